"""The op registry: every op qkvflow knows, declared once.

An :class:`OpSpec` says what an op means (``doc``), which :class:`Group`
it belongs to, its named-dim shape rule (:mod:`qkvflow.ir.shapes`), how each
of its parameters is initialised, which drawing style it gets and which
values its attributes may take (``choices``: what the kernels implement).
The two stages whose code per op would not belong in the IR attach it to
the op's entry: the executor's NumPy kernel (:mod:`qkvflow.run.kernels`)
and the information-flow transfer (:mod:`qkvflow.passes.flow`), each with
:func:`implement`. Every stage dispatches through this registry
(:func:`spec` fails loudly on an op it does not know) and fails loudly on
an op it does not implement. Adding an op is one :data:`OPS` entry, one kernel, one transfer
and their tests (``tests/ir/test_registry.py`` proves every stage covers
every op).

Groups play the part of tinygrad's ``GroupOp``: a pass that needs a kind of
op asks for the group ("the nearest contraction before the softmax", "a
mask maker") rather than listing op names.
"""

import dataclasses
import enum
from collections.abc import Callable
from typing import NamedTuple

from . import shapes
from .errors import GraphError

__all__ = ["Group", "OpSpec", "Kernel", "OPS", "STYLES", "INITS", "spec", "infer", "implement", "in_group"]


class Group(enum.Enum):
    SOURCE = "a run input"
    SINK = "a run output"
    PARAMETRISED = "owns parameters (named <node path>.<name>)"
    ELEMENTWISE = "maps elements one to one, broadcasting by dim name"
    MOVEMENT = "moves elements between axes without changing them"
    REDUCTION = "reduces over axes"
    CONTRACTION = "a product summed over a shared dim (a scores product or a weighted sum)"
    MASK = "makes a boolean attention mask from token ids"
    ATTENTION = "an attention op named as such by model code"


# Drawing styles (the renderer gives each a node shape and colour).
STYLES = ("io", "projection", "heads", "core", "residual", "mask", "numpy", "param")
# Parameter initialisers (see qkvflow.run.params.init_params).
INITS = {
    "fan_in": "N(0, 1/fan_in), fan_in = the last dim (a torch-style (d_out, d_in) weight)",
    "fan_in_first": "N(0, 1/fan_in), fan_in = the first dim (a (d_in, d_out) weight used as x @ W)",
    "small": "N(0, 0.02)",
    "ones": "1",
    "zeros": "0",
}


class Kernel(NamedTuple):
    """The executor's code for an op: ``call(fn, inputs, attrs, params, sizes)``.

    ``fn`` is the jaxtyping-annotated NumPy function the executor checks
    with beartype (None where ``call`` is plain NumPy on named attrs).
    """

    fn: Callable | None
    call: Callable
    fresh: bool = False  # the result is always a new array, never a view of an input or parameter
    in_place: tuple = ()  # inputs ``call(..., out=input)`` may write into, when read there for the last time
    into: bool = False  # ``call(..., out=array)`` writes its result into a C-ordered array of the result's shape


@dataclasses.dataclass(eq=False)
class OpSpec:
    name: str
    doc: str
    groups: frozenset
    shape: Callable  # (input metas, attrs, params, dims) -> Meta; raises ShapeIssue
    style: str
    init: dict = dataclasses.field(default_factory=dict)  # parameter name -> INITS key
    choices: dict = dataclasses.field(default_factory=dict)  # attr -> the values qkvflow runs
    kernel: Kernel | None = None  # attached by qkvflow.run.kernels
    transfer: Callable | None = None  # attached by qkvflow.passes.flow

    def __repr__(self) -> str:
        return f"OpSpec({self.name!r})"


def _op(name: str, doc: str, groups: tuple, shape: Callable, style: str, choices: dict | None = None,
        **init: str) -> OpSpec:
    return OpSpec(name, doc, frozenset(groups), shape, style, dict(init), dict(choices or {}))


_ELEMENTWISE_FNS = ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt",
                    "ge", "and", "or", "neg", "not", "exp", "log", "sqrt", "tanh", "abs", "square",
                    "astype_float", "astype_bool", "astype_int", "sin", "cos", "reciprocal")


_S, _P, _E, _M = Group.SOURCE, Group.PARAMETRISED, Group.ELEMENTWISE, Group.MOVEMENT
_C, _A, _K = Group.CONTRACTION, Group.ATTENTION, Group.MASK

OPS: dict[str, OpSpec] = {s.name: s for s in (
    _op("input", "a run input (token ids or data); attrs: name, shape, dtype, pad_id",
        (_S,), shapes.feed, "io"),
    _op("embed", "token embedding lookup, times attrs.scale; params: weight (vocab, d_model); "
        "attrs.tied_to names a shared weight", (_P,), shapes.embed, "projection", weight="fan_in"),
    _op("positional", "adds position encodings; attrs: kind (sinusoidal | sinusoidal_half | learned), "
        "offset; learned: params weight (max_positions, d_model)", (_P, _E), shapes.positional,
        "projection", {"kind": ("sinusoidal", "sinusoidal_half", "learned")}, weight="small"),
    _op("linear", "x @ weight.T + bias; params: weight (d_out, d_in), bias (d_out)",
        (_P,), shapes.linear, "projection", weight="fan_in", bias="zeros"),
    _op("split_heads", "(batch, seq, heads*d_head) -> (batch, heads, seq, d_head)",
        (_M,), shapes.split_heads, "heads"),
    _op("merge_heads", "(batch, heads, seq, d_head) -> (batch, seq, heads*d_head)",
        (_M,), shapes.merge_heads, "heads"),
    _op("scores", "q @ k^T * attrs.scale: (..., q_seq, d) x (..., k_seq, d) -> (..., q_seq, k_seq)",
        (_C, _A), shapes.scores, "core"),
    _op("mask", "scores where the mask keeps, -inf elsewhere (mask True = keep)",
        (_E, _A), shapes.mask, "core"),
    _op("softmax", "softmax over attrs.axis; a row that is all -inf gives zeros",
        (_A,), shapes.softmax, "core"),
    _op("attend", "probs @ v: (..., q_seq, k_seq) x (..., k_seq, d) -> (..., q_seq, d)",
        (_C, _A), shapes.attend, "core"),
    _op("add", "a + b with broadcasting by dim name (residual connections)",
        (_E,), shapes.add, "residual"),
    _op("norm", "attrs.kind layer (mean and variance) or rms over the last dim; params: weight, "
        "bias (layer)", (_P,), shapes.norm, "residual", {"kind": ("layer", "rms")}, weight="ones",
        bias="zeros"),
    _op("activation", "attrs.fn relu | gelu (erf) | gelu_tanh | silu",
        (_E,), shapes.pointwise, "projection", {"fn": ("relu", "gelu", "gelu_tanh", "silu")}),
    _op("padding_mask", "ids != attrs.pad_id: True where the token is real (attrs.keep_first: position 0 "
        "always, a start token that is the pad id)",
        (_K,), shapes.padding_mask, "mask"),
    _op("causal_mask", "(seq, seq) True where key position <= query position",
        (_K,), shapes.causal_mask, "mask"),
    _op("unembed", "x @ weight.T (+ bias): logits over the vocabulary; attrs.tied_to names a shared weight",
        (_P,), shapes.unembed, "projection", weight="fan_in", bias="zeros"),
    _op("rotary", "rotary positions: features i and i + d/2 turned by the angle (attrs.offset + position) "
        "* attrs.theta^(-2i/d) along the sequence axis -2 (Llama's rotate_half layout)",
        (_E,), shapes.rotary, "projection"),
    _op("relative_bias", "a learned bias per head from the bucketed distance key - query (T5); inputs: "
        "query-side and key-side ids; attrs: bidirectional, buckets, max_distance; params: weight "
        "(buckets, heads)", (_P,), shapes.relative_bias, "mask", weight="small"),
    _op("output", "a run output; attrs: name", (Group.SINK,), shapes.output, "io"),
    _op("reshape", "reshape to attrs.shape (dim names): split or merge adjacent dims only",
        (_M,), shapes.reshape, "numpy"),
    _op("transpose", "permute axes by attrs.perm", (_M,), shapes.transpose, "numpy"),
    _op("matmul", "a @ b, batched over leading dims", (_C,), shapes.matmul, "numpy"),
    _op("einsum", "numpy einsum with attrs.equation", (_C,), shapes.einsum, "numpy"),
    _op("where", "where(cond, a, b); a scalar side is in attrs.a / attrs.b",
        (_E,), shapes.where, "numpy"),
    _op("reduce", "attrs.fn sum | mean | max | min over attrs.axis, attrs.keepdims",
        (Group.REDUCTION,), shapes.reduce, "numpy", {"fn": ("sum", "mean", "max", "min")}),
    _op("elementwise", "attrs.fn applied to one or two tensors; a scalar side is attrs.const",
        (_E,), shapes.elementwise, "numpy", {"fn": _ELEMENTWISE_FNS}),
    _op("concat", "concatenate along attrs.axis", (_M,), shapes.concat, "numpy"),
    _op("param", "a parameter used as an array (qkvflow.param); attrs: name, shape, init; its one "
        "parameter is named by the node's path", (_S, _P), shapes.param, "param", **{"": "small"}),
    _op("gather", "rows of a table at integer indices: table[ids] (an embedding lookup)",
        (_M,), shapes.gather, "projection"),
    _op("split_part", "part attrs.index of attrs.parts equal parts along attrs.axis (np.split)",
        (_M,), shapes.split_part, "numpy"),
    _op("fill", "a constant attrs.value of shape attrs.shape (dim names) and attrs.dtype: "
        "np.ones((T, T)), np.full((T, T), -inf)", (_S,), shapes.fill, "mask"),
    _op("arange", "the positions 0 .. size(attrs.length) - 1: np.arange(T)", (_S,), shapes.arange, "mask"),
    _op("tril", "the lower triangle, diagonal offset attrs.k (np.tril): of ones, a causal mask when k = 0",
        (_E,), shapes.triangle, "mask"),
    _op("triu", "the upper triangle, diagonal offset attrs.k (np.triu): of -inf with k = 1, a causal bias",
        (_E,), shapes.triangle, "mask"),
    _op("constant", "a small constant array attrs.value (nested lists) of shape attrs.shape, its dims "
        "named by their sizes: rotary frequencies", (_S,), shapes.fill, "mask"),
    _op("slice", "entries attrs.start .. attrs.stop - 1 of a sized dim along attrs.axis: x[..., :half]",
        (_M,), shapes.slice_range, "numpy"),
    _op("pick", "entry attrs.index along attrs.axis, the axis dropped: h[:, -1] (negative from the end)",
        (_M,), shapes.pick, "numpy"),
    _op("reverse", "the entries along attrs.axis backwards: x[:, ::-1]", (_M,), shapes.same_shape, "numpy"),
    _op("cumsum", "running sums along attrs.axis (np.cumsum): along a sequence, entry t sums entries <= t",
        (Group.REDUCTION,), shapes.same_shape, "numpy"),
    _op("roll", "entries shifted by attrs.shift along attrs.axis, wrapping around (np.roll)",
        (_M,), shapes.same_shape, "numpy"),
    _op("prefix", "the first attrs.length entries along attrs.axis: table[:T] (learned positions)",
        (_M,), shapes.prefix, "numpy"),
    _op("repeat", "each entry attrs.repeats times along attrs.axis (np.repeat: K/V heads of "
        "grouped-query attention)", (_M,), shapes.repeat, "numpy"),
)}


def spec(op: str) -> OpSpec:
    """The registry entry of ``op``; GraphError for an op qkvflow does not know."""
    try:
        return OPS[op]
    except (KeyError, TypeError):
        raise GraphError(f"unknown op {op!r}; known ops: {', '.join(OPS)}") from None


def in_group(op: str, group: Group) -> bool:
    entry = OPS.get(op)
    return entry is not None and group in entry.groups


def infer(op: str, ins: list, attrs: dict, params: dict, dims: dict):
    """Output meta of ``op`` by its shape rule; raises ShapeIssue on a named-dim mistake."""
    return spec(op).shape(ins, attrs, params, dims)


def implement(stage: str, *names: str):
    """Attach a stage's code to ops: ``@implement("transfer", "linear", "norm")``.

    ``stage`` is ``kernel`` or ``transfer``. An unknown op or a second
    implementation of the same stage is a programming error, raised at import.
    """
    if stage not in ("kernel", "transfer"):
        raise ValueError(f"unknown stage {stage!r}")

    def register(impl):
        for name in names:
            entry = OPS[name]
            if getattr(entry, stage) is not None:
                raise ValueError(f"op {name!r} already has a {stage}")
            setattr(entry, stage, impl)
        return impl

    return register

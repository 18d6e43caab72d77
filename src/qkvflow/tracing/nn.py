"""The ops model code calls: one function per op, traced or eager.

Every function works on :class:`~qkvflow.tracing.tensor.Sym` values while
tracing (recording one node) and on NumPy arrays in an eager run (computing
with the kernel of the same op). Array methods and NumPy functions on a
``Sym`` (``reshape``, ``transpose``, ``@``, ``np.einsum``, ``np.where``,
...) are recorded by :mod:`qkvflow.tracing.tensor` and re-exported here, so a
block written in plain NumPy style is traced as written.

Parametrised ops (``embed``, ``linear``, ``norm``, learned ``positional``,
``unembed``) take a ``name``: the parameter path is ``<scope>.<name>.weight``.
"""

import ast
import functools
import math
import re
import types
import typing

import numpy as np

from ..ir.dims import name_of
from ..ir.errors import TraceError
from .context import Eager, current
from .tensor import (Sym, apply, concat, einsum, elementwise, index, matmul, param, reduce, reshape,
                     split, swapaxes, tracer, transpose, where)

__all__ = [
    "input", "embed", "positional", "linear", "split_heads", "merge_heads",
    "scores", "scale", "mask", "softmax", "attend", "add", "residual", "norm",
    "activation", "padding_mask", "causal_mask", "unembed", "rotary", "relative_bias", "output",
    "reshape", "transpose", "swapaxes", "matmul", "einsum", "where", "reduce",
    "elementwise", "concat", "concat_heads", "index", "split", "param", "mark_memory", "attention",
]


def concat_heads(parts):
    """Concatenate per-head outputs (batch, seq, d_head) x heads -> (batch, seq, heads*d_head)."""
    return concat(parts, axis=-1)


# --- inputs, embeddings, positions ------------------------------------------

def input(name: str, shape: tuple, dtype: str = "int", *, pad_id: int | None = None,  # noqa: A001
          default: int | None = None):
    """A run input, e.g. ``input("src_ids", ("batch", "src"), pad_id=0)``.

    An ``int`` input holds token ids; its last dim is a sequence dim, and
    ``pad_id`` (if any) is the id of its padding token. An input with a
    ``default`` may be left out of a run: it is then filled with that value
    in the shape the other inputs give (BERT's token types, all 0).
    """
    active = tracer()
    if active is not None:
        _check_input(active, name, shape, dtype, pad_id)
        if default is not None and (isinstance(default, bool) or not isinstance(default, (int, np.integer))):
            raise TraceError(f"input {name!r}: default must be an integer, got {default!r}"[:300])
        attrs = {"name": name, "shape": tuple(name_of(d) for d in shape), "dtype": dtype}
        if pad_id is not None:
            attrs["pad_id"] = int(pad_id)
        if default is not None:
            attrs["default"] = int(default)
        return active.record_input(name, attrs)
    ctx = current()
    if isinstance(ctx, Eager) and name not in ctx.feeds and default is not None:
        return None
    if not isinstance(ctx, Eager) or name not in ctx.feeds:
        raise TraceError(f"input {name!r} was not given")
    return np.asarray(ctx.feeds[name])


def _check_input(ctx, name, shape, dtype, pad_id) -> None:
    if not isinstance(name, str) or not name:
        raise TraceError(f"an input's name must be a non-empty string, got {name!r}"[:200])
    if isinstance(shape, str) or not isinstance(shape, (tuple, list)):
        raise TraceError(f"input {name!r}: shape must be a tuple of dim names, e.g. (\"batch\", \"seq\"), "
                         f"got {shape!r}"[:300])
    for d in shape:
        dim = d if isinstance(d, str) else getattr(d, "name", None)
        if dim not in ctx.dims:
            raise TraceError(f"input {name!r}: {d!r} is not a dim of the model; known dims: "
                             f"{', '.join(ctx.dims)}"[:300])
    if dtype not in ("int", "float", "bool"):
        raise TraceError(f"input {name!r}: dtype {dtype!r} is not one of int, float, bool")
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer))
                               or pad_id < 0 or dtype != "int"):
        raise TraceError(f"input {name!r}: pad_id must be a non-negative integer token id of an int "
                         f"input, got {pad_id!r}"[:300])


def embed(ids, *, vocab="vocab", d_model="d_model", scale: float = 1.0, name: str = "embed",
          tied_to: str | None = None):
    """Token embedding lookup: (batch, seq) ids -> (batch, seq, d_model).

    ``tied_to`` reuses another node's weight by parameter path.
    """
    shape = (name_of(vocab), name_of(d_model))
    if tied_to:
        return apply("embed", [ids], name=name,
                      attrs={"scale": float(scale), "tied_to": tied_to, "tied_shape": shape})
    return apply("embed", [ids], name=name, attrs={"scale": float(scale)}, params={"weight": shape})


def positional(x, kind: str = "sinusoidal", *, max_positions="max_positions", offset: int = 0,
               name: str = "positional"):
    """Add position encodings: sinusoidal (interleaved), sinusoidal_half or learned."""
    params = None
    if kind == "learned":
        params = {"weight": (name_of(max_positions), x.names[-1] if isinstance(x, Sym) else "d_model")}
    return apply("positional", [x], name=name, attrs={"kind": kind, "offset": int(offset)}, params=params)


# --- projections and attention ---------------------------------------------

def linear(x, d_out, *, name: str, bias: bool = True):
    """``x @ W.T + b`` with W of shape (d_out, d_in); d_in is x's last dim."""
    d_in = x.names[-1] if isinstance(x, Sym) else "d_in"
    params = {"weight": (name_of(d_out), d_in)}
    if bias:
        params["bias"] = (name_of(d_out),)
    return apply("linear", [x], name=name, params=params)


def split_heads(x, heads="heads", d_head="d_head"):
    """(batch, seq, heads*d_head) -> (batch, heads, seq, d_head)."""
    return apply("split_heads", [x], attrs={"heads": name_of(heads), "d_head": name_of(d_head)})


def merge_heads(x):
    """(batch, heads, seq, d_head) -> (batch, seq, heads*d_head)."""
    return apply("merge_heads", [x])


def scores(q, k, scale: float):
    """q @ k^T * scale: (b, h, q_seq, d) x (b, h, k_seq, d) -> (b, h, q_seq, k_seq)."""
    return apply("scores", [q, k], attrs={"scale": float(scale)})


def scale(x, factor: float):
    """``x * factor`` as its own node (e.g. the 1/sqrt(d_head) of attention scores)."""
    return apply("elementwise", [x], name="scale", attrs={"fn": "mul", "const": float(factor)})


def mask(x, keep):
    """Scores where ``keep`` is True, -inf elsewhere."""
    return apply("mask", [x, keep])


def softmax(x, axis: int = -1):
    """Softmax over ``axis``; a row that is all -inf gives zeros, not NaN."""
    return apply("softmax", [x], attrs={"axis": int(axis)})


def attend(probs, v):
    """probs @ v: (b, h, q_seq, k_seq) x (b, h, k_seq, d) -> (b, h, q_seq, d)."""
    return apply("attend", [probs, v], roles=["probs", "v"])


def add(a, b):
    return apply("add", [a, b])


def residual(x, y):
    """``x + y`` where x is the residual stream."""
    return apply("add", [x, y], roles=["residual", "x"])


def norm(x, kind: str = "layer", *, eps: float = 1e-5, name: str, bias: bool = True):
    """LayerNorm (kind="layer") or RMSNorm (kind="rms") over the last dim."""
    d = x.names[-1] if isinstance(x, Sym) else "d"
    params = {"weight": (d,)}
    if kind == "layer" and bias:
        params["bias"] = (d,)
    return apply("norm", [x], name=name, attrs={"kind": kind, "eps": float(eps)}, params=params)


def activation(x, fn: str):
    """relu, gelu (erf), gelu_tanh or silu."""
    return apply("activation", [x], name=fn, attrs={"fn": fn})


def padding_mask(ids, pad_id: int, *, keep_first: bool = False, name: str = "padding_mask"):
    """True where the token is not padding: (batch, seq) -> (batch, seq). ``keep_first``:
    position 0 is never padding (a decoder whose start token is the pad id: T5, Marian)."""
    attrs = {"pad_id": int(pad_id)}
    if keep_first:
        attrs["keep_first"] = True
    return apply("padding_mask", [ids], name=name, attrs=attrs)


def causal_mask(ids, *, name: str = "causal_mask"):
    """(seq, seq), True where key position <= query position."""
    return apply("causal_mask", [ids], name=name)


def unembed(x, *, vocab="vocab", tied_to: str | None = None, bias: bool = False, name: str = "unembed"):
    """Logits: x @ W.T (+ b) with W (vocab, d_model); ``tied_to`` reuses a weight by path;
    ``bias`` adds a learned bias per vocabulary entry (BART's ``final_logits_bias``)."""
    d = x.names[-1] if isinstance(x, Sym) else "d_model"
    params = {"bias": (name_of(vocab),)} if bias else {}
    if tied_to:
        return apply("unembed", [x], name=name, params=params or None,
                      attrs={"tied_to": tied_to, "tied_shape": (name_of(vocab), d)})
    return apply("unembed", [x], name=name, params={"weight": (name_of(vocab), d), **params})


def rotary(x, *, theta: float = 10000.0, offset: int = 0, name: str = "rotary"):
    """Rotary positions on (..., seq, d_head): features i and i + d_head/2 turned by
    the angle position * theta^(-2i/d_head) (Llama's layout)."""
    return apply("rotary", [x], name=name, attrs={"theta": float(theta), "offset": int(offset)})


def relative_bias(q_ids, k_ids, *, bidirectional: bool, max_distance: int = 128, buckets="buckets",
                  heads="heads", name: str = "relative_bias"):
    """T5's position bias (heads, q_seq, k_seq): a learned scalar per head for each bucket
    of the distance key - query; ``q_ids`` and ``k_ids`` give the two sequences."""
    return apply("relative_bias", [q_ids, k_ids], name=name,
                 attrs={"bidirectional": bool(bidirectional), "max_distance": int(max_distance)},
                 params={"weight": (name_of(buckets), name_of(heads))})


def output(x, name: str):
    active = tracer()
    if active is None:
        return x
    return active.record("output", [x], name=name, attrs={"name": name})


def mark_memory(x):
    """Mark ``x`` as the encoder's final output that cross-attention reads."""
    active = tracer()
    if active is not None:
        active.graph.graph["memory"] = x.node
    return x


# --- declared attention blocks -----------------------------------------------------

_KIND_SCOPE = {"encoder_self": "self_attn", "decoder_self": "self_attn", "cross": "cross_attn"}
_MASK_WORD = re.compile(r"causal|[A-Za-z_]\w*_padding")


def _declared_shapes(fn) -> dict:
    """arg -> declared dim names, from jaxtyping annotations: objects, or the
    strings ``from __future__ import annotations`` leaves (read without
    evaluating them, so declaring a block needs no jaxtyping import)."""
    shapes = {}
    for arg, ann in getattr(fn, "__annotations__", {}).items():
        dim_str = _dim_str_of(ann) if isinstance(ann, str) else getattr(ann, "dim_str", None)
        if dim_str is not None:
            shapes[arg] = tuple(dim_str.split())
    return shapes


def _dim_str_of(annotation: str) -> str | None:
    """The dims of a written ``Dtype[Array, "dims"]``; None for anything else."""
    try:
        tree = ast.parse(annotation, mode="eval").body
    except SyntaxError:
        return None
    if isinstance(tree, ast.Subscript) and isinstance(tree.slice, ast.Tuple) and len(tree.slice.elts) == 2:
        dims = tree.slice.elts[1]
        if isinstance(dims, ast.Constant) and isinstance(dims.value, str):
            return dims.value
    return None


def _type_checked(fn):
    """``fn`` checked by jaxtyping + beartype on every call. Annotations left as
    strings are resolved first, with jaxtyping's dtype names available even when
    the module imports them only for type checkers."""
    import jaxtyping
    from beartype import beartype
    if any(isinstance(a, str) for a in fn.__annotations__.values()):
        names = {k: v for k, v in vars(jaxtyping).items() if not k.startswith("_")}
        hints = typing.get_type_hints(fn, globalns={**names, **fn.__globals__})
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__, copy.__qualname__, copy.__module__ = fn.__kwdefaults__, fn.__qualname__, fn.__module__
        copy.__annotations__ = hints
        fn = copy
    return jaxtyping.jaxtyped(typechecker=beartype)(fn)


def attention(kind: str, *, q: str, k: str, v: str, mask: str, scale="sqrt"):
    """Declare an attention block: its kind, Q/K/V provenance and mask.

    ``kind`` is ``encoder_self`` (bidirectional self-attention),
    ``decoder_self`` (masked self-attention) or ``cross``; ``q``, ``k``,
    ``v`` name the state each is read from: a stream of the model (``encoder``,
    ``decoder`` or the model's own names: that stream's current state) or
    ``memory`` (the final output another stream reads, see ``mark_memory``);
    ``mask`` is ``none``, or ``+``-joined ``causal`` and ``<dim>_padding``
    for a sequence dim (``src_padding``, ``tgt_padding``, ``seq_padding``).
    ``scale`` is what the scores are multiplied by: ``"sqrt"`` (the default,
    1/sqrt of the dim Q and K are contracted over, d_head), ``"none"`` (T5)
    or a number. Shapes are declared with jaxtyping annotations on the
    function. The passes compare these declarations with what the code does.
    """
    if kind not in _KIND_SCOPE:
        raise TraceError(f"attention kind {kind!r}: expected one of {', '.join(_KIND_SCOPE)}")
    if scale not in ("sqrt", "none") and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                          or not math.isfinite(scale) or scale <= 0):
        raise TraceError(f"attention scale={scale!r}: expected 'sqrt', 'none' or a positive number")
    for role, state in (("q", q), ("k", k), ("v", v)):
        if not isinstance(state, str) or not state.isidentifier():
            raise TraceError(f"attention {role}={state!r}: expected a stream name or 'memory'")
    masks = [m.strip() for m in str(mask).split("+")]
    if masks != ["none"] and (not all(_MASK_WORD.fullmatch(m) for m in masks) or len(set(masks)) < len(masks)):
        raise TraceError(
            f"attention mask={mask!r}: expected 'none' or '+'-joined 'causal' and "
            "'<sequence dim>_padding' (e.g. 'causal+tgt_padding')"
        )

    def decorate(fn):
        declared = {"q": q, "k": k, "v": v, "mask": mask, "scale": scale}
        shapes = _declared_shapes(fn)
        code = fn.__code__
        where_defined = f"{code.co_filename}:{code.co_firstlineno}"
        checked = []

        @functools.wraps(fn)
        def block(*args, name: str | None = None, **kwargs):
            ctx = current()
            scope_name = name or _KIND_SCOPE[kind]
            if ctx is None:
                return fn(*args, **kwargs)
            block_name = _KIND_SCOPE[kind]
            with ctx.scope(scope_name, block=block_name, attention=kind):
                if ctx.tracing:
                    bound = _bind(fn, args, kwargs)
                    out = fn(*args, **kwargs)
                    ctx.declare_attention({
                        "kind": kind, "declared": dict(declared), "declared_shapes": dict(shapes),
                        "function": fn.__qualname__, "source": where_defined,
                    }, bound, out)
                    return out
                if not checked:
                    checked.append(_type_checked(fn))
                return checked[0](*args, **kwargs)

        block.declaration = {"kind": kind, **declared}
        return block

    return decorate


def _bind(fn, args, kwargs) -> dict:
    import inspect
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as err:
        raise TraceError(f"calling attention block {fn.__qualname__}: {err}") from err
    return dict(bound.arguments)

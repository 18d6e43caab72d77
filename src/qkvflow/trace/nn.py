"""The ops model code calls: one function per op, traced or eager.

Every function works on :class:`~qkvflow.tracer.Sym` values while tracing
(recording one node) and on NumPy arrays in an eager run (computing with
the kernel of the same op). Array methods and NumPy functions on a ``Sym``
(``reshape``, ``transpose``, ``@``, ``np.einsum``, ``np.where``, ...) land
here too, so a block written in plain NumPy style is traced as written.

Parametrised ops (``embed``, ``linear``, ``norm``, learned ``positional``,
``unembed``) take a ``name``: the parameter path is ``<scope>.<name>.weight``.
"""

import functools
import math
import numbers

import numpy as np

from .context import Eager, current
from ..ir.dims import DataDim, Dim, name_of, size_of
from ..ir.errors import TraceError
from .tracer import Sym, Tracer

__all__ = [
    "input", "embed", "positional", "linear", "split_heads", "merge_heads",
    "scores", "scale", "mask", "softmax", "attend", "add", "residual", "norm",
    "activation", "padding_mask", "causal_mask", "unembed", "output",
    "reshape", "transpose", "swapaxes", "matmul", "einsum", "where", "reduce",
    "elementwise", "concat", "concat_heads", "index", "mark_memory", "attention",
]


def _tracer() -> Tracer | None:
    ctx = current()
    return ctx if isinstance(ctx, Tracer) else None


def _eager_params(name: str, spec: dict, attrs: dict) -> dict:
    ctx = current()
    if not isinstance(ctx, Eager):
        raise TraceError(f"{name} has parameters: run it inside qkvflow.eager(...) or trace it")
    params = {p: ctx.param(ctx.path(f"{name}.{p}")) for p in (spec or {})}
    if attrs.get("tied_to"):
        params["weight"] = ctx.param(attrs["tied_to"])
    return params


def _apply(op: str, args: list, *, name: str | None = None, attrs: dict | None = None,
           params: dict | None = None, roles: list | None = None):
    """Record ``op`` while tracing, or run its kernel on arrays."""
    attrs = attrs or {}
    tracer = _tracer()
    if tracer is not None:
        return tracer.record(op, args, name=name, attrs=attrs, params=params, roles=roles)
    from ..run.kernels import KERNELS
    kernel, call = KERNELS[op]
    values = _eager_params(name or op, params, attrs) if (params or attrs.get("tied_to")) else {}
    ctx = current()
    sizes = dict(ctx.dims) if ctx is not None else {}
    return call(kernel, [np.asarray(a) for a in args], attrs, values, sizes)


# --- inputs, embeddings, positions ------------------------------------------

def input(name: str, shape: tuple, dtype: str = "int"):  # noqa: A001 - mirrors the op name
    """A run input, e.g. ``input("src_ids", ("batch", "src"))``."""
    tracer = _tracer()
    if tracer is not None:
        sym = tracer.record("input", [], name=name, attrs={"name": name, "shape": tuple(shape), "dtype": dtype})
        tracer.graph.graph["inputs"].append(sym.node)
        return sym
    ctx = current()
    if not isinstance(ctx, Eager) or name not in ctx.feeds:
        raise TraceError(f"input {name!r} was not given")
    return np.asarray(ctx.feeds[name])


def embed(ids, *, vocab="vocab", d_model="d_model", scale: float = 1.0, name: str = "embed",
          tied_to: str | None = None):
    """Token embedding lookup: (batch, seq) ids -> (batch, seq, d_model).

    ``tied_to`` reuses another node's weight by parameter path.
    """
    shape = (name_of(vocab), name_of(d_model))
    if tied_to:
        return _apply("embed", [ids], name=name,
                      attrs={"scale": float(scale), "tied_to": tied_to, "tied_shape": shape})
    return _apply("embed", [ids], name=name, attrs={"scale": float(scale)}, params={"weight": shape})


def positional(x, kind: str = "sinusoidal", *, max_positions="max_positions", offset: int = 0,
               name: str = "positional"):
    """Add position encodings: sinusoidal (interleaved), sinusoidal_half or learned."""
    params = None
    if kind == "learned":
        params = {"weight": (name_of(max_positions), x.names[-1] if isinstance(x, Sym) else "d_model")}
    return _apply("positional", [x], name=name, attrs={"kind": kind, "offset": int(offset)}, params=params)


# --- projections and attention ---------------------------------------------

def linear(x, d_out, *, name: str, bias: bool = True):
    """``x @ W.T + b`` with W of shape (d_out, d_in); d_in is x's last dim."""
    d_in = x.names[-1] if isinstance(x, Sym) else "d_in"
    params = {"weight": (name_of(d_out), d_in)}
    if bias:
        params["bias"] = (name_of(d_out),)
    return _apply("linear", [x], name=name, params=params)


def split_heads(x, heads="heads", d_head="d_head"):
    """(batch, seq, heads*d_head) -> (batch, heads, seq, d_head)."""
    return _apply("split_heads", [x], attrs={"heads": name_of(heads), "d_head": name_of(d_head)})


def merge_heads(x):
    """(batch, heads, seq, d_head) -> (batch, seq, heads*d_head)."""
    return _apply("merge_heads", [x])


def scores(q, k, scale: float):
    """q @ k^T * scale: (b, h, q_seq, d) x (b, h, k_seq, d) -> (b, h, q_seq, k_seq)."""
    return _apply("scores", [q, k], attrs={"scale": float(scale)})


def scale(x, factor: float):
    """``x * factor`` as its own node (e.g. the 1/sqrt(d_head) of attention scores)."""
    return _apply("elementwise", [x], name="scale", attrs={"fn": "mul", "const": float(factor)})


def mask(x, keep):
    """Scores where ``keep`` is True, -inf elsewhere."""
    return _apply("mask", [x, keep])


def softmax(x, axis: int = -1):
    """Softmax over ``axis``; a row that is all -inf gives zeros, not NaN."""
    return _apply("softmax", [x], attrs={"axis": int(axis)})


def attend(probs, v):
    """probs @ v: (b, h, q_seq, k_seq) x (b, h, k_seq, d) -> (b, h, q_seq, d)."""
    return _apply("attend", [probs, v], roles=["probs", "v"])


def add(a, b):
    return _apply("add", [a, b])


def residual(x, y):
    """``x + y`` where x is the residual stream."""
    return _apply("add", [x, y], roles=["residual", "x"])


def norm(x, kind: str = "layer", *, eps: float = 1e-5, name: str, bias: bool = True):
    """LayerNorm (kind="layer") or RMSNorm (kind="rms") over the last dim."""
    d = x.names[-1] if isinstance(x, Sym) else "d"
    params = {"weight": (d,)}
    if kind == "layer" and bias:
        params["bias"] = (d,)
    return _apply("norm", [x], name=name, attrs={"kind": kind, "eps": float(eps)}, params=params)


def activation(x, fn: str):
    """relu, gelu (erf), gelu_tanh or silu."""
    return _apply("activation", [x], name=fn, attrs={"fn": fn})


def padding_mask(ids, pad_id: int, *, name: str = "padding_mask"):
    """True where the token is not padding: (batch, seq) -> (batch, seq)."""
    return _apply("padding_mask", [ids], name=name, attrs={"pad_id": int(pad_id)})


def causal_mask(ids, *, name: str = "causal_mask"):
    """(seq, seq), True where key position <= query position."""
    return _apply("causal_mask", [ids], name=name)


def unembed(x, *, vocab="vocab", tied_to: str | None = None, name: str = "unembed"):
    """Logits: x @ W.T with W (vocab, d_model); ``tied_to`` reuses a weight by path."""
    d = x.names[-1] if isinstance(x, Sym) else "d_model"
    if tied_to:
        return _apply("unembed", [x], name=name,
                      attrs={"tied_to": tied_to, "tied_shape": (name_of(vocab), d)})
    return _apply("unembed", [x], name=name, params={"weight": (name_of(vocab), d)})


def output(x, name: str):
    tracer = _tracer()
    if tracer is None:
        return x
    return tracer.record("output", [x], name=name, attrs={"name": name})


def mark_memory(x):
    """Mark ``x`` as the encoder's final output that cross-attention reads."""
    tracer = _tracer()
    if tracer is not None:
        tracer.graph.graph["memory"] = x.node
    return x


# --- NumPy-level ops ----------------------------------------------------------

def _resolve_reshape(x: Sym, shape: tuple) -> tuple:
    names, unknown = [], None
    for i, d in enumerate(shape):
        if isinstance(d, (Dim, DataDim, str)):
            names.append(name_of(d))
        elif isinstance(d, numbers.Integral) and int(d) == 1:
            names.append("1")
        elif isinstance(d, numbers.Integral) and int(d) == -1 and unknown is None:
            unknown = i
            names.append(None)
        else:
            raise TraceError(
                f"reshape of {x.node} to {shape!r}: give dims by name (from .shape or "
                f"qkvflow.dim) or -1, not the bare size {d!r}"
            )
    if unknown is not None:
        names[unknown] = _infer_minus_one(x, names)
    return tuple(names)


def _infer_minus_one(x: Sym, names: list) -> str:
    """The name of a reshape's -1: the input's dims the other names leave over,
    or, when a sized dim is split by other names (d_model -> heads, -1), the one
    model dim of the left-over size."""
    remaining = [f for n in x.names if n != "1" for f in n.split("*")]
    unmatched = []
    for n in names:
        if n is None or n == "1":
            continue
        for f in n.split("*"):
            if f in remaining:
                remaining.remove(f)
            else:
                unmatched.append(f)
    if not unmatched:
        return "*".join(remaining) or "1"
    dims = x.tracer.dims
    have = [size_of(f, dims) for f in remaining]
    taken = [size_of(f, dims) for f in unmatched]
    if None not in have and None not in taken and math.prod(taken) and math.prod(have) % math.prod(taken) == 0:
        size = math.prod(have) // math.prod(taken)
        fits = [d for d, s in dims.items() if s == size]
        if len(fits) == 1:
            return fits[0]
    raise TraceError(
        f"reshape of {x.node} {x.names} to {tuple(n or -1 for n in names)}: cannot tell which dim -1 "
        "stands for; name it (e.g. qkvflow.dim(\"d_head\"))"
    )


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if not isinstance(x, Sym):
        return np.reshape(x, tuple(int(s) for s in shape))
    return _apply("reshape", [x], attrs={"shape": _resolve_reshape(x, shape)})


def transpose(x, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    if not isinstance(x, Sym):
        return np.transpose(x, axes or None)
    perm = tuple(int(a) % x.ndim for a in axes) if axes else tuple(reversed(range(x.ndim)))
    if sorted(perm) != list(range(x.ndim)):
        raise TraceError(f"transpose of {x.node} with axes {axes!r} is not a permutation of {x.ndim} axes")
    return _apply("transpose", [x], attrs={"perm": perm})


def swapaxes(x, a: int, b: int):
    if not isinstance(x, Sym):
        return np.swapaxes(x, a, b)
    perm = list(range(x.ndim))
    a, b = a % x.ndim, b % x.ndim
    perm[a], perm[b] = perm[b], perm[a]
    return _apply("transpose", [x], attrs={"perm": tuple(perm)})


def matmul(a, b):
    if not isinstance(a, Sym) and not isinstance(b, Sym):
        return np.matmul(a, b)
    return _apply("matmul", [_need_sym(a, "matmul"), _need_sym(b, "matmul")])


def einsum(equation: str, *operands):
    if not any(isinstance(o, Sym) for o in operands):
        return np.einsum(equation, *operands)
    if "..." in equation or "->" not in equation:
        raise TraceError(f"einsum '{equation}': write it with an explicit '->' and no '...' to be traced")
    return _apply("einsum", [_need_sym(o, "einsum") for o in operands], attrs={"equation": equation})


def _scalar(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Number) or (isinstance(v, np.ndarray) and v.ndim == 0):
        return float(v)
    return None


def _need_sym(v, what: str) -> Sym:
    if isinstance(v, Sym):
        return v
    raise TraceError(
        f"{what} got a constant {type(v).__name__} while tracing; make it a parameter or an input"
    )


def where(cond, a, b):
    """``np.where`` that traces; a scalar side (e.g. ``-np.inf``) is kept as a constant."""
    if not any(isinstance(v, Sym) for v in (cond, a, b)):
        return np.where(cond, a, b)
    args, attrs = [_need_sym(cond, "where")], {}
    for key, v in (("a", a), ("b", b)):
        s = _scalar(v)
        if s is not None:
            attrs[key] = s
        else:
            args.append(_need_sym(v, "where"))
    return _apply("where", args, attrs=attrs)


def reduce(fn: str, x, axis=None, keepdims: bool = False):
    if not isinstance(x, Sym):
        return getattr(np, fn)(x, axis=axis, keepdims=keepdims)
    axes = tuple(range(x.ndim)) if axis is None else ((axis,) if isinstance(axis, int) else tuple(axis))
    return _apply("reduce", [x], attrs={"fn": fn, "axis": tuple(a % x.ndim for a in axes),
                                        "keepdims": bool(keepdims)})


def elementwise(fn: str, a, b=None):
    """A NumPy elementwise function of one or two operands, one may be a scalar."""
    if b is None:
        return _apply("elementwise", [_need_sym(a, fn)], attrs={"fn": fn})
    sa, sb = _scalar(a), _scalar(b)
    if isinstance(a, Sym) and isinstance(b, Sym):
        return _apply("elementwise", [a, b], attrs={"fn": fn})
    if isinstance(a, Sym) and sb is not None:
        return _apply("elementwise", [a], attrs={"fn": fn, "const": sb})
    if isinstance(b, Sym) and sa is not None:
        return _apply("elementwise", [b], attrs={"fn": fn, "const": sa, "const_first": True})
    raise TraceError(f"{fn} of a traced tensor and a {type(b if isinstance(a, Sym) else a).__name__}: "
                     "only scalars or traced tensors can be combined")


def concat(parts, axis: int = -1):
    if not any(isinstance(p, Sym) for p in parts):
        return np.concatenate(parts, axis=axis)
    syms = [_need_sym(p, "concatenate") for p in parts]
    attrs = {"axis": int(axis)}
    ctx = current()
    heads = ctx.dims.get("heads") if ctx is not None else None
    if heads is not None and len(syms) == heads:
        attrs["count_name"] = "heads"
    return _apply("concat", syms, attrs=attrs)


def concat_heads(parts):
    """Concatenate per-head outputs (batch, seq, d_head) x heads -> (batch, seq, heads*d_head)."""
    return concat(parts, axis=-1)


def index(x, idx):
    """``x[:, None, ...]``: only new axes (None), full slices and Ellipsis trace."""
    if not isinstance(x, Sym):
        return x[idx]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if sum(i is Ellipsis for i in idx) > 1:
        raise TraceError(f"index {idx!r} of {x.node} has more than one '...'")
    if Ellipsis in idx:
        pos = idx.index(Ellipsis)
        fill = x.ndim - sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:pos] + (slice(None),) * fill + idx[pos + 1:]
    names, axis = [], 0
    for i in idx:
        if i is None:
            names.append("1")
        elif isinstance(i, slice) and i == slice(None):
            names.append(x.names[axis])
            axis += 1
        else:
            raise TraceError(
                f"indexing {x.node} with {i!r}: only None, ':' and '...' can be traced"
            )
    names.extend(x.names[axis:])
    return _apply("reshape", [x], attrs={"shape": tuple(names)})


# --- NumPy protocol hooks used by Sym ------------------------------------------

_UFUNCS = {
    "add": "add", "subtract": "sub", "multiply": "mul", "divide": "div", "true_divide": "div",
    "power": "pow", "maximum": "maximum", "minimum": "minimum", "equal": "eq", "not_equal": "ne",
    "less": "lt", "less_equal": "le", "greater": "gt", "greater_equal": "ge",
    "logical_and": "and", "logical_or": "or", "logical_not": "not", "negative": "neg",
    "exp": "exp", "log": "log", "sqrt": "sqrt", "tanh": "tanh", "absolute": "abs", "square": "square",
    "matmul": None,
}


def numpy_ufunc(ufunc, method, inputs, kwargs):
    if method != "__call__" or kwargs or ufunc.__name__ not in _UFUNCS:
        raise TraceError(f"numpy.{ufunc.__name__} ({method}) cannot be traced; see qkvflow.nn")
    if ufunc.__name__ == "matmul":
        return matmul(*inputs)
    return elementwise(_UFUNCS[ufunc.__name__], *inputs)


def _np_sum(a, axis=None, keepdims=False, **_):
    return reduce("sum", a, axis, keepdims)


def _np_mean(a, axis=None, keepdims=False, **_):
    return reduce("mean", a, axis, keepdims)


def _np_max(a, axis=None, keepdims=False, **_):
    return reduce("max", a, axis, keepdims)


def _np_min(a, axis=None, keepdims=False, **_):
    return reduce("min", a, axis, keepdims)


_FUNCTIONS = {
    "einsum": einsum, "matmul": matmul, "where": where, "concatenate": concat,
    "transpose": transpose, "swapaxes": swapaxes, "reshape": reshape,
    "sum": _np_sum, "mean": _np_mean, "max": _np_max, "amax": _np_max, "min": _np_min, "amin": _np_min,
}


def numpy_function(func, args, kwargs):
    fn = _FUNCTIONS.get(func.__name__)
    if fn is None:
        raise TraceError(f"numpy.{func.__name__} cannot be traced; see qkvflow.nn for what can")
    if func.__name__ == "concatenate":
        return concat(args[0], kwargs.get("axis", args[1] if len(args) > 1 else 0))
    if func.__name__ == "reshape":
        shape = args[1] if len(args) > 1 else kwargs["newshape" if "newshape" in kwargs else "shape"]
        return reshape(args[0], *(shape if isinstance(shape, tuple) else (shape,)))
    return fn(*args, **kwargs)


# --- declared attention blocks -----------------------------------------------------

_KIND_SCOPE = {"encoder_self": "self_attn", "decoder_self": "self_attn", "cross": "cross_attn"}
_STATES = ("encoder", "decoder", "memory")
_MASKS = ("none", "causal", "src_padding", "tgt_padding")


def _declared_shapes(fn) -> dict:
    shapes = {}
    for arg, ann in getattr(fn, "__annotations__", {}).items():
        dim_str = getattr(ann, "dim_str", None)
        if dim_str is not None:
            shapes[arg] = tuple(dim_str.split())
    return shapes


def attention(kind: str, *, q: str, k: str, v: str, mask: str):
    """Declare an attention block: its kind, Q/K/V provenance and mask.

    ``kind`` is ``encoder_self``, ``decoder_self`` or ``cross``; ``q``, ``k``,
    ``v`` name the state each is read from: ``encoder`` or ``decoder`` (that
    stream's current state) or ``memory`` (the encoder's final output);
    ``mask`` is ``none``, or ``+``-joined ``causal``, ``src_padding``,
    ``tgt_padding``. Shapes are declared with jaxtyping annotations on the
    function. The tracer compares these declarations with what the code does.
    """
    if kind not in _KIND_SCOPE:
        raise TraceError(f"attention kind {kind!r}: expected one of {', '.join(_KIND_SCOPE)}")
    for role, state in (("q", q), ("k", k), ("v", v)):
        if state not in _STATES:
            raise TraceError(f"attention {role}={state!r}: expected one of {', '.join(_STATES)}")
    masks = [m.strip() for m in mask.split("+")]
    if any(m not in _MASKS for m in masks) or ("none" in masks and len(masks) > 1):
        raise TraceError(
            f"attention mask={mask!r}: expected 'none' or '+'-joined {', '.join(_MASKS[1:])}"
        )

    def decorate(fn):
        declared = {"q": q, "k": k, "v": v, "mask": mask}
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
                if isinstance(ctx, Tracer):
                    path = ctx.here()
                    bound = _bind(fn, args, kwargs)
                    start = len(ctx.order)
                    out = fn(*args, **kwargs)
                    record = {
                        "kind": kind, "declared": dict(declared), "declared_shapes": dict(shapes),
                        "stream": ctx.scope_attrs()["stream"], "layer": ctx.scope_attrs()["layer"],
                        "function": fn.__qualname__, "source": where_defined,
                    }
                    ctx.finish_attention(path, record, bound, out, start)
                    return out
                if not checked:
                    from beartype import beartype
                    from jaxtyping import jaxtyped
                    checked.append(jaxtyped(typechecker=beartype)(fn))
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

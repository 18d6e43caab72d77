"""Symbolic tensors and the NumPy-level ops they record.

:class:`Sym` is what model code holds while it is traced: a graph node with
NumPy-style methods. Its methods, the operators and the NumPy functions and
ufuncs called on it (``reshape``, ``transpose``, ``@``, ``np.einsum``,
``np.where``, sums, ...) all land in the functions below, which record one
node each through :func:`apply`, or compute on arrays in an eager run. The
model-level ops users call (``linear``, ``softmax``, ...) are in
:mod:`qkvflow.tracing.nn`, built on the same :func:`apply`.
"""

import contextlib
import math
import numbers
import threading

import numpy as np

from ..ir.dims import DataDim, Dim, dims_of_size, name_of, size_of
from ..ir.errors import TraceError
from ..ir.shapes import Meta
from .context import Eager, current

__all__ = [
    "Sym", "apply", "reshape", "transpose", "swapaxes", "matmul", "einsum", "where", "reduce",
    "elementwise", "concat", "index", "split", "param", "expand_dims", "squeeze", "stack", "var",
    "astype", "repeat", "constant", "numpy_ufunc", "numpy_function",
]


def tracer():
    """The active tracer, or None outside a trace."""
    ctx = current()
    return ctx if ctx is not None and ctx.tracing else None


def _eager_params(name: str, spec: dict, attrs: dict) -> dict:
    ctx = current()
    if not isinstance(ctx, Eager):
        raise TraceError(f"{name} has parameters: run it inside qkvflow.eager(...) or trace it")
    params = {p: ctx.param(ctx.path(f"{name}.{p}")) for p in (spec or {})}
    if attrs.get("tied_to"):
        params["weight"] = ctx.param(attrs["tied_to"])
    return params


def apply(op: str, args: list, *, name: str | None = None, attrs: dict | None = None,
           params: dict | None = None, roles: list | None = None):
    """Record ``op`` while tracing, or run its kernel on arrays."""
    attrs = attrs or {}
    active = tracer()
    if active is not None:
        return active.record(op, args, name=name, attrs=attrs, params=params, roles=roles)
    from ..ir.ops import spec
    from ..run import kernels  # noqa: F401 - attaches the kernels to the registry
    kernel, call = spec(op).kernel[:2]
    values = _eager_params(name or op, params, attrs) if (params or attrs.get("tied_to")) else {}
    ctx = current()
    sizes = dict(ctx.dims) if ctx is not None else {}
    return call(kernel, [np.asarray(a) for a in args], attrs, values, sizes)


class Sym:
    """A symbolic tensor: a graph node plus NumPy-style methods."""

    __slots__ = ("tracer", "node")
    __array_priority__ = 1000

    def __init__(self, tracer: "Tracer", node: str) -> None:
        self.tracer = tracer
        self.node = node

    # --- what the node knows -------------------------------------------------
    @property
    def meta(self) -> Meta:
        d = self.tracer.graph.nodes[self.node]
        return Meta(d["shape"], d["key_axis"], d["dtype"])

    @property
    def names(self) -> tuple:
        return self.tracer.graph.nodes[self.node]["shape"]

    @property
    def shape(self) -> tuple:
        return tuple(self.tracer.dim_for(n) for n in self.names)

    @property
    def ndim(self) -> int:
        return len(self.names)

    @property
    def dtype(self) -> str:
        return self.tracer.graph.nodes[self.node]["dtype"]

    def __repr__(self) -> str:
        return f"Sym({self.node}: ({', '.join(self.names)}))"

    def __bool__(self):
        raise TraceError(
            f"the truth value of traced tensor {self.node} is unknown while tracing; "
            "use qkvflow.where instead of an if on array values"
        )

    def __len__(self) -> int:
        first = self.shape[0] if self.ndim else None
        if isinstance(first, Dim):
            return int(first)  # a model dim's size (its name is lost: prefer .shape[0])
        raise TraceError(f"len() of traced tensor {self.node}: its first dim "
                         f"{self.names[0] if self.ndim else '(none)'} has no size while tracing; use .shape[0]")

    # --- NumPy-style methods, all recorded through qkvflow.nn ----------------
    def reshape(self, *shape):
        return reshape(self, *shape)

    def transpose(self, *axes):
        return transpose(self, *axes)

    def swapaxes(self, a: int, b: int):
        return swapaxes(self, a, b)

    @property
    def T(self):
        return transpose(self)

    @property
    def mT(self):
        return swapaxes(self, -1, -2)

    def sum(self, axis=None, keepdims=False):
        return reduce("sum", self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return reduce("mean", self, axis, keepdims)

    def max(self, axis=None, keepdims=False):
        return reduce("max", self, axis, keepdims)

    def min(self, axis=None, keepdims=False):
        return reduce("min", self, axis, keepdims)

    def var(self, axis=None, keepdims=False, ddof=0):
        return var(self, axis, keepdims, ddof)

    def astype(self, dtype, copy=True):
        return astype(self, dtype)

    def squeeze(self, axis=None):
        return squeeze(self, axis)

    def cumsum(self, axis=None):
        return cumsum(self, axis)

    def repeat(self, repeats, axis=None):
        return repeat(self, repeats, axis)

    def __getitem__(self, idx):
        return index(self, idx)

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)

    def _binary(self, fn, other, reverse=False):
        return elementwise(fn, other, self) if reverse else elementwise(fn, self, other)

    def __add__(self, o):
        return self._binary("add", o)

    def __radd__(self, o):
        return self._binary("add", o, True)

    def __sub__(self, o):
        return self._binary("sub", o)

    def __rsub__(self, o):
        return self._binary("sub", o, True)

    def __mul__(self, o):
        return self._binary("mul", o)

    def __rmul__(self, o):
        return self._binary("mul", o, True)

    def __truediv__(self, o):
        return self._binary("div", o)

    def __rtruediv__(self, o):
        return self._binary("div", o, True)

    def __pow__(self, o):
        return self._binary("pow", o)

    def __and__(self, o):
        return self._binary("and", o)

    def __rand__(self, o):
        return self._binary("and", o, True)

    def __or__(self, o):
        return self._binary("or", o)

    def __ror__(self, o):
        return self._binary("or", o, True)

    def __eq__(self, o):  # noqa: D105 - elementwise like NumPy
        return self._binary("eq", o)

    def __ne__(self, o):
        return self._binary("ne", o)

    def __lt__(self, o):
        return self._binary("lt", o)

    def __le__(self, o):
        return self._binary("le", o)

    def __gt__(self, o):
        return self._binary("gt", o)

    def __ge__(self, o):
        return self._binary("ge", o)

    __hash__ = object.__hash__

    def __neg__(self):
        return elementwise("neg", self)

    def __invert__(self):
        return elementwise("not", self)

    # NumPy functions and ufuncs called on a Sym are recorded too.
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return numpy_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return numpy_function(func, args, kwargs)



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
        elif isinstance(d, numbers.Integral) and int(d) > 1:
            names.append(_dim_of_size(x, int(d), shape))  # d_model // heads, or a literal 64
        else:
            raise TraceError(
                f"reshape of {x.node} to {shape!r}: give dims by name (from .shape or "
                f"qkvflow.dim) or -1, not the bare size {d!r}"
            )
    if unknown is not None:
        names[unknown] = _infer_minus_one(x, names)
    return tuple(names)


def _named_size(ctx, size: int, what: str) -> str:
    """The model dim a bare size stands for: the one dim of that size."""
    fits = dims_of_size(ctx.dims, size)
    if len(fits) != 1:
        raise TraceError(f"param {what!r}: the bare size {size} names no one dim; give it by name")
    return fits[0]


def _position(i) -> int | None:
    """An integer index, or a list of one (``h[:, -1]``, ``h[:, [-1]]``), as an int."""
    if isinstance(i, list) and len(i) == 1:
        i = i[0]
    if isinstance(i, numbers.Integral) and not isinstance(i, (bool, Dim)):
        return int(i)
    return None


def _int_bounds(s: slice) -> bool:
    """A slice with plain integer bounds (not dims): x[..., :half], x[..., half:]."""
    bounds = [b for b in (s.start, s.stop) if b is not None]
    return bool(bounds) and all(isinstance(b, numbers.Integral) and not isinstance(b, (Dim, bool))
                                for b in bounds)


def _dim_of_size(x: Sym, size: int, shape: tuple) -> str:
    """The model dim a bare size in a reshape stands for: the one dim of that size."""
    fits = dims_of_size(x.tracer.dims, size)
    if len(fits) == 1:
        return fits[0]
    which = f"dims {', '.join(fits)} all have size {size}" if fits else f"no dim has size {size}"
    raise TraceError(f"reshape of {x.node} to {shape!r}: the bare size {size} names no one dim ({which}); "
                     "give it by name (from .shape or qkvflow.dim)")


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
        fits = dims_of_size(dims, size)
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
    return apply("reshape", [x], attrs={"shape": _resolve_reshape(x, shape)})


def transpose(x, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    if not isinstance(x, Sym):
        return np.transpose(x, axes or None)
    perm = tuple(int(a) % x.ndim for a in axes) if axes else tuple(reversed(range(x.ndim)))
    if sorted(perm) != list(range(x.ndim)):
        raise TraceError(f"transpose of {x.node} with axes {axes!r} is not a permutation of {x.ndim} axes")
    return apply("transpose", [x], attrs={"perm": perm})


def swapaxes(x, a: int, b: int):
    if not isinstance(x, Sym):
        return np.swapaxes(x, a, b)
    perm = list(range(x.ndim))
    a, b = a % x.ndim, b % x.ndim
    perm[a], perm[b] = perm[b], perm[a]
    return apply("transpose", [x], attrs={"perm": tuple(perm)})


def matmul(a, b):
    if not isinstance(a, Sym) and not isinstance(b, Sym):
        return np.matmul(a, b)
    return apply("matmul", [_need_sym(a, "matmul"), _need_sym(b, "matmul")])


def einsum(equation: str, *operands):
    if not any(isinstance(o, Sym) for o in operands):
        return np.einsum(equation, *operands)
    if "..." in equation or "->" not in equation:
        raise TraceError(f"einsum '{equation}': write it with an explicit '->' and no '...' to be traced")
    return apply("einsum", [_need_sym(o, "einsum") for o in operands], attrs={"equation": equation})


CONSTANT_LIMIT = 1 << 16  # entries a constant array may have (it is stored in the graph)


def constant(value) -> Sym:
    """A small NumPy array as a graph constant; its dims are named by their sizes."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf" or arr.size > CONSTANT_LIMIT or arr.ndim == 0:
        raise TraceError(f"a constant array of shape {arr.shape} and dtype {arr.dtype} cannot be traced: "
                         f"only numeric arrays of up to {CONSTANT_LIMIT} entries")
    kind = {"b": "bool", "i": "int", "u": "int"}.get(arr.dtype.kind, "float")
    shape = tuple(str(n) for n in arr.shape)
    return tracer().record("constant", [], name="constant",
                           attrs={"shape": shape, "dtype": kind, "value": arr.tolist()})


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
    return apply("where", args, attrs=attrs)


def reduce(fn: str, x, axis=None, keepdims: bool = False):
    if not isinstance(x, Sym):
        return getattr(np, fn)(x, axis=axis, keepdims=keepdims)
    axes = tuple(range(x.ndim)) if axis is None else (
        (axis,) if isinstance(axis, numbers.Integral) else tuple(axis))
    return apply("reduce", [x], attrs={"fn": fn, "axis": tuple(_axis(x, a, x.ndim, fn) for a in axes),
                                        "keepdims": bool(keepdims)})


def elementwise(fn: str, a, b=None):
    """A NumPy elementwise function of one or two operands, one may be a scalar."""
    if b is None:
        return apply("elementwise", [_need_sym(a, fn)], attrs={"fn": fn})
    sa, sb = _scalar(a), _scalar(b)
    if isinstance(a, Sym) and isinstance(b, Sym):
        return apply("elementwise", [a, b], attrs={"fn": fn})
    if isinstance(a, Sym) and sb is not None:
        return apply("elementwise", [a], attrs={"fn": fn, "const": sb})
    if isinstance(b, Sym) and sa is not None:
        return apply("elementwise", [b], attrs={"fn": fn, "const": sa, "const_first": True})
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):  # a constant table (e.g. rotary frequencies)
        return apply("elementwise", [a if isinstance(a, Sym) else constant(a),
                                     b if isinstance(b, Sym) else constant(b)], attrs={"fn": fn})
    raise TraceError(f"{fn} of a traced tensor and a {type(b if isinstance(a, Sym) else a).__name__}: "
                     "only scalars or traced tensors can be combined")


def concat(parts, axis: int = -1):
    if not any(isinstance(p, Sym) for p in parts):
        return np.concatenate(parts, axis=axis)
    syms = [_need_sym(p, "concatenate") for p in parts]
    attrs = {"axis": int(axis)}
    # A loop over a model dim (one part per head) joins to that dim times the part's:
    # the count is named when exactly one model dim has that size.
    ctx = current()
    named = dims_of_size(ctx.dims, len(syms)) if ctx is not None else []
    joined = [s.names[int(axis) % s.ndim] for s in syms]
    literal = all(n != "1" and all(f.isdigit() for f in n.split("*")) for n in joined)
    if len(named) == 1 and not literal:  # literal sizes join to a literal size (2 halves of 2: 2*2)
        attrs["count_name"] = named[0]
    return apply("concat", syms, attrs=attrs)


def index(x, idx):
    """``x[:, None, ...]`` (new axes, full slices, Ellipsis), ``table[:T]`` (the
    first T entries, T a dim from ``.shape``), ``x[..., :half]``, ``x[:, ::-1]``,
    one position ``h[:, -1]`` / ``h[:, [-1]]`` and ``table[ids]`` (rows at
    traced integer ids, an embedding lookup) trace, one such index at a time."""
    if isinstance(idx, Sym):
        if not isinstance(x, Sym) or idx.dtype != "int":
            raise TraceError(f"indexing with traced {idx.dtype} array {idx.node}: only a traced table "
                             "(e.g. qkvflow.param) at integer token ids traces")
        return apply("gather", [x, idx])
    if not isinstance(x, Sym):
        return x[idx]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if sum(i is Ellipsis for i in idx) > 1:
        raise TraceError(f"index {idx!r} of {x.node} has more than one '...'")
    if Ellipsis in idx:
        pos = idx.index(Ellipsis)
        fill = x.ndim - sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:pos] + (slice(None),) * fill + idx[pos + 1:]
    names, axis, prefix = [], 0, None
    for i in idx:
        if i is None:
            names.append("1")
        elif isinstance(i, slice) and i == slice(None):
            names.append(x.names[axis])
            axis += 1
        elif (isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1)
              and isinstance(i.stop, (Dim, DataDim)) and prefix is None):
            prefix = (len(names), axis, i.stop.name)  # table[:T]: the first T rows
            names.append(i.stop.name)
            axis += 1
        elif _position(i) is not None and prefix is None:
            # h[:, -1] drops the axis; h[:, [-1]] keeps it as a 1
            prefix = (len(names), axis, ("pick", _position(i), isinstance(i, list)))
            if isinstance(i, list):
                names.append("1")
            axis += 1
        elif isinstance(i, slice) and i == slice(None, None, -1) and prefix is None:
            prefix = (len(names), axis, "reverse")  # x[:, ::-1]: the axis backwards
            names.append(x.names[axis])
            axis += 1
        elif isinstance(i, slice) and i.step in (None, 1) and prefix is None and _int_bounds(i):
            size = size_of(x.names[axis], x.tracer.dims)
            if size is None:
                raise TraceError(f"indexing {x.node} with {i!r}: a slice with sizes needs a sized dim, "
                                 f"not {x.names[axis]}")
            start, stop, _ = i.indices(size)
            prefix = (len(names), axis, (start, stop))  # x[..., :half]: a range of a sized dim
            names.append(str(max(stop - start, 0)))
            axis += 1
        else:
            raise TraceError(
                f"indexing {x.node} with {i!r}: only None, ':' and '...' can be traced"
            )
    names.extend(x.names[axis:])
    if prefix is not None:
        out_axis, in_axis, length = prefix
        if isinstance(length, tuple) and length[0] == "pick":
            size = size_of(x.names[in_axis], x.tracer.dims)
            if size is not None and not -size <= length[1] < size:
                raise TraceError(f"index {length[1]} of {x.node} is out of range for {x.names[in_axis]} ({size})")
            x = apply("pick", [x], attrs={"axis": in_axis, "index": length[1]})
            if tuple(names) == x.names:
                return x
            return apply("reshape", [x], attrs={"shape": tuple(names)})
        if length == "reverse":
            x = apply("reverse", [x], attrs={"axis": in_axis})
        elif isinstance(length, tuple):
            x = apply("slice", [x], attrs={"axis": in_axis, "start": length[0], "stop": length[1]})
        else:
            x = apply("prefix", [x], attrs={"axis": in_axis, "length": length})
            names[out_axis] = length
        if tuple(names) == x.names:
            return x
    return apply("reshape", [x], attrs={"shape": tuple(names)})


# --- NumPy protocol hooks used by Sym ------------------------------------------

_UFUNCS = {
    "add": "add", "subtract": "sub", "multiply": "mul", "divide": "div", "true_divide": "div",
    "power": "pow", "maximum": "maximum", "minimum": "minimum", "equal": "eq", "not_equal": "ne",
    "less": "lt", "less_equal": "le", "greater": "gt", "greater_equal": "ge",
    "logical_and": "and", "logical_or": "or", "logical_not": "not", "negative": "neg",
    "exp": "exp", "log": "log", "sqrt": "sqrt", "tanh": "tanh", "absolute": "abs", "square": "square",
    "sin": "sin", "cos": "cos", "reciprocal": "reciprocal",
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


def split(x, parts, axis: int = 0) -> list:
    """``np.split(x, n, axis)`` into ``n`` equal parts: a fused ``3*d_model``
    projection splits into three ``d_model`` parts."""
    if not isinstance(x, Sym):
        return np.split(x, parts, axis=axis)
    if not isinstance(parts, numbers.Integral) or int(parts) < 1:
        raise TraceError(f"np.split of {x.node} into {parts!r}: only a number of equal parts traces "
                         "(np.split(x, 3, axis=-1)), not split points")
    axis = _axis(x, axis, x.ndim, "np.split")
    return [apply("split_part", [x], attrs={"axis": axis, "parts": int(parts), "index": i})
            for i in range(int(parts))]


def _axis(x, axis, rank: int, what: str) -> int:
    """``axis`` of a result of ``rank`` axes, as NumPy reads it (negative from the end)."""
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool) or not -rank <= int(axis) < rank:
        raise TraceError(f"{what} of {x.node} {x.names}: axis {axis!r} is out of range for {rank} axes")
    return int(axis) % rank


def cumsum(x, axis=None, **kwargs):
    """``np.cumsum`` along one axis: along a sequence, entry t sums entries <= t."""
    if not isinstance(x, Sym):
        return np.cumsum(x, axis=axis, **kwargs)
    if axis is None or kwargs:
        raise TraceError(f"np.cumsum of {x.node}: give the axis (a flattened cumsum does not trace)")
    return apply("cumsum", [x], attrs={"axis": _axis(x, axis, x.ndim, "np.cumsum")})


def roll(x, shift, axis=None):
    """``np.roll`` along one axis by a whole number of entries (they wrap around)."""
    if not isinstance(x, Sym):
        return np.roll(x, shift, axis=axis)
    if axis is None or not isinstance(shift, numbers.Integral) or isinstance(axis, (tuple, list)):
        raise TraceError(f"np.roll of {x.node}: give one integer shift and one axis")
    return apply("roll", [x], attrs={"axis": _axis(x, axis, x.ndim, "np.roll"), "shift": int(shift)})


def expand_dims(x, axis: int):
    """``np.expand_dims``: a new axis of size 1."""
    if not isinstance(x, Sym):
        return np.expand_dims(x, axis)
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    rank = x.ndim + len(axes)
    axes = tuple(_axis(x, a, rank, "expand_dims") for a in axes)
    new = {int(a) % rank for a in axes}
    rest = iter(x.names)
    names = tuple("1" if a in new else next(rest) for a in range(rank))
    return apply("reshape", [x], attrs={"shape": names})


def squeeze(x, axis=None):
    """``np.squeeze``: drop axes of size 1 (all of them, or ``axis``)."""
    if not isinstance(x, Sym):
        return np.squeeze(x, axis=axis)
    axes = range(x.ndim) if axis is None else [
        _axis(x, a, x.ndim, "squeeze") for a in ((axis,) if isinstance(axis, numbers.Integral) else axis)]
    wrong = [a for a in axes if x.names[a] != "1"]
    if axis is not None and wrong:
        raise TraceError(f"squeeze of {x.node} {x.names} along axis {wrong[0]}: it is "
                         f"{x.names[wrong[0]]}, not an axis of size 1")
    names = tuple(n for a, n in enumerate(x.names) if not (a in axes and n == "1"))
    return apply("reshape", [x], attrs={"shape": names})


def stack(parts, axis: int = 0):
    """``np.stack``: a new axis of one entry per part (named by a model dim of that count)."""
    if not any(isinstance(p, Sym) for p in parts):
        return np.stack(parts, axis=axis)
    syms = [_need_sym(p, "stack") for p in parts]
    axis = _axis(syms[0], axis, syms[0].ndim + 1, "stack")
    return concat([expand_dims(s, axis) for s in syms], axis=axis)


def var(x, axis=None, keepdims: bool = False, ddof: int = 0):
    """``np.var`` (ddof 0): the mean squared distance from the mean."""
    if not isinstance(x, Sym):
        return np.var(x, axis=axis, keepdims=keepdims, ddof=ddof)
    if ddof:
        raise TraceError(f"var of {x.node} with ddof={ddof}: only ddof=0 traces")
    centred = x - reduce("mean", x, axis, True)
    return reduce("mean", centred * centred, axis, keepdims)


_CASTS = {"float": "astype_float", "bool": "astype_bool", "int": "astype_int"}


def astype(x, dtype):
    """``x.astype(dtype)``: to float (any width: the run's dtype decides), bool or int."""
    kind = np.dtype(dtype).kind
    fn = {"f": "astype_float", "b": "astype_bool", "i": "astype_int", "u": "astype_int"}.get(kind)
    if fn is None:
        raise TraceError(f"{x.node}.astype({dtype!r}): only float, bool and int dtypes trace")
    return apply("elementwise", [x], attrs={"fn": fn})


def repeat(x, repeats, axis=None):
    """``np.repeat(x, r, axis)``: each entry ``r`` times (grouped-query attention repeats
    ``kv_heads`` K/V heads ``heads // kv_heads`` times)."""
    if not isinstance(x, Sym):
        return np.repeat(x, repeats, axis=axis)
    if axis is None or not isinstance(repeats, numbers.Integral) or int(repeats) < 1:
        raise TraceError(f"np.repeat of {x.node}: give one repeat count of 1 or more and an axis")
    axis = _axis(x, axis, x.ndim, "np.repeat")
    return apply("repeat", [x], attrs={"axis": axis, "repeats": int(repeats)})


def tril(x, k: int = 0):
    """``np.tril``: the lower triangle (of ones over (T, T): a causal mask)."""
    if not isinstance(x, Sym):
        return np.tril(x, k)
    return apply("tril", [x], attrs={"k": int(k)})


def triu(x, k: int = 0):
    """``np.triu``: the upper triangle (of -inf over (T, T) with k=1: a causal bias)."""
    if not isinstance(x, Sym):
        return np.triu(x, k)
    return apply("triu", [x], attrs={"k": int(k)})


def _dtype_kind(dtype, default: str) -> str:
    if dtype is None:
        return default
    return {"b": "bool", "i": "int", "u": "int", "f": "float"}.get(np.dtype(dtype).kind, "float")


def _traced_shape(shape) -> tuple | None:
    """Dim names of a shape that holds a traced length, or None (a plain NumPy shape)."""
    dims = shape if isinstance(shape, (tuple, list)) else (shape,)
    if not any(isinstance(d, DataDim) for d in dims):
        return None
    active = tracer()
    names = []
    for d in dims:
        if isinstance(d, (Dim, DataDim)):
            names.append(d.name)
        elif isinstance(d, numbers.Integral) and int(d) == 1:
            names.append("1")
        else:
            fits = dims_of_size(active.dims, d)
            if len(fits) != 1:
                raise TraceError(f"a table of shape {shape!r}: give its size {d!r} by name (from .shape)")
            names.append(fits[0])
    return tuple(names)


def _fill(original, value_of):
    """A NumPy constructor that records a constant when its shape holds a traced length."""
    def create(shape, *args, **kwargs):
        names = _traced_shape(shape) if tracer() is not None else None
        if names is None:
            return original(shape, *args, **kwargs)
        value, dtype = value_of(*args, **kwargs)
        kind = _dtype_kind(dtype, "bool" if isinstance(value, bool) else "float")
        value = bool(value) if kind == "bool" else int(value) if kind == "int" else float(value)
        return tracer().record("fill", [], name="fill", attrs={"shape": names, "value": value, "dtype": kind})
    create.__wrapped__ = original
    return create


def _arange(original):
    def arange(*args, **kwargs):
        if tracer() is None or not any(isinstance(a, DataDim) for a in args):
            return original(*args, **kwargs)
        if len(args) != 1 or kwargs:
            raise TraceError(f"np.arange{args!r}: only np.arange(T) of a traced length traces")
        return tracer().record("arange", [], name="arange", attrs={"length": args[0].name})
    arange.__wrapped__ = original
    return arange


def _tri(original):
    def tri(n, m=None, k=0, dtype=float, **kwargs):
        if tracer() is None or not isinstance(n, DataDim):
            return original(n, m, k, dtype=dtype, **kwargs)
        ones = np.ones((n, n if m is None else m), dtype=dtype)
        return tril(ones, k)
    tri.__wrapped__ = original
    return tri


_PATCH_LOCK = threading.Lock()
_PATCHED: dict = {}  # "count" of traces running, "saved" NumPy's own functions


@contextlib.contextmanager
def numpy_constants_traced():
    """While tracing, np.ones / zeros / full / arange / tri of a traced length (a
    DataDim from ``.shape``) record a constant op; with plain sizes, and in any
    thread or context that is not tracing, they are NumPy's own. Installed by
    the first trace that runs and removed by the last, so traces may overlap."""
    with _PATCH_LOCK:
        if not _PATCHED.get("count"):
            saved = {name: getattr(np, name) for name in ("ones", "zeros", "full", "arange", "tri")}
            _PATCHED["saved"] = saved
            np.ones = _fill(saved["ones"], lambda dtype=None, **_: (1, dtype))
            np.zeros = _fill(saved["zeros"], lambda dtype=None, **_: (0, dtype))
            np.full = _fill(saved["full"], _full_value)
            np.arange = _arange(saved["arange"])
            np.tri = _tri(saved["tri"])
        _PATCHED["count"] = _PATCHED.get("count", 0) + 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCHED["count"] -= 1
            if not _PATCHED["count"]:
                for name, fn in _PATCHED.pop("saved").items():
                    setattr(np, name, fn)


def _full_value(fill_value=None, dtype=None, **_):
    if fill_value is None:
        raise TraceError("np.full of a traced shape needs a fill value: np.full((T, T), value)")
    return fill_value, dtype


def param(name: str, dims, init: str | None = None):
    """A parameter as an array: ``W = qf.param("c_attn.weight", ("d_model", "3*d_model"))``.

    Code then uses it as NumPy code uses weights: ``x @ W + b``,
    ``np.split(x @ W, 3, axis=-1)``, ``W[ids]``, ``x @ W.T``. The parameter
    is named by the scope path and ``name`` (the name it loads by from
    safetensors); asking again for the same name gives the same parameter.
    ``init``: ``small`` (N(0, 0.02), the default), ``fan_in_first``
    (N(0, 1/d_in) for a (d_in, d_out) weight), ``fan_in``, ``ones`` or ``zeros``.
    """
    from ..ir.ops import INITS
    ctx = current()
    if ctx is None:
        raise TraceError(f"param({name!r}) needs a trace or an eager run")
    if init is not None and init not in INITS:
        raise TraceError(f"param {name!r}: init {init!r} is not known; use one of {', '.join(INITS)}")
    if isinstance(dims, (str, numbers.Integral)):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)):
        raise TraceError(f"param {name!r}: dims must be a tuple of dim names, got {dims!r}"[:200])
    shape = tuple(_named_size(ctx, d, name) if isinstance(d, numbers.Integral) and not isinstance(d, (Dim, bool))
                  else name_of(d) for d in dims)
    if not ctx.tracing:
        return ctx.param(ctx.path(name))
    unknown = [f for d in shape for f in d.split("*") if not f.isdigit() and f not in ctx.dims]
    if unknown:
        raise TraceError(f"param {name!r} has unknown dim {unknown[0]!r}; known dims: {', '.join(ctx.dims)}")
    free = [f for d in shape for f in d.split("*") if not f.isdigit() and ctx.dims[f] is None]
    if free:
        raise TraceError(f"param {name!r} has data dim {free[0]!r}; a parameter's dims are model dims "
                         "with sizes")
    path = ctx.path(name)
    if path in ctx.graph:
        have = ctx.graph.nodes[path]
        if have["op"] != "param" or tuple(have["attrs"]["shape"]) != shape:
            raise TraceError(f"param {path!r} {shape} clashes with {have['op']} {path!r} {have['shape']}")
        return Sym(ctx, path)
    attrs = {"name": name, "shape": shape, **({"init": init} if init else {})}
    return ctx.record("param", [], name=name, attrs=attrs, params={"": shape})


_FUNCTIONS = {
    "einsum": einsum, "matmul": matmul, "where": where, "concatenate": concat, "split": split,
    "expand_dims": expand_dims, "squeeze": squeeze, "stack": stack, "var": var, "repeat": repeat,
    "tril": tril, "triu": triu, "cumsum": cumsum, "roll": roll,
    "transpose": transpose, "swapaxes": swapaxes, "reshape": reshape,
    "sum": _np_sum, "mean": _np_mean, "max": _np_max, "amax": _np_max, "min": _np_min, "amin": _np_min,
}


def numpy_function(func, args, kwargs):
    fn = _FUNCTIONS.get(func.__name__)
    if fn is None:
        raise TraceError(f"numpy.{func.__name__} cannot be traced; see qkvflow.nn for what can")
    if func.__name__ == "concatenate":
        return concat(args[0], kwargs.get("axis", args[1] if len(args) > 1 else 0))
    if func.__name__ == "split":
        return split(args[0], args[1] if len(args) > 1 else kwargs["indices_or_sections"],
                     kwargs.get("axis", args[2] if len(args) > 2 else 0))
    if func.__name__ == "reshape":
        shape = args[1] if len(args) > 1 else kwargs["newshape" if "newshape" in kwargs else "shape"]
        return reshape(args[0], *(shape if isinstance(shape, tuple) else (shape,)))
    return fn(*args, **kwargs)

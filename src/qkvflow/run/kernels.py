"""NumPy kernels: the definition of every op, one small typed function each.

Each kernel is annotated with jaxtyping and attached to its op's registry
entry (:mod:`qkvflow.ir.ops`) as a :class:`~qkvflow.ir.ops.Kernel`
``(fn, call)``, where ``call(fn, inputs, attrs, params, sizes)`` adapts a
graph node to the kernel's signature. The executor decides when to run a
kernel under a beartype check (see :mod:`qkvflow.run.execute`).

Fully masked rows: :func:`softmax` returns zeros for a row whose entries are
all ``-inf`` (no key may be attended), so no NaN ever leaves it.
"""

import functools
import math

import numpy as np
from jaxtyping import Bool, Float, Integer, Shaped

from ..ir.dims import size_of
from ..ir.ops import Kernel, implement
from .pages import empty_in_small_pages

__all__ = ["sinusoidal_table"]

Array = np.ndarray


def _into(out, *operands, floats: bool = False) -> np.ndarray | None:
    """The array an elementwise kernel of ``operands`` writes its result into: ``out`` when
    the plan gave one it may overwrite (a writable array the result fits: no operand widens
    its shape or promotes its dtype) laid out as the first operand of the result's shape is;
    else a new array laid out like that operand. None when no operand has the result's shape
    (a broadcast widens them all), an operand promotes the dtype or, with ``floats``, the
    result is not of floats: the kernel allocates as NumPy does. So a value's layout, and the
    order a reduction over it sums in, never depend on whether the plan let a kernel write in
    place: a run gives the same bits either way."""
    ref = operands[0]
    if _alike(ref, operands):
        dtype = ref.dtype
    else:
        shape = np.broadcast_shapes(*(np.shape(x) for x in operands))
        ref = next((x for x in operands if isinstance(x, np.ndarray) and x.shape == shape), None)
        if ref is None:
            return None
        dtype = np.result_type(*operands)
        if dtype != ref.dtype:  # promoted: the kernel's own rule for the dtype applies
            return None
    if floats and dtype.kind != "f":
        return None
    if (isinstance(out, np.ndarray) and out.flags.writeable and out.shape == ref.shape and out.dtype == dtype
            and out.strides == ref.strides):
        return out
    return np.empty_like(ref, dtype=dtype)


def _alike(ref, operands: tuple) -> bool:
    """The common case, decided without NumPy's promotion rules: ``ref`` an array, the other
    operands arrays of its dtype and shape (or its last axes' shape: a bias, a positions
    table) or Python numbers with floats (which keep their dtype)."""
    if not isinstance(ref, np.ndarray):
        return False
    for x in operands[1:]:
        if isinstance(x, np.ndarray):
            if x.dtype != ref.dtype or x.ndim > ref.ndim or x.shape != ref.shape[ref.ndim - x.ndim:]:
                return False
        elif type(x) not in (int, float) or ref.dtype.kind != "f":
            return False
    return True


_FEW_ROWS = 64  # tokens: below it values stay token-major (C order), the layout small arrays run fastest in
# The ops whose kernels lay their result out by its count of tokens (on either side of _FEW_ROWS).
LAYOUT_BY_TOKENS = frozenset({"embed", "positional", "linear", "unembed", "merge_heads", "norm"})


def _few_tokens(shape: tuple) -> bool:
    """A (..., d) value of fewer than _FEW_ROWS tokens (all its leading axes together)."""
    return math.prod(shape[:-1]) < _FEW_ROWS


def _feature_major(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised array of ``shape``, from _FEW_ROWS tokens laid out feature by feature:
    each feature's values over every token contiguous (an F-ordered (tokens, features)
    matrix), the layout :func:`linear` returns and reads fastest. Every kernel takes
    either layout; which one a value has depends on the run's sizes alone."""
    if _few_tokens(shape):
        return np.empty(shape, dtype)
    return np.empty((shape[-1], math.prod(shape[:-1])), dtype).T.reshape(shape)


def _canonical(x: np.ndarray) -> np.ndarray:
    """``x``, or a copy of it laid out as the executor lays out a value of its size (see
    _feature_major) when it came otherwise (a value given to a run, read back from a file):
    a sum over its features then adds in one order, and the same numbers give the same bits."""
    if _few_tokens(x.shape):
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)
    if _is_feature_major(x):
        return x
    out = _feature_major(x.shape, x.dtype)
    out[...] = x
    return out


def _is_feature_major(x: np.ndarray) -> bool:
    """``x`` (of _FEW_ROWS tokens or more) laid out as _feature_major lays it out: the tokens
    in C order, then the features (axes of one entry may have any stride)."""
    step, want = x.itemsize, []
    for n in reversed(x.shape[:-1]):
        want.append(step)
        step *= n
    return all(n == 1 or have == w for n, have, w in zip(x.shape, x.strides, [*reversed(want), step]))


def embed(ids: Integer[Array, "*b s"], weight: Float[Array, "vocab d"], scale: float) -> Float[Array, "*b s d"]:
    rows = weight[ids]
    if _few_tokens(rows.shape):
        return rows * weight.dtype.type(scale) if scale != 1.0 else rows
    out = _feature_major(rows.shape, weight.dtype)  # the residual stream's layout from its start
    if scale != 1.0:
        return np.multiply(rows, weight.dtype.type(scale), out=out)
    out[...] = rows
    return out


def sinusoidal_table(positions: int, d: int, kind: str, dtype, start: int = 0) -> np.ndarray:
    """(positions, d) table, built in float64 then cast.

    ``sinusoidal`` (the paper): PE[p, 2i] = sin(p / 10000^(2i/d)),
    PE[p, 2i+1] = cos(p / 10000^(2i/d)). ``sinusoidal_half`` (Marian): the
    sines of every even column in the first ceil(d/2) columns, the cosines
    after them.
    """
    pos = np.arange(start, positions, dtype=np.float64)[:, None]  # rows start .. positions - 1
    n_sin, n_cos = (d + 1) // 2, d // 2
    inv = np.power(10000.0, -(2.0 * np.arange(n_sin, dtype=np.float64)) / d)
    angles = pos * inv[None, :]  # (positions, ceil(d/2))
    table = np.zeros((positions - start, d), dtype=np.float64)
    if kind == "sinusoidal":
        table[:, 0::2] = np.sin(angles)
        table[:, 1::2] = np.cos(angles[:, :n_cos])
    else:
        table[:, :n_sin] = np.sin(angles)
        table[:, n_sin:] = np.cos(angles[:, :n_cos])
    return table.astype(dtype)


def positional(x: Float[Array, "*b s d"], table: Float[Array, "p d"], offset: int,
               out: Float[Array, "*b s d"] | None = None) -> Float[Array, "*b s d"]:
    seq = x.shape[-2]
    if offset + seq > table.shape[0]:
        raise ValueError(f"position {offset + seq - 1} is beyond the table of {table.shape[0]} positions")
    rows = table[offset:offset + seq]
    if not _few_tokens(x.shape) and _is_feature_major(x):  # the rows laid out alike, as a walk
        rows = np.ascontiguousarray(rows.T).T                # over x reads them (0.2 ms, not 2 ms)
    return np.add(x, rows, out=_into(out, x, rows, floats=True))


def linear(x: Float[Array, "*b i"], weight: Float[Array, "o i"], bias: Float[Array, "o"] | None) -> Float[Array, "*b o"]:
    # From _FEW_ROWS tokens, one GEMM for every token as W @ x.T, whose result transposed is y
    # feature by feature (see _feature_major): OpenBLAS runs it faster than x @ W.T from
    # either layout of x, fastest when x is feature-major itself. Fewer: _few_token_product.
    x2 = x.reshape(-1, x.shape[-1])
    y = _few_token_product(x2, weight) if _few_tokens(x.shape) else (weight @ x2.T).T
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        y += bias
    return y


_WEIGHT_BLOCK = 2 << 20  # bytes of a weight a few tokens are multiplied with at once (a core's L2 here)


def _few_token_product(x2: np.ndarray, weight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x2 @ weight.T``, token-major (C order), for fewer than _FEW_ROWS tokens, into ``out``
    (a C-ordered array of its shape) when given: a product whose time goes to reading the
    weight. In float32, OpenBLAS reads it fastest as W @ x.T over blocks of _WEIGHT_BLOCK
    bytes of its rows (vaswani-base's logits at 16 tokens: 8.2 ms against 10.1 as one
    product, 9 as x @ W.T); in float64 as x @ W.T (half the time of W @ x.T for a 37000-row
    weight). Which one runs depends on the sizes and dtypes alone."""
    dtype = np.result_type(x2, weight)
    if dtype == np.float64:
        return np.matmul(x2, weight.T, out=out)
    rows = max(1, _WEIGHT_BLOCK // max(1, weight.shape[1] * weight.itemsize))
    if len(x2) == 1 or weight.shape[0] <= rows:  # one block, or one token (a matrix-vector product)
        y = (weight @ x2.T).T
        if out is None:
            return np.ascontiguousarray(y)
        out[...] = y
        return out
    if out is None:
        out = np.empty((len(x2), weight.shape[0]), dtype)
    for lo in range(0, weight.shape[0], rows):
        out[:, lo:lo + rows] = (weight[lo:lo + rows] @ x2.T).T
    return out


def unembed(x: Float[Array, "*b d"], weight: Float[Array, "vocab d"], bias: Float[Array, "vocab"] | None,
            out: Float[Array, "*b vocab"] | None = None) -> Float[Array, "*b vocab"]:
    """The logits, token by token (C order), as a caller expects them, in small pages (see
    pages.py); into ``out`` (a C-ordered array of their shape: a part's rows of a batch's
    logits) when given."""
    if out is not None and not out.flags.c_contiguous:  # a reshape of it would be a copy, lost
        raise ValueError(f"unembed writes into a C-ordered array, got one of strides {out.strides}")
    rows = (math.prod(x.shape[:-1]), weight.shape[0])
    y = empty_in_small_pages((*x.shape[:-1], weight.shape[0]), np.result_type(x, weight)) if out is None else out
    x2 = x.reshape(-1, x.shape[-1])
    if _few_tokens(x.shape):  # linear's product of a few tokens
        _few_token_product(x2, weight, out=y.reshape(rows))
    else:
        np.matmul(x2, weight.T, out=y.reshape(rows))
    if bias is not None:
        y += bias
    return y


def split_heads(x: Float[Array, "*b s hd"], heads: int) -> Float[Array, "*b h s d"]:
    *lead, seq, hd = x.shape
    # (..., s, h*d) -> (..., s, h, d) -> (..., h, s, d)
    return np.swapaxes(x.reshape(*lead, seq, heads, hd // heads), -2, -3)


def merge_heads(x: Float[Array, "*b h s d"]) -> Float[Array, "*b s hd"]:
    *lead, h, seq, d = x.shape
    # (..., h, s, d) -> (..., s, h, d) -> (..., s, h*d), a copy laid out for the output
    # projection (from attend's feature-major layout, runs of tokens copy to runs of tokens)
    merged = (*lead, seq, h * d)
    if _few_tokens(merged):
        return np.swapaxes(x, -2, -3).reshape(merged)
    out = _feature_major(merged, x.dtype)
    out.reshape(*lead, seq, h, d)[...] = np.swapaxes(x, -2, -3)
    return out


def scores(q: Float[Array, "*b tq d"], k: Float[Array, "*b tk d"], scale: float) -> Float[Array, "*b tq tk"]:
    s = q @ np.swapaxes(k, -1, -2)  # (..., tq, d) @ (..., d, tk) -> (..., tq, tk)
    if scale != 1.0:
        s *= s.dtype.type(scale)  # in place: s is this kernel's own
    return s


def mask(x: Float[Array, "*b tq tk"], keep: Bool[Array, "*#m"],
         out: Float[Array, "*b tq tk"] | None = None) -> Float[Array, "*b tq tk"]:
    if x.dtype.kind == "f" and (keep.shape == x.shape or np.broadcast_shapes(x.shape, keep.shape) == x.shape):
        y = x if out is x and x.flags.writeable else x.copy(order="K")  # x the plan's to overwrite, or a copy
        np.copyto(y, -np.inf, where=np.logical_not(keep))  # keep may be 0/1 ints, as np.where takes it
        return y
    return np.where(keep, x, -np.inf).astype(x.dtype, copy=False)


def softmax(x: Float[Array, "*s"], axis: int, out: Float[Array, "*s"] | None = None) -> Float[Array, "*s"]:
    top = np.maximum.reduce(x, axis=axis, keepdims=True)
    dead = np.isneginf(top)  # a fully masked row
    if not dead.any():
        e = np.subtract(x, top, out=_into(out, x, floats=True))
        np.exp(e, out=e)
        e /= np.add.reduce(e, axis=axis, keepdims=True)
        return e
    e = np.exp(x - np.where(dead, 0, top))
    total = np.sum(e, axis=axis, keepdims=True)
    return np.where(dead, 0, e / np.where(dead, 1, total)).astype(x.dtype, copy=False)


def attend(p: Float[Array, "*b tq tk"], v: Float[Array, "*b tk d"]) -> Float[Array, "*b tq d"]:
    # (..., tq, tk) @ (..., tk, d) -> (..., tq, d). With v held feature by feature (its tokens
    # axis the denser), as (v.T @ p.T).T: each head's v.T is then row-major, and the result's
    # runs of tokens let merge_heads copy them as runs (3.3 -> 0.9 ms a vaswani-base forward)
    if v.ndim < 2 or v.strides[-2] >= v.strides[-1]:
        return p @ v
    return np.swapaxes(np.swapaxes(v, -1, -2) @ np.swapaxes(p, -1, -2), -1, -2)


def add(a: Shaped[Array, "*#a"], b: Shaped[Array, "*#b"],
        out: Shaped[Array, "*c"] | None = None) -> Shaped[Array, "*c"]:
    return np.add(a, b, out=_into(out, a, b))


def norm(x: Float[Array, "*b d"], weight: Float[Array, "d"], bias: Float[Array, "d"] | None,
         kind: str, eps: float, out: Float[Array, "*b d"] | None = None) -> Float[Array, "*b d"]:
    """``layer``: (x - mean) / sqrt(var + eps) * w + b; ``rms``: x / sqrt(mean(x^2) + eps) * w."""
    x = _canonical(x)  # a copy only for a value laid out otherwise than the run's own: out is then not x
    if kind == "rms":
        return x / np.sqrt(_mean_last(x * x) + eps) * weight
    # The same operations as written above, in place on the kernel's own arrays.
    y = np.subtract(x, _mean_last(x), out=_into(out, x, floats=True))
    y /= np.sqrt(_mean_last(np.square(y)) + eps)
    y *= weight
    if bias is not None:
        y += bias
    return y


def _mean_last(x: np.ndarray) -> np.ndarray:
    """x.mean(axis=-1, keepdims=True), the same sum and division without np.mean's own overhead."""
    return np.add.reduce(x, axis=-1, keepdims=True) / x.shape[-1]


def layer_norm(x, weight, bias, eps: float):
    return norm(x, weight, bias, "layer", eps)


def rms_norm(x, weight, eps: float):
    return norm(x, weight, None, "rms", eps)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    from math import erf
    return np.vectorize(erf, otypes=[x.dtype])(x) if x.size else x


def activation(x: Float[Array, "*s"], fn: str, out: Float[Array, "*s"] | None = None) -> Float[Array, "*s"]:
    if fn == "relu":
        return np.maximum(x, 0, out=_into(out, x, floats=True))
    if fn == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if fn == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))
    if fn == "silu":
        return x / (1.0 + np.exp(-x))
    raise ValueError(f"unknown activation {fn!r}")


def padding_mask(ids: Integer[Array, "*b s"], pad_id: int, keep_first: bool = False) -> Bool[Array, "*b s"]:
    keep = ids != pad_id
    if keep_first and keep.shape[-1]:
        keep[..., 0] = True  # the start token, when it is the pad id
    return keep


def causal_mask(ids: Shaped[Array, "*b s"]) -> Bool[Array, "s s"]:
    seq = ids.shape[-1]
    return np.tril(np.ones((seq, seq), dtype=bool))


def rotary(x: Float[Array, "*b s d"], theta: float, offset: int) -> Float[Array, "*b s d"]:
    """Features i and i + d/2 turned by the angle (offset + t) * theta^(-2i/d) at position t:
    [x1 cos - x2 sin, x2 cos + x1 sin] (angles in float64, then cast)."""
    seq, d = x.shape[-2:]
    if d % 2:  # what the checker's QKV201 finds; a run with --no-check reaches it here
        raise ValueError(f"rotary positions turn pairs of features, but the last axis has {d}, an odd count")
    half = d // 2
    inv = np.power(float(theta), -np.arange(0, 2 * half, 2, dtype=np.float64) / d)  # (d/2,)
    angles = np.arange(offset, offset + seq, dtype=np.float64)[:, None] * inv[None, :]  # (s, d/2)
    cos, sin = np.cos(angles).astype(x.dtype), np.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def relative_buckets(q_len: int, k_len: int, bidirectional: bool, buckets: int, max_distance: int,
                     offset: int = 0) -> np.ndarray:
    """(q_len, k_len) bucket of the distance key - query, T5's scheme: exact below half the
    buckets, logarithmic up to ``max_distance``; bidirectional halves the buckets by sign.
    The logarithm is taken in float32, as T5 does, so the buckets agree at their edges."""
    rel = np.arange(k_len)[None, :] - np.arange(offset, offset + q_len)[:, None]
    out = np.zeros_like(rel)
    if bidirectional:
        buckets //= 2
        out += (rel > 0) * buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    exact = buckets // 2
    far = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(exact)) / np.float32(
        math.log(max_distance / exact))
    far = exact + (far * np.float32(buckets - exact)).astype(np.int64)
    return out + np.where(rel < exact, rel, np.minimum(far, buckets - 1))


def relative_bias(q_ids: Shaped[Array, "*b q"], k_ids: Shaped[Array, "*c k"], weight: Float[Array, "n h"],
                  bidirectional: bool, max_distance: int, offset: int) -> Float[Array, "h q k"]:
    buckets = relative_buckets(q_ids.shape[-1], k_ids.shape[-1], bidirectional, weight.shape[0],
                               max_distance, offset)
    return np.ascontiguousarray(np.moveaxis(weight[buckets], -1, 0))  # (q, k, h) -> (h, q, k)


def identity(x: Shaped[Array, "*s"]) -> Shaped[Array, "*s"]:
    return x


def matmul(a: Float[Array, "*#b m k"], b: Float[Array, "*#c k n"]) -> Float[Array, "*d m n"]:
    return a @ b


_ELEMENTWISE = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
    "pow": np.power, "maximum": np.maximum, "minimum": np.minimum,
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
    "gt": np.greater, "ge": np.greater_equal, "and": np.logical_and, "or": np.logical_or,
    "neg": np.negative, "not": np.logical_not, "exp": np.exp, "log": np.log,
    "sqrt": np.sqrt, "tanh": np.tanh, "abs": np.abs, "square": np.square,
    # a new array even when nothing is converted: the op's result is never its input
    "astype_float": lambda x: np.array(x, dtype=np.float64 if np.asarray(x).dtype.kind != "f" else None),
    "astype_bool": lambda x: np.asarray(x).astype(bool), "astype_int": lambda x: np.asarray(x).astype(np.int64),
    "sin": np.sin, "cos": np.cos, "reciprocal": np.reciprocal,
}
_REDUCE = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min}


def _float_like(out, inputs):
    """A float result keeps the dtype of its float array inputs (a Python
    scalar must not turn float32 into float64; a bool mask gives no dtype)."""
    if not isinstance(out, np.ndarray) or out.dtype.kind != "f":
        return out
    floats = [x.dtype for x in inputs if isinstance(x, np.ndarray) and x.dtype.kind == "f"]
    return out.astype(np.result_type(*floats), copy=False) if floats else out


# Ufuncs whose float result keeps the dtype of float operands: they may write into one.
_KEEP_FLOAT = {"add", "sub", "mul", "div", "pow", "maximum", "minimum", "neg", "exp", "log", "sqrt", "tanh",
               "abs", "square", "sin", "cos", "reciprocal"}


def elementwise(fn: str, *xs, const=None, const_first: bool = False, out: np.ndarray | None = None):
    f = _ELEMENTWISE[fn]
    if const is not None:
        xs = (const, *xs) if const_first else (*xs, const)
    target = _into(out, *xs, floats=True) if fn in _KEEP_FLOAT else None
    if target is not None:
        return f(*xs, out=target)
    return _float_like(f(*xs), xs)


def _where(ins, attrs, params):
    it = iter(ins)
    cond = next(it)
    a = attrs["a"] if "a" in attrs else next(it)
    b = attrs["b"] if "b" in attrs else next(it)
    return _float_like(np.where(cond, a, b), (a, b))


def _positional(kernel, ins, attrs, params, out=None):
    x = ins[0]
    table = params.get("weight")
    if table is None:  # the rows of these positions only
        offset = attrs["offset"]
        return kernel(x, _table(offset + x.shape[-2], x.shape[-1], attrs["kind"], x.dtype.str, offset), 0, out)
    return kernel(x, table, attrs["offset"], out)


@functools.lru_cache(maxsize=8)
def _table(positions: int, d: int, kind: str, dtype: str, start: int) -> np.ndarray:
    """sinusoidal_table, read-only, kept for the last 8 sizes and starts asked for: a forward
    reads the same rows each run (generation steps read one row each, built anew)."""
    table = sinusoidal_table(positions, d, kind, np.dtype(dtype), start)
    table.flags.writeable = False
    return table


def _concat(ins, attrs, params):
    return np.concatenate(ins, axis=attrs["axis"])


def _prefix(x: np.ndarray, axis: int, length: int) -> np.ndarray:
    if length > x.shape[axis]:
        raise ValueError(f"{length} entries asked of an axis of {x.shape[axis]}")
    return x[(slice(None),) * axis + (slice(0, length),)]


# Each op's kernel and the adapter ``call(fn, inputs, attrs, params, sizes)``
# that unpacks a node for it, attached to the op's registry entry. An op that may write
# into an input (``in_place``) takes ``out=`` that input; its kernel checks it can. One
# that writes ``into`` a given array takes ``out=`` that array: a part's rows of a split
# run's output (parallel.py).

def _kernel(op: str, fn, call, fresh: bool = False, in_place: tuple = (), into: bool = False) -> None:
    implement("kernel", op)(Kernel(fn, call, fresh, in_place, into))


_kernel("input", None, None)  # fed by the executor
_kernel("embed", embed, lambda k, i, a, p, s: k(i[0], p["weight"], a.get("scale", 1.0)), fresh=True)
_kernel("positional", positional, lambda k, i, a, p, s, out=None: _positional(k, i, a, p, out), fresh=True,
        in_place=(0,))
_kernel("linear", linear, lambda k, i, a, p, s: k(i[0], p["weight"], p.get("bias")), fresh=True)
_kernel("split_heads", split_heads, lambda k, i, a, p, s: k(i[0], s[a["heads"]]))
_kernel("merge_heads", merge_heads, lambda k, i, a, p, s: k(i[0]))
_kernel("scores", scores, lambda k, i, a, p, s: k(i[0], i[1], a["scale"]), fresh=True)
_kernel("mask", mask, lambda k, i, a, p, s, out=None: k(i[0], i[1], out), fresh=True, in_place=(0,))
_kernel("softmax", softmax, lambda k, i, a, p, s, out=None: k(i[0], a["axis"], out), fresh=True, in_place=(0,))
_kernel("attend", attend, lambda k, i, a, p, s: k(i[0], i[1]), fresh=True)
_kernel("add", add, lambda k, i, a, p, s, out=None: k(i[0], i[1], out), fresh=True, in_place=(0, 1))
_kernel("norm", norm, lambda k, i, a, p, s, out=None: k(i[0], p["weight"], p.get("bias"), a["kind"], a["eps"], out),
        fresh=True, in_place=(0,))
_kernel("activation", activation, lambda k, i, a, p, s, out=None: k(i[0], a["fn"], out), fresh=True,
        in_place=(0,))
_kernel("padding_mask", padding_mask, lambda k, i, a, p, s: k(i[0], a["pad_id"], a.get("keep_first", False)))
_kernel("causal_mask", causal_mask, lambda k, i, a, p, s: k(i[0]))
_kernel("unembed", unembed, lambda k, i, a, p, s, out=None: k(i[0], p["weight"], p.get("bias"), out), fresh=True,
        into=True)
_kernel("rotary", rotary, lambda k, i, a, p, s: k(i[0], a["theta"], a.get("offset", 0)))
_kernel("relative_bias", relative_bias, lambda k, i, a, p, s: k(
    i[0], i[1], p["weight"], a["bidirectional"], a["max_distance"], a.get("offset", 0)))
_kernel("output", identity, lambda k, i, a, p, s: k(i[0]))
_kernel("reshape", None, lambda k, i, a, p, s: i[0].reshape([size_of(n, s) for n in a["shape"]]))
_kernel("transpose", None, lambda k, i, a, p, s: np.transpose(i[0], a["perm"]))
_kernel("matmul", matmul, lambda k, i, a, p, s: k(i[0], i[1]), fresh=True)
_kernel("einsum", None, lambda k, i, a, p, s: np.einsum(a["equation"], *i))
_kernel("where", None, lambda k, i, a, p, s: _where(i, a, p))
_kernel("reduce", None, lambda k, i, a, p, s: _REDUCE[a["fn"]](
    i[0], axis=tuple(a["axis"]), keepdims=a["keepdims"]))
_kernel("elementwise", None, lambda k, i, a, p, s, out=None: elementwise(
    a["fn"], *i, const=a.get("const"), const_first=a.get("const_first", False), out=out), fresh=True,
        in_place=(0, 1))
_kernel("concat", None, lambda k, i, a, p, s: _concat(i, a, p))
_kernel("param", None, lambda k, i, a, p, s: p[""])
_kernel("fill", None, lambda k, i, a, p, s: np.full(
    [size_of(n, s) for n in a["shape"]], a["value"], dtype={"bool": bool, "int": np.int64}.get(a["dtype"], float)))
_kernel("arange", None, lambda k, i, a, p, s: np.arange(size_of(a["length"], s)))
_kernel("tril", None, lambda k, i, a, p, s: np.tril(i[0], a["k"]))
_kernel("triu", None, lambda k, i, a, p, s: np.triu(i[0], a["k"]))
_kernel("constant", None, lambda k, i, a, p, s: np.asarray(
    a["value"], dtype={"bool": bool, "int": np.int64}.get(a["dtype"], float)))
_kernel("slice", None, lambda k, i, a, p, s: i[0][(slice(None),) * a["axis"] + (slice(a["start"], a["stop"]),)])
_kernel("pick", None, lambda k, i, a, p, s: np.take(i[0], a["index"], axis=a["axis"]))
_kernel("reverse", None, lambda k, i, a, p, s: np.flip(i[0], axis=a["axis"]))
_kernel("cumsum", None, lambda k, i, a, p, s: np.cumsum(i[0], axis=a["axis"]))
_kernel("roll", None, lambda k, i, a, p, s: np.roll(i[0], a["shift"], axis=a["axis"]))
_kernel("prefix", None, lambda k, i, a, p, s: _prefix(i[0], a["axis"], s[a["length"]]))
_kernel("repeat", None, lambda k, i, a, p, s: np.repeat(i[0], a["repeats"], axis=a["axis"]))
_kernel("gather", None, lambda k, i, a, p, s: i[0][i[1]])
_kernel("split_part", None, lambda k, i, a, p, s: np.split(i[0], a["parts"], axis=a["axis"])[a["index"]])

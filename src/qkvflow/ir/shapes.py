"""Named-dim shape rules: one per op, shared by the tracer and the checker.

The op registry (:mod:`qkvflow.ir.ops`) names the rule of each op. A rule
takes the metas of an op's inputs (dim names, the attention key axis,
dtype), the op's attrs and parameter shapes, and the dims table, and returns
the meta of its output. Rules compare *names*, never sizes: contracting
``d_head`` with ``tgt`` is wrong even when both are 64. A rule that finds a
mistake raises :class:`ShapeIssue` with a stable code and a fallback meta so
tracing can go on and report every mistake, not just the first.

The key axis is the axis of an attention-score tensor that runs over key
positions. It is what tells a softmax over keys from one over queries in
self-attention, where both axes are named ``tgt``.
"""

from typing import NamedTuple

from .dims import describe, describe_shape, dims_of_size, factors, size_of

__all__ = ["Meta", "ShapeIssue", "broadcast", "reshape_map"]


class Meta(NamedTuple):
    shape: tuple
    key_axis: int | None = None
    dtype: str = "float"


class ShapeIssue(Exception):
    def __init__(self, code: str, message: str, fallback: Meta) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fallback = fallback


def same(a: str, b: str, dims) -> bool:
    """One dim under two names: equal, or the same factors (any order, aliases expanded)."""
    return a == b or (hasattr(dims, "same") and dims.same(a, b))


def _is_seq(name: str, dims) -> bool:
    """Whether ``name`` runs over a sequence dim of the model (see DimTable)."""
    seq = getattr(dims, "seq", ())
    return any(part in seq for part in factors(name))


def broadcast(metas: list[Meta], dims: dict, code: str = "QKV201", what: str = "operands"):
    """Right-aligned broadcast by name. Returns (shape, key_axis, maps).

    ``maps[i][a]`` is the output axis of operand ``i``'s axis ``a``.
    """
    ndim = max(len(m.shape) for m in metas)
    out = ["1"] * ndim
    conflict = None
    for m in metas:
        offset = ndim - len(m.shape)
        for a, name in enumerate(m.shape):
            have = out[offset + a]
            if name == "1" or same(name, have, dims):
                continue
            if have == "1":
                out[offset + a] = name
            elif conflict is None:
                conflict = (offset + a, have, name)
    maps = [[ndim - len(m.shape) + a for a in range(len(m.shape))] for m in metas]
    keys = {maps[i][m.key_axis] for i, m in enumerate(metas) if m.key_axis is not None}
    shape = tuple(out)
    if conflict is not None:
        axis, a, b = conflict
        shapes = " and ".join(describe_shape(m.shape, dims) for m in metas)
        raise ShapeIssue(
            code,
            f"{what} {shapes} do not broadcast: axis {axis - ndim} is "
            f"{describe(a, dims)} on one side and {describe(b, dims)} on the other",
            Meta(shape, min(keys) if keys else None, metas[0].dtype),
        )
    if len(keys) > 1:
        raise ShapeIssue(
            "QKV205",
            f"{what} disagree on the key axis: one runs over keys on axis "
            f"{min(keys) - ndim}, another on axis {max(keys) - ndim} "
            f"(a mask or bias applied along the query axis)",
            Meta(shape, max(keys), metas[0].dtype),
        )
    return shape, (keys.pop() if keys else None), maps


def feed(ins, attrs, params, dims):
    return Meta(tuple(attrs["shape"]), attrs.get("key_axis"), attrs.get("dtype", "float"))


def embed(ins, attrs, params, dims):
    (ids,) = ins
    vocab, d_model = params.get("weight") or attrs["tied_shape"]
    return Meta(ids.shape + (d_model,), None, "float")


def _last_dim_must_be(x: Meta, want: str, what: str, out: Meta, dims: dict) -> Meta:
    if x.shape and not same(x.shape[-1], want, dims):
        raise ShapeIssue(
            "QKV201",
            f"{what} expects last dim {describe(want, dims)}, got "
            f"{describe(x.shape[-1], dims)} in {describe_shape(x.shape, dims)}",
            out,
        )
    return out


def _keep_key(x: Meta, last_changed: bool = True) -> int | None:
    if x.key_axis is None:
        return None
    if last_changed and x.key_axis == len(x.shape) - 1:
        return None
    return x.key_axis


def positional(ins, attrs, params, dims):
    (x,) = ins
    out = Meta(x.shape, x.key_axis, x.dtype)
    if "weight" in params:
        return _last_dim_must_be(x, params["weight"][1], "learned positions", out, dims)
    return out


def linear(ins, attrs, params, dims):
    (x,) = ins
    d_out, d_in = params["weight"]
    out = Meta(x.shape[:-1] + (d_out,), _keep_key(x), "float")
    return _last_dim_must_be(x, d_in, "linear", out, dims)


def split_heads(ins, attrs, params, dims):
    (x,) = ins
    heads, d_head = attrs["heads"], attrs["d_head"]
    out = Meta(x.shape[:-2] + (heads, x.shape[-2], d_head), None, x.dtype)
    return _last_dim_must_be(x, f"{heads}*{d_head}", "split_heads", out, dims)


def merge_heads(ins, attrs, params, dims):
    (x,) = ins
    heads, seq, d_head = x.shape[-3:]
    return Meta(x.shape[:-3] + (seq, f"{heads}*{d_head}"), None, x.dtype)


def _contract(a: Meta, b: Meta, b_axis: int, what: str, dims: dict, out: Meta) -> None:
    """a's last axis is contracted with b's axis ``b_axis``: same name required."""
    if not same(a.shape[-1], b.shape[b_axis], dims):
        raise ShapeIssue(
            "QKV202",
            f"{what} contracts {describe(a.shape[-1], dims)} with "
            f"{describe(b.shape[b_axis], dims)}: {describe_shape(a.shape, dims)} x "
            f"{describe_shape(b.shape, dims)}; the contracted axes must be the same dim",
            out,
        )
    if a.key_axis is not None and a.key_axis != len(a.shape) - 1 and _is_seq(a.shape[-1], dims):
        raise ShapeIssue(
            "QKV202",
            f"{what} contracts the query axis of the attention weights "
            f"{describe_shape(a.shape, dims)} (their key axis is axis "
            f"{a.key_axis - len(a.shape)}); weights must be summed over keys",
            out,
        )


def _batch(a: Meta, b: Meta, dims: dict, what: str, fallback_tail: tuple) -> tuple:
    try:
        shape, _, _ = broadcast([Meta(a.shape[:-2]), Meta(b.shape[:-2])], dims, what=what)
    except ShapeIssue as issue:
        issue.fallback = Meta(issue.fallback.shape + fallback_tail)
        raise
    return shape


def _matmul_like(a: Meta, b: Meta, dims: dict, what: str, b_transposed: bool) -> Meta:
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise ShapeIssue(
            "QKV201", f"{what} needs two operands of rank >= 2, got "
            f"{describe_shape(a.shape, dims)} and {describe_shape(b.shape, dims)}",
            Meta(a.shape),
        )
    n = b.shape[-2] if b_transposed else b.shape[-1]
    tail = (a.shape[-2], n)
    key = len(a.shape[:-2]) + 1 if (_is_seq(n, dims) or b_transposed) else None
    batch = _batch(a, b, dims, what, tail)
    key = len(batch) + 1 if key is not None else None
    out = Meta(batch + tail, key, "float")
    _contract(a, b, -1 if b_transposed else -2, what, dims, out)
    return out


def scores(ins, attrs, params, dims):
    q, k = ins
    return _matmul_like(q, k, dims, "scores", b_transposed=True)


def attend(ins, attrs, params, dims):
    probs, v = ins
    out = _matmul_like(probs, v, dims, "attend", b_transposed=False)
    return out._replace(key_axis=None)


def matmul(ins, attrs, params, dims):
    a, b = ins
    return _matmul_like(a, b, dims, "matmul", b_transposed=False)


def mask(ins, attrs, params, dims):
    scores, keep = ins
    shape, key, _ = broadcast([scores, keep], dims, code="QKV205", what="mask and scores")
    out = Meta(scores.shape, scores.key_axis, scores.dtype)
    if shape != scores.shape:
        raise ShapeIssue(
            "QKV205",
            f"mask {describe_shape(keep.shape, dims)} would grow scores "
            f"{describe_shape(scores.shape, dims)} to {describe_shape(shape, dims)}",
            out,
        )
    return out


def softmax(ins, attrs, params, dims):
    (x,) = ins
    axis = attrs["axis"] % len(x.shape)
    out = Meta(x.shape, x.key_axis, "float")
    if x.key_axis is not None and axis != x.key_axis:
        raise ShapeIssue(
            "QKV204",
            f"softmax over axis {axis - len(x.shape)} ({describe(x.shape[axis], dims)}) of "
            f"attention scores {describe_shape(x.shape, dims)}; the key axis is "
            f"{x.key_axis - len(x.shape)} ({describe(x.shape[x.key_axis], dims)})",
            out,
        )
    return out


def pointwise(ins, attrs, params, dims):
    (x,) = ins
    return Meta(x.shape, x.key_axis, "float")


def norm(ins, attrs, params, dims):
    (x,) = ins
    out = Meta(x.shape, x.key_axis, "float")
    return _last_dim_must_be(x, params["weight"][0], "norm", out, dims)


def add(ins, attrs, params, dims):
    shape, key, _ = broadcast(list(ins), dims, what="add")
    return Meta(shape, key, "float")


def padding_mask(ins, attrs, params, dims):
    (ids,) = ins
    return Meta(ids.shape, len(ids.shape) - 1, "bool")


def causal_mask(ins, attrs, params, dims):
    (ids,) = ins
    seq = ids.shape[-1]
    return Meta((seq, seq), 1, "bool")


def unembed(ins, attrs, params, dims):
    (x,) = ins
    vocab, d_model = params.get("weight") or attrs["tied_shape"]
    out = Meta(x.shape[:-1] + (vocab,), None, "float")
    return _last_dim_must_be(x, d_model, "unembed", out, dims)


def rotary(ins, attrs, params, dims):
    """Same shape; the rotated (last) dim must have an even size."""
    (x,) = ins
    out = Meta(x.shape, x.key_axis, x.dtype)
    size = size_of(x.shape[-1], dims) if x.shape else None
    if size is not None and size % 2:
        raise ShapeIssue("QKV201", f"rotary positions turn pairs of features, but "
                         f"{describe(x.shape[-1], dims)} is odd", out)
    return out


def relative_bias(ins, attrs, params, dims):
    """(..., q_seq) and (..., k_seq) ids -> (heads, q_seq, k_seq), the heads of the weight."""
    q_ids, k_ids = ins
    buckets, heads = params["weight"]
    return Meta((heads, q_ids.shape[-1], k_ids.shape[-1]), 2, "float")


def output(ins, attrs, params, dims):
    return ins[0]


def _atoms(shape: tuple) -> list[tuple[str, int]]:
    """Flatten names into factor atoms, remembering the axis each came from."""
    return [(f, axis) for axis, name in enumerate(shape) for f in factors(name)]


def reshape_map(src: tuple, dst: tuple, dims: dict) -> dict[int, int] | None:
    """Axis map src -> dst for axes kept whole, or None when the reshape is not
    a split/merge of adjacent dims in order (checked by name, and by size only
    for splitting a sized dim into sized parts)."""
    a, b = _atoms(src), _atoms(dst)
    i = j = 0
    kept: dict[int, int] = {}
    while i < len(a) and j < len(b):
        if a[i][0] == b[j][0]:
            if src[a[i][1]] == dst[b[j][1]]:
                kept[a[i][1]] = b[j][1]
            i, j = i + 1, j + 1
            continue
        # Different names: allowed only as a numeric split/merge of sized dims,
        # never when one side names a dim the other side has elsewhere (a reorder).
        if a[i][0] in {f for f, _ in b[j:]} or b[j][0] in {f for f, _ in a[i:]}:
            return None
        si, sj = size_of(a[i][0], dims), size_of(b[j][0], dims)
        if si is None or sj is None:
            return None
        i, j = i + 1, j + 1
        while si != sj:
            if si < sj:
                if i >= len(a) or size_of(a[i][0], dims) is None:
                    return None
                si *= size_of(a[i][0], dims)
                i += 1
            else:
                if j >= len(b) or size_of(b[j][0], dims) is None:
                    return None
                sj *= size_of(b[j][0], dims)
                j += 1
    if i != len(a) or j != len(b):
        return None
    return kept


def reshape(ins, attrs, params, dims):
    (x,) = ins
    dst = tuple(attrs["shape"])
    kept = reshape_map(x.shape, dst, dims)
    key = kept.get(x.key_axis) if (kept is not None and x.key_axis is not None) else None
    out = Meta(dst, key, x.dtype)
    if kept is None:
        same_atoms = sorted(f for f, _ in _atoms(x.shape)) == sorted(f for f, _ in _atoms(dst))
        why = (
            "reorders axes: a reshape only splits or merges adjacent dims in "
            "order; moving an axis needs a transpose"
            if same_atoms
            else "is not a split or merge of adjacent dims"
        )
        raise ShapeIssue(
            "QKV203",
            f"reshape {describe_shape(x.shape, dims)} -> {describe_shape(dst, dims)} {why}",
            out,
        )
    return out


def transpose(ins, attrs, params, dims):
    (x,) = ins
    perm = tuple(p % len(x.shape) for p in attrs["perm"])
    key = perm.index(x.key_axis) if x.key_axis is not None else None
    return Meta(tuple(x.shape[p] for p in perm), key, x.dtype)


def einsum(ins, attrs, params, dims):
    lhs, rhs = attrs["equation"].replace(" ", "").split("->")
    specs = lhs.split(",")
    letters: dict[str, str] = {}
    clash = None
    for spec, m in zip(specs, ins):
        for letter, name in zip(spec, m.shape):
            have = letters.setdefault(letter, name)
            if not same(have, name, dims) and clash is None:
                clash = (letter, have, name)
    out_shape = tuple(letters[c] for c in rhs)
    # Scores are laid out (..., queries, keys): the key axis is the last output
    # sequence axis that one operand alone supplies ("bhqd,bhkd->bhqk": k).
    key = None
    if len(specs) > 1:
        for pos, c in enumerate(rhs):
            if _is_seq(letters[c], dims) and sum(c in spec for spec in specs) == 1:
                key = pos
    out = Meta(out_shape, key, "float")
    if clash is not None:
        letter, have, name = clash
        code = "QKV201" if letter in rhs else "QKV202"
        verb = "indexes" if letter in rhs else "contracts"
        raise ShapeIssue(
            code,
            f"einsum '{attrs['equation']}' {verb} {describe(have, dims)} with "
            f"{describe(name, dims)} under the one letter '{letter}'",
            out,
        )
    for spec, m in zip(specs, ins):
        if m.key_axis is None:
            continue
        summed = [c for c in spec if c not in rhs and _is_seq(letters[c], dims)]
        if summed and spec[m.key_axis] not in summed:
            raise ShapeIssue(
                "QKV202",
                f"einsum '{attrs['equation']}' sums the attention weights over their "
                f"query axis '{summed[0]}'; weights must be summed over keys "
                f"'{spec[m.key_axis]}'",
                out,
            )
    return out


def _mask_like(m: Meta) -> bool:
    return m.dtype == "bool"


def where(ins, attrs, params, dims):
    masky = any(_mask_like(m) for m in ins)
    code = "QKV205" if masky else "QKV201"
    shape, key, _ = broadcast(list(ins), dims, code=code, what="where operands")
    dtype = next((m.dtype for m in ins[1:] if m.dtype != "bool"), "float")
    return Meta(shape, key, dtype if len(ins) > 1 else "float")


_COMPARE = {"eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "astype_bool"}


def elementwise(ins, attrs, params, dims):
    masky = any(_mask_like(m) for m in ins)
    shape, key, _ = broadcast(
        list(ins), dims, code="QKV205" if masky and len(ins) > 1 else "QKV201",
        what=f"{attrs['fn']} operands",
    )
    dtype = "bool" if attrs["fn"] in _COMPARE else "int" if attrs["fn"] == "astype_int" else "float"
    return Meta(shape, key, dtype)


def reduce(ins, attrs, params, dims):
    (x,) = ins
    axes = sorted({a % len(x.shape) for a in attrs["axis"]})
    keep = attrs.get("keepdims", False)
    shape, key = [], None
    for a, name in enumerate(x.shape):
        if a in axes:
            if keep:
                shape.append("1")
            continue
        if a == x.key_axis:
            key = len(shape)
        shape.append(name)
    out = Meta(tuple(shape), key, "float" if attrs["fn"] == "mean" else x.dtype)
    wrong = [a for a in axes if a != x.key_axis and _is_seq(x.shape[a], dims)]
    if x.key_axis is not None and x.key_axis not in axes and wrong:
        raise ShapeIssue(
            "QKV204",
            f"{attrs['fn']} over axis {wrong[0] - len(x.shape)} ({describe(x.shape[wrong[0]], dims)}) "
            f"of attention scores {describe_shape(x.shape, dims)}; normalising weights runs over "
            f"the key axis {x.key_axis - len(x.shape)} ({describe(x.shape[x.key_axis], dims)})",
            out,
        )
    return out


def concat(ins, attrs, params, dims):
    axis = attrs["axis"] % len(ins[0].shape)
    rest = [m.shape[:axis] + m.shape[axis + 1:] for m in ins]
    parts = [m.shape[axis] for m in ins]
    if len(set(parts)) == 1:
        count = attrs.get("count_name") or str(len(parts))
        joined = parts[0] if len(parts) == 1 else count if parts[0] == "1" else f"{count}*{parts[0]}"
    else:
        joined = "+".join(parts)
    shape = ins[0].shape[:axis] + (joined,) + ins[0].shape[axis + 1:]
    out = Meta(shape, None, ins[0].dtype)
    if len(set(rest)) != 1:
        raise ShapeIssue(
            "QKV201",
            "concatenated parts differ off the joined axis: "
            + ", ".join(describe_shape(m.shape, dims) for m in ins),
            out,
        )
    return out


def param(ins, attrs, params, dims):
    return Meta(tuple(attrs["shape"]), None, "float")


def gather(ins, attrs, params, dims):
    """table[ids]: (rows, *rest) at (*batch) integer ids -> (*batch, *rest)."""
    table, ids = ins
    out = Meta(ids.shape + table.shape[1:], None, table.dtype)
    if ids.dtype != "int":
        raise ShapeIssue("QKV201", f"rows of {describe_shape(table.shape, dims)} taken at non-integer "
                         f"indices {describe_shape(ids.shape, dims)}", out)
    return out


def split_part(ins, attrs, params, dims):
    """Part ``index`` of ``parts`` equal parts along ``axis``: ``3*d_model`` -> ``d_model``."""
    (x,) = ins
    axis, parts = attrs["axis"] % len(x.shape), attrs["parts"]
    name = x.shape[axis]
    head, rest = factors(name)[:1], factors(name)[1:]
    part = "*".join(rest) if head == (str(parts),) and rest else None
    if part is None and attrs.get("count_name"):
        count = attrs["count_name"]
        part = "*".join(f for f in factors(name) if f != count) if count in factors(name) else None
    out = Meta(x.shape[:axis] + ((part or name),) + x.shape[axis + 1:], x.key_axis, x.dtype)
    if part is None:
        raise ShapeIssue("QKV201", f"split of {describe(name, dims)} into {parts} parts along axis "
                         f"{axis - len(x.shape)} of {describe_shape(x.shape, dims)}: name the dim "
                         f"{parts}*<part> (e.g. 3*d_model for a fused Q|K|V) so each part has a name", out)
    return out


def repeat(ins, attrs, params, dims):
    """Each entry ``repeats`` times along ``axis``: ``kv_heads`` (2) x 3 -> the one dim of
    size 6 (``heads``), else ``3*kv_heads``."""
    (x,) = ins
    axis, r = attrs["axis"], attrs["repeats"]
    name = x.shape[axis]
    size = size_of(name, dims)
    others = {f for n in x.shape for f in factors(n)}
    fits = [d for d in dims_of_size(dims, size * r) if d not in others] if size is not None else []
    grown = fits[0] if len(fits) == 1 else f"{r}*{name}" if r > 1 else name
    return Meta(x.shape[:axis] + (grown,) + x.shape[axis + 1:], x.key_axis, x.dtype)


def prefix(ins, attrs, params, dims):
    """The first ``length`` entries along ``axis``: ``wpe[:T]`` is (seq, d_model)."""
    (x,) = ins
    axis = attrs["axis"]
    return Meta(x.shape[:axis] + (attrs["length"],) + x.shape[axis + 1:], None, x.dtype)


def fill(ins, attrs, params, dims):
    """A constant of a traced shape: np.ones((T, T)), np.full((T, T), -inf)."""
    return Meta(tuple(attrs["shape"]), None, attrs["dtype"])


def arange(ins, attrs, params, dims):
    """np.arange(T): the positions 0..T-1 of a sequence."""
    return Meta((attrs["length"],), None, "int")


def triangle(ins, attrs, params, dims):
    """np.tril / np.triu over the last two axes; of a (seq, seq) table the last is the key axis."""
    (x,) = ins
    square = len(x.shape) >= 2 and x.shape[-1] == x.shape[-2]
    return Meta(x.shape, len(x.shape) - 1 if square else x.key_axis, x.dtype)


def slice_range(ins, attrs, params, dims):
    """A range of a sized dim: its part is named by its size (``x[..., :2]`` of d_head 4: ``2``)."""
    (x,) = ins
    axis = attrs["axis"]
    size = max(attrs["stop"] - attrs["start"], 0)
    return Meta(x.shape[:axis] + (str(size),) + x.shape[axis + 1:], x.key_axis, x.dtype)


def same_shape(ins, attrs, params, dims):
    """Entries moved or summed along one axis: the shape stays."""
    (x,) = ins
    return Meta(x.shape, x.key_axis, "float" if x.dtype == "bool" else x.dtype)


def pick(ins, attrs, params, dims):
    """One entry along an axis; the axis goes."""
    (x,) = ins
    axis = attrs["axis"]
    key = None if x.key_axis in (None, axis) else x.key_axis - (x.key_axis > axis)
    return Meta(x.shape[:axis] + x.shape[axis + 1:], key, x.dtype)


"""Token-level information flow over the graph (the QKV4xx analysis).

An abstract interpretation: for every node it computes, per sequence dim the
model declares (``src`` and ``tgt``, ``seq``, or names of its own), which
input positions an element can depend on:

* ``("pos", a)``    — element i along axis a depends on token i only;
* ``("causal", a)`` — on tokens <= i along axis a;
* ``("nonpad",)``   — on every non-padding token of the source;
* ``("all",)``      — on any token, future or padding included.

A mask is tracked as its *restrictions* — ``("causal", qa, ka)`` (key
ka <= query qa) and ``("keypad", ka, source)`` (non-padding keys) — and
the pair of values it holds where attending is allowed and where it is
ruled out: ``padding_mask`` is (1, 0), ``~keep`` and ``keep == 0`` are
(0, 1), ``(1 - keep) * -1e9`` is (0, -1e9). The pair follows arithmetic
with constants, so any way of writing a mask is understood, and a mask
counts only when it is applied the right way round. Applying one gives a
tensor two kinds of dead entries:

* ``minf``  — entries that are -inf (or very negative): a softmax ignores them;
* ``zeros`` — entries that are exactly 0: a sum or matrix product ignores them.

A reduction over a sequence axis (softmax, sum, a contraction) turns
``pos`` into what its dead entries allow. The node where the dependence on
a *causal* sequence first widens past ``causal`` is where a decoder starts
to see the future; where one on a *bidirectional* sequence with padding
reaches ``all``, padding leaks.
"""

import networkx as nx

from ..ir.dims import factors, sequence_of
from ..ir.errors import GraphError
from ..ir.graph import arg_nodes, execution_order, pad_ids
from ..ir.ops import implement, spec
from ..ir.shapes import reshape_map

__all__ = ["analyse", "Flow", "ALL", "NONPAD", "applied_masks", "padded_sequences"]

ALL, NONPAD = ("all",), ("nonpad",)
_LARGE_NEGATIVE = -1e4  # a fill at or below this acts like -inf in a softmax
EMPTY = frozenset()


class Flow:
    """Facts of one tensor: ``deps`` per source, dead entries, mask values."""

    __slots__ = ("deps", "minf", "zeros", "mask", "values")

    def __init__(self, deps=None, minf=EMPTY, zeros=EMPTY, mask=EMPTY, values=None):
        self.deps = deps or {}  # sequence dim -> facts; a missing dim has none
        self.minf = frozenset(minf)
        self.zeros = frozenset(zeros)
        self.mask = frozenset(mask)  # restrictions, when this tensor is made from masks
        self.values = values if self.mask else None  # (where allowed, where ruled out)


def _norm(facts: set) -> frozenset:
    if ALL in facts:
        return frozenset({ALL})
    causal = {f[1] for f in facts if f[0] == "causal"}
    return frozenset(f for f in facts if not (f[0] == "pos" and f[1] in causal))


def _seq_of(g, name: str) -> str | None:
    """The declared sequence dim that dim ``name`` runs over, if any."""
    return sequence_of(name, g.graph.get("sequences", {}))


def _remap_restrictions(cons: frozenset, amap: dict) -> frozenset:
    out = set()
    for c in cons:
        if c[0] == "causal" and c[1] in amap and c[2] in amap:
            out.add(("causal", amap[c[1]], amap[c[2]]))
        elif c[0] == "keypad" and c[1] in amap:
            out.add(("keypad", amap[c[1]], c[2]))
    return frozenset(out)


def _remap(flow: Flow, amap: dict) -> Flow:
    """Move axis-bound facts by ``amap`` (old -> new); an unmapped axis mixes."""
    deps = {}
    for s, facts in flow.deps.items():
        out = set()
        for f in facts:
            if f[0] in ("pos", "causal"):
                out.add((f[0], amap[f[1]]) if f[1] in amap else ALL)
            else:
                out.add(f)
        deps[s] = _norm(out)
    return Flow(deps, _remap_restrictions(flow.minf, amap), _remap_restrictions(flow.zeros, amap),
                _remap_restrictions(flow.mask, amap), flow.values)


def _deps_join(flows: list[Flow]) -> dict:
    seqs = {s for f in flows for s in f.deps}
    return {s: _norm(set().union(*(f.deps.get(s, EMPTY) for f in flows))) for s in seqs}


def _reduce_axis(facts: frozenset, axis: int, dead: frozenset, source: str) -> set:
    """Facts of ``source`` after reducing over ``axis`` when ``dead`` entries are ignored."""
    out = set()
    causal = [c for c in dead if c[0] == "causal" and c[2] == axis]
    keypad = [c for c in dead if c[0] == "keypad" and c[1] == axis and c[2] == source]
    for f in facts:
        if f[0] in ("pos", "causal") and f[1] == axis:
            out.add(("causal", causal[0][1]) if causal else NONPAD if keypad else ALL)
        else:
            out.add(f)
    return out


def _aligned(g, node, ins, flows) -> list[Flow]:
    """Inputs broadcast to the node's rank (right-aligned)."""
    ndim = len(g.nodes[node]["shape"])
    return [_remap(f, {a: ndim - len(g.nodes[i]["shape"]) + a for a in range(len(g.nodes[i]["shape"]))})
            for f, i in zip(flows, ins)]


@implement("transfer", "positional", "activation", "rotary")
def _plain(g, node, ins, flows):
    """Pointwise ops that keep no dead entries and make no mask."""
    return Flow(_deps_join(_aligned(g, node, ins, flows)))


def _is_bias(f: Flow) -> bool:
    """A mask that adds 0 where allowed and a very negative number where ruled out."""
    return f.values is not None and f.values[0] == 0 and f.values[1] <= _LARGE_NEGATIVE


def _is_keep(f: Flow) -> bool:
    return f.values is not None and f.values[0] != 0 and f.values[1] == 0


_ARITHMETIC = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b if b else None, "eq": lambda a, b: float(a == b),
    "ne": lambda a, b: float(a != b), "lt": lambda a, b: float(a < b), "le": lambda a, b: float(a <= b),
    "gt": lambda a, b: float(a > b), "ge": lambda a, b: float(a >= b),
    "and": lambda a, b: float(bool(a) and bool(b)), "or": lambda a, b: float(bool(a) or bool(b)),
}


def _mask_values(fn: str, a: Flow, const, const_first: bool):
    """The (allowed, ruled out) values of ``fn`` applied to a mask and a constant."""
    if fn == "not":
        return tuple(float(not v) for v in a.values)
    if fn in ("astype_float", "astype_int"):
        return a.values
    if fn == "astype_bool":
        return tuple(float(bool(v)) for v in a.values)
    if fn == "neg":
        return tuple(-v for v in a.values)
    op = _ARITHMETIC.get(fn)
    if op is None or const is None:
        return None
    pair = tuple(op(const, v) if const_first else op(v, const) for v in a.values)
    return None if None in pair or pair[0] == pair[1] else pair


def _combine_masks(fn: str, a: Flow, b: Flow):
    """Two masks combined elementwise: the restrictions where the result's
    (allowed, ruled out) values still hold, or None when they do not."""
    op = _ARITHMETIC.get(fn)
    if op is None:
        return None
    allowed = op(a.values[0], b.values[0])
    # Ruled out by either mask: the value there is the same whichever one rules it out?
    only_a, only_b, both = op(a.values[1], b.values[0]), op(a.values[0], b.values[1]), op(a.values[1], b.values[1])
    if None in (allowed, only_a, only_b, both):
        return None
    ruled = (only_a, only_b, both)
    if allowed not in ruled:  # either mask rules out: the restrictions add up
        if len(set(ruled)) == 1:
            return a.mask | b.mask, (allowed, both)
        if allowed == 0 and max(ruled) <= _LARGE_NEGATIVE:  # two biases added
            return a.mask | b.mask, (allowed, max(ruled))
        return None
    if only_a == only_b == allowed != both:  # both must rule out
        return a.mask & b.mask, (allowed, both)
    return None


@implement("transfer", "add")
def _add(g, node, ins, flows):
    """a + b: a bias mask kills entries; -inf entries stay -inf."""
    fs = _aligned(g, node, ins, flows)
    minf = set()
    for f in fs:
        minf |= f.mask if _is_bias(f) else f.minf
    return Flow(_deps_join(fs), minf)


def _padding_compare(g, node, ins, fn: str, const) -> Flow | None:
    """``ids != pad_id`` (and ``ids > 0`` when pad_id is 0) is a padding mask."""
    if g.nodes[ins[0]]["dtype"] != "int" or const is None:
        return None
    shape = g.nodes[node]["shape"]
    source = _seq_of(g, shape[-1])
    if source is None:
        return None
    pad = pad_ids(g).get(source, const)
    keeps_real = {"ne": const == pad, "gt": pad == 0 and const == 0, "ge": pad == 0 and const == 1}
    drops_real = {"eq": const == pad}
    if keeps_real.get(fn):
        return Flow(mask={("keypad", len(shape) - 1, source)}, values=(1.0, 0.0))
    if drops_real.get(fn):
        return Flow(mask={("keypad", len(shape) - 1, source)}, values=(0.0, 1.0))
    return Flow()


@implement("transfer", "elementwise")
def _elementwise(g, node, ins, flows):
    attrs = g.nodes[node]["attrs"]
    fn, const, first = attrs["fn"], attrs.get("const"), attrs.get("const_first", False)
    fs = _aligned(g, node, ins, flows)
    deps = _deps_join(fs)
    a = fs[0]
    compared = _padding_compare(g, node, ins, fn, const) if len(fs) == 1 else None
    if compared is not None:
        return compared
    if len(fs) == 1 and a.values is not None:
        values = _mask_values(fn, a, const, first)
        return Flow(deps, mask=a.mask, values=values) if values else Flow(deps)
    if len(fs) == 2 and fs[0].values is not None and fs[1].values is not None:
        combined = _combine_masks(fn, fs[0], fs[1])
        return Flow(deps, mask=combined[0], values=combined[1]) if combined else Flow(deps)
    if len(fs) == 1:
        if fn in ("mul", "div") and const is not None and const > 0:
            return Flow(deps, a.minf, a.zeros)  # -inf and 0 survive a positive scale
        if fn in ("add", "sub") and not first:
            return Flow(deps, a.minf)  # -inf survives a shift; 0 does not
        if fn == "exp":
            return Flow(deps, zeros=a.minf)  # exp(-inf) is exactly 0
        if fn == "astype_float":
            return Flow(deps, a.minf, a.zeros)
        return Flow(deps)
    data, other = (fs[1], fs[0]) if fs[0].values is not None else (fs[0], fs[1])
    if fn == "add":
        return _add(g, node, ins, flows)
    if fn == "sub" and other.values is not None and other is fs[1]:
        bias = other.values[0] == 0 and other.values[1] >= -_LARGE_NEGATIVE
        return Flow(deps, data.minf | (other.mask if bias else EMPTY))
    if fn == "sub" and other is fs[1] and not other.minf:
        return Flow(deps, data.minf)  # s - max(s): -inf minus a finite number stays -inf
    if fn == "mul":
        # Multiplying by a keep mask zeroes entries (valid before a sum, not a softmax).
        return Flow(deps, zeros=data.zeros | (other.mask if _is_keep(other) else other.zeros))
    if fn == "div" and other is fs[1]:
        return Flow(deps, zeros=data.zeros)
    return Flow(deps)


@implement("transfer", "where")
def _where(g, node, ins, flows):
    """where(cond, a, b): a mask choosing a very negative (or 0) fill where it
    rules out kills entries; of two scalars it makes a new mask."""
    attrs = g.nodes[node]["attrs"]
    fs = _aligned(g, node, ins, flows)
    it = iter(fs)
    cond = next(it)
    a = attrs["a"] if "a" in attrs else next(it)
    b = attrs["b"] if "b" in attrs else next(it)
    deps = _deps_join(fs)
    if cond.values is None:
        return Flow(deps)
    pick = [bool(v) for v in cond.values]  # True: the `a` side, at (allowed, ruled out)
    if not isinstance(a, Flow) and not isinstance(b, Flow):
        values = tuple(float(a if p else b) for p in pick)
        return Flow(deps, mask=cond.mask, values=values) if values[0] != values[1] else Flow(deps)
    if pick[0] == pick[1]:
        return Flow(deps)
    data, fill = (a, b) if pick[0] else (b, a)  # what allowed entries get, what ruled out ones get
    if not isinstance(data, Flow) or isinstance(fill, Flow):
        return Flow(deps)
    if fill <= _LARGE_NEGATIVE:
        return Flow(deps, data.minf | cond.mask, data.zeros)
    if fill == 0.0:
        return Flow(deps, data.minf, data.zeros | cond.mask)
    return Flow(deps)


@implement("transfer", "mask")
def _mask(g, node, ins, flows):
    scores, keep = _aligned(g, node, ins, flows)
    minf = scores.minf | (keep.mask if _is_keep(keep) else EMPTY)
    return Flow(scores.deps, minf, scores.zeros)


@implement("transfer", "softmax")
def _softmax(g, node, ins, flows):
    (f,) = flows
    axis = g.nodes[node]["attrs"]["axis"] % len(g.nodes[node]["shape"])
    deps = {s: _norm(_reduce_axis(facts, axis, f.minf, s)) for s, facts in f.deps.items()}
    return Flow(deps, zeros=f.minf)  # what was -inf is now exactly 0


@implement("transfer", "reduce")
def _reduce(g, node, ins, flows):
    (f,) = flows
    attrs = g.nodes[node]["attrs"]
    rank = len(g.nodes[ins[0]]["shape"])
    axes = sorted(a % rank for a in attrs["axis"])
    dead = f.zeros if attrs["fn"] in ("sum", "mean") else f.minf
    amap, k = {}, 0
    for a in range(rank):
        if a not in axes:
            amap[a] = k
        if a not in axes or attrs["keepdims"]:
            k += 1
    deps = {}
    for s, facts in f.deps.items():
        for axis in axes:
            facts = frozenset(_reduce_axis(facts, axis, dead, s))
        deps[s] = _norm(set(facts))
    return _remap(Flow(deps, f.minf if attrs["fn"] == "max" else EMPTY), amap)


def _contract(g, node, ins, flows, specs, out_spec):
    """General product: ``specs`` letters per operand, ``out_spec`` result letters."""
    live = set()  # an operand's zero entries drop terms of the sum
    for f, spec in zip(flows, specs):
        for c in f.zeros:
            live.add(("causal", spec[c[1]], spec[c[2]]) if c[0] == "causal" else ("keypad", spec[c[1]], c[2]))
    deps = {s: set() for f in flows for s in f.deps}
    for f, spec in zip(flows, specs):
        for s, facts in f.deps.items():
            for fact in facts:
                if fact[0] not in ("pos", "causal"):
                    deps[s].add(fact)
                    continue
                letter = spec[fact[1]]
                if letter in out_spec:
                    deps[s].add((fact[0], out_spec.index(letter)))
                    continue
                causal = [c for c in live if c[0] == "causal" and c[2] == letter and c[1] in out_spec]
                keypad = [c for c in live if c[0] == "keypad" and c[1] == letter and c[2] == s]
                deps[s].add(("causal", out_spec.index(causal[0][1])) if causal else NONPAD if keypad else ALL)
    return Flow({s: _norm(v) for s, v in deps.items()})


_LETTERS = "abcdefghijklmnopqrstuvw"


@implement("transfer", "attend", "matmul")
def _matmul(g, node, ins, flows):
    ranks = [len(g.nodes[i]["shape"]) for i in ins]
    out_rank = len(g.nodes[node]["shape"])
    batch = _LETTERS[:out_rank - 2]
    specs = [batch[out_rank - ranks[0]:] + "yz", batch[out_rank - ranks[1]:] + "zx"]
    return _contract(g, node, ins, flows, specs, batch + "yx")


@implement("transfer", "scores")
def _scores(g, node, ins, flows):
    batch = _LETTERS[:len(g.nodes[node]["shape"]) - 2]
    return _contract(g, node, ins, flows, [batch + "yz", batch + "xz"], batch + "yx")


@implement("transfer", "einsum")
def _einsum(g, node, ins, flows):
    lhs, rhs = g.nodes[node]["attrs"]["equation"].replace(" ", "").split("->")
    return _contract(g, node, ins, flows, lhs.split(","), rhs)


@implement("transfer", "linear", "norm", "unembed")
def _last_mixing(g, node, ins, flows):
    """Ops that mix the last axis only (linear, norm, unembed)."""
    last = len(g.nodes[ins[0]]["shape"]) - 1
    return Flow(_remap(flows[0], {a: a for a in range(last)}).deps)


@implement("transfer", "reshape")
def _reshape(g, node, ins, flows):
    src, dst = g.nodes[ins[0]]["shape"], g.nodes[node]["shape"]
    # A reshape the shape rules reject (QKV203) still keeps its sequence atoms:
    # one mistake, one finding, not a cascade of flow findings after it.
    whole = reshape_map(src, dst, g.graph["dims"]) or {}
    # Token facts follow their sequence atom through merges and splits
    # ((batch, src) -> (batch*src) -> (batch, src) stays pointwise); dead
    # entries and masks only through axes kept whole.
    atoms = {}
    for axis, name in enumerate(dst):
        for part in factors(name):
            atoms.setdefault(part, axis)
    by_atom = {axis: atoms[_seq_of(g, name)] for axis, name in enumerate(src)
               if _seq_of(g, name) and _seq_of(g, name) in atoms}
    moved = _remap(flows[0], {**whole, **by_atom})
    kept = _remap(flows[0], whole)
    return Flow(moved.deps, kept.minf, kept.zeros, kept.mask, kept.values)


@implement("transfer", "transpose")
def _transpose(g, node, ins, flows):
    perm = g.nodes[node]["attrs"]["perm"]
    return _remap(flows[0], {old: new for new, old in enumerate(perm)})


@implement("transfer", "split_heads")
def _split_heads(g, node, ins, flows):
    rank = len(g.nodes[ins[0]]["shape"])
    amap = {a: a for a in range(rank - 2)}
    amap[rank - 2] = rank - 1  # (.., seq, h*d) -> (.., h, seq, d)
    return _remap(flows[0], amap)


@implement("transfer", "merge_heads")
def _merge_heads(g, node, ins, flows):
    rank = len(g.nodes[ins[0]]["shape"])
    amap = {a: a for a in range(rank - 3)}
    amap[rank - 2] = rank - 3  # (.., h, seq, d) -> (.., seq, h*d)
    return _remap(flows[0], amap)


@implement("transfer", "input")
def _input(g, node, ins, flows):
    deps = {}
    for a, name in enumerate(g.nodes[node]["shape"]):
        s = _seq_of(g, name)
        if s:
            deps[s] = frozenset({("pos", a)})
    return Flow(deps)


@implement("transfer", "padding_mask")
def _padding_mask(g, node, ins, flows):
    """Keeps the real tokens, if it compares with the pad id the ids declare."""
    shape = g.nodes[node]["shape"]
    source = _seq_of(g, shape[-1])
    if g.nodes[node]["attrs"]["pad_id"] != pad_ids(g).get(source, g.nodes[node]["attrs"]["pad_id"]):
        return Flow()  # masks some other token: not a padding mask
    return Flow(mask={("keypad", len(shape) - 1, source)}, values=(1.0, 0.0))


@implement("transfer", "causal_mask")
def _causal_mask(g, node, ins, flows):
    return Flow(mask={("causal", 0, 1)}, values=(1.0, 0.0))


@implement("transfer", "param")
def _param(g, node, ins, flows):
    return Flow()  # a parameter depends on no token


@implement("transfer", "gather")
def _gather(g, node, ins, flows):
    """table[ids]: each row depends on the token its id is (the table on none)."""
    ids = flows[1]
    rank_ids = len(g.nodes[ins[1]]["shape"])
    return _remap(Flow(ids.deps), {a: a for a in range(rank_ids)})


@implement("transfer", "split_part", "slice", "reverse", "roll", "repeat")
def _along_axis(g, node, ins, flows):
    """Entries split, sliced, reversed, rolled or repeated along one axis: every axis
    keeps its facts, but that one only when it is no sequence axis (along a sequence
    a position would hold another position's entry)."""
    rank = len(g.nodes[node]["shape"])
    axis = g.nodes[node]["attrs"]["axis"] % rank
    split_seq = _seq_of(g, g.nodes[ins[0]]["shape"][axis]) is not None
    return _remap(flows[0], {a: a for a in range(rank) if not (split_seq and a == axis)})


@implement("transfer", "pick")
def _pick(g, node, ins, flows):
    """One entry along an axis: the other axes keep their facts. Along a sequence,
    entry 0 (a first or CLS token) reads no position after any other; any other
    entry stands for the whole sequence (the last position has read every token)."""
    rank = len(g.nodes[ins[0]]["shape"])
    axis, index = g.nodes[node]["attrs"]["axis"], g.nodes[node]["attrs"]["index"]
    f = flows[0]
    if index == 0:
        f = Flow({s: frozenset(x for x in facts if not (x[0] in ("pos", "causal") and x[1] == axis))
                  for s, facts in f.deps.items()}, f.minf, f.zeros, f.mask, f.values)
    return _remap(f, {a: a - (a > axis) for a in range(rank) if a != axis})


@implement("transfer", "cumsum")
def _cumsum(g, node, ins, flows):
    """Running sums: along a sequence, entry t depends on entries <= t (what they
    depend on, then causally); along a feature axis nothing moves between positions."""
    axis = g.nodes[node]["attrs"]["axis"]
    f = flows[0]
    if _seq_of(g, g.nodes[node]["shape"][axis]) is None:
        return Flow(f.deps)
    deps = {}
    for s, facts in f.deps.items():
        deps[s] = _norm({("causal", axis) if fact[:2] == ("pos", axis) else fact for fact in facts})
    return Flow(deps)


@implement("transfer", "fill", "arange", "constant", "relative_bias")
def _constant(g, node, ins, flows):
    return Flow()  # the same for every token


@implement("transfer", "tril", "triu")
def _triangle(g, node, ins, flows):
    """A triangle of a constant over (seq, seq): tril(ones, 0) keeps the past
    (values (1, 0)); triu(full(-inf), 1) is the matching bias (values (0, -inf))."""
    d = g.nodes[node]
    rank, k = len(d["shape"]), d["attrs"]["k"]
    value = g.nodes[ins[0]]["attrs"].get("value") if g.nodes[ins[0]]["op"] == "fill" else None
    if value is None or rank < 2 or _seq_of(g, d["shape"][-1]) is None:
        return Flow(flows[0].deps)
    causal = {("causal", rank - 2, rank - 1)}
    if d["op"] == "tril" and k == 0 and value:  # k < 0 would leave row 0 with no key at all
        return Flow(mask=causal, values=(float(value), 0.0))
    if d["op"] == "triu" and k == 1 and value:
        return Flow(mask=causal, values=(0.0, float(value)))
    return Flow()


@implement("transfer", "prefix")
def _prefix(g, node, ins, flows):
    """The first T entries: entry t is entry t of the input, so every fact stays."""
    return flows[0]


@implement("transfer", "embed")
def _embed(g, node, ins, flows):
    return Flow(flows[0].deps)


@implement("transfer", "concat")
def _concat(g, node, ins, flows):
    rank = len(g.nodes[node]["shape"])
    axis = g.nodes[node]["attrs"]["axis"] % rank
    return Flow(_deps_join([_remap(f, {a: a for a in range(rank) if a != axis}) for f in flows]))


@implement("transfer", "output")
def _identity(g, node, ins, flows):
    return flows[0]


def analyse(g: nx.MultiDiGraph) -> dict[str, Flow]:
    """The flow facts of every node, in topological order."""
    flows: dict[str, Flow] = {}
    for node in execution_order(g):
        op = g.nodes[node]["op"]
        transfer = spec(op).transfer
        if transfer is None:
            raise GraphError(f"node {node}: no information-flow rule for op {op!r}")
        ins = arg_nodes(g, node)
        flows[node] = transfer(g, node, ins, [flows[i] for i in ins])
    return flows


def applied_masks(g: nx.MultiDiGraph, flows: dict, logits: str) -> set:
    """The masks that really reach a softmax, given the node it normalises
    (its ``logits``): ``causal`` and ``<dim>_padding``."""
    labels = set()
    for c in flows[logits].minf:
        labels.add("causal" if c[0] == "causal" else f"{c[2]}_padding")
    return labels


def padded_sequences(g: nx.MultiDiGraph, flows: dict) -> set:
    """Sequences that have padding: their token input declares a pad id, or the
    model builds a padding mask over them."""
    made = {c[2] for f in flows.values() for c in f.mask if c[0] == "keypad"}
    return set(pad_ids(g)) | made

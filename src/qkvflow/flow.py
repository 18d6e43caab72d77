"""Token-level information flow over the graph (the QKV4xx analysis).

An abstract interpretation: for every node it computes, per token source
(``src``, ``tgt``), which input positions an element can depend on:

* ``("pos", a)``    — element i along axis a depends on token i only;
* ``("causal", a)`` — on tokens <= i along axis a;
* ``("nonpad",)``   — on every non-padding token of the source;
* ``("all",)``      — on any token, future or padding included.

Masks are tracked with their *polarity*: a mask tensor is ``keep`` (True
where attending is allowed: ``padding_mask``, ``ids != pad``), ``drop``
(True where it is not: ``~keep``, ``1 - keep``) or ``bias`` (a large
negative number where it is not: ``(1 - keep) * -1e9``). A mask's
restrictions are ``("causal", qa, ka)`` (key ka <= query qa) and
``("keypad", ka, source)`` (non-padding keys). Applying a mask the right
way round gives a tensor two kinds of dead entries:

* ``minf``  — entries that are -inf (or very negative): a softmax ignores them;
* ``zeros`` — entries that are exactly 0: a sum or matrix product ignores them.

A reduction over a sequence axis (softmax, sum, a contraction) turns
``pos`` into what its dead entries allow. The node where a ``tgt``
dependence first widens past ``causal`` is where a decoder starts to see
the future; where a ``src`` one reaches ``all``, padding leaks.
"""

import networkx as nx

from .dims import SEQ_DIMS, factors
from .errors import GraphError
from .graph import arg_nodes
from .shapes import reshape_map

__all__ = ["analyse", "Flow", "ALL", "NONPAD", "applied_masks"]

ALL, NONPAD = ("all",), ("nonpad",)
_LARGE_NEGATIVE = -1e4  # a fill at or below this acts like -inf in a softmax
EMPTY = frozenset()


class Flow:
    """Facts of one tensor: ``deps`` per source, dead entries, mask polarity."""

    __slots__ = ("deps", "minf", "zeros", "mask", "polarity")

    def __init__(self, deps=None, minf=EMPTY, zeros=EMPTY, mask=EMPTY, polarity=None):
        self.deps = deps or {s: EMPTY for s in SEQ_DIMS}
        self.minf = frozenset(minf)
        self.zeros = frozenset(zeros)
        self.mask = frozenset(mask)  # restrictions, when this tensor is a mask
        self.polarity = polarity if self.mask else None


def _norm(facts: set) -> frozenset:
    if ALL in facts:
        return frozenset({ALL})
    causal = {f[1] for f in facts if f[0] == "causal"}
    return frozenset(f for f in facts if not (f[0] == "pos" and f[1] in causal))


def _seq_of(name: str) -> str | None:
    parts = [p for p in factors(name) if p in SEQ_DIMS]
    return parts[0] if parts else None


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
                _remap_restrictions(flow.mask, amap), flow.polarity)


def _deps_join(flows: list[Flow]) -> dict:
    return {s: _norm(set().union(*(f.deps[s] for f in flows))) for s in SEQ_DIMS}


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


def _plain(g, node, ins, flows):
    """Pointwise ops that keep no dead entries and make no mask."""
    return Flow(_deps_join(_aligned(g, node, ins, flows)))


def _add(g, node, ins, flows):
    """a + b: a bias mask kills entries; -inf entries stay -inf."""
    fs = _aligned(g, node, ins, flows)
    minf = set()
    for f in fs:
        minf |= f.mask if f.polarity == "bias" else f.minf
    return Flow(_deps_join(fs), minf)


def _combine_masks(fs: list[Flow], fn: str):
    """``and`` / ``or`` of two masks of one polarity."""
    if len(fs) != 2 or not all(f.mask for f in fs) or fs[0].polarity != fs[1].polarity:
        return EMPTY, None
    pol = fs[0].polarity
    narrower = (fn == "and") == (pol == "keep")  # keep & keep, drop | drop: both restrict
    cons = fs[0].mask | fs[1].mask if narrower else fs[0].mask & fs[1].mask
    return cons, pol


def _elementwise(g, node, ins, flows):
    attrs = g.nodes[node]["attrs"]
    fn, const = attrs["fn"], attrs.get("const")
    fs = _aligned(g, node, ins, flows)
    deps = _deps_join(fs)
    (a, *_) = fs
    if fn == "not" and a.polarity in ("keep", "drop"):
        return Flow(deps, mask=a.mask, polarity="drop" if a.polarity == "keep" else "keep")
    if fn in ("and", "or"):
        cons, pol = _combine_masks(fs, fn)
        return Flow(deps, mask=cons, polarity=pol)
    if fn in ("ne", "eq") and const is not None and g.nodes[ins[0]]["dtype"] == "int":
        shape = g.nodes[node]["shape"]
        source = _seq_of(shape[-1])
        return Flow({s: EMPTY for s in SEQ_DIMS}, mask={("keypad", len(shape) - 1, source)} if source else EMPTY,
                    polarity="keep" if fn == "ne" else "drop")
    if len(fs) == 1 and const is not None:
        if fn == "sub" and attrs.get("const_first") and const == 1 and a.polarity in ("keep", "drop"):
            return Flow(deps, mask=a.mask, polarity="drop" if a.polarity == "keep" else "keep")
        if fn == "mul" and a.polarity == "drop" and const <= _LARGE_NEGATIVE:
            return Flow(deps, mask=a.mask, polarity="bias")
        if a.polarity is None and ((fn in ("mul", "div") and const > 0) or fn in ("add", "sub")):
            return Flow(deps, a.minf, a.zeros)  # -inf and 0 survive a positive scale
        return Flow(deps)
    if fn == "exp" and len(fs) == 1:
        return Flow(deps, zeros=a.minf)  # exp(-inf) is exactly 0
    if fn == "mul" and len(fs) == 2:
        # Multiplying by a keep mask zeroes entries (valid before a sum, not a softmax).
        zeros = set()
        for f, other in ((fs[0], fs[1]), (fs[1], fs[0])):
            zeros |= f.mask if f.polarity == "keep" else f.zeros
        return Flow(deps, zeros=zeros)
    if fn in ("add", "sub") and len(fs) == 2:
        return _add(g, node, ins, flows) if fn == "add" else Flow(deps, fs[0].minf)
    if fn == "div" and len(fs) == 2:
        return Flow(deps, zeros=fs[0].zeros)
    return Flow(deps)


def _where(g, node, ins, flows):
    """where(cond, a, b): a keep mask with a -inf (or 0) other side kills entries."""
    attrs = g.nodes[node]["attrs"]
    fs = _aligned(g, node, ins, flows)
    it = iter(fs)
    cond = next(it)
    a = attrs["a"] if "a" in attrs else next(it)
    b = attrs["b"] if "b" in attrs else next(it)
    deps = _deps_join(fs)
    minf, zeros = set(), set()
    for data, fill, pol in ((a, b, "keep"), (b, a, "drop")):
        if isinstance(data, Flow):
            minf |= data.minf
            zeros |= data.zeros
        if cond.polarity == pol and isinstance(fill, float):
            if fill <= _LARGE_NEGATIVE:
                minf |= cond.mask
            elif fill == 0.0:
                zeros |= cond.mask
    return Flow(deps, minf, zeros)


def _mask(g, node, ins, flows):
    scores, keep = _aligned(g, node, ins, flows)
    minf = scores.minf | (keep.mask if keep.polarity == "keep" else EMPTY)
    return Flow(scores.deps, minf, scores.zeros)


def _softmax(g, node, ins, flows):
    (f,) = flows
    axis = g.nodes[node]["attrs"]["axis"] % len(g.nodes[node]["shape"])
    deps = {s: _norm(_reduce_axis(facts, axis, f.minf, s)) for s, facts in f.deps.items()}
    return Flow(deps, zeros=f.minf)  # what was -inf is now exactly 0


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
    deps = {s: set() for s in SEQ_DIMS}
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


def _matmul(g, node, ins, flows):
    ranks = [len(g.nodes[i]["shape"]) for i in ins]
    out_rank = len(g.nodes[node]["shape"])
    batch = _LETTERS[:out_rank - 2]
    specs = [batch[out_rank - ranks[0]:] + "yz", batch[out_rank - ranks[1]:] + "zx"]
    return _contract(g, node, ins, flows, specs, batch + "yx")


def _scores(g, node, ins, flows):
    batch = _LETTERS[:len(g.nodes[node]["shape"]) - 2]
    return _contract(g, node, ins, flows, [batch + "yz", batch + "xz"], batch + "yx")


def _einsum(g, node, ins, flows):
    lhs, rhs = g.nodes[node]["attrs"]["equation"].replace(" ", "").split("->")
    return _contract(g, node, ins, flows, lhs.split(","), rhs)


def _last_mixing(g, node, ins, flows):
    """Ops that mix the last axis only (linear, norm, unembed)."""
    last = len(g.nodes[ins[0]]["shape"]) - 1
    return Flow(_remap(flows[0], {a: a for a in range(last)}).deps)


def _reshape(g, node, ins, flows):
    src, dst = g.nodes[ins[0]]["shape"], g.nodes[node]["shape"]
    whole = reshape_map(src, dst, g.graph["dims"])
    if whole is None:
        return _remap(flows[0], {})
    # Token facts follow their sequence atom through merges and splits
    # ((batch, src) -> (batch*src) -> (batch, src) stays pointwise); dead
    # entries and masks only through axes kept whole.
    atoms = {}
    for axis, name in enumerate(dst):
        for part in factors(name):
            atoms.setdefault(part, axis)
    by_atom = {axis: atoms[_seq_of(name)] for axis, name in enumerate(src)
               if _seq_of(name) and _seq_of(name) in atoms}
    moved = _remap(flows[0], {**whole, **by_atom})
    kept = _remap(flows[0], whole)
    return Flow(moved.deps, kept.minf, kept.zeros, kept.mask, kept.polarity)


def _transpose(g, node, ins, flows):
    perm = g.nodes[node]["attrs"]["perm"]
    return _remap(flows[0], {old: new for new, old in enumerate(perm)})


def _split_heads(g, node, ins, flows):
    rank = len(g.nodes[ins[0]]["shape"])
    amap = {a: a for a in range(rank - 2)}
    amap[rank - 2] = rank - 1  # (.., seq, h*d) -> (.., h, seq, d)
    return _remap(flows[0], amap)


def _merge_heads(g, node, ins, flows):
    rank = len(g.nodes[ins[0]]["shape"])
    amap = {a: a for a in range(rank - 3)}
    amap[rank - 2] = rank - 3  # (.., h, seq, d) -> (.., seq, h*d)
    return _remap(flows[0], amap)


def _input(g, node, ins, flows):
    deps = {s: EMPTY for s in SEQ_DIMS}
    for a, name in enumerate(g.nodes[node]["shape"]):
        s = _seq_of(name)
        if s:
            deps[s] = frozenset({("pos", a)})
    return Flow(deps)


def _padding_mask(g, node, ins, flows):
    shape = g.nodes[node]["shape"]
    return Flow(mask={("keypad", len(shape) - 1, _seq_of(shape[-1]))}, polarity="keep")


def _causal_mask(g, node, ins, flows):
    return Flow(mask={("causal", 0, 1)}, polarity="keep")


def _embed(g, node, ins, flows):
    return Flow(flows[0].deps)


def _concat(g, node, ins, flows):
    rank = len(g.nodes[node]["shape"])
    axis = g.nodes[node]["attrs"]["axis"] % rank
    return Flow(_deps_join([_remap(f, {a: a for a in range(rank) if a != axis}) for f in flows]))


def _identity(g, node, ins, flows):
    return flows[0]


TRANSFER = {
    "input": _input, "embed": _embed, "positional": _plain, "linear": _last_mixing,
    "split_heads": _split_heads, "merge_heads": _merge_heads, "scores": _scores,
    "mask": _mask, "softmax": _softmax, "attend": _matmul, "add": _add,
    "norm": _last_mixing, "activation": _plain, "padding_mask": _padding_mask,
    "causal_mask": _causal_mask, "unembed": _last_mixing, "output": _identity,
    "reshape": _reshape, "transpose": _transpose, "matmul": _matmul, "einsum": _einsum,
    "where": _where, "reduce": _reduce, "elementwise": _elementwise, "concat": _concat,
}


def analyse(g: nx.MultiDiGraph) -> dict[str, Flow]:
    """The flow facts of every node, in topological order."""
    flows: dict[str, Flow] = {}
    for node in nx.topological_sort(g):
        op = g.nodes[node]["op"]
        if op not in TRANSFER:
            raise GraphError(f"node {node}: no information-flow rule for op {op!r}")
        ins = arg_nodes(g, node)
        flows[node] = TRANSFER[op](g, node, ins, [flows[i] for i in ins])
    return flows


def applied_masks(g: nx.MultiDiGraph, flows: dict, softmax: str) -> set:
    """The masks that really reach a softmax: causal, src_padding, tgt_padding."""
    (scores,) = arg_nodes(g, softmax)
    labels = set()
    for c in flows[scores].minf:
        labels.add("causal" if c[0] == "causal" else f"{c[2]}_padding")
    return labels

"""Token-level information flow over the graph (the QKV4xx analysis).

An abstract interpretation: for every node it computes, per token source
(``src``, ``tgt``), which input positions an element can depend on:

* ``("pos", a)``    — element i along axis a depends on token i only;
* ``("causal", a)`` — on tokens <= i along axis a;
* ``("nonpad",)``   — on every non-padding token of the source;
* ``("all",)``      — on any token, future or padding included.

Bool masks carry *constraints* instead: ``("causal", qa, ka)`` keeps key
ka <= query qa, ``("keypad", ka, source)`` keeps non-padding keys. A
reduction (softmax, sum, a matmul contraction) over a sequence axis turns
``pos`` into whatever the constraints on that axis allow. The node where a
``tgt`` dependence first widens past ``causal`` is where a decoder starts
to see the future; where a ``src`` one reaches ``all``, padding leaks.
"""

import networkx as nx

from .dims import SEQ_DIMS, factors
from .graph import arg_nodes
from .shapes import reshape_map

__all__ = ["analyse", "Flow"]

ALL, NONPAD = ("all",), ("nonpad",)


class Flow:
    """Facts of one tensor: ``deps[source]`` sets and mask ``constraints``."""

    __slots__ = ("deps", "constraints")

    def __init__(self, deps=None, constraints=frozenset()):
        self.deps = deps or {s: frozenset() for s in SEQ_DIMS}
        self.constraints = frozenset(constraints)


def _norm(facts: set) -> frozenset:
    if ALL in facts:
        return frozenset({ALL})
    causal = {f[1] for f in facts if f[0] == "causal"}
    return frozenset(f for f in facts if not (f[0] == "pos" and f[1] in causal))


def _seq_of(name: str) -> str | None:
    parts = [p for p in factors(name) if p in SEQ_DIMS]
    return parts[0] if parts else None


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
    cons = set()
    for c in flow.constraints:
        if c[0] == "causal" and c[1] in amap and c[2] in amap:
            cons.add(("causal", amap[c[1]], amap[c[2]]))
        elif c[0] == "keypad" and c[1] in amap:
            cons.add(("keypad", amap[c[1]], c[2]))
    return Flow(deps, cons)


def _join(flows: list[Flow], keep_constraints: bool = True) -> Flow:
    deps = {s: _norm(set().union(*(f.deps[s] for f in flows))) for s in SEQ_DIMS}
    cons = set().union(*(f.constraints for f in flows)) if keep_constraints else set()
    return Flow(deps, cons)


def _reduce_axis(facts: frozenset, axis: int, constraints: frozenset, query_axis_after, source: str) -> set:
    """Facts of ``source`` after summing over ``axis`` under the live-entry ``constraints``."""
    out = set()
    causal = [c for c in constraints if c[0] == "causal" and c[2] == axis]
    keypad = [c for c in constraints if c[0] == "keypad" and c[1] == axis and c[2] == source]
    for f in facts:
        if f[0] in ("pos", "causal") and f[1] == axis:
            if causal and query_axis_after(causal[0][1]) is not None:
                out.add(("causal", query_axis_after(causal[0][1])))
            elif keypad:
                out.add(NONPAD)
            else:
                out.add(ALL)
        else:
            out.add(f)
    return out


def _broadcast_maps(g, node, ins):
    ndim = len(g.nodes[node]["shape"])
    return [{a: ndim - len(g.nodes[i]["shape"]) + a for a in range(len(g.nodes[i]["shape"]))} for i in ins]


def _pointwise(g, node, ins, flows):
    return _join([_remap(f, m) for f, m in zip(flows, _broadcast_maps(g, node, ins))])


def _last_mixing(g, node, ins, flows):
    """Ops that mix the last axis only (linear, norm, unembed)."""
    (f,) = flows
    last = len(g.nodes[ins[0]]["shape"]) - 1
    amap = {a: a for a in range(last)}
    return Flow(_remap(f, amap).deps, frozenset())


def _contract(g, node, ins, flows, specs, out_spec):
    """General product: ``specs`` letters per operand, ``out_spec`` result letters."""
    live = set()
    for f, spec in zip(flows, specs):
        for c in f.constraints:
            if c[0] == "causal":
                live.add(("causal", spec[c[1]], spec[c[2]]))
            else:
                live.add(("keypad", spec[c[1]], c[2]))
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
                if causal:
                    deps[s].add(("causal", out_spec.index(causal[0][1])))
                elif keypad:
                    deps[s].add(NONPAD)
                else:
                    deps[s].add(ALL)
    return Flow({s: _norm(v) for s, v in deps.items()})


def _matmul(g, node, ins, flows):
    ranks = [len(g.nodes[i]["shape"]) for i in ins]
    out_rank = len(g.nodes[node]["shape"])
    letters = "abcdefghijklmnopqrstuvw"
    batch = letters[:out_rank - 2]
    a_spec = batch[out_rank - ranks[0]:] + "yz"
    b_spec = batch[out_rank - ranks[1]:] + "zx"
    return _contract(g, node, ins, flows, [a_spec, b_spec], batch + "yx")


def _scores(g, node, ins, flows):
    rank = len(g.nodes[node]["shape"])
    batch = "abcdefghijklmnop"[:rank - 2]
    return _contract(g, node, ins, flows, [batch + "yz", batch + "xz"], batch + "yx")


def _einsum(g, node, ins, flows):
    lhs, rhs = g.nodes[node]["attrs"]["equation"].replace(" ", "").split("->")
    return _contract(g, node, ins, flows, lhs.split(","), rhs)


def _softmax(g, node, ins, flows):
    (f,) = flows
    axis = g.nodes[node]["attrs"]["axis"] % len(g.nodes[node]["shape"])
    deps = {}
    for s, facts in f.deps.items():
        mixed = _reduce_axis(facts, axis, f.constraints, lambda qa: qa, s)
        deps[s] = _norm(mixed)
    return Flow(deps, f.constraints)


def _reduce(g, node, ins, flows):
    (f,) = flows
    attrs = g.nodes[node]["attrs"]
    rank = len(g.nodes[ins[0]]["shape"])
    axes = sorted(a % rank for a in attrs["axis"])
    amap, k = {}, 0
    for a in range(rank):
        if a in axes:
            if attrs["keepdims"]:
                k += 1
            continue
        amap[a] = k
        k += 1
    deps = {}
    for s, facts in f.deps.items():
        mixed = set(facts)
        for axis in axes:
            mixed = _reduce_axis(frozenset(mixed), axis, f.constraints, lambda qa: qa, s)
        deps[s] = mixed
    return _remap(Flow({s: _norm(v) for s, v in deps.items()}, f.constraints), amap)


def _mask(g, node, ins, flows):
    scores, keep = flows
    maps = _broadcast_maps(g, node, ins)
    return Flow(_remap(scores, maps[0]).deps, _remap(keep, maps[1]).constraints | scores.constraints)


def _reshape(g, node, ins, flows):
    amap = reshape_map(g.nodes[ins[0]]["shape"], g.nodes[node]["shape"], g.graph["dims"]) or {}
    return _remap(flows[0], amap)


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
    shape = g.nodes[node]["shape"]
    deps = {s: frozenset() for s in SEQ_DIMS}
    for a, name in enumerate(shape):
        s = _seq_of(name)
        if s:
            deps[s] = frozenset({("pos", a)})
    return Flow(deps)


def _padding_mask(g, node, ins, flows):
    shape = g.nodes[node]["shape"]
    return Flow(None, {("keypad", len(shape) - 1, _seq_of(shape[-1]))})


def _causal_mask(g, node, ins, flows):
    return Flow(None, {("causal", 0, 1)})


def _embed(g, node, ins, flows):
    return Flow(flows[0].deps)


def _concat(g, node, ins, flows):
    axis = g.nodes[node]["attrs"]["axis"] % len(g.nodes[node]["shape"])
    rank = len(g.nodes[node]["shape"])
    return _join([_remap(f, {a: a for a in range(rank) if a != axis}) for f in flows])


TRANSFER = {
    "input": _input, "embed": _embed, "positional": _pointwise, "linear": _last_mixing,
    "split_heads": _split_heads, "merge_heads": _merge_heads, "scores": _scores,
    "mask": _mask, "softmax": _softmax, "attend": _matmul, "add": _pointwise,
    "norm": _last_mixing, "activation": _pointwise, "padding_mask": _padding_mask,
    "causal_mask": _causal_mask, "unembed": _last_mixing, "output": _pointwise,
    "reshape": _reshape, "transpose": _transpose, "matmul": _matmul, "einsum": _einsum,
    "where": _pointwise, "reduce": _reduce, "elementwise": _pointwise, "concat": _concat,
}


def analyse(g: nx.MultiDiGraph) -> dict[str, Flow]:
    """The flow facts of every node, in topological order."""
    flows: dict[str, Flow] = {}
    for node in nx.topological_sort(g):
        op = g.nodes[node]["op"]
        if op not in TRANSFER:
            raise KeyError(f"no flow rule for op {op!r}")
        ins = arg_nodes(g, node)
        flows[node] = TRANSFER[op](g, node, ins, [flows[i] for i in ins])
    return flows


def widened(before: list[frozenset], after: frozenset, bad) -> bool:
    """True when ``after`` has a bad fact none of ``before`` had."""
    return any(bad(f) for f in after) and not any(bad(f) for facts in before for f in facts)

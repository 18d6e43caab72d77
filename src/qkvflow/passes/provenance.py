"""The provenance pass: where the Q, K and V of every attention come from.

For every declared attention block (``graph.graph["attention"]``) the pass
finds each softmax inside the block (one per head when a block loops over
its heads), the scores product before it and the weighted sum after it. It
walks Q, K and V back out of the block to the tensor each was computed
from, marks the edges on the way with the roles ``q``, ``k`` and ``v`` (and
the weights' edge into the weighted sum ``probs``), and writes one *site*
per softmax into the block's record, under ``sites``:

``softmax``, ``scores``, ``attend``
    the three nodes of the pattern (the softmax is ``nn.softmax`` or one
    written by hand, ``e / e.sum(-1, keepdims=True)`` with ``e = np.exp(...)``);
``logits``
    the node the softmax normalises (where masks must have set -inf);
``origins``
    role -> the first node outside the block on the way back;
``entries``
    role -> the block's node that reads that origin (where a finding points);
``paths``
    role -> the block's nodes on the way back, from the pattern to the entry;
``masks``
    the labels (``causal``, ``<dim>_padding``) of the mask ops that reach the
    softmax beside the scores, made inside the block or handed in;
``scale``, ``contracted``
    the constant the scores are multiplied by before the softmax (None when
    it cannot be told) and the dims Q and K are contracted over;
``rotary``
    whether Q and K are both multiplied by sines / cosines of the positions
    (rotary positions, however they are written);
``problem``
    instead of the above, why the pattern was not found.

Like an fx pass writing node metadata: the tracer only records operations
and declarations, and this pass derives its facts from the graph alone, so
a graph loaded from JSON or made by another front-end gets the same facts.
:func:`qkvflow.ir.graph.lint` checks that recorded sites agree with the
graph.
"""

import collections

import networkx as nx

from ..ir.dims import dim_table
from ..ir.graph import expect_graph, softmax_logits
from ..ir.ops import Group, in_group

__all__ = ["annotate", "ensure"]


def annotate(g: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """Find every attention site of every declared block; write them into ``g``."""
    members = collections.defaultdict(list)
    for node, block in g.nodes(data="attention_block"):
        if block is not None:
            members[block].append(node)
    for path, record in g.graph["attention"].items():
        inside = members.get(path, [])
        inside_set = set(inside)
        normalised = ((sm, softmax_logits(g, sm)) for sm in inside)
        record["sites"] = [_site(g, sm, logits, inside_set) for sm, logits in normalised if logits]
    return g


def ensure(g: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """Annotate ``g`` unless every block already has its sites.

    check, explain and render call it, so a graph made without the pass (by
    the bare tracer, another front-end, or with its sites stripped) gets
    the same facts; recorded sites are kept, and lint checks them.
    """
    expect_graph(g)
    if any("sites" not in record for record in g.graph.get("attention", {}).values()):
        annotate(g)
    return g


def _site(g, sm: str, logits: str, inside: set) -> dict:
    scores = _nearest(g, sm, inside, backwards=True)
    attend = _nearest(g, sm, inside, backwards=False)
    if scores is None or attend is None:
        return {"softmax": sm, "problem": "no scores product before the softmax or no weighted sum after it"}
    origins, entries, paths = _trace_qkv(g, scores, sm, attend, inside)
    masks = sorted({_mask_label(g, n) for n in _masks_beside(g, sm, scores, inside)})
    return {"softmax": sm, "logits": logits, "scores": scores, "attend": attend,
            "origins": origins, "entries": entries, "paths": paths, "masks": masks,
            "scale": _scale(g, scores, logits, paths), "contracted": _contracted(g, scores),
            "rotary": all(_rotated(g, paths.get(r, []), origins.get(r)) for r in ("q", "k"))}


def _rotated(g, path: list, origin: str | None) -> bool:
    """Whether a way back multiplies by sines or cosines of position indices (np.arange):
    rotary positions, however they are written. Only the side operands of the
    way are searched (not the state it reads)."""
    if any(g.nodes[n]["op"] == "rotary" for n in path):
        return True
    for node in path:
        for u in g.predecessors(node):
            if u in path or u == origin or g.nodes[u]["op"] == "param" or (
                    origin in g and nx.has_path(g, origin, u)):
                continue
            trig = [n for n in nx.ancestors(g, u) | {u}
                    if g.nodes[n]["op"] == "elementwise" and g.nodes[n]["attrs"].get("fn") in ("sin", "cos")]
            if any(g.nodes[a]["op"] == "arange" for t in trig for a in nx.ancestors(g, t)):
                return True
    return False


def _factor(g, node: str) -> float | None:
    """What a node multiplies its data by: a constant product or quotient, 1 for
    anything else that keeps values (masks, moves), None when it is unknown."""
    d = g.nodes[node]
    if d["op"] == "scores":
        return d["attrs"]["scale"]
    if d["op"] != "elementwise" or "const" not in d["attrs"]:
        return 1.0
    fn, c = d["attrs"]["fn"], d["attrs"]["const"]
    if fn == "mul":
        return c
    if fn == "div" and not d["attrs"].get("const_first") and c:
        return 1.0 / c
    return 1.0 if fn in ("add", "sub") else None


def _scale(g, scores: str, logits: str, paths: dict) -> float | None:
    """The constant the scores are multiplied by on the way to the softmax:
    factors on Q's and K's way into the product, the product's own, and those
    between it and the softmax."""
    chain, node = [scores], logits
    while node != scores:
        preds = sorted(g.in_edges(node, keys=True, data=True), key=lambda e: e[3]["arg"])
        if not preds or node in chain:
            return None
        chain.append(node)
        node = _data_operand(g, preds)[0]
    total = 1.0
    for n in chain + paths.get("q", []) + paths.get("k", []):
        f = _factor(g, n)
        if f is None:
            return None
        total *= f
    return total


def _contracted(g, scores: str) -> list:
    """The dims Q and K are contracted over in the scores product."""
    d = g.nodes[scores]
    q_arg, _ = _query_key_args(d)
    q = [u for u, _, e in g.in_edges(scores, data=True) if e["arg"] == q_arg]
    if not q:
        return []
    q_shape = g.nodes[q[0]]["shape"]
    if d["op"] != "einsum":
        return [q_shape[-1]] if q_shape else []
    lhs, rhs = d["attrs"]["equation"].replace(" ", "").split("->")
    specs = lhs.split(",")
    others = "".join(s for i, s in enumerate(specs) if i != q_arg)
    return [q_shape[i] for i, c in enumerate(specs[q_arg]) if c in others and c not in rhs]


def _trace_qkv(g, scores: str, sm: str, attend: str, inside: set) -> tuple[dict, dict]:
    """Label the Q, K, V (and probs) edges; return each role's origin and the
    block's node that reads it."""
    q_arg, k_arg = _query_key_args(g.nodes[scores])
    into_scores = {d["arg"]: (u, k) for u, _, k, d in g.in_edges(scores, keys=True, data=True)}
    into_attend = {d["arg"]: (u, k) for u, _, k, d in g.in_edges(attend, keys=True, data=True)}
    after_softmax = _within(g, sm, inside)  # block nodes the weights flow into
    v_arg = next((arg for arg, (u, _) in sorted(into_attend.items())
                  if u != sm and u not in after_softmax), None)
    origins, entries, paths = {}, {}, {}
    for role, (first, key), consumer in (
        ("q", into_scores.get(q_arg, (None, None)), scores),
        ("k", into_scores.get(k_arg, (None, None)), scores),
        ("v", into_attend.get(v_arg, (None, None)), attend),
    ):
        if first is None:
            continue
        g.edges[first, consumer, key]["role"] = role
        paths[role] = []
        origins[role], entry = _walk_back(g, first, inside, role, paths[role])
        entries[role] = entry or consumer
    for arg, (u, key) in into_attend.items():
        if arg != v_arg:
            g.edges[u, attend, key]["role"] = "probs"
    return origins, entries, paths


def _walk_back(g, node: str, inside: set, role: str, chain: list) -> tuple:
    """Follow the data operand out of the block; label the chain's edges ``role``.

    Returns the origin (the first node outside the block) and the block's
    node that reads it (None when ``node`` is already outside); ``chain``
    gets the block's nodes on the way.
    """
    entry = None
    while node in inside:
        chain.append(node)
        preds = sorted(g.in_edges(node, keys=True, data=True), key=lambda e: e[3]["arg"])
        if not preds:
            return None, node
        u, _, k, _ = _data_operand(g, preds)
        g.edges[u, node, k]["role"] = role
        entry, node = node, u
    return node, entry


def _data_operand(g, preds: list) -> tuple:
    """The input edge carrying the data, not a mask: a full-shaped float
    operand (``where(keep, v, 0)`` and ``keep * v`` lead back through v)."""
    def rank(edge):
        d = g.nodes[edge[0]]
        return (d["op"] == "param", d["dtype"] != "float", "1" in d["shape"], edge[3]["arg"])
    return min(preds, key=rank)


def _masks_beside(g, sm: str, scores: str, inside: set) -> set:
    """Mask ops that reach the softmax beside the scores product (not through Q or K),
    made inside the block or handed in."""
    region, outside, stack = set(), set(), [sm]
    while stack:
        for u in g.predecessors(stack.pop()):
            if u == scores or u in region:
                continue
            if u in inside:
                region.add(u)
                stack.append(u)
            else:
                outside.add(u)
    found = {n for o in outside for n in nx.ancestors(g, o) | {o} if _makes_mask(g, n)}
    return found | {n for n in region if _makes_mask(g, n)}


_COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")


def _makes_mask(g, node: str) -> bool:
    """A mask op, or token ids compared with a constant (``ids != pad_id``)."""
    d = g.nodes[node]
    if in_group(d["op"], Group.MASK):
        return True
    if (d["op"] == "tril" and d["attrs"]["k"] == 0) or (d["op"] == "triu" and d["attrs"]["k"] == 1):
        return any(g.nodes[u]["op"] == "fill" for u in g.predecessors(node))  # of a constant: causal
    return (d["op"] == "elementwise" and d["attrs"].get("fn") in _COMPARISONS and "const" in d["attrs"]
            and all(g.nodes[u]["dtype"] == "int" for u in g.predecessors(node)))


def _mask_label(g, node: str) -> str:
    """``causal``, or ``<sequence dim>_padding`` for the padding of that sequence."""
    d = g.nodes[node]
    if d["op"] in ("causal_mask", "tril", "triu"):
        return "causal"
    last = d["shape"][-1] if d["shape"] else "?"
    return f"{dim_table(g.graph).seq_of(last) or last}_padding"


def _query_key_args(scores: dict) -> tuple[int, int]:
    """Argument positions of Q and K in a scores product: (0, 1), except for an
    einsum written keys first ("bhkd,bhqd->bhqk"), told by the key axis."""
    if scores["op"] != "einsum" or scores.get("key_axis") is None:
        return 0, 1
    lhs, rhs = scores["attrs"]["equation"].replace(" ", "").split("->")
    specs = lhs.split(",")
    key_letter = rhs[scores["key_axis"]]
    k_arg = next((i for i, spec in enumerate(specs) if key_letter in spec), 1)
    return (1, 0) if k_arg == 0 else (0, k_arg)


def _within(g, start: str, inside: set) -> set:
    """Nodes of the block reachable from ``start`` (cost bounded by the block's size)."""
    seen, stack = set(), [start]
    while stack:
        for n in g.successors(stack.pop()):
            if n in inside and n not in seen:
                seen.add(n)
                stack.append(n)
    return seen


def _nearest(g, start: str, inside: set, backwards: bool) -> str | None:
    """Breadth-first from ``start`` within the block to the nearest contraction."""
    frontier, seen = collections.deque([start]), {start}
    while frontier:
        node = frontier.popleft()
        nxt = g.predecessors(node) if backwards else g.successors(node)
        for n in sorted(set(nxt)):
            if n in seen or n not in inside:
                continue
            if in_group(g.nodes[n]["op"], Group.CONTRACTION):
                return n
            seen.add(n)
            frontier.append(n)
    return None

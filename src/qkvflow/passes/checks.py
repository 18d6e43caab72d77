"""The checker: structure, config, shapes, provenance and information flow.

Each pass reads only the graph and yields :class:`Diagnostic` records with
stable codes (see :data:`CODES`). Structure (QKV001) is apart from meaning:
a graph that is not well formed gets no semantic passes.
"""

import dataclasses
import math

import networkx as nx

from ..ir.dims import size_of
from ..ir.graph import ATTENTION_KINDS, arg_nodes, describe_origin, execution_order, lint, vocabulary_of
from ..ir.ops import OPS
from .diagnostics import Diagnostic, diag
from .provenance import ensure
from .shapes import shape_findings

__all__ = ["Diagnostic", "CODES", "check", "has_errors"]

CODES = {
    "QKV001": "the graph is not well formed",
    "QKV101": "d_model is not divisible by heads",
    "QKV102": "heads is not divisible by kv_heads",
    "QKV103": "a size is not positive",
    "QKV104": "an option has a value qkvflow does not know or out of its range",
    "QKV201": "named-dim mismatch",
    "QKV202": "contraction over two different dims",
    "QKV203": "reshape that reorders axes or is not a split/merge",
    "QKV204": "softmax of attention scores over a non-key axis",
    "QKV205": "mask broadcast along the wrong axis",
    "QKV206": "a node's recorded shape differs from its rule",
    "QKV207": "attention scores scaled otherwise than 1/sqrt(d_head) (or the declared scale)",
    "QKV301": "Q/K/V origin differs from the declaration",
    "QKV302": "K and V (or self-attention Q and K) from different states",
    "QKV303": "cross-attention reads a non-final encoder state",
    "QKV304": "self-attention reads another layer's state",
    "QKV305": "attention block without a recognisable scores-softmax-sum (cannot be checked)",
    "QKV306": "the masks applied differ from the declared mask",
    "QKV307": "two of Q, K, V computed by one projection",
    "QKV308": "a parametrised op whose result reaches no output",
    "QKV401": "a position of a causal sequence depends on a later token (a decoder sees the future)",
    "QKV402": "a padding position influences a real one",
    "QKV403": "encoder self-attention is causally masked",
}


def _structure(g):
    for node, problem in lint(g):
        yield diag(g, "QKV001", node, problem, source="?")


def _config(g):
    cfg, dims = g.graph.get("config", {}), g.graph.get("dims", {})
    where = f"config of {g.graph.get('model', '?')}"
    for name, size in sorted(dims.items()):
        if size is not None and size <= 0:
            yield diag(g, "QKV103", "config", f"{name} = {size}, expected a positive size", source=where)
    for key in ("encoder_layers", "decoder_layers"):
        if key in cfg and cfg[key] < 0:
            yield diag(g, "QKV103", "config", f"{key} = {cfg[key]}, expected 0 or more", source=where)
    d_model, heads = cfg.get("d_model"), cfg.get("heads")
    if d_model and heads and heads > 0 and not cfg.get("d_head") and d_model % heads:
        yield diag(g, "QKV101", "config",
                    f"d_model = {d_model} is not divisible by heads = {heads} "
                    f"(d_head would be {d_model / heads:g}); set d_head or change heads", source=where)
    kv = cfg.get("kv_heads")
    if kv and heads and heads % kv:
        yield diag(g, "QKV102", "config", f"heads = {heads} is not divisible by kv_heads = {kv}", source=where)
    eps = cfg.get("norm_eps")
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        yield diag(g, "QKV103", "config", f"norm_eps = {eps}, expected a positive number", source=where)
    vocab = dims.get("vocab")
    for key in ("pad_id", "bos_id", "eos_id"):
        value = cfg.get(key)
        if key == "pad_id" and value == -1 and cfg.get("family") == "decoder_only":
            continue  # no padding token
        if value is not None and vocab and vocab > 0 and not 0 <= value < vocab:
            yield diag(g, "QKV104", "config",
                        f"{key} = {value} is not a token id of the vocabulary 0..{vocab - 1}", source=where)
    for node in g.graph.get("inputs", []):
        attrs, vocab = g.nodes[node]["attrs"], vocabulary_of(g, node)
        if attrs.get("pad_id") is not None and vocab and not 0 <= attrs["pad_id"] < vocab:
            yield diag(g, "QKV104", node, f"input {attrs['name']} declares pad_id {attrs['pad_id']}, which "
                       f"is not a token id of its vocabulary 0..{vocab - 1}")
    said = {repr(cfg.get("norm_eps"))}  # one finding per bad eps value, not one per norm
    for node, d in g.nodes(data=True):
        eps = d["attrs"].get("eps") if d["op"] == "norm" else None
        if eps is not None and not (math.isfinite(eps) and eps > 0) and repr(eps) not in said:
            said.add(repr(eps))
            yield diag(g, "QKV103", node, f"norm {node} has eps = {eps}, expected a positive number")
        for attr, accepted in OPS[d["op"]].choices.items():
            if attr in d["attrs"] and d["attrs"][attr] not in accepted:
                yield diag(g, "QKV104", node, f"{d['op']} {node} has {attr} = {d['attrs'][attr]!r}, which "
                           f"qkvflow does not run; use one of {', '.join(accepted)}")


def _final_output(stream: str | None) -> str:
    return "the encoder's final output" if stream in (None, "encoder") else f"the {stream} stream's final output"


def _state_words(g, state: str) -> str:
    """What a declared Q/K/V state names, in words."""
    return _final_output(_memory_stream(g)) if state == "memory" else f"the {state} stream"


def _memory_stream(g) -> str | None:
    memory = g.graph.get("memory")
    return g.nodes[memory].get("stream") if memory in g else None


def _origin_words(fact) -> str:
    if fact["state"] == "memory":
        return f"{_final_output(fact['stream'])} ({fact['node']})"
    layer = "" if fact["layer"] is None else f" layer {fact['layer']}"
    return f"{fact['stream'] or 'no'} stream{layer} ({fact['node']})"


def _wiring(*args, **kwargs):
    """A finding about what a block reads: at the block's own line (see ``diag``)."""
    return diag(*args, wiring=True, **kwargs)


def _site(rec, role: str, default: str) -> tuple[str, str | None]:
    """Where a wrong ``role`` origin is read: (node, source or None for the node's).

    The block's node that reads it, unless the block read an argument that was
    handed the wrong state: then the line that called the block.
    """
    origins = rec.get("origins", {})
    origin = origins.get(role)
    other = origins.get("k" if role == "q" else "q")
    handed_in = origin in rec.get("args", {}).values()
    if handed_in and rec.get("call_source") and (rec["kind"] != "cross" or origin != other):
        return rec["block"], rec["call_source"]
    return rec.get("entries", {}).get(role) or default, None


def _provenance(g):
    streams = set(g.graph.get("streams", []))
    for block, rec in g.graph["attention"].items():
        unknown = [(r, s) for r, s in rec["declared"].items() if r in "qkv" and s != "memory" and s not in streams]
        for role, state in unknown:
            yield _wiring(g, "QKV301", block,
                       f"{block} declares {role}={state!r}, which is not a stream of the model "
                       f"(streams: {', '.join(sorted(streams)) or 'none'}; or 'memory')", source=rec["source"])
        if not rec["sites"]:
            yield diag(g, "QKV305", block, f"{ATTENTION_KINDS[rec['kind']]} {block} cannot be checked: no softmax "
                       "inside the block; use qkvflow.nn.softmax so its scores, weights and weighted sum can "
                       "be identified", severity="warning", source=rec["source"])
        for site in rec["sites"]:
            if site.get("problem"):
                yield diag(g, "QKV305", block, f"{ATTENTION_KINDS[rec['kind']]} {block} cannot be checked: "
                           f"{site['problem']}", severity="warning", source=rec["source"])
            elif not unknown:
                yield from _site_provenance(g, block, {**rec, **site, "block": block})


def _scale_findings(g, block: str, rec: dict):
    """The scores' scale against the declared one (1/sqrt of the contracted dim by default)."""
    declared, scale = rec["declared"].get("scale", "sqrt"), rec.get("scale")
    dims = g.graph["dims"]
    sizes = [size_of(d, dims) for d in rec.get("contracted", [])]
    if scale is None or not sizes or None in sizes or min(sizes) <= 0:
        return
    width = math.prod(sizes)
    want = 1 / math.sqrt(width) if declared == "sqrt" else 1.0 if declared == "none" else float(declared)
    if math.isclose(scale, want, rel_tol=1e-6):
        return
    named = "*".join(rec["contracted"])
    expected = f"1/sqrt({named}) = {want:.6g}" if declared == "sqrt" else f"the declared {want:.6g}"
    hint = next((f" (1/sqrt({n}): a width, not the {named} Q and K are multiplied over)"
                 for n, s in dims.items() if isinstance(s, int) and s > 0 and n not in rec["contracted"]
                 and math.isclose(scale, s ** -0.5)),
                " (unscaled)" if math.isclose(scale, 1.0) else "")
    yield diag(g, "QKV207", rec["scores"], f"{block}: the scores are scaled by {scale:.6g}{hint}; "
               f"expected {expected}; declare scale=... on the block if this is meant")


def _site_provenance(g, block: str, rec: dict):
    """One attention site (one softmax) against its block's declaration."""
    yield from _shared_projections(g, block, rec)
    yield from _scale_findings(g, block, rec)
    origins = rec.get("origins", {})
    facts = {r: describe_origin(g, block, origins.get(r)) for r in ("q", "k", "v")}
    for role, fact in facts.items():
        want = rec["declared"][role]
        node, source = _site(rec, role, rec["scores"] if role in "qk" else rec["attend"])
        got = _origin_words(fact)
        if want == "memory" and fact["state"] == "memory":
            continue
        if want == "memory" and fact["stream"] == _memory_stream(g):
            yield _wiring(g, "QKV303", node,
                       f"{block}: {role.upper()} reads {got}, an intermediate {fact['stream']} state; "
                       f"declared: {_state_words(g, want)}", source=source)
        elif want == "memory" or fact["stream"] != want or fact["state"] == "memory":
            yield _wiring(g, "QKV301", node,
                       f"{block}: {role.upper()} comes from {got}; declared: {_state_words(g, want)}",
                       source=source)
        elif fact["state"] == "stale":
            yield _wiring(g, "QKV304", node,
                       f"{block}: {role.upper()} reads {got}, not the state entering layer "
                       f"{rec['layer']}", source=source)
    if origins.get("k") != origins.get("v"):
        node, source = _site(rec, "v", rec["attend"])
        yield _wiring(g, "QKV302", node,
                   f"{block}: K comes from {_origin_words(facts['k'])} but V from "
                   f"{_origin_words(facts['v'])}; they must read the same state", source=source)
    elif rec["kind"] != "cross" and origins.get("q") != origins.get("k"):
        node, source = _site(rec, "k", rec["scores"])
        yield _wiring(g, "QKV302", node,
                   f"{block}: self-attention Q comes from {_origin_words(facts['q'])} but K and V "
                   f"from {_origin_words(facts['k'])}", source=source)


def _shared_projections(g, block, rec):
    """Q, K and V each need their own projection: ``v = q`` is a copy-paste slip.

    Two roles share one when their ways back into the block end at the same
    projection without taking different parts of it (a fused Q|K|V
    projection split with np.split gives each role its own part)."""
    entries, paths = rec.get("entries", {}), rec.get("paths", {})
    seen = {}
    for role in ("q", "k", "v"):
        node = entries.get(role)
        other = seen.get(node)
        if other and _is_projection(g, node) and _parts(g, paths.get(role, ())) == _parts(g, paths.get(other, ())):
            yield _wiring(g, "QKV307", node,
                       f"{block}: {role.upper()} is computed by {other.upper()}'s projection "
                       f"{node}; each of Q, K and V needs its own")
        seen.setdefault(node, role)


def _parts(g, path) -> set:
    """Which parts of which splits a way back takes: (split input, part index)."""
    return {(next(iter(g.predecessors(n))), g.nodes[n]["attrs"]["index"])
            for n in path if n in g and g.nodes[n]["op"] == "split_part"}


def _is_projection(g, node) -> bool:
    """A linear op, or a product with a parameter (``x @ W``)."""
    if node not in g:
        return False
    op = g.nodes[node]["op"]
    return op == "linear" or (op in ("matmul", "einsum") and any(
        g.nodes[u]["op"] == "param" for u in g.predecessors(node)))


def _dead_parameters(g):
    """Parameters of ops whose result no output depends on: work done for nothing.

    One finding per dead region, at its last parametrised op (an unread
    encoder is one finding, not one per layer).
    """
    live = set(g.graph.get("outputs", []))
    for out in g.graph.get("outputs", []):
        live |= nx.ancestors(g, out)
    dead = {n for n, d in g.nodes(data=True)
            if (d.get("params") or d["attrs"].get("tied_to")) and n not in live}
    for node in sorted(dead):
        if nx.descendants(g, node) & dead:
            continue
        before = len(nx.ancestors(g, node) & dead)
        also = f" (nor on the {before} parametrised ops before it)" if before else ""
        yield diag(g, "QKV308", node,
                    f"{node} ({g.nodes[node]['op']}) has parameters but no output depends on it{also}; "
                    f"was its result meant to be used?", severity="warning")


def _declared_masks(text: str) -> set:
    return {m.strip() for m in text.split("+") if m.strip() and m.strip() != "none"}


def _flow(g):
    from .flow import ALL, NONPAD, analyse, applied_masks, padded_sequences
    flows = analyse(g)
    # Causal sequences first: a node that leaks both is reported as seeing the future.
    sequences = sorted(g.graph.get("sequences", {}).items(), key=lambda item: item[1] != "causal")
    future = lambda f: f in (ALL, NONPAD)  # noqa: E731 - a predicate over facts
    padding = lambda f: f == ALL  # noqa: E731
    padded = padded_sequences(g, flows)
    for node in execution_order(g):
        ins = arg_nodes(g, node)
        d = g.nodes[node]
        if not ins:
            continue
        place = d.get("block_path") or node
        for seq, rule in sequences:
            # A position exists only on a tensor with an axis over the sequence: a value
            # picked or pooled out of it leaks only where it is spread back over positions.
            if not _has_axis(g, node, seq):
                continue
            before = [flows[i].deps.get(seq, ()) for i in ins if _has_axis(g, i, seq)]
            after = flows[node].deps.get(seq, ())
            if rule == "causal" and _widens(before, after, future):
                yield diag(g, "QKV401", node,
                           f"{place}: {d['op']} {node} mixes {seq} positions without a causal mask, so "
                           f"position t of the causal sequence {seq} depends on {seq} tokens after t")
                break
            if rule != "causal" and seq in padded and _widens(before, after, padding):
                yield diag(g, "QKV402", node,
                           f"{place}: {d['op']} {node} mixes {seq} positions without a {seq} padding "
                           f"mask, so padding tokens influence real positions")
                break
    for block, rec in g.graph["attention"].items():
        declared = _declared_masks(rec["declared"]["mask"])
        for site in rec["sites"]:
            if site.get("problem"):
                continue
            applied = applied_masks(g, flows, site["logits"])
            if applied != declared:
                missing, extra = sorted(declared - applied), sorted(applied - declared)
                parts = ([f"declared but not applied: {', '.join(missing)}"] if missing else []) + (
                    [f"applied but not declared: {', '.join(extra)}"] if extra else [])
                yield diag(g, "QKV306", site["softmax"],
                           f"{block}: the masks reaching the softmax differ from the declaration "
                           f"({'; '.join(parts)}); a mask only counts when it sets the entries it "
                           f"rules out to -inf")
            if rec["kind"] == "encoder_self" and "causal" in applied:
                yield diag(g, "QKV403", site["softmax"],
                           f"{block}: encoder self-attention is causally masked, so position i "
                           f"ignores the tokens after i", severity="warning")


def _has_axis(g, node: str, seq: str) -> bool:
    return any(seq in name.split("*") for name in g.nodes[node]["shape"])


def _widens(before, after, bad) -> bool:
    return any(bad(f) for f in after) and not any(bad(f) for facts in before for f in facts)


PASSES = (_config, shape_findings, _provenance, _flow, _dead_parameters)


def check(graph: nx.MultiDiGraph, strict: bool = False) -> list[Diagnostic]:
    """All findings for one traced graph, errors first then by node order.

    ``strict`` turns warnings into errors.

    Examples
    --------
    >>> import qkvflow as qf
    >>> qf.check(qf.trace(qf.load_model("tiny")))
    []
    """
    ensure(graph)
    found = list(_structure(graph))
    if not found:
        for check_pass in PASSES:
            found.extend(check_pass(graph))
    if strict:
        found = [dataclasses.replace(d, severity="error") for d in found]
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=lambda d: (d.severity != "error", d.code))


def has_errors(diagnostics: list[Diagnostic]) -> bool:
    return any(d.severity == "error" for d in diagnostics)

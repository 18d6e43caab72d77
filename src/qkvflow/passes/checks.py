"""The checker: structure, config, shapes, provenance and information flow.

Each pass reads only the graph and yields :class:`Diagnostic` records with
stable codes (see :data:`CODES`). Structure (QKV001) is apart from meaning:
a graph that is not well formed gets no semantic passes.
"""

import dataclasses

import networkx as nx

from ..ir.dims import describe_shape
from ..ir.graph import ATTENTION_KINDS, arg_nodes, describe_origin, lint
from ..ir.shapes import Meta, ShapeIssue, infer

__all__ = ["Diagnostic", "CODES", "FORMATS", "check", "has_errors", "format_diagnostics"]

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
    "QKV301": "Q/K/V origin differs from the declaration",
    "QKV302": "K and V (or self-attention Q and K) from different states",
    "QKV303": "cross-attention reads a non-final encoder state",
    "QKV304": "self-attention reads another layer's state",
    "QKV305": "attention block without a recognisable scores-softmax-sum (cannot be checked)",
    "QKV306": "the masks applied differ from the declared mask",
    "QKV307": "two of Q, K, V computed by one projection",
    "QKV308": "a parametrised op whose result reaches no output",
    "QKV401": "a decoder position depends on a future target token",
    "QKV402": "a padding position influences a real one",
    "QKV403": "encoder self-attention is causally masked",
}


@dataclasses.dataclass(frozen=True)
class Diagnostic:
    code: str
    severity: str  # "error" | "warning"
    message: str
    node: str
    source: str
    model: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def text(self) -> str:
        return f"{self.source}: {self.severity}: {self.code} {self.message} [{self.model}: {self.node}]"


def _diag(g, code, node, message, severity="error", source=None) -> Diagnostic:
    src = source or (g.nodes[node].get("source", "?") if node in g else "?")
    return Diagnostic(code, severity, message, node, src, g.graph.get("model", ""))


def _structure(g):
    for node, problem in lint(g):
        yield _diag(g, "QKV001", node, problem, source="?")


def _config(g):
    cfg, dims = g.graph.get("config", {}), g.graph.get("dims", {})
    where = f"config of {g.graph.get('model', '?')}"
    for name, size in sorted(dims.items()):
        if size is not None and size <= 0:
            yield _diag(g, "QKV103", "config", f"{name} = {size}, expected a positive size", source=where)
    for key in ("encoder_layers", "decoder_layers"):
        if key in cfg and cfg[key] < 0:
            yield _diag(g, "QKV103", "config", f"{key} = {cfg[key]}, expected 0 or more", source=where)
    d_model, heads = cfg.get("d_model"), cfg.get("heads")
    if d_model and heads and heads > 0 and not cfg.get("d_head") and d_model % heads:
        yield _diag(g, "QKV101", "config",
                    f"d_model = {d_model} is not divisible by heads = {heads} "
                    f"(d_head would be {d_model / heads:g}); set d_head or change heads", source=where)
    kv = cfg.get("kv_heads")
    if kv and heads and heads % kv:
        yield _diag(g, "QKV102", "config", f"heads = {heads} is not divisible by kv_heads = {kv}", source=where)
    eps = cfg.get("norm_eps")
    if eps is not None and eps <= 0:
        yield _diag(g, "QKV103", "config", f"norm_eps = {eps}, expected a positive number", source=where)
    vocab = dims.get("vocab")
    for key in ("pad_id", "bos_id", "eos_id"):
        value = cfg.get(key)
        if value is not None and vocab and vocab > 0 and not 0 <= value < vocab:
            yield _diag(g, "QKV104", "config",
                        f"{key} = {value} is not a token id of the vocabulary 0..{vocab - 1}", source=where)
    from ..models.config import CHOICES
    for key, accepted in CHOICES.items():
        if key in cfg and cfg[key] not in accepted:
            yield _diag(g, "QKV104", "config",
                        f"{key} = {cfg[key]!r} is not known; use one of {', '.join(accepted)}", source=where)


def _meta(g, node) -> Meta:
    d = g.nodes[node]
    return Meta(d["shape"], d.get("key_axis"), d.get("dtype", "float"))


def _shapes(g):
    dims = g.graph["dims"]
    for node in nx.topological_sort(g):
        d = g.nodes[node]
        ins = [_meta(g, a) for a in arg_nodes(g, node)]
        try:
            meta = infer(d["op"], ins, d["attrs"], d.get("params", {}), dims)
        except ShapeIssue as issue:
            yield _diag(g, issue.code, node, issue.message)
            continue
        if tuple(meta.shape) != tuple(d["shape"]):
            yield _diag(g, "QKV206", node,
                        f"recorded shape {describe_shape(d['shape'], dims)} but its inputs give "
                        f"{describe_shape(meta.shape, dims)}")
    for block, rec in g.graph["attention"].items():
        yield from _signature(g, block, rec)


def _matches(declared: tuple, actual: tuple) -> bool:
    if any(d.startswith("*") or d == "..." for d in declared):
        return True
    return len(declared) == len(actual) and all(d in ("_", a) for d, a in zip(declared, actual))


def _signature(g, block, rec):
    dims = g.graph["dims"]
    declared = rec.get("declared_shapes", {})
    actual = dict(rec.get("arg_shapes", {}))
    if rec.get("output_shape") is not None:
        actual["return"] = rec["output_shape"]
    for arg, want in declared.items():
        have = actual.get(arg)
        if have is not None and not _matches(tuple(want), tuple(have)):
            what = "returns" if arg == "return" else f"argument {arg!r} receives"
            # A wrong return is shown where the returned value is made; a wrong
            # argument at its annotation.
            made = rec.get("output") if arg == "return" else None
            source = (g.nodes[made].get("source") if made in g else None) \
                or rec.get("annotation_sources", {}).get(arg) or rec["source"]
            yield _diag(g, "QKV201", block,
                        f"{rec['function']} declares {' '.join(want)} but {what} "
                        f"{describe_shape(have, dims)}", source=source)


_STATE_WORDS = {"memory": "the encoder's final output", "encoder": "the encoder stream",
                "decoder": "the decoder stream"}


def _origin_words(fact) -> str:
    if fact["state"] == "memory":
        return f"the encoder's final output ({fact['node']})"
    layer = "" if fact["layer"] is None else f" layer {fact['layer']}"
    return f"{fact['stream'] or 'no'} stream{layer} ({fact['node']})"


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
    for block, rec in g.graph["attention"].items():
        if rec.get("problem"):
            yield _diag(g, "QKV305", block, f"{ATTENTION_KINDS[rec['kind']]} {block} cannot be checked: "
                        f"{rec['problem']}", severity="warning", source=rec["source"])
            continue
        yield from _shared_projections(g, block, rec)
        origins = rec.get("origins", {})
        facts = {r: describe_origin(g, block, origins.get(r)) for r in ("q", "k", "v")}
        rec = {**rec, "block": block}
        for role, fact in facts.items():
            want = rec["declared"][role]
            node, source = _site(rec, role, rec["scores"] if role in "qk" else rec["attend"])
            got = _origin_words(fact)
            if want == "memory" and fact["state"] == "memory":
                continue
            if want == "memory" and fact["stream"] == "encoder":
                yield _diag(g, "QKV303", node,
                            f"{block}: {role.upper()} reads {got}, an intermediate encoder state; "
                            f"declared: {_STATE_WORDS[want]}", source=source)
            elif want == "memory" or fact["stream"] != want or fact["state"] == "memory":
                yield _diag(g, "QKV301", node,
                            f"{block}: {role.upper()} comes from {got}; declared: {_STATE_WORDS[want]}",
                            source=source)
            elif fact["state"] == "stale":
                yield _diag(g, "QKV304", node,
                            f"{block}: {role.upper()} reads {got}, not the state entering layer "
                            f"{rec['layer']}", source=source)
        if origins.get("k") != origins.get("v"):
            node, source = _site(rec, "v", rec["attend"])
            yield _diag(g, "QKV302", node,
                        f"{block}: K comes from {_origin_words(facts['k'])} but V from "
                        f"{_origin_words(facts['v'])}; they must read the same state", source=source)
        elif rec["kind"] != "cross" and origins.get("q") != origins.get("k"):
            node, source = _site(rec, "k", rec["scores"])
            yield _diag(g, "QKV302", node,
                        f"{block}: self-attention Q comes from {_origin_words(facts['q'])} but K and V "
                        f"from {_origin_words(facts['k'])}", source=source)


def _shared_projections(g, block, rec):
    """Q, K and V each need their own projection: ``v = q`` is a copy-paste slip."""
    entries = rec.get("entries", {})
    seen = {}
    for role in ("q", "k", "v"):
        node = entries.get(role)
        if node in g and g.nodes[node]["op"] == "linear" and node in seen:
            yield _diag(g, "QKV307", node,
                        f"{block}: {role.upper()} is computed by {seen[node].upper()}'s projection "
                        f"{node}; each of Q, K and V needs its own")
        seen.setdefault(node, role)


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
        yield _diag(g, "QKV308", node,
                    f"{node} ({g.nodes[node]['op']}) has parameters but no output depends on it{also}; "
                    f"was its result meant to be used?", severity="warning")


def _declared_masks(text: str) -> set:
    return {m.strip() for m in text.split("+") if m.strip() and m.strip() != "none"}


def _flow(g):
    from .flow import ALL, NONPAD, analyse, applied_masks
    flows = analyse(g)
    future = lambda f: f in (ALL, NONPAD)  # noqa: E731 - a predicate over facts
    padding = lambda f: f == ALL  # noqa: E731
    for node in nx.topological_sort(g):
        ins = arg_nodes(g, node)
        d = g.nodes[node]
        if not ins:
            continue
        tgt_before = [flows[i].deps["tgt"] for i in ins]
        src_before = [flows[i].deps["src"] for i in ins]
        place = d.get("block_path") or node
        if _widens(tgt_before, flows[node].deps["tgt"], future):
            yield _diag(g, "QKV401", node,
                        f"{place}: {d['op']} {node} mixes target positions without a causal mask, so "
                        f"decoder position t depends on target tokens after t")
        elif _widens(src_before, flows[node].deps["src"], padding):
            yield _diag(g, "QKV402", node,
                        f"{place}: {d['op']} {node} mixes source positions without a source padding "
                        f"mask, so padding tokens influence real positions")
    for block, rec in g.graph["attention"].items():
        if rec.get("problem"):
            continue
        applied = applied_masks(g, flows, rec["softmax"])
        declared = _declared_masks(rec["declared"]["mask"])
        if applied != declared:
            missing, extra = sorted(declared - applied), sorted(applied - declared)
            parts = ([f"declared but not applied: {', '.join(missing)}"] if missing else []) + (
                [f"applied but not declared: {', '.join(extra)}"] if extra else [])
            yield _diag(g, "QKV306", rec["softmax"],
                        f"{block}: the masks reaching the softmax differ from the declaration "
                        f"({'; '.join(parts)}); a mask only counts when it sets the entries it "
                        f"rules out to -inf")
        if rec["kind"] == "encoder_self" and "causal" in applied:
            yield _diag(g, "QKV403", rec["softmax"],
                        f"{block}: encoder self-attention is causally masked, so source position i "
                        f"ignores source tokens after i", severity="warning")


def _widens(before, after, bad) -> bool:
    return any(bad(f) for f in after) and not any(bad(f) for facts in before for f in facts)


PASSES = (_config, _shapes, _provenance, _flow, _dead_parameters)


def check(graph: nx.MultiDiGraph, strict: bool = False) -> list[Diagnostic]:
    """All findings for one traced graph, errors first then by node order.

    ``strict`` turns warnings into errors.

    Examples
    --------
    >>> import qkvflow as qf
    >>> qf.check(qf.trace(qf.load_model("tiny")))
    []
    """
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


# --- output formats -----------------------------------------------------------

FORMATS = ("text", "json", "sarif", "github")


def _location(source: str) -> tuple[str, int] | None:
    path, _, line = source.rpartition(":")
    if not path or not line.isdigit():
        return None
    return path, int(line)


def _sarif(diagnostics: list[Diagnostic]) -> dict:
    from .. import __version__
    used = sorted({d.code for d in diagnostics} | set(CODES))
    results = []
    for d in diagnostics:
        result = {
            "ruleId": d.code,
            "level": d.severity,
            "message": {"text": d.message},
            "locations": [{"logicalLocations": [{"fullyQualifiedName": f"{d.model}:{d.node}",
                                                 "kind": "member"}]}],
        }
        loc = _location(d.source)
        if loc:
            result["locations"][0]["physicalLocation"] = {
                "artifactLocation": {"uri": loc[0].replace("\\", "/")},
                "region": {"startLine": max(loc[1], 1)},
            }
        results.append(result)
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "qkvflow", "version": __version__,
                "rules": [{"id": c, "shortDescription": {"text": CODES[c]}} for c in used],
            }},
            "results": results,
        }],
    }


def _github(d: Diagnostic) -> str:
    kind = "error" if d.severity == "error" else "warning"
    loc = _location(d.source)
    where = f" file={loc[0]},line={loc[1]}," if loc else " "
    message = d.message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return f"::{kind}{where.rstrip(',')}{',' if loc else ''}title={d.code}::{message} [{d.model}: {d.node}]"


def format_diagnostics(diagnostics: list[Diagnostic], fmt: str = "text", checked: int = 1) -> str:
    """Render findings as compiler-style text, JSON, SARIF 2.1.0 or GitHub annotations."""
    import json
    if fmt == "text":
        lines = [d.text() for d in diagnostics]
        errors = sum(d.severity == "error" for d in diagnostics)
        warnings = len(diagnostics) - errors
        lines.append(f"{checked} model(s) checked: {errors} error(s), {warnings} warning(s)")
        return "\n".join(lines)
    if fmt == "json":
        return json.dumps([d.as_dict() for d in diagnostics], indent=1)
    if fmt == "sarif":
        return json.dumps(_sarif(diagnostics), indent=1)
    if fmt == "github":
        return "\n".join(_github(d) for d in diagnostics)
    from ..ir.errors import ConfigError
    raise ConfigError(f"unknown check format {fmt!r}; use one of: {', '.join(FORMATS)}")

"""A finding: code, severity, message, the graph node and the user's file:line."""

import dataclasses

__all__ = ["Diagnostic", "diag"]


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


def diag(g, code, node, message, severity="error", source=None, wiring: bool = False) -> Diagnostic:
    """A finding at graph node ``node``; its source is the node's unless given.

    A ``wiring`` finding (what a block reads) on a node a helper made is put at
    the block's line that called the helper: the wiring is the block's; a
    shape finding stays at the op's own line, even in a helper.
    """
    src = source or ((_node_source(g, node) if wiring else g.nodes[node].get("source", "?")) if node in g else "?")
    return Diagnostic(code, severity, message, node, src, g.graph.get("model", ""))


def _node_source(g, node: str) -> str:
    """The line a node came from; for a node a helper made inside an attention
    block, the block's own line that called the helper."""
    d = g.nodes[node]
    record = g.graph.get("attention", {}).get(d.get("attention_block")) or {}
    span = record.get("span") or []
    for where in [d.get("source", "?"), *d.get("callers", [])]:
        path, _, line = where.rpartition(":")
        if len(span) == 3 and path == span[0] and line.isdigit() and span[1] <= int(line) <= span[2]:
            return where
    return d.get("source", "?")

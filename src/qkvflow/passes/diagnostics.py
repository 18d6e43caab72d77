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


def diag(g, code, node, message, severity="error", source=None) -> Diagnostic:
    """A finding at graph node ``node``; its source is the node's unless given."""
    src = source or (g.nodes[node].get("source", "?") if node in g else "?")
    return Diagnostic(code, severity, message, node, src, g.graph.get("model", ""))

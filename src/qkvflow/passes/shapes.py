"""The shape pass: every node's recorded shape against its op's rule (QKV2xx),
and every attention block's arguments and result against its annotations."""

from ..ir.dims import describe_shape, dim_table
from ..ir.graph import arg_nodes, execution_order
from ..ir.ops import infer
from ..ir.shapes import Meta, ShapeIssue
from .diagnostics import diag

__all__ = ["shape_findings"]


def _meta(g, node) -> Meta:
    d = g.nodes[node]
    return Meta(d["shape"], d.get("key_axis"), d.get("dtype", "float"))


def shape_findings(g):
    """Every shape finding (QKV2xx) of ``g``."""
    dims = dim_table(g.graph)
    for node in execution_order(g):
        d = g.nodes[node]
        ins = [_meta(g, a) for a in arg_nodes(g, node)]
        try:
            meta = infer(d["op"], ins, d["attrs"], d.get("params", {}), dims)
        except ShapeIssue as issue:
            yield diag(g, issue.code, node, issue.message)
            continue
        if tuple(meta.shape) != tuple(d["shape"]):
            yield diag(g, "QKV206", node,
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
            yield diag(g, "QKV201", block,
                        f"{rec['function']} declares {' '.join(want)} but {what} "
                        f"{describe_shape(have, dims)}", source=source)

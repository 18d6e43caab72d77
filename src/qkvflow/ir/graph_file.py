"""What a graph read from a file must hold before any stage may read it.

A traced graph is right by construction; one read from JSON may have been
edited by hand or by another tool. :func:`file_problem` checks the kind of
every attribute the stages read, then replays every node's shape rule on its
recorded arguments, so that a graph it lets through can be checked,
explained, drawn and run without an exception other than qkvflow's own.
"""

import networkx as nx

from .dims import dim_table
from .graph import ATTENTION_KINDS, GRAPH_KEYS, ROLES, arg_nodes, execution_order
from .ops import OPS, infer
from .shapes import Meta, ShapeIssue

__all__ = ["file_problem"]

_SEQUENCE_RULES = ("causal", "bidirectional")  # the tracer's SEQUENCE_RULES (ir cannot import tracing)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _graph_problem(g: nx.MultiDiGraph) -> str | None:
    a = g.graph
    dims = a.get("dims")
    if not isinstance(dims, dict) or not all(isinstance(k, str) and (v is None or _is_int(v)) for k, v in dims.items()):
        return "its dims must map dim names to integer sizes or null"
    sequences = a.get("sequences")
    if not isinstance(sequences, dict) or not all(isinstance(k, str) and v in _SEQUENCE_RULES
                                                  for k, v in sequences.items()):
        return "its sequences must map dim names to 'causal' or 'bidirectional'"
    if not _strings(a.get("streams")):
        return "its streams must be a list of names"
    for key in ("inputs", "outputs"):
        if not _strings(a.get(key)) or not all(n in g for n in a[key]):
            return f"its {key} must be a list of its nodes"
    if a.get("memory") is not None and a["memory"] not in g:
        return "its memory must be one of its nodes"
    if not isinstance(a.get("model", ""), str) or not isinstance(a.get("config", {}), dict):
        return "its model must be a name and its config a table"
    aliases = a.get("aliases")
    if aliases is not None and not (isinstance(aliases, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in aliases.items())):
        return "its aliases must map names to names"
    attention = a.get("attention")
    if not isinstance(attention, dict):
        return "its attention must be a table of blocks"
    for block, rec in attention.items():
        if not (isinstance(rec, dict) and rec.get("kind") in ATTENTION_KINDS and isinstance(rec.get("declared"), dict)
                and isinstance(rec.get("sites", []), list) and all(isinstance(s, dict) for s in rec.get("sites", []))):
            return f"its attention block {block!r} is not a record of a declared attention"
    return None


def _node_problem(node: str, d: dict) -> str | None:
    if d.get("op") not in OPS:
        return f"node {node!r} has unknown op {d.get('op')!r}"
    if not (isinstance(d.get("shape"), tuple) and all(isinstance(n, str) and n for n in d["shape"])):
        return f"node {node!r} has a shape that is not a list of dim names"
    if not isinstance(d.get("attrs"), dict):
        return f"node {node!r} has attrs that are not a table"
    params = d.get("params")
    if not (isinstance(params, dict) and all(isinstance(k, str) and isinstance(v, tuple) and
                                             all(isinstance(n, str) for n in v) for k, v in params.items())):
        return f"node {node!r} has params that are not a table of named shapes"
    if not (d.get("key_axis") is None or _is_int(d["key_axis"])):
        return f"node {node!r} has a key_axis that is not an integer"
    if not (d.get("layer") is None or _is_int(d["layer"])):
        return f"node {node!r} has a layer that is not an integer"
    for key in ("stream", "block_path", "block", "attention_block", "source", "dtype"):
        if not (d.get(key) is None or isinstance(d[key], str)):
            return f"node {node!r} has a {key} that is not text"
    return None


def file_problem(g: nx.MultiDiGraph) -> str | None:
    """One sentence saying what makes ``g`` unusable, or None. Run before :func:`lint`."""
    if any(key not in g.graph for key in GRAPH_KEYS):
        return None  # lint says which, and that the graph must be traced again
    problem = _graph_problem(g)
    if problem:
        return problem
    for node, d in g.nodes(data=True):
        problem = _node_problem(node, d)
        if problem:
            return problem
    if not all(g.nodes[n]["op"] == "input" and isinstance(g.nodes[n]["attrs"].get("name"), str)
               for n in g.graph["inputs"]):
        return "each of its inputs must be an input node with a name"
    for u, v, d in g.edges(data=True):
        if d.get("role") not in ROLES or not _is_int(d.get("arg")) or d["arg"] < 0:
            return f"the edge {u!r} -> {v!r} has no known role and argument position"
    try:
        order = execution_order(g)
    except nx.NetworkXUnfeasible:
        return None  # lint names the cycle
    dims = dim_table(g.graph)
    for node in order:
        d = g.nodes[node]
        metas = [Meta(g.nodes[u]["shape"], g.nodes[u].get("key_axis"), g.nodes[u].get("dtype") or "float")
                 for u in arg_nodes(g, node)]
        try:
            infer(d["op"], metas, d["attrs"], d["params"], dims)
        except ShapeIssue:
            pass  # a shape mistake: the checker's to report
        except Exception as err:  # noqa: BLE001 - any other failure: the node is not what its op reads
            return (f"node {node!r} ({d['op']}) does not have the arguments and attributes its op reads "
                    f"({type(err).__name__}: {err})")
    return None

"""The one IR: a ``networkx.MultiDiGraph`` of named-dim tensor operations.

Every stage (check, render, explain, execute) reads this graph and nothing
else. This module defines the edge roles, the graph's well-formedness check
(structure only; meaning is the checker's job) and a one-line-per-node
printout; the closed set of ops is the registry in :mod:`qkvflow.ir.ops`.

Node attributes: ``op``, ``path`` (also the node key, the parameter prefix
and the activation key), ``shape`` (dim names), ``dtype``, ``stream``,
``layer``, ``block``, ``block_path``, ``attention`` (kind) and
``attention_block`` (path) on the nodes of a declared attention block,
``params`` (name -> shape), ``attrs`` (op arguments), ``source``
(``file:line``) and ``key_axis`` (the attention key axis, if any).
Edge attributes: ``role`` and ``arg`` (argument position).
Graph attributes: ``config``, ``dims`` (name -> size, None for data dims),
``sequences`` (sequence dim -> ``causal`` | ``bidirectional``),
``streams`` (names), ``attention`` (per declared block: its declaration,
and the ``sites`` the provenance pass found), ``inputs``, ``outputs``,
``memory`` (the node other streams read as the encoder's final output),
``model``.
"""

import json
import re

import networkx as nx

from .dims import factors
from .errors import GraphError
from .ops import OPS, Group
from .text import printable

__all__ = [
    "ROLES",
    "ATTENTION_KINDS",
    "new_graph",
    "args_of",
    "arg_nodes",
    "lint",
    "tabular",
    "to_json",
    "to_graphml",
    "from_json",
    "read_graph",
    "pad_ids",
    "param_path",
    "softmax_logits",
    "vocabulary_of",
]

ROLES = ("x", "q", "k", "v", "mask", "residual", "probs", "ids", "memory")

ATTENTION_KINDS = {
    "encoder_self": "encoder self-attention",
    "decoder_self": "masked decoder self-attention",
    "cross": "cross-attention",
}


def new_graph(**graph_attrs) -> nx.MultiDiGraph:
    g = nx.MultiDiGraph()
    g.graph.update(
        {"attention": {}, "inputs": [], "outputs": [], "memory": None, **graph_attrs}
    )
    return g


def expect_graph(value, caller: str = "") -> None:
    """A GraphError unless ``value`` is a traced graph; a MODEL string gets the call that traces it."""
    if not isinstance(value, nx.MultiDiGraph):
        hint = f"; trace it first: qkvflow.trace(qkvflow.load_model({value!r}))" if isinstance(value, str) else ""
        raise GraphError(f"{caller + ': ' if caller else ''}expected a traced graph (qkvflow.trace(model)), "
                         f"got {type(value).__name__}{hint}")


def position_limit(g: nx.MultiDiGraph) -> int | None:
    """How many positions a sequence may have: ``max_positions`` less the rows a learned
    table skips (BART's offset of 2); None when the model has no such limit."""
    limit = g.graph.get("dims", {}).get("max_positions")
    if not limit:
        return None
    return limit - max((d["attrs"].get("offset") or 0 for _, d in g.nodes(data=True) if d["op"] == "positional"),
                       default=0)


def args_of(g: nx.MultiDiGraph, node: str) -> list[tuple[str, str]]:
    """The (input node, role) pairs of ``node`` in argument order."""
    edges = [(data["arg"], src, data["role"]) for src, keyed in g.pred[node].items() for data in keyed.values()]
    edges.sort(key=lambda e: e[0])
    return [(src, role) for _, src, role in edges]


def execution_order(g: nx.MultiDiGraph) -> list[str]:
    """The nodes, each after its arguments: the order they were added when that is
    one already (a trace adds them so, and checking it is cheap), else a topological
    sort. Raises ``networkx.NetworkXUnfeasible`` when the graph has a cycle."""
    seen = set()
    for node in g:
        if not seen.issuperset(g.pred[node]):
            return list(nx.topological_sort(g))
        seen.add(node)
    return list(g)


def arg_nodes(g: nx.MultiDiGraph, node: str) -> list[str]:
    return [src for src, _ in args_of(g, node)]


# What every graph and every node carries (other keys are optional).
GRAPH_KEYS = ("dims", "sequences", "streams", "attention", "inputs", "outputs")
NODE_KEYS = ("op", "shape", "attrs", "params", "attention_block")  # op and shape: checked below


def lint(g: nx.MultiDiGraph) -> list[tuple[str, str]]:
    """Structural problems as (node, sentence) pairs; empty when well formed.

    Checks structure, not meaning: the graph and node attributes every stage
    reads are there, the graph is acyclic, ops are known, argument positions
    are 0..n-1, outputs are nodes, and recorded attention sites agree with
    the graph (see :mod:`qkvflow.passes.provenance`).
    """
    missing = [k for k in GRAPH_KEYS if k not in g.graph]
    if missing:
        return [("graph", f"the graph has no {', '.join(missing)} attribute(s); a graph written by an "
                          "older qkvflow or another tool must be traced again")]
    problems = []
    for node, data in g.nodes(data=True):
        lacking = [k for k in NODE_KEYS[2:] if k not in data]
        if lacking:
            problems.append((node, f"node {node} has no {', '.join(lacking)} attribute(s)"))
    try:
        execution_order(g)
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g)
        problems.append((cycle[0][0], f"the graph has a cycle through {cycle[0][0]}"))
    for node, data in g.nodes(data=True):
        op = data.get("op")
        if op not in OPS:
            problems.append((node, f"node {node} has unknown op {op!r}"))
        if not isinstance(data.get("shape"), tuple):
            problems.append((node, f"node {node} has no shape"))
        edges = [d for keyed in g.pred[node].values() for d in keyed.values()]
        positions = [d.get("arg") for d in edges]
        if sorted(p for p in positions if type(p) is int) != list(range(len(positions))):
            problems.append((node, f"node {node} has argument positions {positions}"))
        for d in edges:
            if d.get("role") not in ROLES:
                problems.append((node, f"an edge into {node} has unknown role {d.get('role')!r}"))
        if op == "input" and edges:
            problems.append((node, f"input node {node} has inputs"))
    for out in g.graph.get("outputs", []):
        if out not in g:
            problems.append((out, f"output {out} is not a node of the graph"))
    if not problems:
        problems.extend(_site_problems(g))
    return problems


def _site_problems(g: nx.MultiDiGraph) -> list[tuple[str, str]]:
    """Where recorded attention sites (the provenance pass's facts) disagree
    with the graph: a pattern node of the wrong op or outside its block, a
    softmax of a block without a site, an origin that the q/k/v-labelled
    edges do not lead back to."""
    records = g.graph.get("attention", {})
    annotated = [path for path, rec in records.items() if "sites" in rec]
    if not annotated:
        return []
    if len(annotated) != len(records):
        missing = next(p for p in records if p not in annotated)
        return [(missing, f"attention block {missing} has no provenance sites while others do")]
    problems = []
    softmaxes = {n for n, d in g.nodes(data=True) if d.get("attention_block") and softmax_logits(g, n)}
    for path, rec in records.items():
        for site in rec["sites"]:
            sm = site.get("softmax")
            if sm not in g or g.nodes[sm].get("attention_block") != path or not softmax_logits(g, sm):
                problems.append((path, f"block {path} records a site at {sm!r}, not a softmax of the block"))
                continue
            softmaxes.discard(sm)
            if "problem" not in site:
                problems.extend((path, p) for p in _pattern_problems(g, path, site))
    problems.extend((sm, f"softmax {sm} of block {g.nodes[sm]['attention_block']} has no provenance site")
                    for sm in sorted(softmaxes))
    return problems


def _pattern_problems(g: nx.MultiDiGraph, path: str, site: dict) -> list[str]:
    found = []
    for key in ("scores", "attend"):
        node = site.get(key)
        if node not in g or g.nodes[node].get("attention_block") != path or \
                Group.CONTRACTION not in OPS[g.nodes[node]["op"]].groups:
            found.append(f"block {path}: recorded {key} {node!r} is not a contraction of the block")
    if found:
        return found
    for role, consumer in (("q", site["scores"]), ("k", site["scores"]), ("v", site["attend"])):
        origin, entry = site.get("origins", {}).get(role), site.get("entries", {}).get(role)
        if origin is None:
            continue
        inside = entry in g and (entry == consumer or g.nodes[entry].get("attention_block") == path)
        if not (inside and origin in g and g.has_edge(origin, entry)
                and g.nodes[origin].get("attention_block") != path
                and (entry == consumer or nx.has_path(g, entry, consumer))):
            found.append(f"block {path}: the recorded {role.upper()} origin {origin} does not feed "
                         f"the block at {entry} on the way to {consumer}")
    return found


def check_well_formed(g: nx.MultiDiGraph) -> None:
    problems = lint(g)
    if problems:
        raise GraphError(problems[0][1])


def tabular(g: nx.MultiDiGraph, limit: int | None = None) -> str:
    """One line per node: path, op, inputs with roles, shape (like fx)."""
    rows = [("path", "op", "inputs", "shape")]
    for node in execution_order(g):
        data = g.nodes[node]
        ins = ", ".join(f"{role}={printable(src)}" for src, role in args_of(g, node))
        rows.append((printable(node), data["op"], ins, "(" + ", ".join(map(printable, data["shape"])) + ")"))
        if limit is not None and len(rows) > limit:
            break
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows
    )


def to_json(g: nx.MultiDiGraph) -> str:
    return json.dumps(nx.node_link_data(g, edges="edges"), indent=1, sort_keys=True)


# Written as escapes in GraphML: the backslash (so escaping stays one to one), the characters
# XML 1.0 cannot carry, and CR (a parser would read it back as LF).
_XML_UNSAFE = re.compile("[\\\\\x00-\x08\x0b-\x1f\ud800-\udfff\ufffe\uffff]")


def to_graphml(g: nx.MultiDiGraph) -> bytes:
    """GraphML: tuple and dict attributes flattened to strings, a missing (None) attribute
    left out, an attribute whose values differ in type written as strings throughout (one
    key per attribute), and every string made XML-safe by :func:`_xml_text`."""
    import io

    def flat(attrs: dict) -> dict:
        return {k: v if isinstance(v, (bool, int, float)) else _xml_text(str(v))
                for k, v in attrs.items() if v is not None}

    def one_type(rows: list) -> list:
        """An attribute whose values are of several types becomes a string everywhere."""
        kinds: dict = {}
        for attrs in rows:
            for k, v in attrs.items():
                kinds.setdefault(k, set()).add(type(v))
        return [{k: str(v) if len(kinds[k]) > 1 else v for k, v in attrs.items()} for attrs in rows]

    out = nx.MultiDiGraph(model=_xml_text(g.graph.get("model") or ""))
    node_attrs = one_type([flat(d) for _, d in g.nodes(data=True)])
    out.add_nodes_from((_xml_text(n), d) for n, d in zip(g, node_attrs))
    edge_attrs = one_type([flat(d) for *_, d in g.edges(keys=True, data=True)])
    out.add_edges_from((_xml_text(u), _xml_text(v), k, d)
                       for (u, v, k), d in zip(g.edges(keys=True), edge_attrs))
    buffer = io.BytesIO()
    nx.write_graphml(out, buffer)
    return buffer.getvalue()


def _xml_text(text: str) -> str:
    r"""``text`` with backslashes and the characters XML cannot carry (or would turn into
    another: CR) written as Python escapes; one to one, so distinct names stay distinct.

    >>> _xml_text("a\\b\x00\r\n")
    'a\\\\b\\x00\\r\n'
    """
    return _XML_UNSAFE.sub(lambda m: ascii(m.group())[1:-1], text)


def from_json(text: str) -> nx.MultiDiGraph:
    """The graph :func:`to_json` wrote (tuples come back as tuples where shapes need them)."""
    data = json.loads(text)
    g = nx.node_link_graph(data, edges="edges", multigraph=True, directed=True)
    for _, nd in g.nodes(data=True):
        for key in ("shape",):
            if isinstance(nd.get(key), list):
                nd[key] = tuple(nd[key])
        if "params" in nd:
            nd["params"] = {k: tuple(v) for k, v in nd["params"].items()}
    return g


def independent_of(g: nx.MultiDiGraph, inputs) -> set:
    """The nodes whose values do not depend on the named inputs: what stays the same while
    only those inputs change. For an encoder–decoder and ``["tgt_ids"]``: the whole
    encoder and every cross-attention's K and V projections, computed once per source.

    >>> import qkvflow as qf
    >>> fixed = independent_of(qf.trace(qf.load_model("tiny")), ["tgt_ids"])
    >>> "decoder.layers.1.cross_attn.k_proj" in fixed, "decoder.layers.1.cross_attn.q_proj" in fixed
    (True, False)
    """
    by_name = {g.nodes[n]["attrs"]["name"]: n for n in g.graph["inputs"]}
    unknown = [name for name in inputs if name not in by_name]
    if unknown:
        raise GraphError(f"the model has no input {unknown[0]!r}; its inputs are {', '.join(by_name)}")
    changing = {by_name[name] for name in inputs}
    # A node sized by a dim only the changing inputs have (np.ones((T, T)) of the target
    # length) changes with them too, though no edge leads to it.
    steady = {d for name, node in by_name.items() if name not in inputs for d in g.nodes[node]["shape"]}
    moving = {d for node in changing for d in g.nodes[node]["shape"]} - steady
    changing |= {n for n, d in g.nodes(data=True) if any(f in moving for name in d["shape"] for f in factors(name))}
    frontier = list(changing)  # one traversal from all of them
    while frontier:
        node = frontier.pop()
        for succ in g.successors(node):
            if succ not in changing:
                changing.add(succ)
                frontier.append(succ)
    return set(g) - changing


def param_path(node: str, name: str) -> str:
    """The path of parameter ``name`` of ``node``: ``<node>.<name>``, or the node's
    own path for a parameter node (``qkvflow.param``), whose one parameter is named ""."""
    return f"{node}.{name}" if name else node


def vocabulary_of(g: nx.MultiDiGraph, node: str) -> int | None:
    """How many token ids input ``node`` may hold: the rows of the embeddings it feeds."""
    from .dims import size_of
    rows = []
    for succ in g.successors(node):
        d = g.nodes[succ]
        if d["op"] == "embed":
            vocab = (d["params"].get("weight") or d["attrs"].get("tied_shape") or (None,))[0]
            rows.append(size_of(vocab, g.graph["dims"]) if vocab else None)
        elif d["op"] == "gather" and arg_nodes(g, succ)[1:] == [node]:  # table[ids]
            rows.append(size_of(g.nodes[arg_nodes(g, succ)[0]]["shape"][0], g.graph["dims"]))
    return min((r for r in rows if r), default=None)


def required_inputs(g: nx.MultiDiGraph) -> list[str]:
    """The names of the inputs a run must be given: all but those with a default
    (BERT's ``type_ids``, zeros when left out), in the model's order."""
    return [g.nodes[n]["attrs"]["name"] for n in g.graph["inputs"] if "default" not in g.nodes[n]["attrs"]]


def pad_ids(g: nx.MultiDiGraph) -> dict:
    """Sequence dim -> the pad id its token input declares (the config's ``pad_id``
    for token inputs that declare none)."""
    found = {}
    default = g.graph.get("config", {}).get("pad_id")
    for node in g.graph.get("inputs", []):
        attrs = g.nodes[node]["attrs"]
        shape = tuple(attrs.get("shape", ()))
        pad = attrs.get("pad_id", default)
        if attrs.get("dtype") == "int" and shape and pad is not None:
            found.setdefault(shape[-1], pad)
    return found


def read_graph(path) -> nx.MultiDiGraph:
    """A well-formed graph from a JSON file written by ``qkvflow trace --format json``.

    Raises GraphError (one sentence naming the file) when the file cannot be
    read, is not a qkvflow graph or is not well formed.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            g = from_json(fh.read())
    except OSError as err:
        raise GraphError(f"graph file {str(path)!r} cannot be read: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError, AttributeError, nx.NetworkXError) as err:
        raise GraphError(f"graph file {str(path)!r} is not a qkvflow graph (expected the JSON of "
                         f"qkvflow trace --format json): {type(err).__name__}: {err}") from None
    from .graph_file import file_problem
    try:
        problem = file_problem(g)
        problems = [("graph", problem)] if problem else lint(g)
    except Exception as err:  # attributes of the wrong kind anywhere in the file
        raise GraphError(f"graph file {str(path)!r} is not a qkvflow graph: {type(err).__name__}: {err}") from None
    if problem:
        raise GraphError(f"graph file {str(path)!r} is not a qkvflow graph: {problem}")
    if problems:
        raise GraphError(f"graph file {str(path)!r} is not well formed: {problems[0][1]}")
    return g


def describe_origin(g: nx.MultiDiGraph, block: str, node: str | None) -> dict:
    """What state an attention block's Q, K or V was computed from.

    Returns ``{"node", "stream", "layer", "state"}`` where ``state`` is
    ``memory`` (the encoder's final output), ``current`` (the block's own
    stream at its own layer: produced in that layer, or the residual stream
    entering it), ``stale`` (the same stream, another layer's state) or
    ``other`` (another stream, not the memory), or ``unknown``.
    """
    if node is None or node not in g:
        return {"node": node, "stream": None, "layer": None, "state": "unknown"}
    data = g.nodes[node]
    record = g.graph["attention"].get(block, {})
    fact = {"node": node, "stream": data.get("stream"), "layer": data.get("layer")}
    if node == g.graph.get("memory"):
        return {**fact, "state": "memory"}
    if data.get("stream") != record.get("stream"):
        return {**fact, "state": "other"}
    if data.get("layer") == record.get("layer"):
        return {**fact, "state": "current"}
    layer_prefix = block.rsplit(".", 1)[0] + "."
    output = record.get("output")
    feeds_residual = any(
        succ.startswith(layer_prefix) and (
            (g.nodes[succ]["op"] == "add" and d.get("role") == "residual")
            or (_is_sum(g, succ) and output in g and (succ == output or nx.has_path(g, output, succ))))
        for _, succ, d in g.out_edges(node, data=True)
    )
    return {**fact, "state": "current" if feeds_residual else "stale"}


def softmax_logits(g: nx.MultiDiGraph, node: str) -> str | None:
    """The node a softmax normalises, if ``node`` is one: an ``nn.softmax``, or a
    softmax written by hand, ``e / e.sum(axis, keepdims=True)`` with
    ``e = np.exp(...)`` (the max subtracted before it or not)."""
    d = g.nodes[node]
    if d["op"] == "softmax":
        return args_of(g, node)[0][0]
    if d["op"] != "elementwise" or d["attrs"].get("fn") != "div" or "const" in d["attrs"]:
        return None
    numerator, denominator = arg_nodes(g, node)
    while g.nodes[denominator]["op"] == "reshape":  # e.sum(-1)[..., None]
        denominator = arg_nodes(g, denominator)[0]
    total = g.nodes[denominator]
    if total["op"] != "reduce" or total["attrs"].get("fn") != "sum" or len(total["attrs"]["axis"]) != 1:
        return None
    (summed,) = arg_nodes(g, denominator)
    exps = [numerator, summed]
    if not all(g.nodes[e]["op"] == "elementwise" and g.nodes[e]["attrs"].get("fn") == "exp" for e in exps):
        return None
    logits = {arg_nodes(g, e)[0] for e in exps}
    return logits.pop() if len(logits) == 1 else None


def _is_sum(g: nx.MultiDiGraph, node: str) -> bool:
    """``a + b`` of two tensors, as a residual connection written ``x + f(x)``."""
    d = g.nodes[node]
    return d["op"] == "add" or (d["op"] == "elementwise" and d["attrs"].get("fn") == "add"
                                and "const" not in d["attrs"])

"""The render stage: diagrams of the Q/K/V dataflow, drawn from the graph only.

Two levels: ``block`` (one node per sub-layer, grouped by ``block_path``)
and ``op`` (one node per graph node). Both build a small :class:`_Diagram`
first, which is then written as DOT (through the ``graphviz`` package, whose
``dot`` program makes SVG, PNG and PDF) or as Mermaid text. Colours and line
styles come from one mapping, :data:`ROLE_STYLE` for edges and
:data:`STYLES` for the drawing style each op's registry entry names; Q, K
and V are blue, green and orange everywhere.
The encoder's final output (``graph.graph["memory"]``) is drawn on its own so
that the K and V edges into every cross-attention visibly start from it.

Names come from user code, so neither writer puts one in raw: each is shown
on one line with control characters as visible escapes (:func:`_shown`), then
escaped by the writer's own rules; DOT and Mermaid ids are generated.
"""

import os
import re
import shutil
from dataclasses import dataclass, field

import networkx as nx

from ..atomic import OutputError, write_atomic
from ..ir.errors import RenderError
from ..ir.graph import args_of, to_json
from ..ir.ops import OPS
from ..ir.text import printable
from ..passes.provenance import ensure
from .explain import kind_names

__all__ = ["render", "FORMATS", "LEVELS", "ROLE_STYLE", "STYLES"]

FORMATS = ("svg", "png", "pdf", "dot", "mmd", "json")
LEVELS = ("layer", "block", "op")
_NEEDS_DOT = ("svg", "png", "pdf")
_SUFFIXES = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": "dot", ".gv": "dot",
             ".mmd": "mmd", ".mermaid": "mmd", ".json": "json"}
_INSTALL = ("the graphviz 'dot' program is needed for {fmt}; install it "
            "(apt-get install graphviz, brew install graphviz or conda install graphviz) "
            "or ask for .dot or .mmd")

# Edge role -> (colour, line style, pen width, legend text). One table for DOT and Mermaid.
ROLE_STYLE = {
    "q": ("#1f77b4", "solid", 2.0, "Q"),
    "k": ("#2ca02c", "solid", 2.0, "K"),
    "v": ("#ff7f0e", "solid", 2.0, "V"),
    "residual": ("#7f7f7f", "dashed", 1.2, "residual"),
    "mask": ("#d62728", "dotted", 1.2, "mask"),
    "probs": ("#9467bd", "solid", 1.2, "probs"),
    "memory": ("#8c564b", "bold", 2.0, "memory"),
    "x": ("#333333", "solid", 1.0, "x"),
    "ids": ("#17becf", "solid", 1.0, "ids"),
}

# Drawing style of an op (its registry entry's ``style``) -> (node shape, fill colour).
STYLES = {
    "io": ("ellipse", "#eeeeee"), "mask": ("note", "#fbe3e3"), "projection": ("box", "#dbe9f6"),
    "core": ("box", "#fff2cc"), "heads": ("box", "#f3f3f3"), "residual": ("box", "#e6e6e6"),
    "numpy": ("box", "#ffffff"), "param": ("box3d", "#eef5e9"),
}

# Block -> (description, fill colour); user-named blocks fall back to "block".
_BLOCK_STYLE = {
    "embed": ("token embedding + positions", "#dbe9f6"),
    "self_attn": ("self-attention", "#fff2cc"),
    "cross_attn": ("cross-attention", "#fde0c5"),
    "ffn": ("feed-forward", "#e2f0d9"),
    "final_norm": ("final norm", "#e6e6e6"),
    "output": ("output projection", "#dbe9f6"),
}
_MEMORY_FILL = "#f4cccc"
_BIG = 400  # diagram nodes above which dot's layout iterations are bounded
_BIG_EDGES = 300  # diagram edges above which they are bounded too, and edges drawn straight
_LONG = 200  # characters of one name a diagram shows (dot 2.43 refuses quoted strings over 16 KiB)
_DOT_ESCAPES = str.maketrans({"\\": "\\\\", "&": "&amp;", "<": "&lt;", ">": "&gt;"})
_MERMAID_ESCAPES = str.maketrans({"#": "#35;", '"': "#quot;", "<": "#lt;", ">": "#gt;", "&": "#amp;",
                                  ";": "#59;", "`": "#96;", "%": "#37;"})


@dataclass
class _Node:
    label: list[str]             # lines
    path: str                    # graph path or block path (SVG id, tooltip)
    shape: str = "box"
    fill: str = "#ffffff"
    cluster: str | None = None   # stream
    group: str | None = None     # block path, a sub-cluster at op level
    bold: bool = False


@dataclass
class _Edge:
    shapes: set = field(default_factory=set)   # shape texts of the collapsed edges
    free: bool = False                          # drawn without constraining the layout
    label: str = ""                             # set by _label_edges


@dataclass
class _Diagram:
    nodes: dict = field(default_factory=dict)   # id -> _Node, in graph order
    edges: dict = field(default_factory=dict)   # (tail, head, role) -> _Edge
    streams: list = field(default_factory=list)  # clusters, in the model's order
    group_labels: dict = field(default_factory=dict)  # nested cluster -> its title (else its path)
    quiet_masks: bool = False                   # mask edges thin and pale (one per block kind)


def _op_style(op: str) -> tuple[str, str]:
    if op not in OPS:
        raise RenderError(f"cannot draw op {op!r}: it is unknown to qkvflow")
    if OPS[op].style not in STYLES:
        raise RenderError(f"cannot draw op {op!r}: its style {OPS[op].style!r} has no drawing")
    return STYLES[OPS[op].style]


def _role_style(role: str) -> tuple:
    if role not in ROLE_STYLE:
        raise RenderError(f"cannot draw edge role {role!r}; known roles: {', '.join(ROLE_STYLE)}")
    return ROLE_STYLE[role]


def _shape_text(shape) -> str:
    return "(" + ", ".join(shape) + ")"


def _cluster_label(stream: str) -> str:
    """A stream's cluster title: ``Encoder``, ``Decoder``, else ``lm stream``."""
    return stream.capitalize() if stream in ("encoder", "decoder") else f"{stream} stream"


def _streams(g: nx.MultiDiGraph) -> list:
    """The model's streams, then any other stream a node names."""
    named = [d.get("stream") for _, d in g.nodes(data=True) if d.get("stream")]
    return list(dict.fromkeys([*g.graph.get("streams", []), *named]))


def _shown(text: str) -> str:
    """A user string as a diagram shows it: one line, unprintable characters as escapes,
    at most ``_LONG`` characters (its start and its end)."""
    if len(text) > _LONG:
        text = text[:_LONG // 2] + "…" + text[-(_LONG // 2 - 1):]
    return printable(text)


def _relative(path: str, stream: str | None) -> str:
    """``decoder.layers.0.cross_attn`` -> ``layers.0.cross_attn`` inside its stream."""
    prefix = f"{stream}."
    return path[len(prefix):] if stream and path.startswith(prefix) else path


# --- the two levels -----------------------------------------------------------

def _group_of(g: nx.MultiDiGraph, node: str) -> str:
    """The block-level node a graph node belongs to: memory, its block, or itself."""
    if node == g.graph.get("memory"):
        return node
    return g.nodes[node].get("block_path") or node


def _group_node(g: nx.MultiDiGraph, gid: str, members: list[str]) -> _Node:
    first = g.nodes[members[0]]
    stream = next((g.nodes[m].get("stream") for m in members if g.nodes[m].get("stream")), None)
    if gid == g.graph.get("memory"):
        return _Node(["memory", f"{first.get('stream') or 'the'} final output", gid, _shape_text(first["shape"])],
                     gid, "box", _MEMORY_FILL, None, bold=True)
    if first.get("block_path") != gid:  # a lone node: input, mask, output
        shape, fill = _op_style(first["op"])
        return _Node([gid, first["op"], _shape_text(first["shape"])], gid, shape, fill, stream)
    record = g.graph.get("attention", {}).get(gid)
    desc, fill = _BLOCK_STYLE.get(first.get("block"), ("block", "#ffffff"))
    lines = [_relative(gid, stream)]
    if record:
        lines.append(kind_names(g).get(record.get("kind"), desc))
        masks = sorted({m for site in record["sites"] for m in site.get("masks", [])})
        lines.append("mask: " + (", ".join(masks) or "none"))
    else:
        lines.append(desc)
    return _Node(lines, gid, "box", fill, stream)


def _layer_of(g: nx.MultiDiGraph, gid: str, members: list[str]) -> tuple[str, int, str] | None:
    """(stream, layer, the layer's path) of a block inside a numbered layer, else None:
    ``decoder.layers.3.cross_attn`` -> ("decoder", 3, "decoder.layers.3")."""
    first = g.nodes[members[0]]
    layer, parts = first.get("layer"), gid.split(".")
    if layer is None or not first.get("block_path") or str(layer) not in parts[:-1]:
        return None
    return first.get("stream"), layer, ".".join(parts[:parts.index(str(layer)) + 1])


class _Layers:
    """The numbered layers of a graph's streams, sorted into kinds: layers whose units (blocks
    at layer level, ops at op level) describe alike are one kind, drawn once."""

    def __init__(self, g: nx.MultiDiGraph, units: dict, describe, memory_in_layer: bool = False) -> None:
        # The memory is drawn on its own. At op level it still belongs to its layer's kind (a
        # post-norm encoder's last norm is the memory: that layer is like the others).
        memory = g.graph.get("memory")
        placed = {uid: _layer_of(g, uid, nodes) for uid, nodes in units.items() if memory_in_layer or uid != memory}
        layers: dict = {}
        for uid, at in placed.items():
            if at is not None:
                layers.setdefault(at, []).append(describe(uid, at))
        self.where = {uid: at for uid, at in placed.items() if uid != memory}
        kinds: dict = {}  # (stream, descriptions) -> [(stream, layer, its path)]
        for at, described in layers.items():
            kinds.setdefault((at[0], tuple(described)), []).append(at)
        self.first_of = {at: ats[0] for ats in kinds.values() for at in ats}
        self.numbers = {ats[0]: [layer for _, layer, _ in ats] for ats in kinds.values()}
        self.alone = {stream: sum(s == stream for s, _ in kinds) == 1 for stream, _ in kinds}

    def representative(self, uid: str) -> str:
        at = self.where.get(uid)
        return uid if at is None else self.first_of[at][2] + uid[len(at[2]):]

    def title(self, at: tuple) -> str:
        """"layer ×6", or "layers 0-1, 3 (×3)" where a stream's layers are of several kinds."""
        numbers = self.numbers[at]
        return f"layer ×{len(numbers)}" if self.alone[at[0]] else f"layers {_spans(numbers)} (×{len(numbers)})"

    def skipped(self, u_uid: str, v_uid: str) -> bool:
        """An edge from one layer into a later one of its kind (or an earlier kind): the count says it."""
        at_u, at_v = self.where.get(u_uid), self.where.get(v_uid)
        return bool(at_u and at_v and at_u[0] == at_v[0] and at_u[1] != at_v[1]
                    and self.first_of[at_u][1] >= self.first_of[at_v][1])


def _block_diagram(g: nx.MultiDiGraph, collapse: bool = False) -> _Diagram:
    """One node per block. With ``collapse`` (the layer level, the paper's figure) each
    stream's layer is drawn once with its count ("×6"), a model whose layers differ drawing
    each distinct layer once with the layers it stands for, and the masks drawn quietly (one
    edge per mask and block kind); the memory, the inputs and what comes before and after
    the layers as at block level."""
    members: dict[str, list[str]] = {}
    for node, data in g.nodes(data=True):
        _op_style(data.get("op"))
        if data["op"] != "param":  # weights are not dataflow at this level
            members.setdefault(_group_of(g, node), []).append(node)

    def describe(gid: str, at: tuple) -> tuple:  # a block: its path in the layer and what it is
        record = g.graph.get("attention", {}).get(gid) or {}
        masks = tuple(sorted({m for site in record.get("sites", []) for m in site.get("masks", [])}))
        return gid[len(at[2]) + 1:], g.nodes[members[gid][0]].get("block"), record.get("kind"), masks

    layers = _Layers(g, members if collapse else {}, describe)
    diagram = _Diagram(streams=_streams(g), quiet_masks=collapse)
    ids: dict = {}
    for gid in members:
        rep = layers.representative(gid)
        if rep in ids:
            continue
        ids[rep] = f"n{len(ids)}"
        node = _group_node(g, rep, members[rep])
        at = layers.where.get(rep)
        if at is not None:
            node.group, node.label[0] = at[2], rep[len(at[2]) + 1:]
            diagram.group_labels[at[2]] = layers.title(at)
        diagram.nodes[ids[rep]] = node
    memory = g.graph.get("memory")
    for u, v, data in g.edges(data=True):
        gu, gv = _group_of(g, u), _group_of(g, v)
        if g.nodes[u]["op"] == "param" or layers.representative(gu) == layers.representative(gv) \
                or layers.skipped(gu, gv):
            continue  # a weight, inside a block, or from one layer into the next of its kind
        # Mask shapes are on the mask nodes. The edge into the memory is free, so the
        # memory sits above the decoder it feeds and the decoder beside the encoder.
        label = None if data["role"] == "mask" else _shape_text(g.nodes[u]["shape"])
        _add_edge(diagram, ids[layers.representative(gu)], ids[layers.representative(gv)], data["role"], label,
                  free=gv == memory)
    _label_edges(diagram)
    return diagram


def _spans(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans, start = [], numbers[0]
    for prev, n in zip(numbers, numbers[1:] + [None]):
        if n != prev + 1 if n is not None else True:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = n
    return ", ".join(spans)


def _op_diagram(g: nx.MultiDiGraph) -> _Diagram:
    """Every operation, each block a box; repeated layers drawn once, as at layer level (a
    6+6-layer graph is as tall as a 1+1 one). Two layers are of one kind when their ops, by
    path in the layer, and the edges between them are the same."""
    def describe(node: str, at: tuple) -> tuple:  # an op: its path in the layer, its op, its wiring
        inner = node[len(at[2]) + 1:]
        args = tuple((u[len(at[2]) + 1:] if u.startswith(at[2] + ".") else "", role) for u, role in args_of(g, node))
        return inner, g.nodes[node]["op"], args

    layers = _Layers(g, {node: [node] for node in g if g.nodes[node].get("block_path")}, describe,
                     memory_in_layer=True)
    diagram = _Diagram(streams=_streams(g))
    memory = g.graph.get("memory")
    ids: dict = {}
    for node, data in g.nodes(data=True):
        rep = layers.representative(node)
        if rep in ids:
            continue
        ids[rep] = f"n{len(ids)}"
        shape, fill = _op_style(data.get("op"))
        tail = rep.rsplit(".", 1)[-1]
        # "softmax / softmax" says one word twice: a node named after its op shows it once
        named_as_op = tail.rstrip("_0123456789") == data["op"]
        lines = [tail, *([] if named_as_op else [data["op"]]), _shape_text(data.get("shape", ()))]
        if node == memory:
            lines, fill = ["memory: " + tail, *lines[1:]], _MEMORY_FILL
        group = None if node == memory else data.get("block_path")  # the memory stands on its own
        at = layers.where.get(rep)
        if at is not None and group:
            group = layers.representative(group) if group.startswith(at[2] + ".") else group
            diagram.group_labels[group] = f"{group[len(at[2]) + 1:]} ({layers.title(at)})"
        diagram.nodes[ids[rep]] = _Node(lines, rep, shape, fill, data.get("stream"), group, bold=node == memory)
    for u, v, data in g.edges(data=True):
        if layers.skipped(u, v):
            continue
        _add_edge(diagram, ids[layers.representative(u)], ids[layers.representative(v)], data["role"], None)
    return diagram


def _add_edge(diagram: _Diagram, tail: str, head: str, role: str, shape: str | None,
              free: bool = False) -> None:
    """Parallel edges with the same role collapse into one; their shapes are merged."""
    _role_style(role)
    edge = diagram.edges.setdefault((tail, head, role), _Edge())
    edge.free = edge.free or free
    if shape:
        edge.shapes.add(shape)


def _label_edges(diagram: _Diagram) -> None:
    """``Q: (batch, src, d_model)``; a shape already shown between a pair is not repeated."""
    shown = set()
    for (tail, head, role), edge in diagram.edges.items():
        text = " | ".join(sorted(edge.shapes))
        if (tail, head, text) in shown:
            text = ""
        shown.add((tail, head, text))
        letter = ROLE_STYLE[role][3] if role in ("q", "k", "v") else ""
        edge.label = ": ".join(part for part in (letter, text) if part)


# --- writers -----------------------------------------------------------------

_QUIET_MASK = ("#e4b4b4", "dotted", 0.8, "mask")


def _edge_style(diagram: _Diagram, role: str) -> tuple:
    return _QUIET_MASK if role == "mask" and diagram.quiet_masks else ROLE_STYLE[role]


def _legend_html(diagram: _Diagram) -> str:
    """The roles the diagram draws, in the table's order."""
    glyph = {"solid": "━━━", "bold": "━━━", "dashed": "━ ━ ━", "dotted": "· · · ·"}
    drawn = {role for _, _, role in diagram.edges}
    rows = "".join(
        f'<tr><td><font color="{colour}">{glyph[style]}</font></td>'
        f'<td align="left"><font color="{colour}"><b>{text}</b></font></td></tr>'
        for colour, style, _, text in (_edge_style(diagram, r) for r in ROLE_STYLE if r in drawn))
    return f'<<table border="0" cellspacing="0" cellpadding="2">{rows}</table>>'


def _to_dot(diagram: _Diagram, title: str, level: str) -> str:
    try:
        import graphviz
    except ImportError as err:
        raise RenderError("the graphviz Python package is needed to draw; pip install graphviz") from err
    title = _dot_text(title)
    graph_attr = {"rankdir": "TB", "label": title, "labelloc": "t", "fontname": "Helvetica",
                  "nodesep": "0.3", "ranksep": "0.45" if level == "block" else "0.3"}
    if len(diagram.nodes) > _BIG:
        # Long edges (masks, memory) become ~10^5 virtual nodes on a 1,400-node graph:
        # unbounded network simplex takes 9 s at 520 nodes, 110 s at 700, >15 min at
        # 1,400; bounded, 0.5 s, 1.4 s and 7.5 s, at some cost in layout quality.
        graph_attr.update(nslimit="1", nslimit1="1")
    if len(diagram.edges) > _BIG_EDGES:
        # Few nodes, many long edges (24+24 layers at block level: 134 nodes, 488 edges):
        # routing splines around every node takes dot 14 s there; bounded crossing
        # minimisation and straight edges, 0.4 s.
        graph_attr.update(nslimit="1", nslimit1="1", mclimit="0.1", splines="line")
    dot = graphviz.Digraph(
        title, graph_attr=graph_attr,
        # op level: one width for every box (a minimum: the few longer labels widen theirs)
        node_attr={"fontname": "Helvetica", "fontsize": "10", "style": "filled,rounded",
                   **({"width": "2.1"} if level == "op" else {})},
        edge_attr={"fontname": "Helvetica", "fontsize": "8", "arrowsize": "0.6"})
    by_cluster: dict = {}
    for nid, node in diagram.nodes.items():
        by_cluster.setdefault(node.cluster, {}).setdefault(node.group, []).append(nid)
    for i, (cluster, groups) in enumerate(by_cluster.items()):
        if cluster is None:
            _dot_nodes(dot, diagram, groups)
            continue
        # The two usual streams keep readable names; any other stream's name is user text.
        name = f"cluster_{cluster}" if cluster in ("encoder", "decoder") else f"cluster_{i}"
        with dot.subgraph(name=name) as sub:
            sub.attr(label=_dot_text(_cluster_label(cluster)), style="rounded", color="#999999")
            _dot_nodes(sub, diagram, groups)
    for (tail, head, role), edge in diagram.edges.items():
        colour, style, width, _ = _edge_style(diagram, role)
        dot.edge(tail, head, label=_dot_text(edge.label) or None, color=colour, fontcolor=colour,
                 style=style, penwidth=str(width), constraint="false" if edge.free else None,
                 **{"class": role})
    with dot.subgraph(name="cluster_legend") as sub:
        sub.attr(label="Legend", style="rounded", color="#999999")
        sub.node("legend", label=_legend_html(diagram), shape="plain", id="legend", style="")
    return dot.source


def _dot_nodes(dot, diagram: _Diagram, groups: dict) -> None:
    """Nodes of one stream; at op level each block becomes a nested cluster."""
    for group, nids in groups.items():
        if group is None:
            for nid in nids:
                _dot_node(dot, nid, diagram.nodes[nid])
            continue
        with dot.subgraph(name=f"cluster_{nids[0]}") as sub:  # named after its first node: unique
            title = diagram.group_labels.get(group) or _relative(group, diagram.nodes[nids[0]].cluster)
            sub.attr(label=_dot_text(title), style="dashed,rounded", color="#bbbbbb", fontsize="9")
            for nid in nids:
                _dot_node(sub, nid, diagram.nodes[nid])


def _dot_node(dot, nid: str, node: _Node) -> None:
    path = _dot_text(node.path)
    dot.node(nid, label=_dot_text(*node.label), shape=node.shape, fillcolor=node.fill, id=path,
             tooltip=path, penwidth="2.5" if node.bold else None)


def _dot_text(*lines: str) -> str:
    """Lines of user text as one DOT escString: backslashes doubled, so none starts an
    escape but the line breaks; ``&``, ``<`` and ``>`` as entities, so it is never
    read as an entity or an HTML label. The graphviz package quotes it, escaping ``"``."""
    return "\\n".join(_shown(line).translate(_DOT_ESCAPES) for line in lines)


def _pipe(source: str, fmt: str) -> str | bytes:
    """Run ``dot`` on DOT text; a missing program is one clear RenderError."""
    import graphviz

    def missing() -> RenderError:
        error = RenderError(_INSTALL.format(fmt=fmt))
        error.fallback = source  # the DOT text, for callers that want to print it instead
        return error

    if shutil.which("dot") is None:
        raise missing()
    try:
        out = graphviz.Source(source).pipe(format=fmt)
    except graphviz.ExecutableNotFound as err:
        raise missing() from err
    except graphviz.CalledProcessError as err:
        detail = (err.stderr or b"").decode(errors="replace").strip().splitlines()
        raise RenderError(f"dot failed to draw {fmt}: {detail[-1] if detail else err}") from err
    return out.decode("utf-8") if fmt == "svg" else out


def _mermaid_id(path: str, taken: set) -> str:
    """``n_`` and the path with each character but ASCII letters, digits and ``_`` as ``_``,
    numbered when taken."""
    base = "n_" + re.sub(r"\W", "_", path[:_LONG], flags=re.ASCII)
    nid, i = base, 1
    while nid in taken:
        nid, i = f"{base}_{i}", i + 1
    taken.add(nid)
    return nid


def _mermaid_text(text: str) -> str:
    """User text inside a quoted Mermaid label: characters Mermaid, HTML or Markdown would read
    as syntax written as Mermaid entity codes (``#quot;``, ``#35;``)."""
    return _shown(text).translate(_MERMAID_ESCAPES)


def _to_mermaid(diagram: _Diagram, title: str) -> str:
    taken: set = set()
    ids = {nid: _mermaid_id(node.path, taken) for nid, node in diagram.nodes.items()}
    legend = "Q blue, K green, V orange, residual dashed, mask dotted"
    lines = ["flowchart TB", f"  %% {_mermaid_text(title)}: {legend}"]
    for i, cluster in enumerate([*diagram.streams, None]):
        members = [nid for nid, node in diagram.nodes.items() if node.cluster == cluster]
        indent = "    " if cluster else "  "
        if cluster:
            label = _cluster_label(cluster)
            sid = label if label.isidentifier() and label.isascii() else f"stream_{i}"
            lines.append(f'  subgraph {sid}["{_mermaid_text(label)}"]')
        groups: dict = {}
        for nid in members:
            groups.setdefault(diagram.nodes[nid].group if diagram.nodes[nid].group in diagram.group_labels
                              else None, []).append(nid)
        for j, (group, nids) in enumerate(groups.items()):
            inner = indent + ("  " if group else "")
            if group:  # a layer drawn once: its own box, titled with its count
                lines.append(f'{indent}subgraph layer_{i}_{j}["{_mermaid_text(diagram.group_labels[group])}"]')
            for nid in nids:
                node = diagram.nodes[nid]
                label = "<br/>".join(_mermaid_text(line) for line in node.label)
                lines.append(f'{inner}{ids[nid]}["{label}"]')
                width = ",stroke-width:3px" if node.bold else ""
                lines.append(f"{inner}style {ids[nid]} fill:{node.fill}{width}")
            if group:
                lines.append(f"{indent}end")
        if cluster:
            lines.append("  end")
    by_role: dict = {}
    for i, ((tail, head, role), edge) in enumerate(diagram.edges.items()):
        arrow = "-.->" if ROLE_STYLE[role][1] in ("dashed", "dotted") else "-->"
        link = f'|"{_mermaid_text(edge.label)}"|' if edge.label else ""
        lines.append(f"  {ids[tail]} {arrow}{link} {ids[head]}")
        by_role.setdefault(role, []).append(str(i))
    for role, numbers in by_role.items():
        colour, style, width, _ = ROLE_STYLE[role]
        dots = ",stroke-dasharray:2 3" if style == "dotted" else ""
        lines.append(f"  linkStyle {','.join(numbers)} stroke:{colour},stroke-width:{width}px{dots}")
    lines.append('  subgraph Legend["Legend"]')
    for role, (colour, style, _, text) in ROLE_STYLE.items():
        lines.append(f'    legend_{role}["{text} ({style})"]')
        lines.append(f"    style legend_{role} fill:#ffffff,stroke:{colour},color:{colour}")
    lines.append("  end")
    return "\n".join(lines) + "\n"


# --- the public entry point --------------------------------------------------

def _resolve_format(path, fmt: str | None) -> str:
    """An explicit ``fmt`` wins; otherwise the suffix of ``path``; otherwise DOT."""
    if fmt is not None:
        fmt = str(fmt).lower().lstrip(".")
        if fmt not in FORMATS:
            raise RenderError(f"unknown diagram format {fmt!r}; accepted: {', '.join(FORMATS)}")
        suffix = os.path.splitext(os.fspath(path))[1].lower() if path is not None else ""
        if suffix in _SUFFIXES and _SUFFIXES[suffix] != fmt:  # x.svg holding PNG bytes would lie
            raise RenderError(f"{os.fspath(path)!r} is named as {_SUFFIXES[suffix]}, but the format asked "
                              f"for is {fmt}; make them agree")
        return fmt
    suffix = os.path.splitext(os.fspath(path))[1].lower() if path is not None else ".dot"
    if suffix not in _SUFFIXES:
        raise RenderError(f"cannot tell the diagram format of {os.fspath(path)!r}; "
                          f"use a suffix among {', '.join(_SUFFIXES)}, or give the format (--format, or fmt= "
                          "in Python)")
    return _SUFFIXES[suffix]


def render(graph: nx.MultiDiGraph, path=None, *, level: str = "layer",
           fmt: str | None = None) -> str | bytes:
    """Draw the Q/K/V dataflow of a traced graph.

    Parameters
    ----------
    graph : networkx.MultiDiGraph
        A graph from :func:`qkvflow.trace`; only read.
    path : str or os.PathLike, optional
        Where to write the diagram (atomically). Its suffix gives the format
        when ``fmt`` is None.
    level : {"layer", "block", "op"}
        ``layer`` (default): each stream's layer drawn once with its count, as
        in the paper's figure; ``block``: one node per sub-layer of every
        layer; ``op``: one node per graph node.
    fmt : {"svg", "png", "pdf", "dot", "mmd", "json"}, optional
        svg, png and pdf need the graphviz ``dot`` program; dot, mmd
        (Mermaid) and json do not. Default: from ``path``, else ``dot``.

    Returns
    -------
    str or bytes
        The diagram: bytes for png and pdf, text otherwise.

    Raises
    ------
    RenderError
        Unknown level or format, an op or role without a style, a missing
        ``dot`` program, or a path that cannot be written.

    Examples
    --------
    >>> import qkvflow as qf
    >>> text = render(qf.trace(qf.load_model("tiny")), fmt="mmd")
    >>> text.splitlines()[0]
    'flowchart TB'
    """
    if level not in LEVELS:
        raise RenderError(f"unknown diagram level {level!r}; accepted: {', '.join(LEVELS)}")
    fmt = _resolve_format(path, fmt)
    ensure(graph)  # the provenance pass labels the Q, K and V edges
    title = f"{graph.graph.get('model') or 'model'} ({level} level)"
    if fmt == "json":
        out = to_json(graph)
    else:
        diagram = _op_diagram(graph) if level == "op" else _block_diagram(graph, collapse=level == "layer")
        if fmt == "mmd":
            out = _to_mermaid(diagram, title)
        else:
            out = _to_dot(diagram, title, level)
            if fmt in _NEEDS_DOT:
                out = _pipe(out, fmt)
    if path is not None:
        try:
            write_atomic(path, out)
        except OutputError as err:
            raise RenderError(str(err)) from None
    return out

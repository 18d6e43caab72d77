"""The render stage, through its public entry point ``render``.

Structure is checked on the DOT and Mermaid text (node ids carry the graph
path as ``id=``, edges carry their role as ``class=``), pictures on the SVG.
"""

import json
import os
import re
import shutil
import xml.etree.ElementTree as ET

import pytest

import qkvflow as qf
from qkvflow.ir.errors import RenderError
from qkvflow.ir.graph import ROLES
from qkvflow.views.render import ROLE_STYLE, render

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz 'dot' not installed")
SVG = "{http://www.w3.org/2000/svg}"
PRESETS = ["tiny", "vaswani-base", "torch-transformer"]
INSTALL = "the graphviz 'dot' program is needed for svg; install it"


@pytest.fixture(scope="module")
def graphs():
    return {name: qf.trace(qf.load_model(name)) for name in PRESETS}


# --- helpers: read back what was drawn ---------------------------------------

def dot_nodes(text: str) -> dict:
    """DOT node id -> the graph path (or block path) in its ``id`` attribute."""
    found = {}
    for nid, attrs in re.findall(r"^\s*(n\d+) \[(.*)\]$", text, re.M):
        match = re.search(r'\bid=(?:"([^"]*)"|([^\s\]]+))', attrs)
        found[nid] = match.group(1) or match.group(2)
    return found


def dot_edges(text: str) -> list[tuple[str, str, str, str]]:
    """(tail path, head path, role, label) for every DOT edge."""
    ids = dot_nodes(text)
    edges = []
    for tail, head, attrs in re.findall(r"^\s*(n\d+) -> (n\d+) \[(.*)\]$", text, re.M):
        role = re.search(r"\bclass=(\w+)", attrs).group(1)
        label = re.search(r'\blabel="([^"]*)"', attrs)
        edges.append((ids[tail], ids[head], role, label.group(1) if label else ""))
    return edges


def cluster_body(text: str, name: str) -> str:
    start = text.index(f"subgraph {name} {{")
    return text[start:text.index("\n\t}", start)]


def cross_blocks(g) -> list[str]:
    return sorted(p for p, rec in g.graph["attention"].items() if rec["kind"] == "cross")


# --- block level --------------------------------------------------------------

@needs_dot
def test_block_svg_parses_and_has_the_qkv_legend(graphs):
    svg = render(graphs["vaswani-base"], fmt="svg", level="block")
    root = ET.fromstring(svg)
    texts = {el.text for el in root.iter(f"{SVG}text")}
    assert {"Q", "K", "V", "residual", "mask"} <= texts
    ids = {el.get("id") for el in root.iter(f"{SVG}g")}
    assert {"legend", "decoder.layers.5.cross_attn", "encoder.layers.5.norm2"} <= ids
    classes = {el.get("class") for el in root.iter(f"{SVG}g")}
    assert {"edge q", "edge k", "edge v", "edge residual", "edge mask"} <= classes


@pytest.mark.parametrize("name", PRESETS)
def test_memory_feeds_every_cross_attention_with_k_and_v(graphs, name):
    g = graphs[name]
    text = render(g, fmt="dot", level="block")
    memory = g.graph["memory"]
    crosses = cross_blocks(g)
    assert len(crosses) == g.graph["config"]["decoder_layers"]
    decoder = cluster_body(text, "cluster_decoder")
    edges = dot_edges(text)
    for block in crosses:
        assert f'id="{block}"' in decoder
        into = {(tail, role) for tail, head, role, _ in edges if head == block}
        assert (memory, "k") in into and (memory, "v") in into, block
        assert not any(t == memory and r == "q" for t, r in into)
    assert sum(1 for t, _, r, _ in edges if t == memory and r in "kv") == 2 * len(crosses)


def test_block_level_has_encoder_and_decoder_clusters(graphs):
    g = graphs["vaswani-base"]
    text = render(g, level="block", fmt="dot")
    encoder = cluster_body(text, "cluster_encoder")
    decoder = cluster_body(text, "cluster_decoder")
    for i in range(6):
        assert f'id="encoder.layers.{i}.self_attn"' in encoder
        assert f'id="encoder.layers.{i}.ffn"' in encoder
        assert f'id="decoder.layers.{i}.self_attn"' in decoder
        assert f'id="encoder.layers.{i}.self_attn"' not in decoder
    assert "subgraph cluster_legend" in text
    paths = set(dot_nodes(text).values())
    assert len(paths) < g.number_of_nodes() / 5  # blocks, not ops


def test_block_edges_carry_roles_colours_and_shapes(graphs):
    g = graphs["vaswani-base"]
    text = render(g, fmt="dot", level="block")
    edges = dot_edges(text)
    memory = g.graph["memory"]
    k_labels = {label for t, _, r, label in edges if t == memory and r == "k"}
    assert k_labels == {"K: (batch, src, d_model)"}
    q_labels = {label for _, h, r, label in edges if h.endswith("cross_attn") and r == "q"}
    assert q_labels == {"Q: (batch, tgt, d_model)"}
    for role in ("q", "k", "v", "residual", "mask"):
        colour, style = ROLE_STYLE[role][:2]
        lines = [ln for ln in text.splitlines() if f"class={role}" in ln]
        assert lines and all(f'color="{colour}"' in ln for ln in lines), role
        assert all(style == "solid" or f"style={style}" in ln for ln in lines), role
    assert len({ROLE_STYLE[r][0] for r in "qkv"}) == 3  # Q, K, V told apart


def test_block_level_collapses_parallel_edges(graphs):
    text = render(graphs["tiny"], fmt="dot")
    edges = [(t, h, r) for t, h, r, _ in dot_edges(text)]
    assert len(edges) == len(set(edges))
    # embed -> first encoder self-attention carries four roles, one edge each
    roles = sorted(r for t, h, r in edges if (t, h) == ("encoder.embed", "encoder.layers.0.self_attn"))
    assert roles == ["k", "q", "residual", "v"]


# --- op level ------------------------------------------------------------------

def test_op_level_draws_every_op_of_each_kind_of_layer_once(graphs):
    g = graphs["tiny"]  # 2 + 2 layers, alike in each stream
    text = render(g, level="op", fmt="dot")
    drawn = list(dot_nodes(text).values())
    once = {n for n, d in g.nodes(data=True)
            if not d.get("block_path") or d.get("layer") in (None, 0) or n == g.graph["memory"]}
    assert len(drawn) == len(set(drawn)) and set(drawn) == once
    assert 'label="self_attn (layer ×2)"' in text and 'label="cross_attn (layer ×2)"' in text
    assert "splines=ortho" not in text and "newrank" not in text
    assert 'id="encoder.layers.0.self_attn.q_proj"' in cluster_body(text, "cluster_encoder")


def test_op_level_collapses_a_duplicated_edge(graphs):
    g = graphs["tiny"].copy()
    u, v = "decoder.layers.0.cross_attn.scores", "decoder.layers.0.cross_attn.mask"
    g.add_edge(u, v, role="x", arg=2)
    g.add_edge(u, v, role="x", arg=3)
    pairs = [(t, h, r) for t, h, r, _ in dot_edges(render(g, level="op", fmt="dot"))]
    assert pairs.count((u, v, "x")) == 1


@needs_dot
def test_op_level_svg_of_the_base_model(graphs):
    root = ET.fromstring(render(graphs["vaswani-base"], level="op", fmt="svg"))
    ids = {el.get("id") for el in root.iter(f"{SVG}g")}
    assert "decoder.layers.0.cross_attn.k_proj" in ids and "legend" in ids
    assert not any(".layers.3." in i for i in ids if i)  # layers 1-5 are drawn as layer 0's "×6"


# --- Mermaid -------------------------------------------------------------------

@pytest.mark.parametrize("level", ["block", "op"])
def test_mermaid_flowchart(graphs, level):
    g = graphs["vaswani-base"]
    text = render(g, level=level, fmt="mmd")
    assert text.startswith("flowchart")
    assert 'subgraph Encoder["Encoder"]' in text and 'subgraph Decoder["Decoder"]' in text
    if level == "block":
        memory = "n_" + g.graph["memory"].replace(".", "_")
        for block in cross_blocks(g):
            node = "n_" + block.replace(".", "_")
            assert re.search(rf'^  {memory} -->\|"K: \(batch, src, d_model\)"\| {node}$', text, re.M)
            assert re.search(rf'^  {memory} -->\|"V[^"]*"\| {node}$', text, re.M)
    links = text.count(" --> ") + text.count(" -.-> ") + text.count(" -->|") + text.count(" -.->|")
    styled = sum(len(m.split(",")) for m in re.findall(r"^  linkStyle ([\d,]+) ", text, re.M))
    assert links == styled
    for role in "qkv":
        assert re.search(rf"linkStyle [\d,]+ stroke:{ROLE_STYLE[role][0]}", text)


# --- formats, files, errors ------------------------------------------------------

@pytest.mark.parametrize("suffix, check", [
    (".dot", lambda out: out.startswith("digraph")),
    (".gv", lambda out: out.startswith("digraph")),
    (".mmd", lambda out: out.startswith("flowchart TB")),
    (".json", lambda out: len(json.loads(out)["nodes"]) == 131),  # tiny: 131 nodes
    pytest.param(".svg", lambda out: "<svg" in out, marks=needs_dot),
    pytest.param(".png", lambda out: out.startswith(b"\x89PNG"), marks=needs_dot),
    pytest.param(".pdf", lambda out: out.startswith(b"%PDF"), marks=needs_dot),
])
def test_format_from_suffix(graphs, tmp_path, suffix, check):
    path = tmp_path / f"tiny{suffix}"
    out = render(graphs["tiny"], path)
    assert check(out)
    on_disk = path.read_bytes()
    assert on_disk == (out if isinstance(out, bytes) else out.encode())
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


def test_explicit_fmt_wins_over_suffix(graphs, tmp_path):
    out = render(graphs["tiny"], tmp_path / "diagram.txt", fmt="mmd")
    assert out.startswith("flowchart")


def test_overwrites_an_existing_file(graphs, tmp_path):
    path = tmp_path / "d.dot"
    path.write_text("old")
    render(graphs["tiny"], str(path))
    assert path.read_text().startswith("digraph")


@pytest.mark.parametrize("kwargs, words", [
    ({"fmt": "gif"}, ["gif", "svg", "png", "pdf", "dot", "mmd"]),
    ({"level": "layers"}, ["layers", "layer", "block", "op"]),
    ({"path": "diagram.xyz"}, ["diagram.xyz", ".svg", ".mmd"]),
])
def test_unknown_format_or_level_names_the_accepted_ones(graphs, kwargs, words):
    with pytest.raises(RenderError) as info:
        render(graphs["tiny"], **kwargs)
    for word in words:
        assert word in str(info.value)


def test_missing_dot_program(graphs, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert shutil.which("dot") is None
    with pytest.raises(RenderError) as info:
        render(graphs["vaswani-base"], tmp_path / "d.svg")
    message = str(info.value)
    assert message.startswith(INSTALL)
    assert "apt-get install graphviz" in message and ".dot or .mmd" in message
    assert message.count(";") == 1 and "\n" not in message
    assert info.value.fallback.startswith("digraph")
    assert not (tmp_path / "d.svg").exists()
    # formats that need no program still work
    assert render(graphs["vaswani-base"], tmp_path / "d.dot").startswith("digraph")
    assert render(graphs["vaswani-base"], tmp_path / "d.mmd").startswith("flowchart")


def test_dot_vanishing_after_the_lookup(graphs, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/nowhere/dot")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RenderError, match="'dot' program is needed for png"):
        render(graphs["tiny"], fmt="png")


@pytest.mark.parametrize("where", ["missing-dir/d.dot", "a-directory.dot"])
def test_unwritable_path(graphs, tmp_path, where):
    (tmp_path / "a-directory.dot").mkdir()
    target = tmp_path / where
    with pytest.raises(RenderError) as info:
        render(graphs["tiny"], target)
    assert str(target) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["a-directory.dot"]


def test_an_op_without_a_style_is_refused(graphs):
    g = graphs["tiny"].copy()
    g.nodes["decoder.layers.0.relu"]["op"] = "frobnicate"
    for level in ("block", "op"):
        with pytest.raises(RenderError, match="frobnicate"):
            render(g, level=level, fmt="dot")


def test_an_unknown_role_is_refused(graphs):
    g = graphs["tiny"].copy()
    g.add_edge("src_ids", "logits", role="gate", arg=1)
    with pytest.raises(RenderError, match="'gate'"):
        render(g, level="op", fmt="mmd")


def test_every_role_has_one_style():
    assert set(ROLE_STYLE) == set(ROLES)

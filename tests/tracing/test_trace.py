"""The graph contract: what every stage may rely on in a traced graph."""

import copy
import dataclasses
import json
import os
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

import qkvflow as qf
from qkvflow.ir import graph as ir
from qkvflow.ir.errors import GraphError
from qkvflow.ir.graph import ATTENTION_KINDS, ROLES, lint, tabular
from qkvflow.ir.ops import OPS

PRESETS = ("tiny", "vaswani-base", "torch-transformer")


def _trace(name):
    return qf.trace(qf.load_model(name))


@pytest.fixture(scope="module")
def graphs():
    return {name: _trace(name) for name in PRESETS}


@pytest.fixture()
def tiny(graphs):
    return copy.deepcopy(graphs["tiny"])  # tests below may break their copy


def _file_line(source: str) -> tuple[Path, int]:
    path, _, line = source.rpartition(":")
    return Path(path), int(line)


# --- nodes and edges ----------------------------------------------------------------

@pytest.mark.parametrize("name", PRESETS)
def test_every_node_carries_the_contract_attributes(graphs, name):
    g = graphs[name]
    assert isinstance(g, nx.MultiDiGraph)
    for node, d in g.nodes(data=True):
        assert d["op"] in OPS, node
        assert d["path"] == node
        assert isinstance(d["shape"], tuple) and all(isinstance(s, str) for s in d["shape"]), node
        assert d["dtype"] in ("float", "bool", "int"), node
        for key in ("stream", "layer", "block", "block_path", "attention", "attrs"):
            assert key in d, (node, key)
        assert d["stream"] in (None, "encoder", "decoder"), node
        assert d["layer"] is None or isinstance(d["layer"], int), node
        assert d["attention"] in (None, *ATTENTION_KINDS), node
        assert isinstance(d["params"], dict), node
        for pname, pshape in d["params"].items():
            assert isinstance(pname, str) and isinstance(pshape, tuple), (node, pname)
            assert all(isinstance(s, str) for s in pshape), (node, pname)


@pytest.mark.parametrize("name", PRESETS)
def test_every_node_source_points_at_a_real_line(graphs, name):
    g = graphs[name]
    files: dict = {}
    for node, d in g.nodes(data=True):
        path, line = _file_line(d["source"])
        if not path.is_absolute():
            path = Path(os.getcwd()) / path
        if path not in files:
            assert path.is_file(), (node, d["source"])
            files[path] = path.read_text(encoding="utf-8").splitlines()
        assert 1 <= line <= len(files[path]), (node, d["source"])


def test_sources_point_at_the_model_code_that_made_the_node(graphs):
    g = graphs["tiny"]
    for node, needle, module in [("decoder.layers.1.cross_attn.k_proj", "k_proj", "blocks.py"),
                                 ("encoder.layers.0.self_attn.scores", "nn.scores", "blocks.py"),
                                 ("masks.causal", "causal_mask", "encoder_decoder.py"),
                                 ("decoder.unembed", "unembed", "blocks.py")]:
        path, line = _file_line(g.nodes[node]["source"])
        assert path.name == module and path.parent.name == "models", node
        lines = path.read_text(encoding="utf-8").splitlines()
        assert needle in lines[line - 1], (node, lines[line - 1])


@pytest.mark.parametrize("name", PRESETS)
def test_every_edge_has_a_known_role_and_argument_position(graphs, name):
    g = graphs[name]
    for u, v, d in g.edges(data=True):
        assert d["role"] in ROLES, (u, v, d)
        assert isinstance(d["arg"], int), (u, v, d)
    for node in g:
        args = sorted(d["arg"] for _, _, d in g.in_edges(node, data=True))
        assert args == list(range(len(args))), node


@pytest.mark.parametrize("name", PRESETS)
def test_graph_is_plain_data_and_round_trips_through_json(graphs, name):
    g = graphs[name]
    text = json.dumps(nx.node_link_data(g, edges="edges"))
    data = json.loads(text)
    assert len(data["nodes"]) == g.number_of_nodes()
    assert len(data["edges"]) == g.number_of_edges()
    back = ir.from_json(ir.to_json(g))
    assert set(back.nodes) == set(g.nodes)
    assert all(back.nodes[n]["shape"] == g.nodes[n]["shape"] for n in g)
    roles = lambda h: sorted((u, v, d["role"], d["arg"]) for u, v, d in h.edges(data=True))  # noqa: E731
    assert roles(back) == roles(g)
    assert back.graph["memory"] == g.graph["memory"]
    assert back.graph["dims"] == g.graph["dims"]


def test_json_round_trip_still_runs_and_checks(graphs):
    g = graphs["tiny"]
    back = ir.from_json(ir.to_json(g))
    params = qf.init_params(g, seed=2)
    src = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 2, 0], [14, 15, 16, 2, 0, 0, 0, 0, 0, 0, 0]])
    tgt = np.array([[1, 20, 21, 22, 23], [1, 24, 25, 0, 0]])
    np.testing.assert_array_equal(qf.forward(back, params, src, tgt)["logits"],
                                  qf.forward(g, params, src, tgt)["logits"])
    assert qf.check(back) == []


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_well_formed_and_clean(graphs, name):
    g = graphs[name]
    assert lint(g) == []
    assert nx.is_directed_acyclic_graph(g)
    assert qf.check(g) == []
    inputs = [n for n, d in g.nodes(data=True) if d["op"] == "input"]
    assert sorted(inputs) == sorted(g.graph["inputs"]) == ["src_ids", "tgt_ids"]
    assert g.graph["outputs"] == ["logits"]
    assert g.nodes["logits"]["shape"] == ("batch", "tgt", "vocab")
    # every node is on a path from an input to the output
    for node in g:
        assert node in g.graph["outputs"] or nx.has_path(g, node, "logits"), node


# --- lint catches broken structure ---------------------------------------------------------

def test_lint_catches_a_cycle(tiny):
    tiny.add_edge("decoder.unembed", "decoder.layers.0.norm1", role="x", arg=1)
    problems = lint(tiny)
    assert any("cycle" in text for _, text in problems)
    with pytest.raises(GraphError, match="cycle"):
        ir.check_well_formed(tiny)
    assert [d.code for d in qf.check(tiny)] and {d.code for d in qf.check(tiny)} == {"QKV001"}


def test_lint_catches_an_unknown_op(tiny):
    tiny.nodes["encoder.layers.1.relu"]["op"] = "conv2d"
    assert lint(tiny) == [("encoder.layers.1.relu", "node encoder.layers.1.relu has unknown op 'conv2d'")]


def test_lint_catches_a_missing_shape(tiny):
    del tiny.nodes["decoder.layers.0.cross_attn.scores"]["shape"]
    assert lint(tiny) == [("decoder.layers.0.cross_attn.scores",
                           "node decoder.layers.0.cross_attn.scores has no shape")]


def test_lint_catches_bad_roles_argument_gaps_and_stray_outputs(tiny):
    u, v, k = next((u, v, k) for u, v, k in tiny.in_edges("decoder.layers.0.cross_attn.attend", keys=True))
    tiny.edges[u, v, k]["role"] = "key"
    tiny.add_edge("masks.src_keep", "encoder.layers.0.norm1", role="x", arg=2)
    tiny.graph["outputs"].append("nowhere")
    texts = [t for _, t in lint(tiny)]
    assert any("unknown role 'key'" in t for t in texts)
    assert any("argument positions [0, 2]" in t for t in texts)
    assert any("output nowhere is not a node" in t for t in texts)


def test_executor_refuses_a_graph_that_is_not_well_formed(tiny):
    params = qf.init_params(tiny)
    tiny.nodes["encoder.layers.1.relu"]["op"] = "conv2d"
    with pytest.raises(GraphError, match="conv2d"):
        qf.Executor(tiny, params)


# --- provenance -------------------------------------------------------------------------------

def _walk(g, node, role):
    """Follow edges of ``role`` backwards from ``node`` as far as they go; the chain of nodes."""
    chain = [node]
    while True:
        ins = [u for u, _, d in g.in_edges(chain[-1], data=True) if d["role"] == role]
        if not ins:
            return chain
        assert len(ins) == 1, (chain[-1], ins)
        chain.append(ins[0])


def _one_site(g, block: str) -> dict:
    """A block's declaration merged with the one attention site the provenance pass found in it."""
    record = g.graph["attention"][block]
    assert len(record["sites"]) == 1, block
    return {**record, **record["sites"][0]}


@pytest.mark.parametrize("name", PRESETS)
def test_every_cross_attention_reads_k_and_v_from_the_memory(graphs, name):
    g = graphs[name]
    memory = g.graph["memory"]
    assert memory is not None and g.nodes[memory]["stream"] == "encoder"
    cross = [b for b, r in g.graph["attention"].items() if r["kind"] == "cross"]
    assert len(cross) == g.graph["config"]["decoder_layers"]
    for block in cross:
        rec = _one_site(g, block)
        k_chain = _walk(g, rec["scores"], "k")
        v_chain = _walk(g, rec["attend"], "v")
        assert k_chain[-1] == memory and v_chain[-1] == memory, (k_chain, v_chain)
        assert [g.nodes[n]["op"] for n in k_chain] == ["scores", "split_heads", "linear", "norm"]
        assert k_chain[2] == f"{block}.k_proj" and v_chain[2] == f"{block}.v_proj"
        q_chain = _walk(g, rec["scores"], "q")
        assert q_chain[2] == f"{block}.q_proj"
        assert g.nodes[q_chain[-1]]["stream"] == "decoder"
        assert rec["origins"] == {"q": q_chain[-1], "k": memory, "v": memory}


def test_memory_is_the_encoders_final_output(graphs):
    assert graphs["tiny"].graph["memory"] == "encoder.layers.1.norm2"
    assert graphs["vaswani-base"].graph["memory"] == "encoder.layers.5.norm2"
    assert graphs["torch-transformer"].graph["memory"] == "encoder.norm"


def test_attention_records_for_all_three_kinds(graphs):
    g = graphs["tiny"]
    records = g.graph["attention"]
    assert sorted(records) == sorted(
        [f"encoder.layers.{i}.self_attn" for i in range(2)]
        + [f"decoder.layers.{i}.self_attn" for i in range(2)]
        + [f"decoder.layers.{i}.cross_attn" for i in range(2)])
    want = {
        "encoder_self": ({"q": "encoder", "k": "encoder", "v": "encoder", "mask": "src_padding", "scale": "sqrt"},
                         ["src_padding"], "encoder"),
        "decoder_self": ({"q": "decoder", "k": "decoder", "v": "decoder", "mask": "causal+tgt_padding", "scale": "sqrt"},
                         ["causal", "tgt_padding"], "decoder"),
        "cross": ({"q": "decoder", "k": "memory", "v": "memory", "mask": "src_padding", "scale": "sqrt"},
                  ["src_padding"], "decoder"),
    }
    for block in records:
        rec = _one_site(g, block)
        declared, masks, stream = want[rec["kind"]]
        assert rec["declared"] == declared, block
        assert rec["masks"] == masks, block
        assert rec["stream"] == stream and rec["layer"] == int(block.split(".")[2]), block
        assert rec["softmax"] == f"{block}.softmax" and rec["scores"] == f"{block}.scores", block
        assert g.nodes[rec["softmax"]]["attention"] == rec["kind"]
        path, _ = _file_line(rec["source"])
        assert path.name == "encoder_decoder.py"
    # declared shapes name query and key lengths apart
    cross = _one_site(g, "decoder.layers.0.cross_attn")
    assert tuple(cross["declared_shapes"]["y"]) == ("batch", "tgt", "d_model")
    assert tuple(cross["declared_shapes"]["memory"]) == ("batch", "src", "d_model")
    assert g.nodes[cross["scores"]]["shape"] == ("batch", "heads", "tgt", "src")


def test_self_attention_origins_are_the_state_entering_the_layer(graphs):
    g = graphs["tiny"]
    rec = {block: _one_site(g, block) for block in g.graph["attention"]}
    assert rec["encoder.layers.0.self_attn"]["origins"] == dict.fromkeys("qkv", "encoder.positional")
    assert rec["encoder.layers.1.self_attn"]["origins"] == dict.fromkeys("qkv", "encoder.layers.0.norm2")
    assert rec["decoder.layers.1.self_attn"]["origins"] == dict.fromkeys("qkv", "decoder.layers.0.norm3")
    assert rec["decoder.layers.1.cross_attn"]["origins"]["q"] == "decoder.layers.1.norm1"


def test_key_axis_is_recorded_on_scores(graphs):
    g = graphs["tiny"]
    assert g.nodes["decoder.layers.0.self_attn.scores"]["key_axis"] == 3
    assert g.nodes["decoder.layers.0.cross_attn.softmax"]["attrs"]["axis"] == -1


# --- printout ---------------------------------------------------------------------------------------

def test_tabular_has_a_header_and_one_line_per_node(graphs):
    g = graphs["tiny"]
    lines = tabular(g).splitlines()
    assert len(lines) == g.number_of_nodes() + 1
    assert lines[0].split() == ["path", "op", "inputs", "shape"]
    first = {line.split()[0] for line in lines[1:]}
    assert first == set(g.nodes)
    row = next(line for line in lines if line.startswith("decoder.layers.1.cross_attn.scores "))
    assert "q=decoder.layers.1.cross_attn.split_heads" in row
    assert "k=decoder.layers.1.cross_attn.split_heads_1" in row
    assert row.rstrip().endswith("(batch, heads, tgt, src)")
    assert len(tabular(g, limit=5).splitlines()) == 6


# --- the presets -----------------------------------------------------------------------------------

def test_vaswani_base(graphs):
    g = graphs["vaswani-base"]
    dims = g.graph["dims"]
    assert (dims["d_model"], dims["heads"], dims["d_head"], dims["d_ff"]) == (512, 8, 64, 2048)
    assert {g.nodes[n]["layer"] for n in g if g.nodes[n]["stream"] == "encoder"} - {None} == set(range(6))
    assert {g.nodes[n]["layer"] for n in g if g.nodes[n]["stream"] == "decoder"} - {None} == set(range(6))
    kinds = [r["kind"] for r in g.graph["attention"].values()]
    assert len(kinds) == 18
    assert {k: kinds.count(k) for k in ATTENTION_KINDS} == {"encoder_self": 6, "decoder_self": 6, "cross": 6}
    # one embedding matrix shared by both inputs and the pre-softmax projection
    assert g.nodes["decoder.embed"]["attrs"]["tied_to"] == "encoder.embed.weight"
    assert g.nodes["decoder.unembed"]["attrs"]["tied_to"] == "encoder.embed.weight"
    from qkvflow.run.params import param_specs
    specs = param_specs(g)
    assert specs["encoder.embed.weight"] == ("vocab", "d_model")
    assert not [p for p in specs if p.startswith("decoder.embed") or p.startswith("decoder.unembed")]
    assert g.nodes["encoder.embed"]["attrs"]["scale"] == pytest.approx(512 ** 0.5)
    assert "encoder.norm" not in g and "decoder.norm" not in g


def test_torch_transformer_has_final_norms_and_untied_embeddings(graphs):
    g = graphs["torch-transformer"]
    for node, stream in (("encoder.norm", "encoder"), ("decoder.norm", "decoder")):
        assert g.nodes[node]["op"] == "norm"
        assert g.nodes[node]["stream"] == stream
        assert g.nodes[node]["params"] == {"weight": ("d_model",), "bias": ("d_model",)}
    # post-norm: the last layer's norm3 is normalised again, then unembedded
    assert ir.arg_nodes(g, "decoder.norm") == ["decoder.layers.5.norm3"]
    assert ir.arg_nodes(g, "decoder.unembed") == ["decoder.norm"]
    assert "tied_to" not in g.nodes["decoder.embed"]["attrs"]
    assert g.nodes["decoder.unembed"]["params"] == {"weight": ("vocab", "d_model")}


def test_tracing_is_deterministic(graphs):
    again = _trace("tiny")
    assert ir.to_json(again) == ir.to_json(graphs["tiny"])


# --- annotations left as strings (from __future__ import annotations) ------------------

def test_postponed_annotations_are_declared_shapes_and_checked_at_run():
    """qkvflow's own models write their annotations this way (no jaxtyping
    import to check a model); a user's may too. Traced, the strings are the
    declared shapes; run, jaxtyping checks them like annotation objects."""
    import postponed_annotations as blocks
    from zoo.registry import TINY
    cfg = dataclasses.replace(TINY, d_head=5)  # d_model 21, heads 3: every size apart
    good, bad = (qf.transformer.build(cfg, cross=b) for b in (blocks.cross, blocks.misdeclared_cross))
    assert qf.check(qf.trace(good)) == []
    errors = [f for f in qf.check(qf.trace(bad)) if f.severity == "error"]
    assert len(errors) == cfg.decoder_layers  # one per cross-attention
    assert all(f.code == "QKV201" and "memory" in f.message for f in errors)
    params = qf.init_params(qf.trace(good), seed=0)
    feeds = {"src_ids": np.full((2, 6), 4), "tgt_ids": np.full((2, 4), 5)}
    assert np.isfinite(qf.eager(good, params, feeds)["logits"]).all()
    with pytest.raises(TypeError, match="memory"):  # jaxtyping's TypeCheckError
        qf.eager(bad, params, feeds)

"""The provenance pass: facts derived from the graph alone, for every softmax.

The tracer records operations and declarations only; the pass finds every
scores -> softmax -> weighted-sum site, labels Q/K/V edges and writes the
sites. A graph written to JSON and loaded back (or stripped of its sites)
gives the same findings, table, diagrams and logits; recorded sites that
disagree with the graph are a QKV001.
"""

import numpy as np
import pytest

import qkvflow as qf
import single_stream
from qkvflow.ir.graph import from_json, lint, to_json
from qkvflow.passes.provenance import annotate
from qkvflow.tracing.tracer import trace as record_only
from zoo import ENTRIES, TINY

BY_NAME = {e.name: e for e in ENTRIES}
ROUND_TRIP = {
    "tiny": lambda: qf.load_model("tiny"),
    "cross_head_loop_k_from_decoder": BY_NAME["cross_head_loop_k_from_decoder"].model,
    "decoder_self_without_causal": BY_NAME["decoder_self_without_causal"].model,
    "decoder-only": single_stream.decoder_only,
    "encoder-only-query-mask": lambda: single_stream.encoder_only(single_stream.query_masked_attention),
}


def _feeds(g) -> dict:
    """Token ids for every input of ``g``: batch 2, a different length per sequence dim."""
    rng = np.random.default_rng(3)
    lengths = dict(zip(sorted(g.graph["sequences"]), (6, 4, 5)))
    feeds = {}
    for node in g.graph["inputs"]:
        attrs = g.nodes[node]["attrs"]
        seq = attrs["shape"][-1]
        ids = rng.integers(3, 41, size=(2, lengths[seq]))
        ids[1, -1] = attrs.get("pad_id", 0)
        feeds[attrs["name"]] = ids
    return feeds


def test_the_tracer_records_no_provenance_the_pass_does():
    raw = record_only(qf.load_model("tiny"))
    block = "decoder.layers.0.cross_attn"
    assert "sites" not in raw.graph["attention"][block]
    assert not any(d["role"] in ("q", "k") for _, _, d in raw.edges(data=True))
    annotate(raw)
    (site,) = raw.graph["attention"][block]["sites"]
    assert site["origins"] == {"q": "decoder.layers.0.norm1", "k": "encoder.layers.1.norm2",
                               "v": "encoder.layers.1.norm2"}
    assert raw.edges["decoder.layers.0.cross_attn.k_proj", "decoder.layers.0.cross_attn.split_heads_1", 0][
        "role"] == "k"


def test_a_per_head_loop_has_one_site_per_head_and_only_the_wrong_head_is_reported():
    g = qf.trace(BY_NAME["cross_head_loop_k_from_decoder"].model())
    block = "decoder.layers.0.cross_attn"
    sites = g.graph["attention"][block]["sites"]
    assert len(sites) == TINY.heads == 3
    keys = [s["origins"]["k"] for s in sites]
    assert keys == ["encoder.layers.1.norm2", "decoder.layers.0.norm1", "encoder.layers.1.norm2"]
    found = [d for d in qf.check(g) if d.node.startswith(block)]
    assert ("QKV301", f"{block}.head1.k_proj") in {(d.code, d.node) for d in found}
    # Heads 0 and 2 are right: every finding is about head 1 (its nodes, or the block as a whole).
    assert all(d.node == block or ".head1." in d.node or d.node.endswith("_1") for d in found), found
    rows = qf.explain(g, fmt="json")
    assert '"k": "decoder stream"' in rows and '"k": "encoder final output"' in rows


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_a_graph_loaded_from_json_gives_identical_answers(name):
    g = qf.trace(ROUND_TRIP[name]())
    back = from_json(to_json(g))
    assert to_json(back) == to_json(g)
    assert qf.check(back) == qf.check(g)
    for lang in ("en", "zh"):
        for fmt in ("text", "json"):
            assert qf.explain(back, lang=lang, fmt=fmt) == qf.explain(g, lang=lang, fmt=fmt)
    for level in ("block", "op"):
        for fmt in ("mmd", "dot"):
            assert qf.render(back, level=level, fmt=fmt) == qf.render(g, level=level, fmt=fmt)
    params = qf.init_params(g, seed=1)
    assert qf.init_params(back, seed=1).keys() == params.keys()
    if any(d.code.startswith("QKV2") for d in qf.check(g)):
        return  # a graph with shape errors cannot run
    feeds = _feeds(g)
    np.testing.assert_array_equal(qf.forward(back, params, **feeds)["logits"],
                                  qf.forward(g, params, **feeds)["logits"])


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_a_graph_stripped_of_its_facts_gets_them_back(name):
    g = qf.trace(ROUND_TRIP[name]())
    stripped = from_json(to_json(g))
    for record in stripped.graph["attention"].values():
        del record["sites"]
    for _, _, d in stripped.edges(data=True):
        if d["role"] in ("q", "k", "v", "probs"):
            d["role"] = "x"
    assert qf.check(stripped) == qf.check(g)
    assert qf.explain(stripped) == qf.explain(g)
    assert qf.render(stripped, fmt="mmd") == qf.render(g, fmt="mmd")


def test_recorded_sites_that_disagree_with_the_graph_are_qkv001():
    g = qf.trace(qf.load_model("tiny"))
    tampered = from_json(to_json(g))
    site = tampered.graph["attention"]["decoder.layers.1.cross_attn"]["sites"][0]
    site["origins"]["k"] = "decoder.layers.1.norm1"  # claims K reads the decoder
    problems = lint(tampered)
    assert any("recorded K origin decoder.layers.1.norm1 does not feed" in p for _, p in problems)
    assert [d.code for d in qf.check(tampered)] == ["QKV001"]

    partial = from_json(to_json(g))
    del partial.graph["attention"]["encoder.layers.0.self_attn"]["sites"]
    assert "has no provenance sites while others do" in lint(partial)[0][1]
    assert qf.check(partial) == []  # a missing record is derived again, not trusted

    missing = from_json(to_json(g))
    missing.graph["attention"]["encoder.layers.0.self_attn"]["sites"] = []
    assert lint(missing) == [("encoder.layers.0.self_attn.softmax", "softmax encoder.layers.0.self_attn.softmax "
                              "of block encoder.layers.0.self_attn has no provenance site")]

    wrong_op = from_json(to_json(g))
    wrong_op.graph["attention"]["encoder.layers.0.self_attn"]["sites"][0]["scores"] = "encoder.layers.0.norm1"
    assert "is not a contraction of the block" in lint(wrong_op)[0][1]


def test_a_block_without_softmax_is_reported_once_as_unreadable():
    @qf.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
    def no_softmax(x, src_keep):
        return qf.nn.linear(x, "d_model", name="out_proj")

    g = qf.trace(qf.transformer.build(TINY, encoder_self=no_softmax))
    found = [d for d in qf.check(g) if d.code == "QKV305"]
    assert [d.node for d in found] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert all("no softmax inside the block" in d.message for d in found)


def test_a_graph_written_before_the_declarations_is_refused_not_misread(tmp_path):
    import json

    from qkvflow.ir.errors import GraphError
    from qkvflow.ir.graph import read_graph

    data = json.loads(to_json(qf.trace(qf.load_model("tiny"))))
    old = json.loads(json.dumps(data))
    del old["graph"]["sequences"], old["graph"]["streams"]
    for node in old["nodes"]:
        node.pop("attention_block")
    found = qf.check(from_json(json.dumps(old)))
    assert [(d.code, d.node) for d in found] == [("QKV001", "graph")]
    assert "no sequences, streams attribute(s)" in found[0].message
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    with pytest.raises(GraphError, match="old.json' is not well formed: the graph has no sequences, streams"):
        read_graph(path)
    del data["nodes"][3]["attention_block"]
    assert lint(from_json(json.dumps(data)))[0][1].endswith("has no attention_block attribute(s)")

"""Weights as arrays: qkvflow.param, x @ W + b, np.split of a fused projection, table[ids].

:mod:`gpt_numpy` is a GPT-2-style decoder written as plain NumPy with its
weights from ``qf.param``. It traces, checks clean, explains, renders, and
its graph runs equal to the same model in NumPy alone; its planted bug is
found; what the tracer still refuses is refused in one sentence.
"""

import numpy as np
import pytest

import gpt_numpy as gpt
import qkvflow as qf
from qkvflow import nn
from qkvflow.ir.errors import InputError, TraceError
from qkvflow.views.explain import provenance


@pytest.fixture(scope="module")
def port():
    model = gpt.gpt()
    return model, qf.trace(model)


def _ids(batch=2, length=7, seed=0):
    return np.random.default_rng(seed).integers(0, gpt.DIMS["vocab"], (batch, length))


def test_the_port_checks_clean_and_explains(port):
    _, g = port
    assert qf.check(g, strict=True) == []
    (row,) = provenance(g)
    assert (row["attention"], row["k"], row["mask"], row["count"]) == (
        "masked self-attention", "lm stream", "causal", 2)
    site = g.graph["attention"]["lm.h.1.self_attn"]["sites"][0]
    origin = site["origins"]["q"]
    assert site["origins"] == dict.fromkeys("qkv", origin)
    assert g.nodes[origin]["attrs"]["fn"] == "add" and g.nodes[origin]["layer"] == 1  # ln_1's "+ b"
    # K: swapaxes, the head split (transpose, reshape), its part of the fused projection, + b, x @ w
    assert [g.nodes[n]["op"] for n in site["paths"]["k"]] == [
        "transpose", "transpose", "reshape", "split_part", "elementwise", "matmul"]


def test_parameters_are_named_as_declared_and_initialised_as_asked(port):
    _, g = port
    params = qf.init_params(g, seed=1)
    assert {"wte", "h.0.attn.c_attn.w", "h.1.mlp.c_proj.b", "ln_f.g", "lm.wpe.weight"} <= set(params)
    assert params["h.0.attn.c_attn.w"].shape == (12, 36)
    assert params["wte"].shape == (29, 12)
    np.testing.assert_array_equal(params["ln_f.g"], np.ones(12))
    np.testing.assert_array_equal(params["ln_f.b"], np.zeros(12))
    assert abs(params["h.0.mlp.c_fc.w"].std() - 12 ** -0.5) < 0.05  # fan_in_first: N(0, 1/d_in)


def test_the_graph_runs_equal_to_the_plain_numpy_model(port, tmp_path):
    model, g = port
    params = qf.init_params(g, seed=1)
    ids = _ids()
    logits = qf.forward(g, params, ids=ids)["logits"]
    assert logits.shape == (2, 7, 29)
    assert np.abs(logits - gpt.reference(params, ids)).max() <= 1e-12
    assert np.abs(qf.eager(model, params, {"ids": ids})["logits"] - logits).max() <= 1e-12
    qf.save_params(params, tmp_path / "gpt.safetensors")
    loaded = qf.load_params(tmp_path / "gpt.safetensors")
    np.testing.assert_array_equal(qf.forward(g, loaded, ids=ids)["logits"], logits)
    single = qf.forward(g, params, ids=ids, dtype="float32")["logits"]
    assert single.dtype == np.float32 and np.abs(single - logits).max() < 1e-4
    with pytest.raises(InputError, match="input ids has token id 29, expected ids in 0..28"):
        qf.forward(g, params, ids=np.array([[3, 29]]))


def test_the_block_diagram_shows_dataflow_not_weights(port):
    _, g = port
    text = qf.render(g, fmt="mmd", level="block")
    assert "c_attn" not in text and 'n_wte["' not in text
    assert "h.0.self_attn<br/>masked self-attention<br/>mask: causal" in text
    assert "c_attn" in qf.render(g, fmt="mmd", level="op")


def test_values_taken_from_the_queries_part_are_qkv307():
    found = qf.check(qf.trace(gpt.gpt(gpt.attention_v_is_q)))
    assert [(d.code, d.node) for d in found] == [("QKV307", "lm.h.0.self_attn.matmul"),
                                                ("QKV307", "lm.h.1.self_attn.matmul")]
    assert "V is computed by Q's projection" in found[0].message
    # The projection is made in the helper linear(); the finding names the block's line that called it.
    lines = open(gpt.__file__, encoding="utf-8").read().splitlines()
    line = int(found[0].source.rsplit(":", 1)[1])
    assert "np.split(linear(x, **c_attn)" in lines[line - 1]
    assert lines.index("def attention_v_is_q(") < line - 1


def test_a_split_that_cannot_name_its_parts_is_a_finding():
    def run():
        x = nn.input("x", ("batch", "seq", "d_model"), dtype="float")
        a, b = np.split(x, 2, axis=-1)  # d_model is no 2*<part>
        return {"y": a + b}

    found = qf.check(qf.trace(qf.Model("halves", gpt.DIMS, run)))
    assert [d.code for d in found] == ["QKV201", "QKV201"]
    assert "name the dim 2*<part>" in found[0].message


def _traced(body):
    def run():
        ids = nn.input("ids", ("batch", "seq"))
        return {"y": body(ids)}
    return qf.trace(qf.Model("refused", gpt.DIMS, run))


@pytest.mark.parametrize("body, message", [
    (lambda ids: np.split(qf.param("w", ("vocab", "d_model"))[ids], [3], axis=-1)[0],
     "only a number of equal parts traces"),
    (lambda ids: qf.param("w", ("vocab", "d_modle"))[ids], "param 'w' has unknown dim 'd_modle'"),
    (lambda ids: qf.param("w", ("vocab", "d_model"))[ids] + qf.param("w", ("vocab", "d_ff"))[ids],
     "param 'w' ('vocab', 'd_ff') clashes with param 'w'"),
    (lambda ids: qf.param("w", ("vocab", "d_model"), init="xavier")[ids], "init 'xavier' is not known"),
    (lambda ids: qf.param("w", ("vocab", "d_model"))[ids * 1.0], "only a traced table"),
    (lambda ids: qf.param("w", ("seq", "d_model"))[ids], "param 'w' has data dim 'seq'"),
])
def test_what_the_tracer_refuses_is_one_sentence(body, message):
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _traced(body)

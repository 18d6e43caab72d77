"""Attention heatmaps: the weights read off a run, and the figure drawn from them."""

import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import qkvflow as qf
from qkvflow.ir.errors import InputError, RenderError
from qkvflow.views.heatmaps import attention_maps, plot_attention

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def tiny_run():
    g = qf.trace(qf.load_model("tiny"))
    src = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])  # row 0 ends in 2 pads (pad_id 0)
    tgt = np.array([[1, 20, 21], [1, 22, 23]])
    acts = qf.forward(g, qf.init_params(g, seed=3), src, tgt, capture=True)["activations"]
    return g, acts


def test_one_map_per_attention_in_kind_then_layer_order(tiny_run):
    g, acts = tiny_run
    maps = attention_maps(g, acts)
    assert [(m.kind, m.layer) for m in maps] == [
        ("encoder_self", 0), ("encoder_self", 1), ("decoder_self", 0), ("decoder_self", 1), ("cross", 0), ("cross", 1)]
    shapes = {m.kind: (m.queries, m.keys, m.weights.shape) for m in maps}
    assert shapes == {"encoder_self": ("src", "src", (6, 6)), "decoder_self": ("tgt", "tgt", (3, 3)),
                      "cross": ("tgt", "src", (3, 6))}
    for m in maps:
        np.testing.assert_allclose(m.weights.sum(axis=1), 1.0, atol=1e-12)


def test_the_causal_triangle_and_padded_keys_get_exactly_nothing(tiny_run):
    g, acts = tiny_run
    maps = attention_maps(g, acts)
    for m in maps:
        if m.kind == "decoder_self":
            assert (m.weights[np.triu_indices(3, k=1)] == 0).all()
        else:  # keys over src: row 0's two pads
            assert (m.weights[:, 4:] == 0).all() and (m.weights[:, :4] > 0).all()
    unpadded = attention_maps(g, acts, batch_row=1)
    assert all((m.weights > 0).all() for m in unpadded if m.kind != "decoder_self")


def test_averaged_over_heads_or_one_head_by_hand():
    g = qf.trace(qf.load_model("tiny"))
    node = g.graph["attention"]["decoder.layers.0.cross_attn"]["sites"][0]["softmax"]
    probs = np.zeros((2, 3, 2, 4))  # (batch, heads, tgt, src)
    probs[0, 0, 0] = [1, 0, 0, 0]
    probs[0, 1, 0] = [0, 1, 0, 0]
    probs[0, 2, 0] = [0, 0.5, 0.5, 0]
    probs[0, :, 1] = [0.25, 0.25, 0.25, 0.25]
    [m] = attention_maps(g, {node: probs})
    np.testing.assert_array_equal(m.weights, [[1 / 3, 1.5 / 3, 0.5 / 3, 0], [0.25] * 4])
    [m] = attention_maps(g, {node: probs}, head=2)
    np.testing.assert_array_equal(m.weights, [[0, 0.5, 0.5, 0], [0.25] * 4])
    with pytest.raises(InputError, match=r"head 3 does not exist; .* has 3 heads \(0\.\.2\)"):
        attention_maps(g, {node: probs}, head=3)
    with pytest.raises(InputError, match="batch row 2 does not exist"):
        attention_maps(g, {node: probs}, batch_row=2)


def test_a_single_stream_model_draws_its_one_kind(tmp_path):
    g = qf.trace(qf.load_model("gpt2-tiny"))
    acts = qf.forward(g, qf.init_params(g), ids=np.array([[5, 6, 7, 8]]), capture=True)["activations"]
    maps = attention_maps(g, acts)
    assert {m.kind for m in maps} == {"decoder_self"} and len(maps) == g.graph["config"]["decoder_layers"]
    out = plot_attention(maps, tmp_path / "gpt2.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_svg_carries_the_tokens_as_text(tmp_path, tiny_run):
    g, acts = tiny_run
    words = {"src": ["I", "love", "China", "<eos>", "<pad>", "$x$"], "tgt": ["<bos>", "我", "爱"]}
    out = plot_attention(attention_maps(g, acts), tmp_path / "a.svg", tokens=words, title="tiny & <friends> $\\foo{$")
    text = {t.text for t in ET.parse(out).iter() if t.tag.endswith("text") and t.text}
    assert {"China", "<pad>", "$x$", "我", "爱", "tiny & <friends> $\\foo{$"} <= text  # drawn as written, no maths
    with pytest.raises(RenderError, match="use a .png or .svg file"):
        plot_attention(attention_maps(g, acts), tmp_path / "a.txt")


def test_cli_run_draws_the_demo_models_heatmaps(tmp_path):
    out = tmp_path / "attention.svg"
    proc = subprocess.run([sys.executable, "-m", "qkvflow", "run", "toy-en-zh", "--src", "I love China <eos>",
                           "--tgt", "<bos> 我 爱 中国", "--attention", out, "--head", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out} (attention weights of batch row 0, head 0)" in proc.stdout
    assert "中国" in out.read_text(encoding="utf-8")
    bad = subprocess.run([sys.executable, "-m", "qkvflow", "run", "tiny", "--src", "5", "--tgt", "1",
                          "--attention", tmp_path / "a.svg", "--head", "9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "head 9 does not exist" in bad.stderr


def test_without_matplotlib_one_sentence_says_how_to_get_it(tmp_path, tiny_run, monkeypatch):
    g, acts = tiny_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(RenderError, match=r"heatmaps need matplotlib: pip install 'qkvflow\[plot\]'"):
        plot_attention(attention_maps(g, acts), tmp_path / "a.png")

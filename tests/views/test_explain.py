"""The explain stage: the provenance table is derived from the traced graph."""

import json

import numpy as np
import pytest
from jaxtyping import Bool, Float

import qkvflow
from qkvflow import transformer
from qkvflow.ir.errors import ConfigError, QkvflowError
from qkvflow.views.explain import explain, provenance

EXPECTED = [
    ("encoder self-attention", "encoder stream", "encoder stream", "encoder stream",
     "source padding"),
    ("masked decoder self-attention", "decoder stream", "decoder stream", "decoder stream",
     "causal + target padding"),
    ("cross-attention", "decoder stream", "encoder final output", "encoder final output",
     "source padding"),
]


def _facts(rows):
    return [(r["attention"], r["q"], r["k"], r["v"], r["mask"]) for r in rows]


@pytest.fixture(scope="module")
def tiny():
    return qkvflow.trace(qkvflow.load_model("tiny"))


@pytest.mark.parametrize("name, layers", [("tiny", 2), ("vaswani-base", 6)])
def test_presets_give_the_textbook_table(name, layers):
    rows = provenance(qkvflow.trace(qkvflow.load_model(name)))
    assert _facts(rows) == EXPECTED
    assert [r["count"] for r in rows] == [layers] * 3
    assert [r["kind"] for r in rows] == ["encoder_self", "decoder_self", "cross"]
    assert rows[2]["blocks"] == [f"decoder.layers.{i}.cross_attn" for i in range(layers)]


def test_text_names_the_model_and_states_the_consequences(tiny):
    text = explain(tiny)
    assert text.splitlines()[0] == "Attention provenance of model tiny"
    assert "2 of 2 cross-attention blocks read K and V from the same node" in text
    assert "encoder.layers.1.norm2" in text and "depend only on src_ids" in text
    assert "Decoder position t depends on target tokens <= t only" in text


def test_zh_uses_the_seed_vocabulary(tiny):
    text = explain(tiny, lang="zh")
    for term in ("编码器自注意力", "带掩码的解码器自注意力", "交叉注意力", "编码器的最终输出",
                 "理解输入序列内部的上下文", "连接 Encoder 和 Decoder", "Query (Q) 来源",
                 "因果掩码 + 目标端填充", "源端填充", "推论"):
        assert term in text


def test_zh_text_columns_line_up_by_display_width(tiny):
    import unicodedata

    def width(s):
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)

    lines = explain(tiny, lang="zh").splitlines()[2:7]
    assert [line.split()[-1] for line in lines] == ["数量", "----", "2", "2", "2"]
    starts = {width(line[:len(line) - len(line.split()[-1])]) for line in lines}
    assert len(starts) == 1


def test_md_has_a_header_separator_row(tiny):
    lines = explain(tiny, fmt="md").splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| attention kind | purpose | Q from | K from | V from | mask | blocks |"
    assert table[1] == "|---|---|---|---|---|---|---|"
    assert len(table) == 5


def test_json_parses_and_carries_rows_and_consequences(tiny):
    data = json.loads(explain(tiny, lang="zh", fmt="json"))
    assert data["model"] == "tiny" and data["lang"] == "zh"
    assert [r["count"] for r in data["rows"]] == [2, 2, 2]
    assert data["rows"][2]["k"] == "编码器的最终输出"
    assert len(data["consequences"]) == 2


@pytest.mark.parametrize("kwargs, accepted", [({"lang": "fr"}, "en, zh"),
                                              ({"fmt": "html"}, "text, md, json")])
def test_unknown_lang_or_format_is_a_config_error(tiny, kwargs, accepted):
    with pytest.raises(ConfigError, match=accepted):
        explain(tiny, **kwargs)
    assert issubclass(ConfigError, QkvflowError)


# --- rewired models: the table shows what the code does, not what it declares ---

@qkvflow.nn.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_reading_decoder(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Wrong on purpose: K and V from the decoder stream instead of the memory."""
    return transformer.multi_head_attention(y, y, src_keep[:, None, None, :])


@qkvflow.nn.attention("decoder_self", q="decoder", k="decoder", v="decoder",
                      mask="causal+tgt_padding")
def decoder_self_without_causal(
    y: Float[np.ndarray, "batch tgt d_model"],
    causal: Bool[np.ndarray, "tgt tgt"],
    tgt_keep: Bool[np.ndarray, "batch tgt"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Wrong on purpose: declares a causal mask but applies only target padding."""
    return transformer.multi_head_attention(y, y, tgt_keep[:, None, None, :])


def _rewired(**blocks):
    return qkvflow.trace(transformer.build(qkvflow.preset("tiny"), **blocks))


def test_cross_attention_reading_the_decoder_shows_in_the_table():
    g = _rewired(cross=cross_reading_decoder)
    rows = provenance(g)
    assert _facts(rows)[:2] == EXPECTED[:2]
    cross = rows[2]
    assert (cross["attention"], cross["k"], cross["v"]) == (
        "cross-attention", "decoder stream", "decoder stream")
    text = explain(g)
    assert "None of the 2 cross-attention blocks reads both K and V from the encoder" in text
    assert "No causal mask on decoder.layers.0.cross_attn, decoder.layers.1.cross_attn" in text
    assert "depends on target tokens <= t only" not in text


def test_decoder_self_attention_without_causal_mask_shows_in_the_table():
    g = _rewired(decoder_self=decoder_self_without_causal)
    rows = provenance(g)
    assert rows[1]["attention"] == "masked decoder self-attention"
    assert rows[1]["mask"] == "target padding"
    assert provenance(g, lang="zh")[1]["mask"] == "目标端填充"
    text = explain(g)
    assert "No causal mask on decoder.layers.0.self_attn, decoder.layers.1.self_attn" in text
    assert "depends on target tokens <= t only" not in text


def test_stale_and_other_origins_name_the_layer_and_node(tiny):
    g = tiny.copy()
    g.graph["attention"] = {p: {**r, "sites": [{**s, "origins": dict(s["origins"])} for s in r["sites"]]}
                            for p, r in tiny.graph["attention"].items()}
    g.graph["attention"]["decoder.layers.1.self_attn"]["sites"][0]["origins"]["k"] = "decoder.positional"
    g.graph["attention"]["decoder.layers.1.cross_attn"]["sites"][0]["origins"]["v"] = "encoder.layers.0.norm2"
    rows = {r["blocks"][0]: r for r in provenance(g)}
    assert rows["decoder.layers.1.self_attn"]["k"] == (
        "decoder stream, embeddings (stale: decoder.positional)")
    assert rows["decoder.layers.1.cross_attn"]["v"] == (
        "encoder stream, layer 0: encoder.layers.0.norm2")
    zh = {r["blocks"][0]: r for r in provenance(g, lang="zh")}
    assert zh["decoder.layers.1.self_attn"]["k"] == "解码器嵌入层的旧状态（decoder.positional）"
    assert zh["decoder.layers.1.cross_attn"]["v"] == "编码器第 0 层的状态（encoder.layers.0.norm2）"
    assert len(provenance(g)) == 5
    assert "1 of 2 cross-attention blocks" in explain(g)

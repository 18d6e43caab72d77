"""The layer level: each stream's layer drawn once with its count, as in the paper."""

import re

import numpy as np
from jaxtyping import Bool, Float

import qkvflow as qf
from qkvflow import nn
from qkvflow.views.render import render

DIMS = {"batch": None, "seq": None, "d_model": 12, "heads": 2, "d_head": 6, "d_ff": 17, "vocab": 29,
        "max_positions": 23}


@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def attend(x: Float[np.ndarray, "batch seq d_model"], causal: Bool[np.ndarray, "seq seq"]
           ) -> Float[np.ndarray, "batch seq d_model"]:
    """Masked self-attention, heads split and merged by reshape."""
    B, T, _ = x.shape
    q, k, v = (nn.linear(x, "heads*d_head", name=f"{r}_proj").reshape(B, T, 2, 6).transpose(0, 2, 1, 3)
               for r in "qkv")
    s = np.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(6.0), -np.inf)
    o = (nn.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, T, 12)
    return nn.linear(o, "d_model", name="out_proj")


def mixed(kinds: str = "AABAB") -> qf.Model:
    """A decoder-only LM whose layers are of two kinds: A has a feed-forward block, B has not."""
    def run():
        ids = nn.input("ids", ("batch", "seq"))
        causal = nn.causal_mask(ids, name="causal")
        with qf.scope("lm", stream="lm"):
            with qf.scope("", block="embed"):
                x = nn.positional(nn.embed(ids, name="wte"), "learned", name="wpe")
            for i, kind in enumerate(kinds):
                with qf.scope(f"blocks.{i}", layer=i):
                    with qf.scope("", block="attn"):
                        x = nn.residual(x, attend(nn.norm(x, name="ln_1"), causal))
                    if kind == "A":
                        with qf.scope("", block="mlp"):
                            h = nn.linear(nn.norm(x, name="ln_2"), "d_ff", name="fc")
                            x = nn.residual(x, nn.linear(nn.activation(h, "relu"), "d_model", name="proj"))
            logits = nn.unembed(nn.norm(x, name="ln_f"), tied_to="lm.wte.weight")
        return {"logits": logits}
    return qf.Model(f"mixed-{kinds}", DIMS, run, sequences={"seq": "causal"}, streams=("lm",))


def _clusters(dot: str) -> list[str]:
    return re.findall(r'label="(layers? [^"]*)"', dot)


def test_vaswani_base_is_one_encoder_layer_and_one_decoder_layer_times_six():
    g = qf.trace(qf.load_model("vaswani-base"))
    dot = render(g, fmt="dot")  # the default level
    assert _clusters(dot) == ["layer ×6", "layer ×6"]
    ids = re.findall(r' id="([^"]+)"', dot)
    assert [i for i in ids if i.endswith("cross_attn")] == ["decoder.layers.0.cross_attn"]
    assert [i for i in ids if i.endswith("self_attn")] == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn"]
    memory = g.graph["memory"]
    assert memory in ids  # the encoder's final output, drawn on its own
    node = {i: n for n, i in re.findall(r'\t+(n\d+) \[.*? id="([^"]+)"', dot)}
    kv = re.findall(rf'\t{node[memory]} -> {node["decoder.layers.0.cross_attn"]} \[[^\]]*class=(\w)', dot)
    assert sorted(kv) == ["k", "v"]
    # the mask edges: one per mask and block kind, pale; the legend names only drawn roles
    assert len(re.findall(r"class=mask", dot)) == 4  # src_keep to both kinds, tgt_keep and causal to one
    assert "probs" not in dot.split("Legend", 1)[1] and ">ids<" in dot.split("Legend", 1)[1]


def test_layers_of_two_kinds_are_drawn_once_each_saying_which_they_are():
    g = qf.trace(mixed("AABAB"))
    assert qf.check(g) == []
    dot = render(g, level="layer", fmt="dot")
    assert _clusters(dot) == ["layers 0-1, 3 (×3)", "layers 2, 4 (×2)"]
    ids = re.findall(r' id="([^"]+)"', dot)
    assert [i for i in ids if i.endswith(".attn")] == ["lm.blocks.0.attn", "lm.blocks.2.attn"]
    assert [i for i in ids if i.endswith(".mlp")] == ["lm.blocks.0.mlp"]
    assert render(g, level="layer", fmt="mmd").count("subgraph") >= 3  # Mermaid draws it too


def test_the_cli_draws_the_layer_level_by_default(tmp_path):
    from qkvflow.cli import main
    assert main(["render", "t5-tiny", "-o", str(tmp_path / "t5.dot")]) == 0
    assert "(layer level)" in (tmp_path / "t5.dot").read_text()
    assert main(["render", "t5-tiny", "-o", str(tmp_path / "b.dot"), "--level", "block"]) == 0
    assert "(block level)" in (tmp_path / "b.dot").read_text()


def test_op_level_labels_do_not_say_a_word_twice():
    dot = render(qf.trace(qf.load_model("vaswani-base")), level="op", fmt="dot")
    labels = [label.split("\\n") for label in re.findall(r'\[label="([^"]*)"', dot)]
    assert ["softmax", "(batch, heads, src, src)"] in labels  # named after its op: said once
    assert ["q_proj", "linear", "(batch, src, heads*d_head)"] in labels
    assert not [lines for lines in labels if len(lines) > 2 and lines[0].rstrip("_0123456789") == lines[1]]
    assert re.search(r"node \[[^\]]*width=2\.1", dot)  # one width for every box


def test_op_level_draws_a_miswired_layer_apart():
    """A layer whose ops are wired otherwise is its own kind at op level: nothing is hidden."""
    g = qf.trace(mixed("AAAA"))
    g2 = g.copy()
    # layer 2's out_proj reads the values instead of the attention's result (as a broken port would)
    u = next(u for u, _, d in g2.in_edges("lm.blocks.2.self_attn.out_proj", data=True) if d["role"] == "x")
    key = next(k for a, _, k in g2.in_edges("lm.blocks.2.self_attn.out_proj", keys=True) if a == u)
    data = g2.edges[u, "lm.blocks.2.self_attn.out_proj", key]
    g2.remove_edge(u, "lm.blocks.2.self_attn.out_proj", key)
    g2.add_edge("lm.blocks.2.ln_1", "lm.blocks.2.self_attn.out_proj", **data)
    assert re.findall(r'label="attn \((layers? [^"]*)\)"', render(g, level="op", fmt="dot")) == ["layer ×4"]
    assert re.findall(r'label="attn \((layers? [^"]*)\)"', render(g2, level="op", fmt="dot")) == [
        "layers 0-1, 3 (×3)", "layers 2 (×1)"]

"""An encoder-decoder Transformer in plain NumPy, ported to qkvflow:
transformer_numpy.py with the lines the porting guide in the README lists
(marked ``# port``), and a model() factory.

    qkvflow check examples/transformer_qkvflow.py:model
    qkvflow explain examples/transformer_qkvflow.py:model --lang zh
"""

import numpy as np

import qkvflow as qf  # port
from qkvflow import nn  # port

PAD = 0
# Every dim a different size: d_model 12 = heads 3 * d_head 4.
DIMS = {"batch": None, "src": None, "tgt": None, "d_model": 12, "heads": 3, "d_head": 4, "d_ff": 19,
        "vocab": 29, "max_positions": 17}


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x, g, b, eps=1e-5):
    return (x - x.mean(axis=-1, keepdims=True)) / np.sqrt(x.var(axis=-1, keepdims=True) + eps) * g + b


def heads_attention(x_q, x_kv, mask, W):
    outs = []
    for h in range(len(W["q"])):
        q, k, v = x_q @ W["q"][h], x_kv @ W["k"][h], x_kv @ W["v"][h]        # (B, Tq|Tk, d_head)
        s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])                    # (B, Tq, Tk)
        outs.append(softmax(np.where(mask, s, -1e9)) @ v)                    # (B, Tq, d_head)
    return np.concatenate(outs, axis=-1) @ W["o"]                             # (B, Tq, d_model)


encoder_self = qf.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")(heads_attention)  # port
decoder_self = qf.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")(heads_attention)  # port
cross = qf.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")(heads_attention)  # port


def feed_forward(x, W):
    return np.maximum(0, x @ W["w1"] + W["b1"]) @ W["w2"] + W["b2"]


def encoder_layer(x, src_keep, W):
    x = layer_norm(x + encoder_self(x, x, src_keep[:, None, :], W["self"]), **W["ln1"])  # port
    return layer_norm(x + feed_forward(x, W["ffn"]), **W["ln2"])


def decoder_layer(y, memory, src_keep, keep, W):
    y = layer_norm(y + decoder_self(y, y, keep, W["self"]), **W["ln1"])  # port
    y = layer_norm(y + cross(y, memory, src_keep[:, None, :], W["cross"]), **W["ln2"])  # port
    return layer_norm(y + feed_forward(y, W["ffn"]), **W["ln3"])


def transformer(src, tgt, emb, pos, encoder, decoder):
    S, T = src.shape[-1], tgt.shape[-1]
    src_keep = src != PAD                                                     # (B, S)
    keep = np.tril(np.ones((T, T), dtype=bool))[None] & (tgt != PAD)[:, None, :]  # (B, T, T)
    with qf.scope("encoder", stream="encoder"):  # port
        x = emb[src] * np.sqrt(emb.shape[-1]) + pos[:S]
        for i, W in enumerate(encoder):  # port
            with qf.scope(f"layers.{i}", layer=i):  # port
                x = encoder_layer(x, src_keep, W)
        memory = nn.mark_memory(x)  # port
    with qf.scope("decoder", stream="decoder"):  # port
        y = emb[tgt] * np.sqrt(emb.shape[-1]) + pos[:T]
        for i, W in enumerate(decoder):  # port
            with qf.scope(f"layers.{i}", layer=i):  # port
                y = decoder_layer(y, memory, src_keep, keep, W)
        return y @ emb.T                                                      # (B, T, vocab)


# --- port: the weights as parameters, and the model's declarations ----------------------

def weights(layers: int = 2) -> dict:
    """The nested weight dict of transformer_numpy.py, each leaf a qf.param named by its path."""
    P = qf.param

    def attention(prefix):
        return {r: [P(f"{prefix}.{r}.{h}", ("d_model", "d_head"), init="fan_in_first") for h in range(DIMS["heads"])]
                for r in "qkv"} | {"o": P(f"{prefix}.o", ("heads*d_head", "d_model"), init="fan_in_first")}

    def norm(prefix):
        return {"g": P(f"{prefix}.g", ("d_model",), init="ones"), "b": P(f"{prefix}.b", ("d_model",), init="zeros")}

    def ffn(prefix):
        return {"w1": P(f"{prefix}.w1", ("d_model", "d_ff"), init="fan_in_first"), "b1": P(f"{prefix}.b1", ("d_ff",)),
                "w2": P(f"{prefix}.w2", ("d_ff", "d_model"), init="fan_in_first"), "b2": P(f"{prefix}.b2", ("d_model",))}

    encoder = [{"self": attention(f"encoder.{i}.self"), "ffn": ffn(f"encoder.{i}.ffn"),
                "ln1": norm(f"encoder.{i}.ln1"), "ln2": norm(f"encoder.{i}.ln2")} for i in range(layers)]
    decoder = [{"self": attention(f"decoder.{i}.self"), "cross": attention(f"decoder.{i}.cross"),
                "ffn": ffn(f"decoder.{i}.ffn"), "ln1": norm(f"decoder.{i}.ln1"), "ln2": norm(f"decoder.{i}.ln2"),
                "ln3": norm(f"decoder.{i}.ln3")} for i in range(layers)]
    return {"emb": P("emb", ("vocab", "d_model"), init="fan_in"), "pos": P("pos", ("max_positions", "d_model")),
            "encoder": encoder, "decoder": decoder}


def model() -> qf.Model:
    def build():
        src = nn.input("src_ids", ("batch", "src"), pad_id=PAD)
        tgt = nn.input("tgt_ids", ("batch", "tgt"), pad_id=PAD)
        return {"logits": transformer(src, tgt, **weights())}

    return qf.Model("transformer-numpy", DIMS, build, sequences={"src": "bidirectional", "tgt": "causal"},
                    streams=("encoder", "decoder"))


if __name__ == "__main__":
    g = qf.trace(model())
    print(qf.format_diagnostics(qf.check(g)))
    print(qf.explain(g))

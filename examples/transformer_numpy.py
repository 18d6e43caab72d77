"""An encoder-decoder Transformer in plain NumPy, no qkvflow: the model that
transformer_qkvflow.py ports.

Post-norm, learned positions, tied embeddings, attention as a loop over
heads with one (d_model, d_head) weight per head: ``q = x @ W["q"][h]``.
Weights are a nested dict of arrays; token id 0 is padding.
"""

import numpy as np

PAD = 0


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


def feed_forward(x, W):
    return np.maximum(0, x @ W["w1"] + W["b1"]) @ W["w2"] + W["b2"]


def encoder_layer(x, src_keep, W):
    x = layer_norm(x + heads_attention(x, x, src_keep[:, None, :], W["self"]), **W["ln1"])
    return layer_norm(x + feed_forward(x, W["ffn"]), **W["ln2"])


def decoder_layer(y, memory, src_keep, keep, W):
    y = layer_norm(y + heads_attention(y, y, keep, W["self"]), **W["ln1"])
    y = layer_norm(y + heads_attention(y, memory, src_keep[:, None, :], W["cross"]), **W["ln2"])
    return layer_norm(y + feed_forward(y, W["ffn"]), **W["ln3"])


def transformer(src, tgt, emb, pos, encoder, decoder):
    S, T = src.shape[-1], tgt.shape[-1]
    src_keep = src != PAD                                                     # (B, S)
    keep = np.tril(np.ones((T, T), dtype=bool))[None] & (tgt != PAD)[:, None, :]  # (B, T, T)
    x = emb[src] * np.sqrt(emb.shape[-1]) + pos[:S]
    for W in encoder:
        x = encoder_layer(x, src_keep, W)
    memory = x
    y = emb[tgt] * np.sqrt(emb.shape[-1]) + pos[:T]
    for W in decoder:
        y = decoder_layer(y, memory, src_keep, keep, W)
    return y @ emb.T                                                          # (B, T, vocab)

"""A Llama-style decoder in plain NumPy, no qkvflow: the model that llama_qkvflow.py ports.

RMSNorm, a SwiGLU feed-forward, rotary positions and grouped-query attention
(n_kv_head K/V heads, each repeated for n_head // n_kv_head query heads).
Weights are a nested dict of arrays; no biases; an untied output head.
"""

import numpy as np


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rms_norm(x, w, eps=1e-6):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1 + np.exp(-x))


def rope(x, T, theta=10000.0):
    Dh = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, Dh, 2) / Dh))                        # (Dh/2,)
    angles = np.arange(T)[:, None] * inv[None, :]                             # (T, Dh/2)
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)                       # (T, Dh)
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)
    half = Dh // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(x, causal, wq, wk, wv, wo, n_head, n_kv_head):
    B, T, D = x.shape
    Dh = D // n_head
    q = (x @ wq).reshape(B, T, n_head, Dh).transpose(0, 2, 1, 3)              # (B, H, T, Dh)
    k = (x @ wk).reshape(B, T, n_kv_head, Dh).transpose(0, 2, 1, 3)           # (B, KV, T, Dh)
    v = (x @ wv).reshape(B, T, n_kv_head, Dh).transpose(0, 2, 1, 3)
    q, k = rope(q, T), rope(k, T)
    k = np.repeat(k, n_head // n_kv_head, axis=1)                             # (B, H, T, Dh)
    v = np.repeat(v, n_head // n_kv_head, axis=1)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(Dh)                                  # (B, H, T, T)
    o = softmax(np.where(causal, s, -np.inf)) @ v
    return o.transpose(0, 2, 1, 3).reshape(B, T, D) @ wo


def feed_forward(x, w_gate, w_up, w_down):
    return (silu(x @ w_gate) * (x @ w_up)) @ w_down                           # SwiGLU


def layer(x, causal, attn_norm, attn, ffn_norm, ffn, n_head, n_kv_head):
    x = x + attention(rms_norm(x, attn_norm), causal, **attn, n_head=n_head, n_kv_head=n_kv_head)
    return x + feed_forward(rms_norm(x, ffn_norm), **ffn)


def llama(ids, embed, layers, norm, lm_head, n_head, n_kv_head):
    T = ids.shape[-1]
    causal = np.tril(np.ones((T, T), dtype=bool))
    x = embed[ids]
    for W in layers:
        x = layer(x, causal, **W, n_head=n_head, n_kv_head=n_kv_head)
    return rms_norm(x, norm) @ lm_head                                        # (B, T, vocab)

"""GPT-2 in plain NumPy, no qkvflow: the model that gpt2_qkvflow.py ports.

Weights are a nested dict of arrays, as NumPy GPT-2s keep them:
{"wte", "wpe", "blocks": [{"ln_1", "attn": {"c_attn", "c_proj"}, "ln_2",
"mlp": {"c_fc", "c_proj"}}, ...], "ln_f"}, each leaf a {"w", "b"} or {"g", "b"} dict.
"""

import numpy as np


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x, g, b, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * g + b


def linear(x, w, b):
    return x @ w + b                                                          # (.., d_in) @ (d_in, d_out)


def attention(x, causal, c_attn, c_proj, n_head):
    B, T, D = x.shape
    q, k, v = np.split(linear(x, **c_attn), 3, axis=-1)                       # 3 x (B, T, D)
    q, k, v = (t.reshape(B, T, n_head, D // n_head).transpose(0, 2, 1, 3) for t in (q, k, v))
    s = q @ k.swapaxes(-1, -2) / np.sqrt(D // n_head)                         # (B, H, T, T)
    o = softmax(np.where(causal, s, -1e10)) @ v                               # (B, H, T, D/H)
    return linear(o.transpose(0, 2, 1, 3).reshape(B, T, D), **c_proj)


def block(x, causal, ln_1, attn, ln_2, mlp, n_head):
    x = x + attention(layer_norm(x, **ln_1), causal, **attn, n_head=n_head)
    return x + linear(gelu(linear(layer_norm(x, **ln_2), **mlp["c_fc"])), **mlp["c_proj"])


def gpt2(ids, wte, wpe, blocks, ln_f, n_head):
    T = ids.shape[-1]
    causal = np.tril(np.ones((T, T), dtype=bool))
    x = wte[ids] + wpe[:T]                                                    # (B, T, D)
    for blk in blocks:
        x = block(x, causal, **blk, n_head=n_head)
    return layer_norm(x, **ln_f) @ wte.T                                      # tied head: (B, T, vocab)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    D, V, P, F, layers = 12, 29, 17, 19, 2

    def dense(d_in, d_out):
        return {"w": rng.normal(0, 0.02, (d_in, d_out)), "b": np.zeros(d_out)}

    def norm():
        return {"g": np.ones(D), "b": np.zeros(D)}

    weights = {"wte": rng.normal(0, 0.02, (V, D)), "wpe": rng.normal(0, 0.02, (P, D)), "ln_f": norm(),
               "blocks": [{"ln_1": norm(), "attn": {"c_attn": dense(D, 3 * D), "c_proj": dense(D, D)},
                           "ln_2": norm(), "mlp": {"c_fc": dense(D, F), "c_proj": dense(F, D)}}
                          for _ in range(layers)]}
    print(gpt2(np.array([[1, 2, 3]]), **weights, n_head=3).shape)

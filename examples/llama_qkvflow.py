"""A Llama-style decoder in plain NumPy, ported to qkvflow: llama_numpy.py with
the lines the porting guide in the README lists (marked ``# port``), and a
model() factory.

    qkvflow check examples/llama_qkvflow.py:model
    qkvflow run examples/llama_qkvflow.py:model --ids "5 6 7"
"""

import numpy as np

import qkvflow as qf  # port
from qkvflow import nn  # port

# 4 query heads share 2 K/V heads; every dim a different size: d_model 24 = heads 4 * d_head 6.
DIMS = {"batch": None, "seq": None, "d_model": 24, "heads": 4, "kv_heads": 2, "d_head": 6, "d_ff": 19,
        "vocab": 29}


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


@qf.attention("decoder_self", q="llama", k="llama", v="llama", mask="causal")  # port
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
    with qf.scope("llama", stream="llama"):  # port
        x = embed[ids]
        for i, W in enumerate(layers):  # port
            with qf.scope(f"layers.{i}", layer=i):  # port
                x = layer(x, causal, **W, n_head=n_head, n_kv_head=n_kv_head)
        return rms_norm(x, norm) @ lm_head                                    # (B, T, vocab)


# --- port: the weights as parameters, and the model's declarations ----------------------

def weights(n_layers: int = 2) -> dict:
    """The nested weight dict of llama_numpy.py, each leaf a qf.param named by its path."""
    def P(name, dims, init="fan_in_first"):
        return qf.param(name, dims, init=init)

    layers = [{"attn_norm": P(f"layers.{i}.attn_norm", ("d_model",), "ones"),
               "ffn_norm": P(f"layers.{i}.ffn_norm", ("d_model",), "ones"),
               "attn": {"wq": P(f"layers.{i}.attn.wq", ("d_model", "heads*d_head")),
                        "wk": P(f"layers.{i}.attn.wk", ("d_model", "kv_heads*d_head")),
                        "wv": P(f"layers.{i}.attn.wv", ("d_model", "kv_heads*d_head")),
                        "wo": P(f"layers.{i}.attn.wo", ("heads*d_head", "d_model"))},
               "ffn": {"w_gate": P(f"layers.{i}.ffn.w_gate", ("d_model", "d_ff")),
                       "w_up": P(f"layers.{i}.ffn.w_up", ("d_model", "d_ff")),
                       "w_down": P(f"layers.{i}.ffn.w_down", ("d_ff", "d_model"))}} for i in range(n_layers)]
    return {"embed": P("embed", ("vocab", "d_model"), "small"), "layers": layers,
            "norm": P("norm", ("d_model",), "ones"), "lm_head": P("lm_head", ("d_model", "vocab"))}


def model() -> qf.Model:
    def build():
        ids = nn.input("ids", ("batch", "seq"))
        return {"logits": llama(ids, **weights(), n_head=qf.dim("heads"), n_kv_head=qf.dim("kv_heads"))}

    # The attention output is reshaped to D (d_model) before wo (heads*d_head, d_model): one dim.
    return qf.Model("llama-numpy", DIMS, build, sequences={"seq": "causal"}, streams=("llama",),
                    aliases={"d_model": "heads*d_head"})


if __name__ == "__main__":
    g = qf.trace(model())
    print(qf.format_diagnostics(qf.check(g)))
    print(qf.explain(g))

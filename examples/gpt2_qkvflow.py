"""GPT-2 in plain NumPy, ported to qkvflow: gpt2_numpy.py with the lines the
porting guide in the README lists (marked ``# port``), and a model() factory.

    qkvflow check examples/gpt2_qkvflow.py:model
    qkvflow run examples/gpt2_qkvflow.py:model --ids "5 6 7"
"""

import numpy as np

import qkvflow as qf  # port
from qkvflow import nn  # port

# Every dim a different size: d_model 12 = heads 3 * d_head 4.
DIMS = {"batch": None, "seq": None, "d_model": 12, "heads": 3, "d_head": 4, "d_ff": 19, "vocab": 29,
        "max_positions": 17}


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


@qf.attention("decoder_self", q="gpt", k="gpt", v="gpt", mask="causal")  # port
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
    causal = nn.causal_mask(ids)  # port
    with qf.scope("gpt", stream="gpt"):  # port
        x = wte[ids] + wpe[:T]                                                # (B, T, D)
        for i, blk in enumerate(blocks):  # port
            with qf.scope(f"blocks.{i}", layer=i):  # port
                x = block(x, causal, **blk, n_head=n_head)
        return layer_norm(x, **ln_f) @ wte.T                                  # tied head: (B, T, vocab)


# --- port: the weights as parameters, and the model's declarations ----------------------

def weights(layers: int = 2) -> dict:
    """The nested weight dict of gpt2_numpy.py, each leaf a qf.param named by its path."""
    def dense(prefix, d_in, d_out):
        return {"w": qf.param(f"{prefix}.w", (d_in, d_out)), "b": qf.param(f"{prefix}.b", (d_out,), init="zeros")}

    def norm(prefix):
        return {"g": qf.param(f"{prefix}.g", ("d_model",), init="ones"),
                "b": qf.param(f"{prefix}.b", ("d_model",), init="zeros")}

    return {"wte": qf.param("wte", ("vocab", "d_model")), "wpe": qf.param("wpe", ("max_positions", "d_model")),
            "ln_f": norm("ln_f"),
            "blocks": [{"ln_1": norm(f"blocks.{i}.ln_1"), "ln_2": norm(f"blocks.{i}.ln_2"),
                        "attn": {"c_attn": dense(f"blocks.{i}.attn.c_attn", "d_model", "3*d_model"),
                                 "c_proj": dense(f"blocks.{i}.attn.c_proj", "d_model", "d_model")},
                        "mlp": {"c_fc": dense(f"blocks.{i}.mlp.c_fc", "d_model", "d_ff"),
                                "c_proj": dense(f"blocks.{i}.mlp.c_proj", "d_ff", "d_model")}}
                       for i in range(layers)]}


def model() -> qf.Model:
    def build():
        ids = nn.input("ids", ("batch", "seq"))
        return {"logits": gpt2(ids, **weights(), n_head=qf.dim("heads"))}

    return qf.Model("gpt2-numpy", DIMS, build, sequences={"seq": "causal"}, streams=("gpt",))


if __name__ == "__main__":
    g = qf.trace(model())
    print(qf.format_diagnostics(qf.check(g)))
    print(qf.explain(g))

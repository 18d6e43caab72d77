"""A GPT-2-style decoder written as plain NumPy, with its weights as arrays.

The weights come from :func:`qkvflow.param` in nested dicts, as NumPy ports
of GPT-2 keep them; the code uses them as NumPy does: ``x @ w + b``, one
fused Q|K|V weight split with ``np.split``, ``wte[ids]``, a tied head
``x @ wte.T``. :func:`reference` is the same model written without qkvflow,
run on the same dict of arrays.
"""

import numpy as np
from jaxtyping import Bool, Float

import qkvflow as qf
from qkvflow import nn

# Every dim a different size: d_model 12 = heads 3 * d_head 4.
DIMS = {"batch": None, "seq": None, "d_model": 12, "heads": 3, "d_head": 4, "d_ff": 19, "vocab": 29,
        "max_positions": 17}
LAYERS = 2


def weights(layers: int = LAYERS) -> dict:
    """The weights as a nested dict of parameters, named as they load from safetensors."""
    P = qf.param

    def norm(prefix):
        return {"g": P(f"{prefix}.g", ("d_model",), init="ones"), "b": P(f"{prefix}.b", ("d_model",), init="zeros")}

    def dense(prefix, d_in, d_out):
        return {"w": P(f"{prefix}.w", (d_in, d_out), init="fan_in_first"), "b": P(f"{prefix}.b", (d_out,))}

    return {
        "wte": P("wte", ("vocab", "d_model")),
        "blocks": [{
            "ln_1": norm(f"h.{i}.ln_1"), "ln_2": norm(f"h.{i}.ln_2"),
            "attn": {"c_attn": dense(f"h.{i}.attn.c_attn", "d_model", "3*d_model"),
                     "c_proj": dense(f"h.{i}.attn.c_proj", "d_model", "d_model")},
            "mlp": {"c_fc": dense(f"h.{i}.mlp.c_fc", "d_model", "d_ff"),
                    "c_proj": dense(f"h.{i}.mlp.c_proj", "d_ff", "d_model")},
        } for i in range(layers)],
        "ln_f": norm("ln_f"),
    }


def linear(x, w, b):
    return x @ w + b                                                         # (..., d_in) @ (d_in, d_out)


def layer_norm(x, g, b, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _heads(t, B, T):
    return t.reshape(B, T, qf.dim("heads"), qf.dim("d_head")).transpose(0, 2, 1, 3)  # (B, H, T, Dh)


@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def attention(
    x: Float[np.ndarray, "batch seq d_model"],
    causal: Bool[np.ndarray, "seq seq"],
    c_attn: dict,
    c_proj: dict,
) -> Float[np.ndarray, "batch seq d_model"]:
    """Masked self-attention: Q, K, V from one fused projection of the lm stream."""
    B, T, _ = x.shape
    q, k, v = np.split(linear(x, **c_attn), 3, axis=-1)                      # 3 x (B, T, d_model)
    q, k, v = _heads(q, B, T), _heads(k, B, T), _heads(v, B, T)
    s = np.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(qf.dim("d_head")), -1e10)  # (B, H, T, T)
    o = nn.softmax(s, axis=-1) @ v                                           # (B, H, T, Dh)
    return linear(o.transpose(0, 2, 1, 3).reshape(B, T, qf.dim("d_model")), **c_proj)


@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def attention_v_is_q(
    x: Float[np.ndarray, "batch seq d_model"],
    causal: Bool[np.ndarray, "seq seq"],
    c_attn: dict,
    c_proj: dict,
) -> Float[np.ndarray, "batch seq d_model"]:
    """Masked self-attention whose values are the queries' part of the fused projection."""
    B, T, _ = x.shape
    q, k, v = np.split(linear(x, **c_attn), 3, axis=-1)
    q, k, v = _heads(q, B, T), _heads(k, B, T), _heads(q, B, T)            # BUG(v_is_q)
    s = np.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(qf.dim("d_head")), -1e10)
    o = nn.softmax(s, axis=-1) @ v
    return linear(o.transpose(0, 2, 1, 3).reshape(B, T, qf.dim("d_model")), **c_proj)


def gpt(block=attention, layers: int = LAYERS) -> qf.Model:
    def run():
        ids = nn.input("ids", ("batch", "seq"))
        p = weights(layers)
        causal = nn.causal_mask(ids, name="causal")
        with qf.scope("lm", stream="lm"):
            x = nn.positional(p["wte"][ids], "learned", name="wpe")          # (B, T, d_model)
            for i, blk in enumerate(p["blocks"]):
                with qf.scope(f"h.{i}", layer=i):
                    x = nn.residual(x, block(layer_norm(x, **blk["ln_1"]), causal, **blk["attn"]))
                    h = gelu(linear(layer_norm(x, **blk["ln_2"]), **blk["mlp"]["c_fc"]))
                    x = nn.residual(x, linear(h, **blk["mlp"]["c_proj"]))
            logits = layer_norm(x, **p["ln_f"]) @ p["wte"].T                  # tied head
        return {"logits": logits}

    return qf.Model(f"gpt-numpy-{block.__name__}", DIMS, run, sequences={"seq": "causal"}, streams=("lm",))


def reference(params: dict, ids: np.ndarray, layers: int = LAYERS) -> np.ndarray:
    """The same model in NumPy alone, on the arrays ``params`` holds by name."""
    H, Dh = DIMS["heads"], DIMS["d_head"]

    def dense(prefix):
        return {"w": params[f"{prefix}.w"], "b": params[f"{prefix}.b"]}

    def norm(prefix):
        return {"g": params[f"{prefix}.g"], "b": params[f"{prefix}.b"]}

    B, T = ids.shape
    x = params["wte"][ids] + params["lm.wpe.weight"][:T]
    causal = np.tril(np.ones((T, T), dtype=bool))
    for i in range(layers):
        h = layer_norm(x, **norm(f"h.{i}.ln_1"))
        q, k, v = (t.reshape(B, T, H, Dh).transpose(0, 2, 1, 3)
                   for t in np.split(linear(h, **dense(f"h.{i}.attn.c_attn")), 3, axis=-1))
        s = np.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(Dh), -1e10)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p = p / p.sum(axis=-1, keepdims=True)
        x = x + linear((p @ v).transpose(0, 2, 1, 3).reshape(B, T, H * Dh), **dense(f"h.{i}.attn.c_proj"))
        h = gelu(linear(layer_norm(x, **norm(f"h.{i}.ln_2")), **dense(f"h.{i}.mlp.c_fc")))
        x = x + linear(h, **dense(f"h.{i}.mlp.c_proj"))
    return layer_norm(x, **norm("ln_f")) @ params["wte"].T

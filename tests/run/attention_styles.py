"""Decoder-only models whose attention is written in other legal NumPy styles, for the
incremental-decoding tests: einsum letters in another order with an additive -inf triangle,
scores laid out (keys, queries), a mask from comparing np.arange twice, heads merged with the
batch (bmm style), an ALiBi-like distance bias, grouped-query attention with rotary angles from
np.arange, and attention by running sums (np.cumsum); and, for an encoder–decoder, a
cross-attention with heads merged into the batch and a decoder self-attention with einsum
letters of its own and an additive triangle."""

from jaxtyping import Bool, Float

import numpy as np
import qkvflow as qf
from qkvflow import nn

DIMS = {"batch": None, "seq": None, "d_model": 12, "heads": 3, "d_head": 4, "kv_heads": 1, "d_ff": 19,
        "vocab": 29, "max_positions": 17}

def P(name, dims, init="fan_in_first"):
    return qf.param(name, dims, init=init)

def ln(x, name):
    g, b = P(f"{name}.g", ("d_model",), "ones"), P(f"{name}.b", ("d_model",), "zeros")
    m = x.mean(axis=-1, keepdims=True); v = x.var(axis=-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-5) * g + b

def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)

def make(attn, *, pos="learned", post=False, layers=2, name="m", pad_mask=False):
    def build():
        ids = nn.input("ids", ("batch", "seq"))
        T = ids.shape[-1]
        wte = P("wte", ("vocab", "d_model"))
        with qf.scope("lm", stream="lm"):
            x = wte[ids]
            if pos == "learned":
                x = x + P("wpe", ("max_positions", "d_model"))[:T]
            for i in range(layers):
                with qf.scope(f"h.{i}", layer=i):
                    if post:
                        x = ln(x + attn(x, ids, i), f"h.{i}.ln1")
                    else:
                        x = x + attn(ln(x, f"h.{i}.ln1"), ids, i)
                    h = ln(x, f"h.{i}.ln2") @ P(f"h.{i}.fc", ("d_model", "d_ff"))
                    x = x + np.maximum(h, 0) @ P(f"h.{i}.proj", ("d_ff", "d_model"))
            logits = ln(x, "lnf") @ wte.T
        return {"logits": logits}
    return qf.Model(name, DIMS, build, sequences={"seq": "causal"}, streams=("lm",))

def qkv(x, i, kv=None):
    B, T, D = x.shape
    H, Dh = qf.dim("heads"), qf.dim("d_head")
    q = x @ P(f"h.{i}.wq", ("d_model", "heads*d_head"))
    k = x @ P(f"h.{i}.wk", ("d_model", "heads*d_head"))
    v = x @ P(f"h.{i}.wv", ("d_model", "heads*d_head"))
    return q.reshape(B, T, H, Dh), k.reshape(B, T, H, Dh), v.reshape(B, T, H, Dh)

def out(o, i):
    B, T = o.shape[0], o.shape[1]
    return o.reshape(B, T, qf.dim("heads") * qf.dim("d_head")) @ P(f"h.{i}.wo", ("heads*d_head", "d_model"))

# 1. einsum with other letters, triu -inf additive mask
@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def a_triu(x, ids, i):
    T = x.shape[1]
    q, k, v = qkv(x, i)
    s = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(qf.dim("d_head"))
    s = s + np.triu(np.full((T, T), -np.inf), 1)
    return out(np.einsum("bhst,bthd->bshd", softmax(s), v), i)

# 2. scores laid out (keys, queries), softmax over axis -2
@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def a_kq(x, ids, i):
    T = x.shape[1]
    q, k, v = qkv(x, i)
    s = np.einsum("bkhd,bqhd->bhkq", k, q) / np.sqrt(qf.dim("d_head"))
    causal = np.tril(np.ones((T, T), dtype=bool))  # (q, k)
    s = np.where(causal.T, s, -np.inf)
    p = softmax(s, axis=-2)
    return out(np.einsum("bhkq,bkhd->bqhd", p, v), i)

# 3. causal mask from arange comparison
@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def a_arange(x, ids, i):
    T = x.shape[1]
    q, k, v = qkv(x, i)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(qf.dim("d_head"))
    causal = np.arange(T)[:, None] >= np.arange(T)[None, :]
    s = np.where(causal, s, -np.inf)
    return out(np.einsum("bhqk,bkhd->bqhd", softmax(s), v), i)

# 4. batch*heads merged (bmm style)
@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def a_bmm(x, ids, i):
    B, T, D = x.shape
    H, Dh = qf.dim("heads"), qf.dim("d_head")
    q, k, v = (t.transpose(0, 2, 1, 3).reshape(B * H, T, Dh) for t in qkv(x, i))
    s = q @ k.transpose(0, 2, 1) / np.sqrt(Dh)
    causal = np.tril(np.ones((T, T), dtype=bool))
    o = softmax(np.where(causal, s, -np.inf)) @ v
    return out(o.reshape(B, H, T, Dh).transpose(0, 2, 1, 3), i)

# 5. ALiBi-like bias from arange differences + padding mask ids != 0
@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def a_alibi(x, ids, i):
    T = x.shape[1]
    q, k, v = qkv(x, i)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(qf.dim("d_head"))
    causal = np.tril(np.ones((T, T), dtype=bool))
    s = np.where(causal, s, -np.inf) - 0.5 * np.abs(np.arange(T)[:, None] - np.arange(T)[None, :])
    s = np.where((ids != 0)[:, None, None, :], s, -1e9)
    return out(np.einsum("bhqk,bkhd->bqhd", softmax(s), v), i)

# 6. GQA via np.repeat with kv_heads + rotary via arange/sin/cos
def rope(x, T, theta=10000.0):
    Dh = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, Dh, 2) / Dh))
    ang = np.arange(T)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1); sin = np.concatenate([np.sin(ang)] * 2, axis=-1)
    half = Dh // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin

@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def a_gqa(x, ids, i):
    B, T, D = x.shape
    H, KV, Dh = qf.dim("heads"), qf.dim("kv_heads"), qf.dim("d_head")
    q = (x @ P(f"h.{i}.wq", ("d_model", "heads*d_head"))).reshape(B, T, H, Dh).transpose(0, 2, 1, 3)
    k = (x @ P(f"h.{i}.wk", ("d_model", "kv_heads*d_head"))).reshape(B, T, KV, Dh).transpose(0, 2, 1, 3)
    v = (x @ P(f"h.{i}.wv", ("d_model", "kv_heads*d_head"))).reshape(B, T, KV, Dh).transpose(0, 2, 1, 3)
    q, k = rope(q, T), rope(k, T)
    k = np.repeat(k, H // KV, axis=1); v = np.repeat(v, H // KV, axis=1)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(Dh)
    causal = np.tril(np.ones((T, T), dtype=bool))
    o = softmax(np.where(causal, s, -np.inf)) @ v
    return out(o.transpose(0, 2, 1, 3), i)

# 7. cumsum trick: causal mean of values ("linear attention" style), no softmax
@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def a_cumsum(x, ids, i):
    q, k, v = qkv(x, i)
    kv = np.cumsum(np.einsum("bthd,bthe->bthde", np.exp(k * 0.1), v), axis=1)
    z = np.cumsum(np.exp(k * 0.1), axis=1)
    num = np.einsum("bthd,bthde->bthe", np.exp(q * 0.1), kv)
    den = np.einsum("bthd,bthd->bth", np.exp(q * 0.1), z)
    return out(num / den[..., None], i)


# --- encoder–decoder blocks -----------------------------------------------------------

def heads_bmm(t, B, L):
    H, Dh = qf.dim("heads"), qf.dim("d_head")
    return t.reshape(B, L, H, Dh).transpose(0, 2, 1, 3).reshape(B * H, L, Dh)

@qf.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_bmm(y: Float[np.ndarray, "batch tgt d_model"], memory: Float[np.ndarray, "batch src d_model"],
              src_keep: Bool[np.ndarray, "batch src"]) -> Float[np.ndarray, "batch tgt d_model"]:
    B, T, _ = y.shape; S = memory.shape[1]
    H, Dh = qf.dim("heads"), qf.dim("d_head")
    q = heads_bmm(nn.linear(y, "heads*d_head", name="q_proj"), B, T)
    k = heads_bmm(nn.linear(memory, "heads*d_head", name="k_proj"), B, S)
    v = heads_bmm(nn.linear(memory, "heads*d_head", name="v_proj"), B, S)
    s = (q @ k.transpose(0, 2, 1)).reshape(B, H, T, S) / np.sqrt(Dh)
    p = nn.softmax(np.where(src_keep[:, None, None, :], s, -np.inf), axis=-1).reshape(B * H, T, S)
    o = (p @ v).reshape(B, H, T, Dh).transpose(0, 2, 1, 3).reshape(B, T, H * Dh)
    return nn.linear(o, "d_model", name="out_proj")

@qf.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")
def self_triu(y: Float[np.ndarray, "batch tgt d_model"], causal: Bool[np.ndarray, "tgt tgt"],
              tgt_keep: Bool[np.ndarray, "batch tgt"]) -> Float[np.ndarray, "batch tgt d_model"]:
    B, T, _ = y.shape
    H, Dh = qf.dim("heads"), qf.dim("d_head")
    q, k, v = (nn.linear(y, "heads*d_head", name=f"{r}_proj").reshape(B, T, H, Dh) for r in "qkv")
    s = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(Dh) + np.triu(np.full((T, T), -np.inf), 1)
    s = np.where(tgt_keep[:, None, None, :], s, -1e9)
    o = np.einsum("bnts,bsnd->btnd", nn.softmax(s, axis=-1), v).reshape(B, T, H * Dh)
    return nn.linear(o, "d_model", name="out_proj")

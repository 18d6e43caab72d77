"""Correct attention written in different NumPy styles checks clean and runs alike.

No false positives: flattened token projections, einsum with keys first, a
per-head loop joined with np.concatenate, a softmax written out with exp and
sum, pre-norm and learned positions.
Each model is traced, checked (0 findings), and its graph run compared with
the eager run of the same code.
"""

import math

import numpy as np
import pytest
from jaxtyping import Bool, Float

import qkvflow as qf
from qkvflow import nn
from qkvflow.models.config import from_dict
from qkvflow.models.encoder_decoder import build

TINY = qf.preset("tiny")


@qf.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def flattened_keys_first(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Q from the decoder stream; K, V from the memory; source padding masked."""
    B, T, D = y.shape
    S = memory.shape[1]
    H, Dh = qf.dim("heads"), qf.dim("d_head")
    q = nn.linear(y.reshape(B * T, D), "heads*d_head", name="q_proj")            # (batch*tgt, heads*d_head)
    q = q.reshape(B, T, H, Dh).transpose(0, 2, 1, 3)                            # (batch, heads, tgt, d_head)
    k = nn.linear(memory.reshape(-1, D), "heads*d_head", name="k_proj")
    k = k.reshape(B, S, H, Dh).transpose(0, 2, 1, 3)                            # (batch, heads, src, d_head)
    v = nn.linear(memory.reshape(-1, D), "heads*d_head", name="v_proj")
    v = v.reshape(B, S, H, Dh).transpose(0, 2, 1, 3)
    s = np.einsum("bhsd,bhtd->bhts", k, q) / math.sqrt(Dh)                      # (batch, heads, tgt, src)
    p = nn.softmax(np.where(src_keep[:, None, None, :], s, -np.inf), axis=-1)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(B * T, H * Dh)                     # (batch*tgt, heads*d_head)
    return nn.linear(o, "d_model", name="out_proj").reshape(B, T, D)


@qf.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def per_head_loop(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Q, K, V from the encoder stream, one projection per head; source padding masked."""
    outputs = []
    for h in range(qf.dim("heads")):
        q = nn.linear(x, "d_head", name=f"head{h}.q_proj")                      # (batch, src, d_head)
        k = nn.linear(x, "d_head", name=f"head{h}.k_proj")
        v = nn.linear(x, "d_head", name=f"head{h}.v_proj")
        s = q @ k.swapaxes(-1, -2) / np.sqrt(qf.dim("d_head"))                  # (batch, src, src)
        p = nn.softmax(np.where(src_keep[:, None, :], s, -np.inf), axis=-1)
        outputs.append(p @ v)                                                   # (batch, src, d_head)
    o = np.concatenate(outputs, axis=-1)                                        # (batch, src, heads*d_head)
    return nn.linear(o, "d_model", name="out_proj")


def _split(t, B, L):
    return t.reshape(B, L, qf.dim("heads"), -1).transpose(0, 2, 1, 3)  # (batch, heads, L, d_head)


@qf.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def masked_values_and_minus_one(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Q from the decoder stream; K, V from the memory (padded rows zeroed); padding masked."""
    B, T, _ = y.shape
    S = memory.shape[1]
    memory = src_keep[:, :, None] * memory                                     # zero padded rows
    q = _split(nn.linear(y, "d_model", name="q_proj"), B, T)                   # -1 is d_head
    k = _split(nn.linear(memory, "d_model", name="k_proj"), B, S)
    v = np.where(src_keep[:, None, :, None], _split(nn.linear(memory, "d_model", name="v_proj"), B, S), 0.0)
    s = np.matmul(q, np.swapaxes(k, -1, -2)) / math.sqrt(qf.dim("d_head"))    # (batch, heads, tgt, src)
    p = nn.softmax(np.where(src_keep[:, None, None, :] == 0, -1e9, s), axis=-1)  # masked_fill style
    return nn.linear((p @ v).transpose(0, 2, 1, 3).reshape(B, T, -1), "d_model", name="out_proj")


@qf.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def hand_written_softmax(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Q, K, V from the encoder stream; source padding masked; the softmax written out."""
    B, S, _ = x.shape
    q, k, v = (_split(nn.linear(x, "heads*d_head", name=f"{r}_proj"), B, S) for r in "qkv")
    s = np.where(src_keep[:, None, None, :], q @ k.swapaxes(-1, -2) / math.sqrt(qf.dim("d_head")), -1e9)
    e = np.exp(s - s.max(axis=-1, keepdims=True))                               # (batch, heads, src, src)
    p = e / e.sum(axis=-1, keepdims=True)
    return nn.linear((p @ v).transpose(0, 2, 1, 3).reshape(B, S, -1), "d_model", name="out_proj")


def scaled(prescale: bool, declared="sqrt"):
    """Cross-attention whose queries are scaled before the product (prescale) or never."""

    @qf.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding", scale=declared)
    def cross(
        y: Float[np.ndarray, "batch tgt d_model"],
        memory: Float[np.ndarray, "batch src d_model"],
        src_keep: Bool[np.ndarray, "batch src"],
    ) -> Float[np.ndarray, "batch tgt d_model"]:
        """Q from the decoder stream; K, V from the memory; source padding masked."""
        B, T, _ = y.shape
        S = memory.shape[1]
        q = _split(nn.linear(y, "heads*d_head", name="q_proj"), B, T)
        if prescale:
            q = q * qf.dim("d_head") ** -0.5                                    # scaled before the product
        k = _split(nn.linear(memory, "heads*d_head", name="k_proj"), B, S)
        v = _split(nn.linear(memory, "heads*d_head", name="v_proj"), B, S)
        s = np.einsum("bhtd,bhsd->bhts", q, k)                                  # (batch, heads, tgt, src)
        p = nn.softmax(np.where(src_keep[:, None, None, :], s, -np.inf), axis=-1)
        return nn.linear((p @ v).transpose(0, 2, 1, 3).reshape(B, T, -1), "d_model", name="out_proj")

    return cross


def test_scores_scaled_otherwise_are_qkv207_unless_declared():
    found = qf.check(qf.trace(build(TINY, cross=scaled(prescale=False))))
    assert {d.code for d in found} == {"QKV207"}
    assert found[0].message == ("decoder.layers.0.cross_attn: the scores are scaled by 1 (unscaled); expected "
                                "1/sqrt(d_head) = 0.377964; declare scale=... on the block if this is meant")
    found = qf.check(qf.trace(build(TINY, cross=scaled(prescale=True, declared=0.5))))
    assert "scaled by 0.377964; expected the declared 0.5" in found[0].message


MODELS = {
    "prescaled_queries": lambda: build(TINY, cross=scaled(prescale=True)),
    "unscaled_declared_t5_style": lambda: build(TINY, cross=scaled(prescale=False, declared="none")),
    "flattened_keys_first": lambda: build(TINY, cross=flattened_keys_first),
    "per_head_loop": lambda: build(TINY, encoder_self=per_head_loop),
    "hand_written_softmax": lambda: build(TINY, encoder_self=hand_written_softmax),
    "masked_values_and_minus_one": lambda: build(TINY, cross=masked_values_and_minus_one),
    "pre_norm_learned_gelu": lambda: build(from_dict(
        {"preset": "tiny", "name": "pre", "norm": "pre", "positions": "learned", "activation": "gelu"})),
    "half_positions_silu": lambda: build(from_dict(
        {"preset": "tiny", "name": "marian-like", "positions": "sinusoidal_half", "activation": "silu"})),
    "gelu_tanh": lambda: build(from_dict({"preset": "tiny", "name": "gpt-like", "activation": "gelu_tanh"})),
    "untied_final_norms": lambda: build(from_dict(
        {"preset": "tiny", "name": "untied", "shared_embeddings": False, "tied_embeddings": False, "final_norms": True})),
}


@pytest.mark.parametrize("name", MODELS)
def test_correct_styles_check_clean_and_run_alike(name):
    model = MODELS[name]()
    g = qf.trace(model)
    assert qf.check(g, strict=True) == []
    rng = np.random.default_rng(0)
    src = rng.integers(3, TINY.vocab, (2, 11))
    src[0, -4:] = TINY.pad_id
    tgt = rng.integers(3, TINY.vocab, (2, 5))
    params = qf.init_params(g, seed=4)
    graph_logits = qf.forward(g, params, src, tgt)["logits"]
    eager_logits = qf.eager(model, params, {"src_ids": src, "tgt_ids": tgt})["logits"]
    assert graph_logits.shape == (2, 5, TINY.vocab)
    assert np.abs(graph_logits - eager_logits).max() <= 1e-12

"""Masks count only when applied the right way round (polarity), in every style.

Correct styles (where/keep, where/drop, additive bias) check clean and the
graph executor agrees with the eager run; the same masks applied the wrong
way round are found, and each finding is confirmed by perturbing inputs.
"""

import math

import numpy as np
import pytest
from jaxtyping import Bool, Float

import qkvflow as qf
from qkvflow import nn
from qkvflow.models.encoder_decoder import build

TINY = qf.preset("tiny")
SRC, TGT = 11, 5  # every axis a different size: batch 2, heads 3, d_head 7, d_model 21


def heads(t, B, L):
    H, Dh = qf.dim("heads"), qf.dim("d_head")
    return t.reshape(B, L, H, Dh).transpose(0, 2, 1, 3)  # (batch, heads, L, d_head)


def attention_with(masking):
    """A cross-attention whose scores are masked by ``masking(scores, keep)``."""

    @qf.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
    def cross(
        y: Float[np.ndarray, "batch tgt d_model"],
        memory: Float[np.ndarray, "batch src d_model"],
        src_keep: Bool[np.ndarray, "batch src"],
    ) -> Float[np.ndarray, "batch tgt d_model"]:
        """Q from the decoder stream; K, V from the memory; source padding masked."""
        B, T, _ = y.shape
        S = memory.shape[1]
        q = heads(nn.linear(y, "heads*d_head", name="q_proj"), B, T)       # (batch, heads, tgt, d_head)
        k = heads(nn.linear(memory, "heads*d_head", name="k_proj"), B, S)  # (batch, heads, src, d_head)
        v = heads(nn.linear(memory, "heads*d_head", name="v_proj"), B, S)
        s = (q @ k.swapaxes(-1, -2)) / math.sqrt(qf.dim("d_head"))        # (batch, heads, tgt, src)
        p = nn.softmax(masking(s, src_keep[:, None, None, :]), axis=-1)
        o = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)               # (batch, tgt, heads*d_head)
        return nn.linear(o, "d_model", name="out_proj")

    return build(TINY, cross=cross)


CORRECT = {
    "where_keep": lambda s, keep: np.where(keep, s, -np.inf),
    "where_drop": lambda s, keep: np.where(~keep, -np.inf, s),
    "additive_bias": lambda s, keep: s + (1 - keep) * -1e9,
    "nn_mask": lambda s, keep: nn.mask(s, keep),
    "masked_fill_eq0": lambda s, keep: np.where(keep == 0, -1e9, s),
    "minus_large": lambda s, keep: s - 1e9 * (1 - keep),
    "keep_minus_one": lambda s, keep: s + (keep - 1) * 1e9,
    "float_mask": lambda s, keep: s + (1.0 - keep * 1.0) * -1e9,
    "bias_from_where": lambda s, keep: s + np.where(keep, 0.0, -np.inf),
    "two_biases": lambda s, keep: s + np.where(keep, 0.0, -1e9) + (1 - keep) * -1e9,
}
WRONG_WAY = {
    "inverted_where": lambda s, keep: np.where(keep, -np.inf, s),
    "inverted_drop": lambda s, keep: np.where(~keep, s, -np.inf),
    "multiplied": lambda s, keep: s * keep,
    "wrong_sign_bias": lambda s, keep: s + keep * -1e9,
    "fill_where_kept": lambda s, keep: np.where(keep == 0, s, -1e9),
    "positive_bias": lambda s, keep: s + (1 - keep) * 1e9,
}


def feeds():
    rng = np.random.default_rng(0)
    src = rng.integers(3, TINY.vocab, (2, SRC))
    src[1, -3:] = TINY.pad_id
    tgt = rng.integers(3, TINY.vocab, (2, TGT))
    tgt[:, 0] = TINY.bos_id
    return src, tgt


def padding_leak(g) -> float:
    """How much real logits move when only the padding token's embedding changes."""
    src, tgt = feeds()
    params = qf.init_params(g, seed=3)
    base = qf.forward(g, params, src, tgt)["logits"]
    table = params["encoder.embed.weight"].copy()
    table[TINY.pad_id] += 1.0
    moved = qf.forward(g, {**params, "encoder.embed.weight": table}, src, tgt)["logits"]
    real = np.arange(TINY.vocab) != TINY.pad_id  # the tied unembedding's pad column moves too
    return float(np.abs(moved[..., real] - base[..., real]).max())


@pytest.mark.parametrize("style", CORRECT)
def test_correct_mask_styles_check_clean_and_run_alike(style):
    model = attention_with(CORRECT[style])
    g = qf.trace(model)
    assert qf.check(g) == []
    src, tgt = feeds()
    params = qf.init_params(g, seed=1)
    graph_logits = qf.forward(g, params, src, tgt)["logits"]
    eager_logits = qf.eager(model, params, {"src_ids": src, "tgt_ids": tgt})["logits"]
    assert np.all(np.isfinite(graph_logits))
    assert np.abs(graph_logits - eager_logits).max() <= 1e-12
    assert padding_leak(g) < 1e-9


@pytest.mark.parametrize("style", WRONG_WAY)
def test_masks_applied_the_wrong_way_round_are_found_and_really_leak(style):
    g = qf.trace(attention_with(WRONG_WAY[style]))
    codes = {d.code for d in qf.check(g)}
    assert {"QKV306", "QKV402"} <= codes, codes
    assert padding_leak(g) > 1e-6


@qf.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")
def anticausal(
    y: Float[np.ndarray, "batch tgt d_model"],
    causal: Bool[np.ndarray, "tgt tgt"],
    tgt_keep: Bool[np.ndarray, "batch tgt"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Q, K, V from the decoder stream; keeps exactly the future (the mask inverted)."""
    from qkvflow.models.encoder_decoder import multi_head_attention
    keep = ~causal[None, None, :, :] & tgt_keep[:, None, None, :]  # (batch, 1, tgt, tgt)
    return multi_head_attention(y, y, keep)


def test_an_inverted_causal_mask_lets_the_decoder_see_the_future():
    g = qf.trace(build(TINY, decoder_self=anticausal))
    codes = {d.code for d in qf.check(g)}
    assert {"QKV306", "QKV401"} <= codes, codes
    src, tgt = feeds()
    params = qf.init_params(g, seed=2)
    base = qf.forward(g, params, src, tgt)["logits"]
    later = tgt.copy()
    later[:, 3] = 3 + (tgt[:, 3] - 2) % (TINY.vocab - 3)
    moved = qf.forward(g, params, src, later)["logits"]
    assert np.abs(moved[:, :3] - base[:, :3]).max() > 1e-6


def ids_model(keep_from_ids):
    """A one-layer encoder whose padding mask is computed from the ids by user code."""
    cfg = TINY

    @qf.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
    def self_attention(
        x: Float[np.ndarray, "batch src d_model"],
        keep: Bool[np.ndarray, "batch 1 1 src"],
    ) -> Float[np.ndarray, "batch src d_model"]:
        """Q, K, V from the encoder stream; source padding masked."""
        from qkvflow.models.encoder_decoder import multi_head_attention
        return multi_head_attention(x, x, keep)

    def run():
        src = nn.input("src_ids", ("batch", "src"))
        with qf.scope("encoder", stream="encoder"):
            x = nn.positional(nn.embed(src, name="embed"), name="positional")
            with qf.scope("layers.0", layer=0):
                x = nn.residual(x, self_attention(x, keep_from_ids(src)[:, None, None, :]))
        return {"logits": nn.unembed(x, name="unembed")}

    return qf.Model("ids-mask", cfg.dims(), run, config=cfg.as_dict())


@pytest.mark.parametrize("keep, clean", [
    (lambda ids: ids != TINY.pad_id, True),
    (lambda ids: ids > 0, True),            # pad_id is 0: every real id is positive
    (lambda ids: ids != TINY.eos_id, False),  # masks end-of-sentence, not padding
    (lambda ids: ids != 1, False),           # a pad id from another tokenizer
])
def test_padding_masks_computed_from_ids_must_use_the_pad_id(keep, clean):
    g = qf.trace(ids_model(keep))
    codes = {d.code for d in qf.check(g)}
    assert (codes == set()) == clean, codes
    if not clean:
        assert {"QKV306", "QKV402"} <= codes

"""Mask mistakes and what they let through (QKV205, QKV4xx).

None of them changes a size: a mask broadcast along the wrong axis, a
missing or transposed mask and a mean over positions all run on any input.
"""

import numpy as np
from jaxtyping import Bool, Float

import qkvflow
from qkvflow import nn

from .registry import bug, merge, project, scaled_scores, tiny


def _self_qkv(x):
    return project(x, "q_proj"), project(x, "k_proj"), project(x, "v_proj")


# --- encoder self-attention -------------------------------------------------------------

@qkvflow.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def pad_axis_block(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention. Q, K, V: encoder stream; mask: source padding."""
    q, k, v = _self_qkv(x)
    s = np.where(src_keep[:, None, :, None], scaled_scores(q, k), -np.inf)  # BUG(padding_mask_wrong_axis)
    return merge(nn.softmax(s, axis=-1) @ v)


@bug("QKV205", "encoder.layers.0.self_attn.where", size_silent=True)
def padding_mask_wrong_axis(cfg):
    """Padding mask broadcast as keep[:, None, :, None]: masks queries, not keys."""
    return tiny(cfg, encoder_self=pad_axis_block)


@qkvflow.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def unpadded_block(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention. Q, K, V: encoder stream; mask: source padding."""
    q, k, v = _self_qkv(x)
    p = nn.softmax(scaled_scores(q, k), axis=-1)  # BUG(encoder_self_without_padding_mask)
    return merge(p @ v)


@bug("QKV402", "encoder.layers.0.self_attn.softmax", size_silent=True)
def encoder_self_without_padding_mask(cfg):
    """Encoder self-attention that never applies its source padding mask."""
    return tiny(cfg, encoder_self=unpadded_block)


@qkvflow.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def late_mask_block(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention. Q, K, V: encoder stream; mask: source padding."""
    q, k, v = _self_qkv(x)
    p = nn.softmax(scaled_scores(q, k), axis=-1)  # BUG(mask_after_softmax)
    p = np.where(src_keep[:, None, None, :], p, 0.0)  # padded keys zeroed, after normalising
    return merge(p @ v)


@bug("QKV402", "encoder.layers.0.self_attn.softmax", size_silent=True)
def mask_after_softmax(cfg):
    """Padding zeroed after the softmax: the padded keys still took their share."""
    return tiny(cfg, encoder_self=late_mask_block)


@qkvflow.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def causal_encoder_block(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention. Q, K, V: encoder stream; mask: source padding."""
    q, k, v = _self_qkv(x)
    keep = src_keep[:, None, None, :]  # (B, 1, 1, S)
    causal = nn.causal_mask(src_keep)  # (S, S), copied from the decoder block
    p = nn.softmax(np.where(keep & causal, scaled_scores(q, k), -np.inf), axis=-1)  # BUG(encoder_self_causal)
    return merge(p @ v)


@bug("QKV306", "encoder.layers.0.self_attn.softmax", size_silent=True)
def encoder_self_causal(cfg):
    """A causal mask copied into encoder self-attention, which declares padding only."""
    return tiny(cfg, encoder_self=causal_encoder_block)


@qkvflow.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="causal+src_padding")
def declared_causal_encoder_block(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention. Q, K, V: encoder stream; mask: causal + source padding."""
    q, k, v = _self_qkv(x)
    keep = src_keep[:, None, None, :] & nn.causal_mask(src_keep)  # (B, 1, S, S)
    p = nn.softmax(np.where(keep, scaled_scores(q, k), -np.inf), axis=-1)  # BUG(encoder_self_declared_causal)
    return merge(p @ v)


@bug("QKV403", "encoder.layers.0.self_attn.softmax", size_silent=True)
def encoder_self_declared_causal(cfg):
    """A deliberately causal encoder: declared, so only a warning (some models want it)."""
    return tiny(cfg, encoder_self=declared_causal_encoder_block)


# --- decoder self-attention -------------------------------------------------------------

@qkvflow.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")
def uncausal_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    causal: Bool[np.ndarray, "tgt tgt"],
    tgt_keep: Bool[np.ndarray, "batch tgt"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Decoder self-attention. Q, K, V: decoder stream; mask: causal + target padding."""
    q, k, v = _self_qkv(y)
    keep = tgt_keep[:, None, None, :]  # (B, 1, 1, T): padding only
    p = nn.softmax(np.where(keep, scaled_scores(q, k), -np.inf), axis=-1)  # BUG(decoder_self_without_causal)
    return merge(p @ v)


@bug("QKV401", "decoder.layers.0.self_attn.softmax", size_silent=True)
def decoder_self_without_causal(cfg):
    """Decoder self-attention with target padding but no causal mask."""
    return tiny(cfg, decoder_self=uncausal_block)


@qkvflow.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")
def transposed_causal_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    causal: Bool[np.ndarray, "tgt tgt"],
    tgt_keep: Bool[np.ndarray, "batch tgt"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Decoder self-attention. Q, K, V: decoder stream; mask: causal + target padding."""
    q, k, v = _self_qkv(y)
    s = np.where(tgt_keep[:, None, None, :], scaled_scores(q, k), -np.inf)
    s = np.where(causal.T, s, -np.inf)  # BUG(causal_mask_transposed)
    return merge(nn.softmax(s, axis=-1) @ v)


@bug("QKV205", "decoder.layers.0.self_attn.where", size_silent=True)
def causal_mask_transposed(cfg):
    """Causal mask applied transposed: position t sees t and the future."""
    return tiny(cfg, decoder_self=transposed_causal_block)


# --- cross-attention ---------------------------------------------------------------------

@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def unpadded_cross_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    q, k, v = project(y, "q_proj"), project(memory, "k_proj"), project(memory, "v_proj")
    p = nn.softmax(scaled_scores(q, k), axis=-1)  # BUG(cross_without_padding_mask)
    return merge(p @ v)


@bug("QKV402", "decoder.layers.0.cross_attn.softmax", size_silent=True)
def cross_without_padding_mask(cfg):
    """Cross-attention that attends to padded source positions."""
    return tiny(cfg, cross=unpadded_cross_block)


# --- feed-forward ------------------------------------------------------------------------

def context_ffn(x, activation: str):
    """Feed-forward plus the sequence mean as "global context"."""
    h = x + x.mean(axis=1, keepdims=True)  # BUG(ffn_mean_over_positions)
    h = nn.activation(nn.linear(h, "d_ff", name="linear1"), activation)
    return nn.linear(h, "d_model", name="linear2")


@bug("QKV401", "decoder.layers.0.elementwise", size_silent=True)  # where the mean meets positions
def ffn_mean_over_positions(cfg):
    """A feed-forward that adds the mean over positions: the future in the decoder."""
    return tiny(cfg, ffn=context_ffn)

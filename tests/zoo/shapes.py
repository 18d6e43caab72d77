"""Shape mistakes: head split/merge, products, softmax axis, block signatures.

Most are invisible to size checks whenever the sizes they mix up happen to
be equal (``coincide``); several never change a size at all.
"""

import dataclasses

import numpy as np
from jaxtyping import Bool, Float

import qkvflow
from qkvflow import nn

from .registry import bug, merge, project, scaled_scores, tiny


def _qkv(x_q, x_kv):
    return project(x_q, "q_proj"), project(x_kv, "k_proj"), project(x_kv, "v_proj")


# --- head split and merge ------------------------------------------------------------

def split_without_transpose(t):
    """(B, T, H*Dh) -> (B, H, T, Dh), or so it seems."""
    B, T, _ = t.shape
    H, Dh = qkvflow.dim("heads"), qkvflow.dim("d_head")
    return t.reshape(B, H, T, Dh)  # BUG(split_heads_without_transpose)


@qkvflow.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")
def split_no_transpose_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    causal: Bool[np.ndarray, "tgt tgt"],
    tgt_keep: Bool[np.ndarray, "batch tgt"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Decoder self-attention. Q, K, V: decoder stream; mask: causal + target padding."""
    q = split_without_transpose(nn.linear(y, "heads*d_head", name="q_proj"))
    k = split_without_transpose(nn.linear(y, "heads*d_head", name="k_proj"))
    v = split_without_transpose(nn.linear(y, "heads*d_head", name="v_proj"))
    s = np.where(causal & tgt_keep[:, None, None, :], scaled_scores(q, k), -np.inf)
    return merge(nn.softmax(s, axis=-1) @ v)


@bug("QKV203", "decoder.layers.0.self_attn.reshape", size_silent=True)
def split_heads_without_transpose(cfg):
    """Heads split by reshape(B, H, T, Dh): rows of different positions get mixed."""
    return tiny(cfg, decoder_self=split_no_transpose_block)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def merge_no_transpose_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    B, T, _ = y.shape
    q, k, v = _qkv(y, memory)
    s = np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf)
    o = nn.softmax(s, axis=-1) @ v  # (B, H, T, Dh)
    o = o.reshape(B, T, -1)  # BUG(merge_heads_without_transpose)
    return nn.linear(o, "d_model", name="out_proj")


@bug("QKV203", "decoder.layers.0.cross_attn.reshape", size_silent=True)
def merge_heads_without_transpose(cfg):
    """Heads merged by reshape(B, T, -1) straight from (B, H, T, Dh)."""
    return tiny(cfg, cross=merge_no_transpose_block)


# --- products ----------------------------------------------------------------------------

@qkvflow.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")
def untransposed_k_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    causal: Bool[np.ndarray, "tgt tgt"],
    tgt_keep: Bool[np.ndarray, "batch tgt"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Decoder self-attention. Q, K, V: decoder stream; mask: causal + target padding."""
    q, k, v = _qkv(y, y)
    s = q @ k / np.sqrt(qkvflow.dim("d_head"))  # BUG(scores_without_transposing_k)
    s = np.where(causal & tgt_keep[:, None, None, :], s, -np.inf)
    return merge(nn.softmax(s, axis=-1) @ v)


@bug("QKV202", "decoder.layers.0.self_attn.matmul", size_silent=True, coincide="tgt==d_head")
def scores_without_transposing_k(cfg):
    """Scores as q @ k: contracts d_head with the key positions."""
    return tiny(cfg, decoder_self=untransposed_k_block)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def einsum_letter_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    q, k, v = _qkv(y, memory)
    s = np.einsum("bhtd,bhds->bhts", q, k) / np.sqrt(qkvflow.dim("d_head"))  # BUG(einsum_scores_wrong_letter)
    s = np.where(src_keep[:, None, None, :], s, -np.inf)
    return merge(nn.softmax(s, axis=-1) @ v)


@bug("QKV202", "decoder.layers.0.cross_attn.einsum", size_silent=True, coincide="src==d_head")
def einsum_scores_wrong_letter(cfg):
    """einsum 'bhtd,bhds' reads k as if already transposed: d_head meets src."""
    return tiny(cfg, cross=einsum_letter_block)


@qkvflow.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def transposed_weights_block(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention. Q, K, V: encoder stream; mask: source padding."""
    q, k, v = _qkv(x, x)
    p = nn.softmax(np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf), axis=-1)
    return merge(p.swapaxes(-1, -2) @ v)  # BUG(attend_transposed_weights)


@bug("QKV202", "encoder.layers.0.self_attn.matmul", size_silent=True)
def attend_transposed_weights(cfg):
    """Weighted sum with the transposed weights: sums over queries, not keys."""
    return tiny(cfg, encoder_self=transposed_weights_block)


# --- softmax -----------------------------------------------------------------------------

@qkvflow.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def query_softmax_block(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention. Q, K, V: encoder stream; mask: source padding."""
    q, k, v = _qkv(x, x)
    s = np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf)
    p = nn.softmax(s, axis=-2)  # BUG(softmax_over_queries)
    return merge(p @ v)


@bug("QKV204", "encoder.layers.0.self_attn.softmax", size_silent=True)
def softmax_over_queries(cfg):
    """Softmax over axis -2: normalises over queries, not keys."""
    return tiny(cfg, encoder_self=query_softmax_block)


@qkvflow.attention(  # BUG(sigmoid_attention): the block has no softmax
    "encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def sigmoid_block(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention with sigmoid weights. Q, K, V: encoder stream; mask: source padding."""
    q, k, v = _qkv(x, x)
    w = 1.0 / (1.0 + np.exp(-scaled_scores(q, k))) * src_keep[:, None, None, :]  # (B, H, S, S)
    return merge(w @ v)


@bug("QKV305", "encoder.layers.0.self_attn", size_silent=True)
def sigmoid_attention(cfg):
    """Attention weights from a sigmoid, not a softmax: no scores-softmax-sum to check."""
    return tiny(cfg, encoder_self=sigmoid_block)


@qkvflow.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="none")
def hand_softmax_over_queries_block(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention with a softmax written by hand (and no padding mask, so that a
    padded key column is no 0/0). Q, K, V: encoder stream."""
    q, k, v = _qkv(x, x)
    s = scaled_scores(q, k)                                                    # (B, H, S, S)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return merge(e / e.sum(axis=-2, keepdims=True) @ v)  # BUG(hand_softmax_over_queries)


@bug("QKV204", "encoder.layers.0.self_attn.reduce_1", size_silent=True)
def hand_softmax_over_queries(cfg):
    """A softmax written by hand whose sum runs over the queries."""
    return tiny(cfg, encoder_self=hand_softmax_over_queries_block)


@qkvflow.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def normalise_over_queries_block(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention. Q, K, V: encoder stream; mask: source padding."""
    q, k, v = _qkv(x, x)
    p = nn.softmax(np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf), axis=-1)
    p = p / (p.sum(axis=-2, keepdims=True) + 1e-9)  # BUG(renormalise_over_queries)
    return merge(p @ v)


@bug("QKV204", "encoder.layers.0.self_attn", size_silent=True)
def renormalise_over_queries(cfg):
    """Weights re-normalised over the query axis: both axes are src, sizes agree."""
    return tiny(cfg, encoder_self=normalise_over_queries_block)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def heads_factor_order_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    B, T, _ = y.shape
    H, Dh = qkvflow.dim("heads"), qkvflow.dim("d_head")
    q = nn.linear(y, "heads*d_head", name="q_proj")
    q = q.reshape(B, T, Dh, H).transpose(0, 3, 1, 2)  # BUG(heads_split_in_the_wrong_factor_order)
    k, v = project(memory, "k_proj"), project(memory, "v_proj")
    p = nn.softmax(np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf), axis=-1)
    return merge(p @ v)


@bug("QKV203", "decoder.layers.0.cross_attn.reshape", size_silent=True)
def heads_split_in_the_wrong_factor_order(cfg):
    """(heads*d_head) split as (d_head, heads): weights of torch or a checkpoint land in the wrong heads."""
    return tiny(cfg, cross=heads_factor_order_block)


# --- block signatures --------------------------------------------------------------------

@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def no_out_proj_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    B, T, _ = y.shape
    q, k, v = _qkv(y, memory)
    o = nn.softmax(np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf), axis=-1) @ v
    return o.transpose(0, 2, 1, 3).reshape(B, T, -1)  # BUG(residual_skips_out_proj)


@bug("QKV201", "decoder.layers.0.cross_attn", size_silent=True, coincide="d_model==heads*d_head")
def residual_skips_out_proj(cfg):
    """No out_proj: heads*d_head is added to the d_model residual stream."""
    return tiny(cfg, cross=no_out_proj_block)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def unmerged_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    q, k, v = _qkv(y, memory)
    p = nn.softmax(np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf), axis=-1)
    return nn.linear(p @ v, "d_model", name="out_proj")  # BUG(out_proj_before_merge)


@bug("QKV201", "decoder.layers.0.cross_attn", size_silent=False)
def out_proj_before_merge(cfg):
    """out_proj applied per head: the heads are never merged (NumPy notices too)."""
    # One decoder layer: a second one could not even unpack (B, T, _) = y.shape.
    return tiny(dataclasses.replace(cfg, decoder_layers=1), cross=unmerged_block)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def misdeclared_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch tgt d_model"],  # BUG(memory_annotated_as_target)
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    q, k, v = _qkv(y, memory)
    s = np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf)
    return merge(nn.softmax(s, axis=-1) @ v)


@bug("QKV201", "decoder.layers.0.cross_attn", size_silent=True, coincide="src==tgt")
def memory_annotated_as_target(cfg):
    """The memory argument annotated with tgt: jaxtyping agrees whenever src == tgt."""
    return tiny(cfg, cross=misdeclared_block)


@qkvflow.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def model_width_scale_block(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention. Q, K, V: encoder stream; mask: source padding."""
    q, k, v = _qkv(x, x)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(qkvflow.dim("d_model"))  # BUG(scale_by_model_width)
    return merge(nn.softmax(np.where(src_keep[:, None, None, :], s, -np.inf), axis=-1) @ v)


@bug("QKV207", "encoder.layers.0.self_attn.matmul", size_silent=False)
def scale_by_model_width(cfg):
    """Scores divided by sqrt(d_model), the model width, instead of sqrt(d_head)."""
    return tiny(cfg, encoder_self=model_width_scale_block)


"""Q, K or V read from the wrong state inside a cross-attention block.

The block receives the right states; its own code picks the wrong one.
With ``src == tgt`` every shape agrees, so nothing size-based notices.
"""

import numpy as np
from jaxtyping import Bool, Float

import qkvflow
from qkvflow import nn

from .registry import bug, heads, merge, scaled_scores, tiny


def _finish(q, k, v, src_keep):
    """Masked softmax over source keys, weighted sum, merge, out_proj."""
    s = np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf)  # (B, H, T, S)
    return merge(nn.softmax(s, axis=-1) @ v)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_kv_decoder_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    q = heads(nn.linear(y, "heads*d_head", name="q_proj"))
    k = heads(nn.linear(y, "heads*d_head", name="k_proj"))  # BUG(cross_kv_from_decoder)
    v = heads(nn.linear(y, "heads*d_head", name="v_proj"))
    return _finish(q, k, v, src_keep)


@bug("QKV301", "decoder.layers.0.cross_attn.k_proj", size_silent=True, coincide="src==tgt")
def cross_kv_from_decoder(cfg):
    """Cross-attention projects K and V from the decoder stream, not the memory."""
    return tiny(cfg, cross=cross_kv_decoder_block)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_q_memory_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    q = heads(nn.linear(memory, "heads*d_head", name="q_proj"))  # BUG(cross_q_from_memory)
    k = heads(nn.linear(memory, "heads*d_head", name="k_proj"))
    v = heads(nn.linear(memory, "heads*d_head", name="v_proj"))
    return _finish(q, k, v, src_keep)


@bug("QKV301", "decoder.layers.0.cross_attn.q_proj", size_silent=True, coincide="src==tgt")
def cross_q_from_memory(cfg):
    """Cross-attention takes its queries from the encoder output as well."""
    return tiny(cfg, cross=cross_q_memory_block)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_v_decoder_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    q = heads(nn.linear(y, "heads*d_head", name="q_proj"))
    k = heads(nn.linear(memory, "heads*d_head", name="k_proj"))
    v = heads(nn.linear(y, "heads*d_head", name="v_proj"))  # BUG(cross_v_from_decoder)
    return _finish(q, k, v, src_keep)


@bug("QKV302", "decoder.layers.0.cross_attn.v_proj", size_silent=True, coincide="src==tgt")
def cross_v_from_decoder(cfg):
    """Cross-attention keys come from the memory but values from the decoder."""
    return tiny(cfg, cross=cross_v_decoder_block)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def v_is_k_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    q = heads(nn.linear(y, "heads*d_head", name="q_proj"))
    k = heads(nn.linear(memory, "heads*d_head", name="k_proj"))  # BUG(v_reuses_k_projection): V reuses it
    v = k
    return _finish(q, k, v, src_keep)


@bug("QKV307", "decoder.layers.0.cross_attn.k_proj", size_silent=True)
def v_reuses_k_projection(cfg):
    """V is the K projection (a copy-paste slip): keys and values are the same vectors."""
    return tiny(cfg, cross=v_is_k_block)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def unused_projection_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    q = heads(nn.linear(y, "heads*d_head", name="q_proj"))
    k = heads(nn.linear(memory, "heads*d_head", name="k_proj"))
    v = heads(nn.linear(memory, "heads*d_head", name="v_proj"))
    heads(nn.linear(memory, "heads*d_head", name="v_proj_2"))  # BUG(value_projection_unused)
    return _finish(q, k, v, src_keep)


@bug("QKV308", "decoder.layers.0.cross_attn.v_proj_2", size_silent=True)
def value_projection_unused(cfg):
    """A second value projection is computed and dropped: its weights train nothing."""
    return tiny(cfg, cross=unused_projection_block)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_head_loop_block(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention written as a loop over heads, one softmax per head.
    Q: decoder stream; K, V: the memory; mask: source padding."""
    outputs = []
    for h in range(qkvflow.dim("heads")):
        q = nn.linear(y, "d_head", name=f"head{h}.q_proj")                     # (batch, tgt, d_head)
        k = nn.linear(y if h == 1 else memory, "d_head", name=f"head{h}.k_proj")  # BUG(cross_head_loop_k_from_decoder)
        v = nn.linear(memory, "d_head", name=f"head{h}.v_proj")
        s = q @ k.swapaxes(-1, -2) / np.sqrt(qkvflow.dim("d_head"))             # (batch, tgt, src)
        p = nn.softmax(np.where(src_keep[:, None, :], s, -np.inf), axis=-1)
        outputs.append(p @ v)                                                   # (batch, tgt, d_head)
    return nn.linear(np.concatenate(outputs, axis=-1), "d_model", name="out_proj")


@bug("QKV301", "decoder.layers.0.cross_attn.head1.k_proj", size_silent=True, coincide="src==tgt")
def cross_head_loop_k_from_decoder(cfg):
    """A per-head loop whose second head projects K from the decoder stream."""
    return tiny(cfg, cross=cross_head_loop_block)

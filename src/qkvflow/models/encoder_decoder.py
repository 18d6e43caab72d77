"""The encoder–decoder Transformer, written with the same API users write.

The three attention blocks below declare their shapes (jaxtyping), their
Q/K/V provenance and their mask; :func:`build` wires them into a model. Any
block can be swapped for a user's own (``build(cfg, cross_attention=mine)``).
"""

import math

import numpy as np
from jaxtyping import Bool, Float

from ..tracing import nn
from .config import Config
from ..tracing.context import Model, dim, scope

__all__ = [
    "encoder_self_attention",
    "decoder_self_attention",
    "cross_attention",
    "multi_head_attention",
    "feed_forward",
    "build",
]


def multi_head_attention(x_q, x_kv, keep):
    """Scaled dot-product attention over ``heads`` heads.

    x_q (batch, q_seq, d_model), x_kv (batch, k_seq, d_model),
    keep broadcastable to (batch, heads, q_seq, k_seq).
    """
    q = nn.split_heads(nn.linear(x_q, "heads*d_head", name="q_proj"))   # (batch, heads, q_seq, d_head)
    k = nn.split_heads(nn.linear(x_kv, "heads*d_head", name="k_proj"))  # (batch, heads, k_seq, d_head)
    v = nn.split_heads(nn.linear(x_kv, "heads*d_head", name="v_proj"))  # (batch, heads, k_seq, d_head)
    d_head = dim("d_head")  # a non-positive size is the checker's QKV103, not a crash here
    s = nn.scores(q, k, scale=1.0)                                      # (batch, heads, q_seq, k_seq)
    s = nn.scale(s, 1.0 / math.sqrt(d_head) if d_head > 0 else 1.0)
    p = nn.softmax(nn.mask(s, keep), axis=-1)                           # over k_seq
    o = nn.merge_heads(nn.attend(p, v))                                 # (batch, q_seq, heads*d_head)
    return nn.linear(o, "d_model", name="out_proj")                     # (batch, q_seq, d_model)


@nn.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def encoder_self_attention(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention: context inside the source.

    Q, K, V all from the encoder stream; keys at source padding are masked.
    """
    return multi_head_attention(x, x, src_keep[:, None, None, :])


@nn.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")
def decoder_self_attention(
    y: Float[np.ndarray, "batch tgt d_model"],
    causal: Bool[np.ndarray, "tgt tgt"],
    tgt_keep: Bool[np.ndarray, "batch tgt"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Masked decoder self-attention: context inside what was generated so far.

    Q, K, V all from the decoder stream; a position sees keys <= itself that
    are not padding.
    """
    keep = causal[None, None, :, :] & tgt_keep[:, None, None, :]  # (batch, 1, tgt, tgt)
    return multi_head_attention(y, y, keep)


@nn.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_attention(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention: the decoder reads the encoder's final output.

    Q from the decoder stream; K and V from the memory; source padding masked.
    """
    return multi_head_attention(y, memory, src_keep[:, None, None, :])


def feed_forward(x, activation: str):
    """linear1 -> activation -> linear2: (.., d_model) -> (.., d_ff) -> (.., d_model)."""
    h = nn.activation(nn.linear(x, "d_ff", name="linear1"), activation)
    return nn.linear(h, "d_model", name="linear2")


def _sublayer(cfg: Config, x, fn, norm_name: str):
    """Residual sub-layer, post-norm: norm(x + f(x)); pre-norm: x + f(norm(x))."""
    if cfg.norm == "pre":
        return nn.residual(x, fn(nn.norm(x, eps=cfg.norm_eps, name=norm_name)))
    return nn.norm(nn.residual(x, fn(x)), eps=cfg.norm_eps, name=norm_name)


def build(cfg: Config, *, encoder_self=encoder_self_attention, decoder_self=decoder_self_attention,
          cross=cross_attention, ffn=feed_forward) -> Model:
    """The encoder–decoder Model of ``cfg``; any block can be replaced."""

    def embed(ids, stream: str):
        with scope("", block="embed"):
            scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings and cfg.d_model > 0 else 1.0
            if stream == "decoder" and cfg.tied_embeddings:
                x = nn.embed(ids, scale=scale, name="embed", tied_to="encoder.embed.weight")
            else:
                x = nn.embed(ids, scale=scale, name="embed")
            return nn.positional(x, cfg.positions, name="positional")

    def final_norm(x):
        # torch.nn.Transformer always adds one; a pre-norm stack needs one.
        if cfg.final_norms or cfg.norm == "pre":
            with scope("", block="final_norm"):
                x = nn.norm(x, eps=cfg.norm_eps, name="norm")
        return x

    def run():
        src = nn.input("src_ids", ("batch", "src"), pad_id=cfg.pad_id)
        tgt = nn.input("tgt_ids", ("batch", "tgt"), pad_id=cfg.pad_id)
        with scope("masks"):
            src_keep = nn.padding_mask(src, cfg.pad_id, name="src_keep")
            tgt_keep = nn.padding_mask(tgt, cfg.pad_id, name="tgt_keep")
            causal = nn.causal_mask(tgt, name="causal")
        with scope("encoder", stream="encoder"):
            x = embed(src, "encoder")
            for i in range(cfg.encoder_layers):
                with scope(f"layers.{i}", layer=i):
                    with scope("", block="self_attn"):
                        x = _sublayer(cfg, x, lambda h: encoder_self(h, src_keep), "norm1")
                    with scope("", block="ffn"):
                        x = _sublayer(cfg, x, lambda h: ffn(h, cfg.activation), "norm2")
            memory = nn.mark_memory(final_norm(x))
        with scope("decoder", stream="decoder"):
            y = embed(tgt, "decoder")
            for i in range(cfg.decoder_layers):
                with scope(f"layers.{i}", layer=i):
                    with scope("", block="self_attn"):
                        y = _sublayer(cfg, y, lambda h: decoder_self(h, causal, tgt_keep), "norm1")
                    with scope("", block="cross_attn"):
                        y = _sublayer(cfg, y, lambda h: cross(h, memory, src_keep), "norm2")
                    with scope("", block="ffn"):
                        y = _sublayer(cfg, y, lambda h: ffn(h, cfg.activation), "norm3")
            y = final_norm(y)
            with scope("", block="output"):
                tied = "encoder.embed.weight" if cfg.tied_embeddings else None
                logits = nn.unembed(y, tied_to=tied, name="unembed")
        return {"logits": logits}

    return Model(cfg.name, cfg.dims(), run, config=cfg.as_dict(),
                 sequences={"src": "bidirectional", "tgt": "causal"}, streams=("encoder", "decoder"))

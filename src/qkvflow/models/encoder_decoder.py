"""The encoder–decoder Transformer, written with the same API users write.

The three attention blocks below declare their shapes (jaxtyping), their
Q/K/V provenance and their mask; :func:`build` wires them into a model. Any
block can be swapped for a user's own (``build(cfg, cross=mine)``).
"""

from __future__ import annotations  # shapes are read without importing jaxtyping (cold start)

from typing import TYPE_CHECKING

import numpy as np

from ..tracing import nn
from ..tracing.context import Model, scope
from .blocks import (PLAIN, AttentionOptions, embed, feed_forward, final_norm, lm_head, multi_head_attention,
                     position_bias, sublayer, with_scale)
from .config import Config

if TYPE_CHECKING:  # the annotations are resolved when a run type-checks a block
    from jaxtyping import Bool, Float

__all__ = ["encoder_self_attention", "decoder_self_attention", "cross_attention", "multi_head_attention",
           "feed_forward", "build"]


@nn.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def encoder_self_attention(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
    position_bias: Float[np.ndarray, "heads src src"] | None = None,
    *, opts: AttentionOptions = PLAIN,
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention: context inside the source.

    Q, K, V all from the encoder stream; keys at source padding are masked.
    """
    return multi_head_attention(x, x, src_keep[:, None, None, :], opts=opts, position_bias=position_bias)


@nn.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")
def decoder_self_attention(
    y: Float[np.ndarray, "batch tgt d_model"],
    causal: Bool[np.ndarray, "tgt tgt"],
    tgt_keep: Bool[np.ndarray, "batch tgt"],
    position_bias: Float[np.ndarray, "heads tgt tgt"] | None = None,
    *, opts: AttentionOptions = PLAIN,
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Masked decoder self-attention: context inside what was generated so far.

    Q, K, V all from the decoder stream; a position sees keys <= itself that
    are not padding.
    """
    keep = causal[None, None, :, :] & tgt_keep[:, None, None, :]  # (batch, 1, tgt, tgt)
    return multi_head_attention(y, y, keep, opts=opts, position_bias=position_bias)


@nn.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_attention(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
    *, opts: AttentionOptions = PLAIN,
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention: the decoder reads the encoder's final output.

    Q from the decoder stream; K and V from the memory; source padding masked
    (no position bias: T5's cross-attention has none).
    """
    return multi_head_attention(y, memory, src_keep[:, None, None, :], opts=opts)


def build(cfg: Config, *, encoder_self=None, decoder_self=None, cross=None, ffn=None) -> Model:
    """The encoder–decoder Model of ``cfg``; any block can be replaced.

    Covers the paper's model, torch.nn.Transformer, BART, Marian and T5 (see
    :class:`~qkvflow.models.config.Config`). A replacement attention block is
    called ``block(x, keep)`` / ``block(y, memory, src_keep)``, with
    ``position_bias=`` too when the config has relative positions, and
    ``opts=`` (:class:`~qkvflow.models.blocks.AttentionOptions`) when the
    config's attention is not the plain one.
    """
    opts = AttentionOptions.of(cfg)
    own = (with_scale(b, opts.scale) for b in (encoder_self_attention, decoder_self_attention, cross_attention))
    encoder_self, decoder_self, cross = (mine or theirs for mine, theirs in zip((encoder_self, decoder_self, cross), own))
    ffn = ffn or (lambda h, act: feed_forward(h, act, gated=cfg.ffn == "gated", bias=cfg.bias))
    extra = {} if opts == PLAIN else {"opts": opts}
    relative = cfg.positions == "relative"
    separate = cfg.src_vocab > 0
    # The decoder reads the encoder's token table when shared, else its own; a tied
    # output projection is the decoder's table.
    shared = cfg.shared_embeddings and not separate
    table = "encoder.embed.weight" if shared else "decoder.embed.weight"

    def run():
        src = nn.input("src_ids", ("batch", "src"), pad_id=cfg.pad_id)
        tgt = nn.input("tgt_ids", ("batch", "tgt"), pad_id=cfg.pad_id)
        with scope("masks"):
            src_keep = nn.padding_mask(src, cfg.pad_id, name="src_keep")
            # T5 and Marian start the target with the pad id: that first token is no padding
            tgt_keep = nn.padding_mask(tgt, cfg.pad_id, keep_first=cfg.bos_id == cfg.pad_id, name="tgt_keep")
            causal = nn.causal_mask(tgt, name="causal")
        with scope("encoder", stream="encoder"):
            x = embed(cfg, src, vocab="src_vocab" if separate else "vocab")
            bias = {"position_bias": position_bias(cfg, src, src, bidirectional=True)} if relative else {}
            for i in range(cfg.encoder_layers):
                with scope(f"layers.{i}", layer=i):
                    with scope("", block="self_attn"):
                        x = sublayer(cfg, x, lambda h: encoder_self(h, src_keep, **bias, **extra), "norm1")
                    with scope("", block="ffn"):
                        x = sublayer(cfg, x, lambda h: ffn(h, cfg.activation), "norm2")
            memory = nn.mark_memory(final_norm(cfg, x))
        with scope("decoder", stream="decoder"):
            y = embed(cfg, tgt, tied_to=table if shared else None)
            bias = {"position_bias": position_bias(cfg, tgt, tgt, bidirectional=False)} if relative else {}
            for i in range(cfg.decoder_layers):
                with scope(f"layers.{i}", layer=i):
                    with scope("", block="self_attn"):
                        y = sublayer(cfg, y, lambda h: decoder_self(h, causal, tgt_keep, **bias, **extra), "norm1")
                    with scope("", block="cross_attn"):
                        y = sublayer(cfg, y, lambda h: cross(h, memory, src_keep, **extra), "norm2")
                    with scope("", block="ffn"):
                        y = sublayer(cfg, y, lambda h: ffn(h, cfg.activation), "norm3")
            y = final_norm(cfg, y)
            logits = lm_head(cfg, y, tied_to=table)
        return {"logits": logits}

    return Model(cfg.name, cfg.dims(), run, config=cfg.as_dict(),
                 sequences={"src": "bidirectional", "tgt": "causal"}, streams=("encoder", "decoder"))

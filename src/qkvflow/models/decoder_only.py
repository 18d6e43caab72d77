"""The decoder-only Transformer (GPT-2, Llama), written with the same API users write.

One stream, ``decoder``, over one causal sequence dim ``seq``: masked
self-attention and a feed-forward network per layer, then the output head.
GPT-2: pre-norm LayerNorm, learned positions, tanh GELU, tied output.
Llama: RMSNorm, SwiGLU, rotary positions, grouped-query attention, no biases.
"""

from __future__ import annotations  # shapes are read without importing jaxtyping (cold start)

from typing import TYPE_CHECKING

import numpy as np

from ..tracing import nn
from ..tracing.context import Model, scope
from .blocks import (PLAIN, AttentionOptions, embed, feed_forward, final_norm, lm_head, multi_head_attention,
                     sublayer, with_scale)
from .config import Config

if TYPE_CHECKING:  # the annotations are resolved when a run type-checks a block
    from jaxtyping import Bool, Float

__all__ = ["causal_self_attention", "build"]


@nn.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+seq_padding")
def causal_self_attention(
    x: Float[np.ndarray, "batch seq d_model"],
    causal: Bool[np.ndarray, "seq seq"],
    keep: Bool[np.ndarray, "batch seq"] | None = None,
    *, opts: AttentionOptions = PLAIN,
) -> Float[np.ndarray, "batch seq d_model"]:
    """Masked self-attention: Q, K, V from the decoder stream; a position sees the
    keys at and before it that are not padding."""
    mask = causal[None, None, :, :]                                    # (1, 1, seq, seq)
    if keep is not None:
        mask = mask & keep[:, None, None, :]                           # (batch, 1, seq, seq)
    return multi_head_attention(x, x, mask, opts=opts)


@nn.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal")
def causal_self_attention_unpadded(
    x: Float[np.ndarray, "batch seq d_model"],
    causal: Bool[np.ndarray, "seq seq"],
    *, opts: AttentionOptions = PLAIN,
) -> Float[np.ndarray, "batch seq d_model"]:
    """Masked self-attention of a model without a padding token."""
    return multi_head_attention(x, x, causal[None, None, :, :], opts=opts)


def build(cfg: Config, *, self_attention=None, ffn=None) -> Model:
    """The decoder-only Model of ``cfg``: ids (batch, seq) -> logits (batch, seq, vocab).

    ``pad_id = -1`` means the model has no padding token (GPT-2, Llama): only the
    causal mask then applies.
    """
    opts = AttentionOptions.of(cfg)
    padded = cfg.pad_id >= 0
    attend = self_attention or with_scale(causal_self_attention if padded else causal_self_attention_unpadded,
                                          opts.scale)
    ffn = ffn or (lambda h, act: feed_forward(h, act, gated=cfg.ffn == "gated", bias=cfg.bias))
    extra = {} if opts == PLAIN else {"opts": opts}
    table = "decoder.embed.weight"

    def run():
        ids = nn.input("ids", ("batch", "seq"), pad_id=cfg.pad_id if padded else None)
        with scope("masks"):
            causal = nn.causal_mask(ids, name="causal")
            keep = (nn.padding_mask(ids, cfg.pad_id, name="keep"),) if padded else ()
        with scope("decoder", stream="decoder"):
            x = embed(cfg, ids)
            for i in range(cfg.decoder_layers):
                with scope(f"layers.{i}", layer=i):
                    with scope("", block="self_attn"):
                        x = sublayer(cfg, x, lambda h: attend(h, causal, *keep, **extra), "norm1")
                    with scope("", block="ffn"):
                        x = sublayer(cfg, x, lambda h: ffn(h, cfg.activation), "norm2")
            x = final_norm(cfg, x)
            logits = lm_head(cfg, x, tied_to=table)
        return {"logits": logits}

    return Model(cfg.name, cfg.dims(), run, config=cfg.as_dict(), sequences={"seq": "causal"},
                 streams=("decoder",))

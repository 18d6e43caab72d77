"""The encoder-only Transformer (BERT), written with the same API users write.

One stream, ``encoder``, over one bidirectional sequence dim ``seq``:
self-attention and a feed-forward network per layer, post-norm, after
word + token-type + position embeddings and their LayerNorm. The head is
BERT's masked-LM head (dense, GELU, LayerNorm, tied projection with its own
bias) or its pooled output (dense and tanh over the first token).
"""

from __future__ import annotations  # shapes are read without importing jaxtyping (cold start)

from typing import TYPE_CHECKING

import numpy as np

from ..tracing import nn
from ..tracing.context import Model, scope
from .blocks import (PLAIN, AttentionOptions, embed, feed_forward, final_norm, multi_head_attention, sublayer,
                     with_scale)
from .config import Config

if TYPE_CHECKING:  # the annotations are resolved when a run type-checks a block
    from jaxtyping import Bool, Float

__all__ = ["bidirectional_self_attention", "build"]


@nn.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="seq_padding")
def bidirectional_self_attention(
    x: Float[np.ndarray, "batch seq d_model"],
    keep: Bool[np.ndarray, "batch seq"],
    *, opts: AttentionOptions = PLAIN,
) -> Float[np.ndarray, "batch seq d_model"]:
    """Self-attention: Q, K, V from the encoder stream; every position sees every
    key that is not padding."""
    return multi_head_attention(x, x, keep[:, None, None, :], opts=opts)


def build(cfg: Config, *, self_attention=None, ffn=None) -> Model:
    """The encoder-only Model of ``cfg``: ids (batch, seq) [+ type_ids, zeros when not
    given] -> logits (batch, seq, vocab) with the ``mlm`` head, or hidden states
    (batch, seq, d_model) and pooled (batch, d_model) with the ``pooled`` head."""
    opts = AttentionOptions.of(cfg)
    attend = self_attention or with_scale(bidirectional_self_attention, opts.scale)
    ffn = ffn or (lambda h, act: feed_forward(h, act, gated=cfg.ffn == "gated", bias=cfg.bias))
    extra = {} if opts == PLAIN else {"opts": opts}

    def run():
        ids = nn.input("ids", ("batch", "seq"), pad_id=cfg.pad_id)
        types = nn.input("type_ids", ("batch", "seq"), default=0) if cfg.type_vocab else None
        with scope("masks"):
            keep = nn.padding_mask(ids, cfg.pad_id, name="keep")
        with scope("encoder", stream="encoder"):
            x = embed(cfg, ids, type_ids=types)
            for i in range(cfg.encoder_layers):
                with scope(f"layers.{i}", layer=i):
                    with scope("", block="self_attn"):
                        x = sublayer(cfg, x, lambda h: attend(h, keep, **extra), "norm1")
                    with scope("", block="ffn"):
                        x = sublayer(cfg, x, lambda h: ffn(h, cfg.activation), "norm2")
            x = final_norm(cfg, x)
            if cfg.head == "pooled":
                with scope("", block="pooler"):
                    first = x[:, 0]                                                  # (batch, d_model)
                    pooled = np.tanh(nn.linear(first, "d_model", name="dense"))
                return {"hidden": x, "pooled": pooled}
            with scope("", block="output"):
                h = nn.activation(nn.linear(x, "d_model", name="transform"), cfg.activation)
                h = nn.norm(h, eps=cfg.norm_eps, name="transform_norm")
                tied = "encoder.embed.weight" if cfg.tied_embeddings else None
                logits = nn.unembed(h, tied_to=tied, bias=cfg.logits_bias, name="unembed")
        return {"logits": logits}

    return Model(cfg.name, cfg.dims(), run, config=cfg.as_dict(), sequences={"seq": "bidirectional"},
                 streams=("encoder",))

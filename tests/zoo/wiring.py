"""A hand-written encoder-decoder whose wiring hands a block the wrong state.

:class:`EncoderDecoder` is a pre-norm model written the way many people
write their own: a self-attention block that takes its queries and its
keys/values as two arguments, encoder states kept in a list. Each entry
below overrides one method and changes one line. The blocks themselves are
right; the mistake is where they are called, so that is where qkvflow
points.
"""

import math

import numpy as np
from jaxtyping import Bool, Float

import qkvflow
from qkvflow import nn

from .registry import bug, merge, project, scaled_scores


@qkvflow.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")
def self_attention(
    x: Float[np.ndarray, "batch tgt d_model"],
    kv: Float[np.ndarray, "batch tgt d_model"],
    keep: Bool[np.ndarray, "batch 1 tgt tgt"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Decoder self-attention. Q from x, K and V from kv: both the decoder
    stream entering the layer (normalised). Mask: causal + target padding."""
    q, k, v = project(x, "q_proj"), project(kv, "k_proj"), project(kv, "v_proj")
    s = np.where(keep, scaled_scores(q, k), -np.inf)  # (B, H, T, T)
    return merge(nn.softmax(s, axis=-1) @ v)


@qkvflow.attention("encoder_self", q="encoder", k="encoder", v="encoder", mask="src_padding")
def encoder_attention(
    x: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch src d_model"]:
    """Encoder self-attention. Q, K, V: the encoder stream; mask: source padding."""
    q, k, v = project(x, "q_proj"), project(x, "k_proj"), project(x, "v_proj")
    s = np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf)  # (B, H, S, S)
    return merge(nn.softmax(s, axis=-1) @ v)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_attention(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: the decoder stream; K, V: the memory (the encoder's
    final, normalised output); mask: source padding."""
    q, k, v = project(y, "q_proj"), project(memory, "k_proj"), project(memory, "v_proj")
    s = np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf)  # (B, H, T, S)
    return merge(nn.softmax(s, axis=-1) @ v)


def ffn(x):
    h = nn.activation(nn.linear(x, "d_ff", name="linear1"), "relu")
    return nn.linear(h, "d_model", name="linear2")


class EncoderDecoder:
    """Pre-norm encoder-decoder; ``ctx`` carries the states a layer may read."""

    def __init__(self, cfg):
        self.cfg = cfg

    def model(self) -> qkvflow.Model:
        return qkvflow.Model(self.cfg.name, self.cfg.dims(), self.build, self.cfg.as_dict())

    def embed(self, ids):
        x = nn.embed(ids, scale=math.sqrt(self.cfg.d_model), name="embed")
        return nn.positional(x, "sinusoidal", name="positional")

    def build(self):
        src = nn.input("src_ids", ("batch", "src"))
        tgt = nn.input("tgt_ids", ("batch", "tgt"))
        with qkvflow.scope("masks"):
            src_keep = nn.padding_mask(src, self.cfg.pad_id, name="src_keep")
            tgt_keep = nn.padding_mask(tgt, self.cfg.pad_id, name="tgt_keep")
            causal = nn.causal_mask(tgt, name="causal")
        ctx = {"src_keep": src_keep, "keep": causal[None, None, :, :] & tgt_keep[:, None, None, :]}
        with qkvflow.scope("encoder", stream="encoder"):
            x, states = self.embed(src), []
            for i in range(self.cfg.encoder_layers):
                with qkvflow.scope(f"layers.{i}", layer=i):
                    with qkvflow.scope("", block="self_attn"):
                        x = nn.residual(x, encoder_attention(nn.norm(x, name="norm1"), src_keep))
                    with qkvflow.scope("", block="ffn"):
                        x = nn.residual(x, ffn(nn.norm(x, name="norm2")))
                states.append(x)
            with qkvflow.scope("", block="final_norm"):
                memory = nn.mark_memory(nn.norm(x, name="norm"))
        ctx.update(memory=memory, states=states)
        with qkvflow.scope("decoder", stream="decoder"):
            y = ctx["emb"] = self.embed(tgt)
            for i in range(self.cfg.decoder_layers):
                with qkvflow.scope(f"layers.{i}", layer=i):
                    with qkvflow.scope("", block="self_attn"):
                        y = self.self_sublayer(y, ctx)
                    with qkvflow.scope("", block="cross_attn"):
                        y = self.cross_sublayer(y, ctx)
                    with qkvflow.scope("", block="ffn"):
                        y = nn.residual(y, ffn(nn.norm(y, name="norm3")))
            with qkvflow.scope("", block="final_norm"):
                y = nn.norm(y, name="norm")
            with qkvflow.scope("", block="output"):
                return {"logits": nn.unembed(y, name="unembed")}

    def self_sublayer(self, y, ctx):
        h = nn.norm(y, name="norm1")
        return nn.residual(y, self_attention(h, h, ctx["keep"]))

    def cross_sublayer(self, y, ctx):
        h = nn.norm(y, name="norm2")
        return nn.residual(y, cross_attention(h, ctx["memory"], ctx["src_keep"]))


def correct(cfg) -> qkvflow.Model:
    """The model without a mistake (tests check it has no findings)."""
    return EncoderDecoder(cfg).model()


class _FirstEncoderLayer(EncoderDecoder):
    def cross_sublayer(self, y, ctx):
        h = nn.norm(y, name="norm2")
        out = cross_attention(h, ctx["states"][0], ctx["src_keep"])  # BUG(cross_reads_encoder_layer0)
        return nn.residual(y, out)


@bug("QKV303", "decoder.layers.0.cross_attn", size_silent=True)
def cross_reads_encoder_layer0(cfg):
    """Cross-attention handed the first encoder layer's output, not the memory."""
    return _FirstEncoderLayer(cfg).model()


class _UnnormedMemory(EncoderDecoder):
    def cross_sublayer(self, y, ctx):
        h = nn.norm(y, name="norm2")
        out = cross_attention(h, ctx["states"][-1], ctx["src_keep"])  # BUG(cross_reads_unnormed_memory)
        return nn.residual(y, out)


@bug("QKV303", "decoder.layers.0.cross_attn", size_silent=True)
def cross_reads_unnormed_memory(cfg):
    """Pre-norm: cross-attention reads the last encoder layer before the final norm."""
    return _UnnormedMemory(cfg).model()


class _EmbeddingsAsKV(EncoderDecoder):
    def self_sublayer(self, y, ctx):
        h = nn.norm(y, name="norm1")
        out = self_attention(h, ctx["emb"], ctx["keep"])  # BUG(decoder_self_kv_from_embeddings)
        return nn.residual(y, out)


@bug("QKV304", "decoder.layers.1.self_attn", size_silent=True)
def decoder_self_kv_from_embeddings(cfg):
    """Decoder self-attention keys/values from the embeddings in every layer."""
    return _EmbeddingsAsKV(cfg).model()


class _UnnormedKV(EncoderDecoder):
    def self_sublayer(self, y, ctx):
        h = nn.norm(y, name="norm1")
        out = self_attention(h, y, ctx["keep"])  # BUG(prenorm_kv_unnormalized)
        return nn.residual(y, out)


@bug("QKV302", "decoder.layers.0.self_attn", size_silent=True)
def prenorm_kv_unnormalized(cfg):
    """Pre-norm self-attention: Q from norm(y) but K and V from y itself."""
    return _UnnormedKV(cfg).model()

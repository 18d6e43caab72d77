"""Single-stream models written from scratch with the public API.

A decoder-only language model (GPT-2 style: pre-norm, learned positions,
tied output) over a sequence dim named ``seq`` in a stream named ``lm``, and
an encoder-only model (BERT style: post-norm, additive padding mask) over
``tokens`` in a stream named ``text``: no ``src``/``tgt``, no
``encoder``/``decoder``. Each comes correct and broken, the broken blocks
written in another NumPy style than the correct ones.
"""

import math

import numpy as np
from jaxtyping import Bool, Float, Integer

import qkvflow as qf
from qkvflow import nn

# Every dim a different size: d_model 22 = heads 2 * d_head 11.
DIMS = {"batch": None, "seq": None, "tokens": None, "d_model": 22, "heads": 2, "d_head": 11,
        "d_ff": 37, "vocab": 53, "max_positions": 31}
PAD = 0


def _heads(t, B, L):
    """(batch, L, heads*d_head) -> (batch, heads, L, d_head)."""
    return t.reshape(B, L, qf.dim("heads"), qf.dim("d_head")).transpose(0, 2, 1, 3)


def _project(x, B, L):
    """Q, K and V of x, each (batch, heads, L, d_head)."""
    return tuple(_heads(nn.linear(x, "heads*d_head", name=f"{r}_proj"), B, L) for r in "qkv")


def _merge(o, B, L):
    """(batch, heads, L, d_head) -> (batch, L, heads*d_head) -> out_proj -> (batch, L, d_model)."""
    o = o.transpose(0, 2, 1, 3).reshape(B, L, qf.dim("heads") * qf.dim("d_head"))
    return nn.linear(o, "d_model", name="out_proj")


# --- decoder-only --------------------------------------------------------------------

@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="causal")
def causal_attention(
    x: Float[np.ndarray, "batch seq d_model"],
    causal: Bool[np.ndarray, "seq seq"],
) -> Float[np.ndarray, "batch seq d_model"]:
    """Masked self-attention: Q, K, V from the lm stream; a position sees keys <= itself."""
    B, T, _ = x.shape
    q, k, v = _project(x, B, T)                                              # (batch, heads, seq, d_head)
    bias = (1.0 - causal) * -1e9                                             # (seq, seq): 0 or -1e9
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(qf.dim("d_head")) + bias  # (batch, heads, seq, seq)
    return _merge(np.einsum("bhqk,bhkd->bhqd", nn.softmax(s, axis=-1), v), B, T)


@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="none")
def unmasked_attention(
    x: Float[np.ndarray, "batch seq d_model"],
    causal: Bool[np.ndarray, "seq seq"],
) -> Float[np.ndarray, "batch seq d_model"]:
    """Self-attention over the lm stream that forgets the causal mask (and declares none)."""
    B, T, _ = x.shape
    q, k, v = _project(x, B, T)                                              # (batch, heads, seq, d_head)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(qf.dim("d_head"))                  # (batch, heads, seq, seq)
    return _merge(nn.softmax(s, axis=-1) @ v, B, T)                          # BUG(decoder_only_unmasked)


def decoder_only(block=causal_attention, *, layers: int = 2, declare: bool = True,
                 post_norm: bool = False) -> qf.Model:
    """A pre-norm decoder-only LM: ids (batch, seq) -> logits (batch, seq, vocab); with
    ``post_norm`` each sub-layer is ``norm(x + f(x))``, the sum written with ``+``."""

    def run():
        ids = nn.input("ids", ("batch", "seq"))
        causal = nn.causal_mask(ids, name="causal")
        with qf.scope("lm", stream="lm"):
            with qf.scope("", block="embed"):
                x = nn.positional(nn.embed(ids, name="wte"), "learned", name="wpe")
            for i in range(layers):
                with qf.scope(f"h.{i}", layer=i):
                    with qf.scope("", block="attn"):
                        if post_norm:
                            x = nn.norm(x + block(x, causal), name="ln_1")
                        else:
                            x = nn.residual(x, block(nn.norm(x, name="ln_1"), causal))
                    with qf.scope("", block="mlp"):
                        h = nn.linear(nn.norm(x, name="ln_2"), "d_ff", name="c_fc")
                        h = nn.linear(nn.activation(h, "gelu_tanh"), "d_model", name="c_proj")
                        x = nn.residual(x, h)
            x = nn.norm(x, name="ln_f")
            logits = nn.unembed(x, tied_to="lm.wte.weight")
        return {"logits": logits}

    name = "decoder-only" if block is causal_attention else "decoder-only-unmasked"
    if not declare:
        return qf.Model(name, DIMS, run)
    return qf.Model(name, DIMS, run, sequences={"seq": "causal"}, streams=("lm",))


# --- encoder-only --------------------------------------------------------------------

@qf.attention("encoder_self", q="text", k="text", v="text", mask="tokens_padding")
def bidirectional_attention(
    x: Float[np.ndarray, "batch tokens d_model"],
    ids: Integer[np.ndarray, "batch tokens"],
) -> Float[np.ndarray, "batch tokens d_model"]:
    """Bidirectional self-attention: Q, K, V from the text stream; padded keys masked."""
    B, L, _ = x.shape
    q = _heads(nn.linear(x, "heads*d_head", name="query"), B, L)
    k = _heads(nn.linear(x, "heads*d_head", name="key"), B, L)
    v = _heads(nn.linear(x, "heads*d_head", name="value"), B, L)
    keep = (ids != PAD)[:, None, None, :]                                    # (batch, 1, 1, tokens)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(qf.dim("d_head"))                  # (batch, heads, tokens, tokens)
    s = s + (1.0 - keep) * -10000.0                                          # BERT's additive mask
    return _merge(nn.softmax(s, axis=-1) @ v, B, L)


@qf.attention("encoder_self", q="text", k="text", v="text", mask="tokens_padding")
def query_masked_attention(
    x: Float[np.ndarray, "batch tokens d_model"],
    ids: Integer[np.ndarray, "batch tokens"],
) -> Float[np.ndarray, "batch tokens d_model"]:
    """Bidirectional self-attention whose padding mask runs along the query axis."""
    B, L, _ = x.shape
    H, Dh = qf.dim("heads"), qf.dim("d_head")
    q = nn.linear(x, "heads*d_head", name="query").reshape(B, L, H, Dh).transpose(0, 2, 1, 3)
    k = nn.linear(x, "heads*d_head", name="key").reshape(B, L, H, Dh).transpose(0, 2, 1, 3)
    v = nn.linear(x, "heads*d_head", name="value").reshape(B, L, H, Dh).transpose(0, 2, 1, 3)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(Dh)                  # (batch, heads, tokens, tokens)
    p = nn.softmax(np.where((ids != PAD)[:, None, :, None], s, -np.inf), axis=-1)  # BUG(encoder_only_query_mask)
    o = np.einsum("bhqk,bhkd->bhqd", p, v)
    return nn.linear(o.transpose(0, 2, 1, 3).reshape(B, L, H * Dh), "d_model", name="out_proj")


def masking_with(pad_id: int):
    """Bidirectional self-attention masking the keys whose id is ``pad_id`` with nn.padding_mask."""

    @qf.attention("encoder_self", q="text", k="text", v="text", mask="tokens_padding")
    def padding_mask_attention(
        x: Float[np.ndarray, "batch tokens d_model"],
        ids: Integer[np.ndarray, "batch tokens"],
    ) -> Float[np.ndarray, "batch tokens d_model"]:
        """Bidirectional self-attention: Q, K, V from the text stream; keys at ``pad_id`` masked."""
        B, L, _ = x.shape
        q, k, v = _project(x, B, L)                                          # (batch, heads, tokens, d_head)
        keep = nn.padding_mask(ids, pad_id, name="keep")[:, None, None, :]  # (batch, 1, 1, tokens)
        s = nn.mask(q @ k.swapaxes(-1, -2) / np.sqrt(qf.dim("d_head")), keep)
        return _merge(nn.softmax(s, axis=-1) @ v, B, L)

    return padding_mask_attention


def encoder_only(block=bidirectional_attention, *, layers: int = 2, declare_pad: bool = True) -> qf.Model:
    """A post-norm encoder-only model: token_ids (batch, tokens) -> logits (batch, tokens, vocab)."""

    def run():
        ids = nn.input("token_ids", ("batch", "tokens"), pad_id=PAD if declare_pad else None)
        with qf.scope("text", stream="text"):
            with qf.scope("", block="embed"):
                x = nn.positional(nn.embed(ids, name="word_embeddings"), "learned", name="position_embeddings")
                x = nn.norm(x, eps=1e-12, name="embeddings_norm")
            for i in range(layers):
                with qf.scope(f"layer.{i}", layer=i):
                    with qf.scope("", block="attention"):
                        x = nn.norm(nn.residual(x, block(x, ids)), eps=1e-12, name="attention_norm")
                    with qf.scope("", block="ffn"):
                        h = nn.activation(nn.linear(x, "d_ff", name="intermediate"), "gelu")
                        x = nn.norm(nn.residual(x, nn.linear(h, "d_model", name="output")), eps=1e-12,
                                    name="output_norm")
            logits = nn.unembed(x, tied_to="text.word_embeddings.weight")
        return {"logits": logits}

    name = "encoder-only" if block is bidirectional_attention else f"encoder-only-{block.__name__}"
    return qf.Model(name, DIMS, run, sequences={"tokens": "bidirectional"}, streams=("text",))

"""Your own attention blocks, written in plain NumPy, checked by qkvflow.

The two blocks below are ordinary NumPy code: ``reshape``, ``transpose``,
``np.einsum``, ``@``, ``np.where``. Each is declared with
``@qkvflow.attention`` (where Q, K and V come from, which mask applies) and
jaxtyping annotations (``tgt`` and ``src`` named apart). qkvflow traces the
same code with named dims and checks that it does what it declares; the
same code also runs eagerly on arrays.

Run it::

    python examples/custom_attention.py
    qkvflow check examples/custom_attention.py:model
"""

import numpy as np
from jaxtyping import Bool, Float

import qkvflow
from qkvflow import nn, transformer


def split_heads(t):
    """(B, T, H*Dh) -> (B, H, T, Dh)."""
    B, T, _ = t.shape
    H, Dh = qkvflow.dim("heads"), qkvflow.dim("d_head")
    return t.reshape(B, T, H, Dh).transpose(0, 2, 1, 3)  # (B, T, H, Dh) -> (B, H, T, Dh)


def attend(q, k, v, keep):
    """Scaled dot-product attention, heads merged, out_proj.

    q (B, H, T, Dh), k and v (B, H, S, Dh), keep broadcastable to the
    scores (B, H, T, S): False where a key must get no weight.
    """
    B, _, T, Dh = q.shape
    s = np.einsum("bhtd,bhsd->bhts", q, k) / np.sqrt(Dh)  # (B, H, T, S)
    s = np.where(keep, s, -np.inf)                        # masked keys get no weight
    p = nn.softmax(s, axis=-1)                            # over S, the keys
    o = p @ v                                             # (B, H, T, Dh)
    o = o.transpose(0, 2, 1, 3).reshape(B, T, -1)         # (B, T, H, Dh) -> (B, T, H*Dh)
    return nn.linear(o, "d_model", name="out_proj")       # (B, T, d_model)


@qkvflow.attention("decoder_self", q="decoder", k="decoder", v="decoder", mask="causal+tgt_padding")
def decoder_self_attention(
    y: Float[np.ndarray, "batch tgt d_model"],
    causal: Bool[np.ndarray, "tgt tgt"],
    tgt_keep: Bool[np.ndarray, "batch tgt"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Masked decoder self-attention.

    Q, K, V: the decoder stream entering this layer. Mask: causal (query t
    sees keys <= t) and target padding (padded keys get no weight).
    """
    keep = causal[None, None, :, :] & tgt_keep[:, None, None, :]  # (B, 1, T, T)
    q = split_heads(nn.linear(y, "heads*d_head", name="q_proj"))  # (B, H, T, Dh)
    k = split_heads(nn.linear(y, "heads*d_head", name="k_proj"))  # (B, H, T, Dh)
    v = split_heads(nn.linear(y, "heads*d_head", name="v_proj"))  # (B, H, T, Dh)
    return attend(q, k, v, keep)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_attention(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention: the decoder reads the encoder.

    Q: the decoder stream. K and V: the memory, the encoder's final output.
    Mask: source padding (padded source tokens get no weight).
    """
    q = split_heads(nn.linear(y, "heads*d_head", name="q_proj"))       # (B, H, T, Dh)
    k = split_heads(nn.linear(memory, "heads*d_head", name="k_proj"))  # (B, H, S, Dh)
    v = split_heads(nn.linear(memory, "heads*d_head", name="v_proj"))  # (B, H, S, Dh)
    return attend(q, k, v, src_keep[:, None, None, :])                 # keep: (B, 1, 1, S)


def model():
    """The ``tiny`` encoder-decoder with the two blocks above plugged in."""
    return transformer.build(qkvflow.preset("tiny"), decoder_self=decoder_self_attention,
                             cross=cross_attention)


def main():
    m = model()
    g = qkvflow.trace(m)
    found = qkvflow.check(g)
    print(f"{len(found)} findings")
    for d in found:
        print(d.text())
    print()
    print(qkvflow.explain(g))

    params = qkvflow.init_params(g, seed=0)
    src = np.array([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]])  # 0 is padding
    tgt = np.array([[1, 12, 13], [1, 14, 15]])
    graph_run = qkvflow.forward(g, params, src, tgt)["logits"]                         # the traced graph
    eager_run = qkvflow.eager(m, params, {"src_ids": src, "tgt_ids": tgt})["logits"]  # this file's code
    print(f"\nlogits {graph_run.shape}; graph vs eager max |diff| = "
          f"{np.max(np.abs(graph_run - eager_run)):.1e}")


if __name__ == "__main__":
    main()

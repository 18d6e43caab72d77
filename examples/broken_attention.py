"""A classic cross-attention mistake that no size check can see.

Same model as ``custom_attention.py`` with one line changed: the
cross-attention projects K and V from the decoder stream ``y`` instead of
the encoder's output ``memory``. Whenever the source and target have the
same length every shape agrees, so NumPy, PyTorch and jaxtyping run it
without a word; the model simply never reads its input sentence.
qkvflow reads the dataflow instead of the sizes.

Run it::

    python examples/broken_attention.py
    qkvflow check examples/broken_attention.py:model   # exit code 1
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


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross_attention(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention: the decoder reads the encoder (or means to).

    Q: the decoder stream. K and V: the memory, the encoder's final output.
    Mask: source padding.
    """
    q = split_heads(nn.linear(y, "heads*d_head", name="q_proj"))  # (B, H, T, Dh)
    k = split_heads(nn.linear(y, "heads*d_head", name="k_proj"))  # BUG: y, not memory
    v = split_heads(nn.linear(y, "heads*d_head", name="v_proj"))  # BUG: y, not memory
    return attend(q, k, v, src_keep[:, None, None, :])            # keep: (B, 1, 1, S)


def model():
    """The ``tiny`` encoder-decoder with the broken cross-attention plugged in."""
    return transformer.build(qkvflow.preset("tiny"), cross=cross_attention)


def main():
    m = model()
    g = qkvflow.trace(m)
    found = qkvflow.check(g)
    print(qkvflow.format_diagnostics(found))

    # The same code on arrays with src and tgt of one length: nothing complains.
    params = qkvflow.init_params(g, seed=0)
    feeds = {"src_ids": np.array([[5, 6, 7, 8]]), "tgt_ids": np.array([[1, 12, 13, 14]])}
    logits = qkvflow.eager(m, params, feeds)["logits"]
    other = qkvflow.eager(m, params, {**feeds, "src_ids": np.array([[9, 10, 11, 12]])})["logits"]
    print(f"\nran eagerly on src == tgt == 4: logits {logits.shape}, no error; "
          f"changing every source token changes the logits by {np.max(np.abs(logits - other)):.1e}")


if __name__ == "__main__":
    main()

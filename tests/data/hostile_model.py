"""A small decoder-only model whose every user-chosen name is hostile.

The model, its stream, a block, an input and a linear layer are all named
:data:`NAME`, which holds what breaks a careless writer of each output
format: line breaks, NUL, quotes, markup, GitHub's command separators, DOT
and Mermaid syntax, a right-to-left override. The layer's scope and another
linear layer are named :data:`LONG`. The attention forgets its causal mask
and declares a stream the model lacks, so ``check`` has findings to report
on those names.
"""

import numpy as np
from jaxtyping import Bool, Float

import qkvflow as qf
from qkvflow import nn

NAME = ('ev"il<b>&amp;%25%,x::y\\n\\\x00\x1b\r\n::error file=forged,line=1::forged'
        '\nn_forged["x"] --> n_forged;%%{init: {}}%%\n#quot;`md`|\u202eq\u2028')
LONG = "long" + "é" * 20000
DIMS = {"batch": None, "seq": None, "d_model": 22, "heads": 2, "d_head": 11, "vocab": 53,
        "max_positions": 31}


@qf.attention("decoder_self", q="lm", k="lm", v="lm", mask="none")
def unmasked_attention(
    x: Float[np.ndarray, "batch seq d_model"],
    causal: Bool[np.ndarray, "seq seq"],
) -> Float[np.ndarray, "batch seq d_model"]:
    """Self-attention over the stream that forgets the causal mask (and declares none)."""
    B, T, _ = x.shape
    H, Dh = qf.dim("heads"), qf.dim("d_head")
    q, k, v = (nn.linear(x, "heads*d_head", name=f"{r}_proj").reshape(B, T, H, Dh).transpose(0, 2, 1, 3)
               for r in "qkv")                                             # (batch, heads, seq, d_head)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(Dh)                               # (batch, heads, seq, seq)
    o = (nn.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, T, H * Dh)
    return nn.linear(o, "d_model", name=NAME)                              # (batch, seq, d_model)


def model() -> qf.Model:
    def run():
        ids = nn.input(NAME, ("batch", "seq"))
        causal = nn.causal_mask(ids, name="causal")
        with qf.scope(NAME, stream=NAME):
            with qf.scope("", block="embed"):
                x = nn.positional(nn.embed(ids, name="wte"), "learned", name="wpe")
            with qf.scope(LONG, layer=0):
                with qf.scope("", block=NAME):
                    x = nn.residual(x, unmasked_attention(nn.norm(x, name="ln"), causal))
                with qf.scope("", block="mlp"):
                    x = nn.residual(x, nn.linear(x, "d_model", name=LONG))
            logits = nn.unembed(x, tied_to=f"{NAME}.wte.weight")
        return {"logits": logits}

    return qf.Model(NAME, DIMS, run, sequences={"seq": "causal"}, streams=(NAME,))

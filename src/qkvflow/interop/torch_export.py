"""The same model in torch: qkvflow parameters loaded into torch.nn.Transformer layers.

For parity tests and benchmarks against an independent implementation:
:func:`to_torch` returns a function ``(src_ids, tgt_ids) -> logits`` built
from ``torch.nn.TransformerEncoder``/``TransformerDecoder`` layers carrying
the given qkvflow parameters (Q/K/V packed into ``in_proj_weight``), plus
the embedding, positions and output projection that torch does not have.
Needs torch (``pip install torch==2.13.0``); imported only here.
"""

import math

import numpy as np

from ..models.config import Config
from ..ir.errors import QkvflowError

__all__ = ["to_torch"]

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu"}  # torch's "gelu" is the exact erf GELU


def _torch():
    try:
        import torch
    except ImportError:
        raise QkvflowError("torch is not installed; pip install torch==2.13.0 (a CPU wheel)") from None
    return torch


def to_torch(cfg: Config, params: dict):
    """A torch forward pass ``(src_ids, tgt_ids) -> logits`` with ``params``' weights.

    The dtype follows the parameters (float64 or float32). Padding masks use
    ``cfg.pad_id``; the causal mask is passed explicitly (never
    ``tgt_is_causal`` alone) and torch's MHA fast path is switched off so
    padded positions are computed, not zeroed.
    """
    torch = _torch()
    from torch import nn

    if cfg.activation not in _ACTIVATIONS or cfg.positions == "sinusoidal_half":
        raise QkvflowError(f"to_torch supports relu/gelu and sinusoidal/learned positions, not "
                           f"{cfg.activation}/{cfg.positions}")
    dtype = torch.float64 if next(iter(params.values())).dtype == np.float64 else torch.float32

    def t(name: str):
        return torch.from_numpy(np.ascontiguousarray(params[name])).to(dtype)

    def layers(cls, count: int):
        layer = cls(cfg.d_model, cfg.heads, cfg.d_ff, dropout=0.0, activation=_ACTIVATIONS[cfg.activation],
                    layer_norm_eps=cfg.norm_eps, batch_first=True, norm_first=cfg.norm == "pre", dtype=dtype)
        return layer, count

    final = cfg.final_norms or cfg.norm == "pre"
    enc_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype) if final else None
    dec_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype) if final else None
    enc = nn.TransformerEncoder(*layers(nn.TransformerEncoderLayer, cfg.encoder_layers), norm=enc_norm,
                                enable_nested_tensor=False)
    dec = nn.TransformerDecoder(*layers(nn.TransformerDecoderLayer, cfg.decoder_layers), norm=dec_norm)

    def load(module, name: str) -> None:
        module.weight.data, module.bias.data = t(f"{name}.weight"), t(f"{name}.bias")

    def load_attention(mha, prefix: str) -> None:
        mha.in_proj_weight.data = torch.cat([t(f"{prefix}.{p}_proj.weight") for p in "qkv"])  # (3E, E)
        mha.in_proj_bias.data = torch.cat([t(f"{prefix}.{p}_proj.bias") for p in "qkv"])
        load(mha.out_proj, f"{prefix}.out_proj")

    for i, layer in enumerate(enc.layers):
        prefix = f"encoder.layers.{i}"
        load_attention(layer.self_attn, f"{prefix}.self_attn")
        for name in ("linear1", "linear2", "norm1", "norm2"):
            load(getattr(layer, name), f"{prefix}.{name}")
    for i, layer in enumerate(dec.layers):
        prefix = f"decoder.layers.{i}"
        load_attention(layer.self_attn, f"{prefix}.self_attn")
        load_attention(layer.multihead_attn, f"{prefix}.cross_attn")
        for name in ("linear1", "linear2", "norm1", "norm2", "norm3"):
            load(getattr(layer, name), f"{prefix}.{name}")
    if final:
        load(enc_norm, "encoder.norm")
        load(dec_norm, "decoder.norm")
    enc.eval()
    dec.eval()

    src_table = t("encoder.embed.weight")
    tgt_table = src_table if cfg.shared_embeddings else t("decoder.embed.weight")
    out_table = tgt_table if cfg.tied_embeddings else t("decoder.unembed.weight")
    scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0

    def positions(stream: str, length: int):
        if cfg.positions == "learned":
            return t(f"{stream}.positional.weight")[:length]
        from ..run.kernels import sinusoidal_table
        return torch.from_numpy(sinusoidal_table(length, cfg.d_model, cfg.positions, np.float64)).to(dtype)

    def forward(src_ids, tgt_ids) -> np.ndarray:
        src, tgt = torch.as_tensor(src_ids), torch.as_tensor(tgt_ids)
        x = src_table[src] * scale + positions("encoder", src.shape[1])
        y = tgt_table[tgt] * scale + positions("decoder", tgt.shape[1])
        causal = torch.triu(torch.full((tgt.shape[1], tgt.shape[1]), float("-inf"), dtype=dtype), 1)
        src_pad, tgt_pad = src == cfg.pad_id, tgt == cfg.pad_id
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.inference_mode():
                memory = enc(x, src_key_padding_mask=src_pad)
                out = dec(y, memory, tgt_mask=causal, tgt_key_padding_mask=tgt_pad,
                          memory_key_padding_mask=src_pad)
                return (out @ out_table.T).numpy()
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)

    return forward

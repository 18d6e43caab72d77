"""Forward pass of vaswani-base in float32, batch 8, 64 source + 64 target tokens.

Peer: torch's CPU eager forward of the same model with the same weights
(nn.TransformerEncoder/Decoder layers, post-norm, tied embeddings), when
torch is installed. Also measures what runtime checking costs (check=True
vs check=False, interleaved). Reports medians and ratios.

    python benchmarks/forward.py      # writes benchmarks/results/forward.json
"""

import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

import qkvflow as qf

HERE = Path(__file__).resolve().parent
BATCH, SRC, TGT, REPEATS = 8, 64, 64, 15


def median_time(fn, repeats=REPEATS) -> float:
    fn()  # warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def torch_model(params: dict, cfg):
    import torch
    from torch import nn

    d, h = cfg.d_model, cfg.heads
    enc_layer = nn.TransformerEncoderLayer(d, h, cfg.d_ff, dropout=0.0, batch_first=True)
    dec_layer = nn.TransformerDecoderLayer(d, h, cfg.d_ff, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(enc_layer, cfg.encoder_layers, enable_nested_tensor=False)
    dec = nn.TransformerDecoder(dec_layer, cfg.decoder_layers)
    t = lambda k: torch.from_numpy(np.ascontiguousarray(params[k]))  # noqa: E731

    def load_attn(mha, prefix):
        mha.in_proj_weight.data = torch.cat([t(f"{prefix}.{p}_proj.weight") for p in "qkv"])
        mha.in_proj_bias.data = torch.cat([t(f"{prefix}.{p}_proj.bias") for p in "qkv"])
        mha.out_proj.weight.data, mha.out_proj.bias.data = t(f"{prefix}.out_proj.weight"), t(f"{prefix}.out_proj.bias")

    def load_common(layer, prefix, norms):
        layer.linear1.weight.data, layer.linear1.bias.data = t(f"{prefix}.linear1.weight"), t(f"{prefix}.linear1.bias")
        layer.linear2.weight.data, layer.linear2.bias.data = t(f"{prefix}.linear2.weight"), t(f"{prefix}.linear2.bias")
        for n in norms:
            norm = getattr(layer, n)
            norm.weight.data, norm.bias.data = t(f"{prefix}.{n}.weight"), t(f"{prefix}.{n}.bias")

    for i, layer in enumerate(enc.layers):
        load_attn(layer.self_attn, f"encoder.layers.{i}.self_attn")
        load_common(layer, f"encoder.layers.{i}", ("norm1", "norm2"))
    for i, layer in enumerate(dec.layers):
        load_attn(layer.self_attn, f"decoder.layers.{i}.self_attn")
        load_attn(layer.multihead_attn, f"decoder.layers.{i}.cross_attn")
        load_common(layer, f"decoder.layers.{i}", ("norm1", "norm2", "norm3"))
    emb = t("encoder.embed.weight")
    pe = torch.from_numpy(qf_pe(cfg))

    @torch.inference_mode()
    def forward(src, tgt):
        scale = math.sqrt(d)
        x = emb[src] * scale + pe[: src.shape[1]]
        y = emb[tgt] * scale + pe[: tgt.shape[1]]
        causal = torch.triu(torch.full((tgt.shape[1], tgt.shape[1]), float("-inf")), diagonal=1)
        src_pad, tgt_pad = src == cfg.pad_id, tgt == cfg.pad_id
        memory = enc(x, src_key_padding_mask=src_pad)
        out = dec(y, memory, tgt_mask=causal, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
        return out @ emb.T

    enc.eval(), dec.eval()
    return forward


def qf_pe(cfg):
    from qkvflow.kernels import sinusoidal_table
    return sinusoidal_table(cfg.max_positions, cfg.d_model, "sinusoidal", np.float32)


def main() -> None:
    cfg = qf.preset("vaswani-base")
    g = qf.trace(qf.load_model(cfg))
    params = qf.init_params(g, seed=0, dtype="float32")
    rng = np.random.default_rng(0)
    src = rng.integers(3, cfg.vocab, (BATCH, SRC))
    tgt = rng.integers(3, cfg.vocab, (BATCH, TGT))
    feeds = {"src_ids": src, "tgt_ids": tgt}
    checked = qf.Executor(g, params, dtype="float32", check=True)
    unchecked = qf.Executor(g, params, dtype="float32", check=False)
    results = {"model": "vaswani-base", "dtype": "float32", "batch": BATCH, "src": SRC, "tgt": TGT}

    # Interleave checked and unchecked runs so machine noise hits both alike.
    on, off = [], []
    checked.run(feeds), unchecked.run(feeds)
    for _ in range(REPEATS):
        for ex, bucket in ((checked, on), (unchecked, off)):
            start = time.perf_counter()
            ex.run(feeds)
            bucket.append(time.perf_counter() - start)
    results["qkvflow_forward_s"] = round(statistics.median(on), 4)
    results["qkvflow_forward_unchecked_s"] = round(statistics.median(off), 4)
    # Best-of is the robust estimate of a fixed extra cost on a noisy machine.
    results["check_overhead_best_of"] = round(min(on) / min(off) - 1, 4)
    results["check_overhead_median"] = round(statistics.median(on) / statistics.median(off) - 1, 4)

    try:
        import torch
    except ImportError:
        results["torch"] = "not installed (pip install torch==2.13.0)"
    else:
        fwd = torch_model(params, cfg)
        ts, tt = torch.from_numpy(src), torch.from_numpy(tgt)
        ours = checked.run(feeds)["logits"]
        theirs = fwd(ts, tt).numpy()
        results["torch_version"] = torch.__version__
        results["torch_threads"] = torch.get_num_threads()
        results["max_abs_diff_vs_torch"] = float(np.abs(ours - theirs).max())
        results["torch_forward_s"] = round(median_time(lambda: fwd(ts, tt)), 4)
        results["qkvflow_vs_torch"] = round(results["qkvflow_forward_s"] / results["torch_forward_s"], 3)
    results["command"] = "python benchmarks/forward.py"
    out = HERE / "results" / "forward.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Greedy generation: 64 new tokens, batch 1, 32 source tokens, a Marian-sized model, float32.

Marian-sized: 6+6 layers, d_model 512, 8 heads, d_ff 2048, vocab 32000, random
weights (transformers' MarianMTModel from a config, saved and imported with
``qkvflow import``). Peer: transformers' ``generate`` with its KV cache on the
same weights, timed interleaved in one process with a 0.2 s pause between
libraries. Reports medians with min-max, the ratio, ms per token against the
weight-streaming floor (one decoder step reads the decoder's float32 weights
but the cross-attention K/V projections, and the output projection: a
matrix-vector product over that many bytes, timed here), what runtime checks
cost per step, and the share of CPU other processes took meanwhile.

    python benchmarks/generate.py     # writes benchmarks/results/generate.json (needs torch, transformers)
"""

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import qkvflow as qf
from timing import OthersCpu, interleaved, stats

HERE = Path(__file__).resolve().parent
NEW, SRC, REPEATS = 64, 32, 9


def main() -> None:
    import torch
    import transformers as T
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    config = T.MarianConfig(vocab_size=32000, d_model=512, encoder_layers=6, decoder_layers=6,
                            encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                            decoder_ffn_dim=2048, max_position_embeddings=512, pad_token_id=31999,
                            decoder_start_token_id=31999, eos_token_id=0, activation_function="swish",
                            scale_embedding=True)
    hf = T.MarianMTModel(config).eval()
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    model = qf.load_model(f"hf:{folder}")
    g = qf.trace(model)
    params = {k: v.astype(np.float32) for k, v in model.params.items()}
    src = np.random.default_rng(0).integers(3, 31000, size=(1, SRC))
    src_t = torch.from_numpy(src)

    def ours(check=True):
        return qf.generate(g, params, src, max_new_tokens=NEW, dtype="float32", check=check).ids

    def theirs():
        with torch.no_grad():
            return hf.generate(src_t, attention_mask=torch.ones_like(src_t), max_new_tokens=NEW, num_beams=1,
                               do_sample=False, min_new_tokens=0, forced_eos_token_id=None).numpy()

    a, b = ours(), theirs()
    assert a.shape == b.shape == (1, NEW + 1), (a.shape, b.shape)  # both write all 64 tokens
    others = OthersCpu()
    runs = interleaved({"qkvflow": ours, "transformers": theirs, "qkvflow_unchecked": lambda: ours(check=False)},
                       REPEATS, warm_up=False)  # warmed up above
    share = others.share()

    # What one decoder step must read: the decoder's weights but the cross-attention K/V
    # projections (computed once per source), and the output projection (tied to the embedding).
    step_bytes = sum(v.nbytes for k, v in params.items() if k.startswith("decoder.")
                     and not any(f"cross_attn.{p}_proj" in k for p in "kv"))
    step_bytes += params["encoder.embed.weight"].nbytes
    # Read as NumPy reads a weight fastest: one matrix-vector product over that many bytes,
    # BLAS on every core (a sum over them runs on one core and was slower than a step).
    blob = np.ones((step_bytes // 4 // 512, 512), dtype=np.float32)
    vector = np.ones(512, dtype=np.float32)
    reads = []
    for _ in range(20):
        t = time.perf_counter()
        blob @ vector
        reads.append(time.perf_counter() - t)
    floor_ms = statistics.median(reads) * 1e3

    q, t = statistics.median(runs["qkvflow"]), statistics.median(runs["transformers"])
    result = {
        "workload": f"greedy {NEW} new tokens, batch 1, {SRC} source tokens, Marian-sized (6+6, d_model 512, "
                    "8 heads, d_ff 2048, vocab 32000), float32, random weights",
        "qkvflow": stats(runs["qkvflow"]), "qkvflow_unchecked": stats(runs["qkvflow_unchecked"]),
        "transformers_generate": stats(runs["transformers"]),
        "ratio_qkvflow_over_transformers": round(q / t, 3),
        "qkvflow_ms_per_token": round(q / NEW * 1e3, 2),
        "transformers_ms_per_token": round(t / NEW * 1e3, 2),
        "weights_read_per_step_mb": round(step_bytes / 2**20, 1),
        "weight_streaming_floor_ms_per_token": round(floor_ms, 2),
        "qkvflow_over_floor": round(q / NEW * 1e3 / floor_ms, 2),
        "check_overhead_median": round(q / statistics.median(runs["qkvflow_unchecked"]) - 1, 4),
        "others_cpu_share": share,
        "same_tokens": bool((a == b).all()),
        "command": "python benchmarks/generate.py",
    }
    print(json.dumps(result, indent=2))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "generate.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

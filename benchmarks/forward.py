"""Forward pass of vaswani-base in float32, batch 8, 64 source + 64 target tokens.

Peer: torch's CPU eager forward of the same model with the same weights
(nn.TransformerEncoder/Decoder layers via qkvflow.interop.torch_export), when
torch is installed. Also measures what runtime checking costs (check=True
vs check=False, interleaved). Reports medians and ratios.

    python benchmarks/forward.py      # writes benchmarks/results/forward.json
"""

import json
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
        from qkvflow.interop.torch_export import to_torch
        fwd = to_torch(cfg, params)
        ts, tt = torch.from_numpy(src), torch.from_numpy(tgt)
        ours = checked.run(feeds)["logits"]
        theirs = fwd(ts, tt)
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

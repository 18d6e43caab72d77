"""Forward passes against torch's CPU eager forward of the same model and weights.

Workloads: vaswani-base float32 batch 8 x 64+64 tokens (also float64), and batch 1 x 16+16
through the public ``qf.forward`` (a new executor per call, as users call it) on tiny and
vaswani-base. Peer: torch.nn.TransformerEncoder/Decoder layers carrying the same weights
(``qkvflow.interop.torch_export``). Contenders are interleaved with a 0.2 s pause before
each sample; checked and unchecked runs are interleaved too, one executor with its checks
turned on and off (two executors of the same weights differed by up to 5 % here,
measured A/A in one process), and so is the same executor running the batch as one part
(``workers=1``) where by default it runs a part on each core (run/parallel.py). A second
peer at float32 batch 8: the same model written by hand in plain NumPy as lean as NumPy
allows (``plain_numpy.py``), the floor for a forward in NumPy run as one stream. Also
three forwards back to back, of qkvflow and of torch, timed per forward, as a loop over
batches calls them: the pause before every sample spares a contender what the one before
left spinning (BLAS or OpenMP threads), which a library's own next forward does not
escape. Also: the share of NumPy's sgemm peak the batch-8 forward's GEMMs reach, the peak
being a 2048^3 product timed interleaved with the forwards (median over median, and best
over best), and the same share of the forward's matrix products alone, one after the other,
on the operands a run gives them (the ceiling for a forward run as one stream: its non-GEMM
work takes the rest); a forward's peak memory against the largest set of values it must
keep at once; the CPU share other processes took. Ratios to torch and runtime checks' cost
are also given paired: the median over rounds of one contender's sample over the other's in
the same round; the checks' cost also timed alone (``shape_checks_ms``) over the checked
run's median, which the machine's drift barely moves.
Prints medians with min-max, writes benchmarks/results/forward.json.

    python benchmarks/forward.py      # needs torch (pip install torch==2.13.0)
"""

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

import qkvflow as qf
from plain_numpy import PlainNumpyForward
from timing import OthersCpu, interleaved, paired, stats

HERE = Path(__file__).resolve().parent


def gemm_flops(cfg, batch: int, src: int, tgt: int) -> float:
    """Floating-point operations of the forward's matrix products (projections and attention)."""
    d, f, v, h = cfg.d_model, cfg.d_ff, cfg.vocab, cfg.d_model
    enc = cfg.encoder_layers * (batch * src * (4 * d * d + 2 * d * f) + 2 * batch * src * src * h)
    dec = cfg.decoder_layers * (batch * tgt * (4 * d * d + 2 * d * d + 2 * d * f) + 2 * batch * tgt * tgt * h
                                + 2 * batch * tgt * src * h) + cfg.decoder_layers * batch * src * 2 * d * d
    return 2.0 * (enc + dec + batch * tgt * d * v)


PEAK_N = 2048  # the sgemm peak: one (PEAK_N, PEAK_N) x (PEAK_N, PEAK_N) product
BACK_TO_BACK = 3  # forwards in a row, timed as one sample


def repeated(fn, n: int):
    """One sample: ``fn`` called ``n`` times back to back."""
    def run():
        for _ in range(n):
            fn()
    return run


def products_only(g, ex, feeds):
    """The forward's matrix products alone, nothing else: each projection (stacked as a run of
    this size stacks them) and each attention product, on the operands the run gives them
    (its captured values, in their layouts), each in the form its kernel multiplies it. What
    a forward of this model in NumPy takes at the least, its non-GEMM work aside: the ceiling
    of its share of the sgemm peak."""
    from qkvflow.ir.graph import param_path
    from qkvflow.run.plan import fast_plan
    acts = ex.run(feeds, capture=True)["activations"]  # stacks the weights as a run of this size does
    pairs = []
    for node, op, args, attrs, *_ in fast_plan(g, stacked=True)[0]:
        # each product in the form its kernel computes it at 64+ tokens (kernels.py)
        if op in ("linear", "unembed"):
            x = acts[args[0]]
            x = x.reshape(-1, x.shape[-1])
            w = ex.params[attrs["tied_to"] if "tied_to" in attrs else param_path(node, "weight")]
            pairs.append((w, x.T) if op == "linear" else (x, w.T))  # W @ x.T; the logits x @ W.T
        elif op == "scores":
            q, k = acts[args[0]], acts[args[1]]
            pairs.append((q, np.swapaxes(k, -1, -2)))
        elif op == "attend":
            p, v = acts[args[0]], acts[args[1]]
            if v.strides[-2] >= v.strides[-1]:
                pairs.append((p, v))
            else:  # v feature by feature: (v.T @ p.T).T
                pairs.append((np.swapaxes(v, -1, -2), np.swapaxes(p, -1, -2)))
    del acts

    def run():
        for a, b in pairs:
            a @ b
    return run


def shape_checks_ms(ex, feeds) -> float:
    """Milliseconds a checked run of ``ex`` spends checking the named shapes of what it
    produces, the work checks add to a run once every kernel signature has been verified:
    the checks one run makes are recorded, then timed alone (median of 50). Microseconds
    timed back to back, which the machine's drift barely moves, to set beside the run."""
    from qkvflow.run.execute import Executor
    made = []
    check = Executor._check_shape
    Executor._check_shape = staticmethod(lambda *args: made.append(args) or check(*args))
    try:
        ex.check = True
        ex.run(feeds)
    finally:
        Executor._check_shape = staticmethod(check)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        for args in made:
            check(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def memory(g, params, feeds, dtype: str) -> dict:
    """Peak bytes a forward allocates (tracemalloc sees NumPy's buffers; parameters are
    cast before) against the largest set of values that must be alive at once: after each
    step, every value still to be read (the executor's last-use plan)."""
    import tracemalloc

    from qkvflow.run.plan import frees
    ex = qf.Executor(g, params, dtype=dtype)
    owners = {}  # node -> (id, bytes) of the buffer its value lives in (a view shares its base's)
    for n, a in ex.run(feeds, capture=True)["activations"].items():
        base = a
        while isinstance(base.base, np.ndarray):
            base = base.base
        owners[n] = (id(base), base.nbytes)
    alive: dict = {}  # buffer id -> (bytes, how many alive values use it)
    needed = 0
    for (node, *_), freed in zip(ex.plan, frees(g, ex.plan)):
        if node in owners:
            key, size = owners[node]
            alive[key] = (size, alive.get(key, (size, 0))[1] + 1)
        needed = max(needed, sum(size for size, _ in alive.values()))
        for u in freed:
            if u in owners:
                key, size = owners[u]
                left = alive[key][1] - 1
                alive[key] = (size, left)
                if not left:
                    del alive[key]
    ex.run(feeds)  # the first run of 64+ tokens stacks the projections' weights, once
    tracemalloc.start()
    ex.run(feeds)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"peak_mb": round(peak / 2**20, 1), "largest_live_set_mb": round(needed / 2**20, 1),
            "peak_over_live_set": round(peak / needed, 2)}


def main() -> None:
    import torch
    from qkvflow.interop.torch_export import to_torch
    torch.set_num_threads(os.cpu_count())
    results: dict = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}
    others = OthersCpu()

    cfg = qf.preset("vaswani-base")
    g = qf.trace(qf.load_model(cfg))
    rng = np.random.default_rng(0)
    for dtype, repeats in (("float32", 21), ("float64", 7)):
        params = qf.init_params(g, seed=0, dtype=dtype)
        src, tgt = rng.integers(3, cfg.vocab, (8, 64)), rng.integers(3, cfg.vocab, (8, 64))
        feeds = {"src_ids": src, "tgt_ids": tgt}
        ex = qf.Executor(g, params, dtype=dtype, check=True)
        fwd = to_torch(cfg, params)
        ts, tt = torch.from_numpy(src), torch.from_numpy(tgt)
        got = ex.run(feeds)["logits"]

        def qkvflow(check: bool, workers=None):
            def run():
                ex.check, ex.workers = check, workers
                ex.run(feeds)
            return run
        contenders = {"qkvflow": qkvflow(True), "torch": lambda: fwd(ts, tt), "qkvflow_unchecked": qkvflow(False),
                      "qkvflow_one_part": qkvflow(True, workers=1)}
        entry = results[f"vaswani-base b8 64+64 {dtype}"] = {
            "max_abs_diff_vs_torch": float(np.abs(got - fwd(ts, tt)).max())}
        if dtype == "float32":
            plain = PlainNumpyForward(cfg, params)
            entry["max_abs_diff_vs_plain_numpy"] = float(np.abs(got - plain(src, tgt)).max())
            a = rng.random((PEAK_N, PEAK_N), dtype=np.float32)
            contenders.update({"plain_numpy": lambda: plain(src, tgt), "sgemm_2048": lambda: a @ a,
                               "products_only": products_only(g, ex, feeds),
                               # BACK_TO_BACK forwards in a row, as a loop over batches calls them: what
                               # a library's threads leave spinning falls on its own next forward
                               "qkvflow_back_to_back": repeated(qkvflow(True), BACK_TO_BACK),
                               "torch_back_to_back": repeated(lambda: fwd(ts, tt), BACK_TO_BACK)})
        runs = interleaved(contenders, repeats)
        for name in ("qkvflow_back_to_back", "torch_back_to_back"):
            if name in runs:
                runs[name] = [x / BACK_TO_BACK for x in runs[name]]  # seconds per forward
        ex.check, ex.workers = True, None  # as the "qkvflow" contender runs: the last round may have left others
        q, t = statistics.median(runs["qkvflow"]), statistics.median(runs["torch"])
        entry.update({name: stats(xs) for name, xs in runs.items()})
        entry.update({"ratio_qkvflow_over_torch": round(q / t, 3),
                      "ratio_qkvflow_over_torch_best_over_best": round(min(runs["qkvflow"]) / min(runs["torch"]), 3),
                      "ratio_qkvflow_over_torch_paired": paired(runs["qkvflow"], runs["torch"]),
                      "check_overhead_median": round(q / statistics.median(runs["qkvflow_unchecked"]) - 1, 4),
                      "check_overhead_paired": round(paired(runs["qkvflow"], runs["qkvflow_unchecked"]) - 1, 3),
                      "check_overhead_timed_alone": round(shape_checks_ms(ex, feeds) / 1e3 / q, 5),
                      "parts": [list(p) for p in ex._parts(dict(g.graph["dims"], batch=8, src=64, tgt=64))],
                      "ratio_parts_over_one_part_paired": paired(runs["qkvflow"], runs["qkvflow_one_part"])})
        if dtype == "float32":
            flops, peak_flops = gemm_flops(cfg, 8, 64, 64), 2 * PEAK_N ** 3
            peak, best_peak = peak_flops / statistics.median(runs["sgemm_2048"]), peak_flops / min(runs["sgemm_2048"])
            results["numpy_sgemm_peak_gflops"] = {"median": round(peak / 1e9, 1), "best": round(best_peak / 1e9, 1)}
            entry["ratio_qkvflow_over_plain_numpy"] = round(q / statistics.median(runs["plain_numpy"]), 3)
            entry["ratio_qkvflow_over_torch_back_to_back"] = round(
                statistics.median(runs["qkvflow_back_to_back"]) / statistics.median(runs["torch_back_to_back"]), 3)
            entry["ratio_qkvflow_over_torch_back_to_back_paired"] = paired(runs["qkvflow_back_to_back"],
                                                                          runs["torch_back_to_back"])
            entry["ratio_qkvflow_over_plain_numpy_best_over_best"] = round(
                min(runs["qkvflow"]) / min(runs["plain_numpy"]), 3)
            for name in ("qkvflow", "qkvflow_one_part", "torch", "plain_numpy", "products_only"):
                entry[f"share_of_sgemm_peak_{name}"] = {
                    "median_over_median": round(flops / statistics.median(runs[name]) / peak, 3),
                    "best_over_best": round(flops / min(runs[name]) / best_peak, 3)}
            entry["products_share_of_qkvflow_time"] = {  # the rest is the forward's non-GEMM work
                "median_over_median": round(statistics.median(runs["products_only"]) / q, 3),
                "best_over_best": round(min(runs["products_only"]) / min(runs["qkvflow"]), 3)}
        entry["memory"] = memory(g, params, feeds, dtype)

    for name in ("tiny", "vaswani-base"):
        cfg1 = qf.preset(name)
        g1 = qf.trace(qf.load_model(cfg1))
        params = qf.init_params(g1, seed=0, dtype="float32")
        src, tgt = rng.integers(3, cfg1.vocab, (1, 16)), rng.integers(3, cfg1.vocab, (1, 16))
        fwd = to_torch(cfg1, params)
        ts, tt = torch.from_numpy(src), torch.from_numpy(tgt)
        calls = 50 if name == "tiny" else 5  # one sample is this many calls back to back (~0.1 s)
        runs = interleaved({
            "qf.forward": repeated(lambda: qf.forward(g1, params, src, tgt, dtype="float32"), calls),
            "torch": repeated(lambda: fwd(ts, tt), calls),
            "qf.forward_unchecked": repeated(lambda: qf.forward(g1, params, src, tgt, dtype="float32",
                                                                  check=False), calls)}, 21)
        runs = {k: [x / calls for x in v] for k, v in runs.items()}  # seconds per call
        q, t = statistics.median(runs["qf.forward"]), statistics.median(runs["torch"])
        results[f"{name} b1 16+16 float32 (qf.forward)"] = {
            **{k: stats(v) for k, v in runs.items()}, "ratio_qkvflow_over_torch": round(q / t, 3),
            "ratio_qkvflow_over_torch_paired": paired(runs["qf.forward"], runs["torch"]),
            "check_overhead_median": round(q / statistics.median(runs["qf.forward_unchecked"]) - 1, 4),
            "check_overhead_paired": round(paired(runs["qf.forward"], runs["qf.forward_unchecked"]) - 1, 3),
            "check_overhead_timed_alone": round(
                shape_checks_ms(qf.Executor(g1, params, dtype="float32"), {"src_ids": src, "tgt_ids": tgt}) / 1e3 / q, 5)}

    results["others_cpu_share"] = others.share()
    results["command"] = "python benchmarks/forward.py"
    out = HERE / "results" / "forward.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Rendering to SVG: every preset at block and op level, and 24+24 layers, whole processes.

Each figure is the median of 3 runs of ``qkvflow render MODEL -o x.svg --level L`` in a new
process; the peer in the same run is ``qkvflow presets`` (the start-up every command pays).

    python benchmarks/render.py     # writes benchmarks/results/render.json
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import qkvflow as qf

HERE = Path(__file__).resolve().parent


def timed(args: list) -> float:
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qkvflow", *args], check=True, capture_output=True)
        samples.append(time.perf_counter() - start)
    return round(statistics.median(samples), 3)


def main() -> None:
    out = tempfile.mkdtemp()
    deep = Path(out) / "deep.toml"
    deep.write_text('preset = "vaswani-base"\nname = "deep-24+24"\nencoder_layers = 24\ndecoder_layers = 24\n')
    results = {"startup_s (qkvflow presets)": timed(["presets"])}
    for model in [*qf.PRESETS, str(deep)]:
        for level in ("block", "op"):
            name = "24+24 layers" if model == str(deep) else model
            results[f"{name} {level}"] = timed(["render", model, "-o", f"{out}/x.svg", "--level", level])
    results["slowest_s"] = max(v for k, v in results.items() if k != "startup_s (qkvflow presets)")
    results["command"] = "python benchmarks/render.py"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "render.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

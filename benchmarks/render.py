"""Rendering to SVG: every preset at layer, block and op level, and 24+24 layers, whole processes.

Each contender is ``qkvflow render MODEL -o x.svg --level L`` in a new process, 3 runs
interleaved in a random order per round with a 0.2 s pause; the peer in the same run is
``qkvflow presets`` (the start-up every command pays). Prints medians with min-max and
the CPU share other processes took.

    python benchmarks/render.py     # writes benchmarks/results/render.json
"""

import json
import sys
import tempfile
from pathlib import Path

import qkvflow as qf
from timing import OthersCpu, interleaved, process, stats

HERE = Path(__file__).resolve().parent


def main() -> None:
    out = tempfile.mkdtemp()
    deep = Path(out) / "deep.toml"
    deep.write_text('preset = "vaswani-base"\nname = "deep-24+24"\nencoder_layers = 24\ndecoder_layers = 24\n')
    qkvflow = [sys.executable, "-m", "qkvflow"]
    contenders = {"startup (qkvflow presets)": process([*qkvflow, "presets"])}
    for model in [*qf.PRESETS, str(deep)]:
        for level in ("layer", "block", "op"):
            name = "24+24 layers" if model == str(deep) else model
            contenders[f"{name} {level}"] = process([*qkvflow, "render", model, "-o", f"{out}/x.svg", "--level", level])
    others = OthersCpu()
    runs = interleaved(contenders, 3, warm_up=False)
    results = {name: stats(xs) for name, xs in runs.items()}
    results["slowest_median_s"] = max(v["median_s"] for k, v in results.items() if not k.startswith("startup"))
    results["others_cpu_share"] = others.share()
    results["command"] = "python benchmarks/render.py"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "render.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Cold start of `qkvflow check`: a new process each time, imports included.

Peer: the same interpreter importing only numpy and networkx (the floor any
networkx-based checker pays); also that import followed by ``gc.freeze()``,
which spares the exit's full collection as qkvflow's CLI does (a stricter floor).
Contenders are interleaved in a random order per round with a 0.2 s pause; qkvflow's
bytecode is compiled first, as an installed package's is. Reports medians with
min-max, the ratio to the peer, how the check scales with depth (6+6 ... 48+48
layers) and the CPU share other processes took.

    python benchmarks/cold_start.py            # writes benchmarks/results/cold_start.json
"""

import compileall
import json
import statistics
import sys
import tempfile
from pathlib import Path

import qkvflow
from timing import OthersCpu, interleaved, process, ratio, stats

HERE = Path(__file__).resolve().parent
REPEATS = 15


def main() -> None:
    compileall.compile_dir(Path(qkvflow.__file__).parent, quiet=1)
    py = sys.executable
    others = OthersCpu()
    with tempfile.TemporaryDirectory() as tmp:
        contenders = {"import numpy, networkx": process([py, "-c", "import numpy, networkx"]),
                      # the same with the exit's full collection skipped, as qkvflow's CLI does
                      "import numpy, networkx; gc.freeze()": process(
                          [py, "-c", "import gc, numpy, networkx; gc.freeze()"]),
                      "check vaswani-base": process([py, "-m", "qkvflow", "check", "vaswani-base"])}
        for layers in (6, 12, 24, 48):
            toml = Path(tmp) / f"deep{layers}.toml"
            toml.write_text(f'preset = "vaswani-base"\nencoder_layers = {layers}\ndecoder_layers = {layers}\n')
            contenders[f"check {layers}+{layers} (TOML)"] = process([py, "-m", "qkvflow", "check", str(toml)])
        runs = interleaved(contenders, REPEATS)
    peer, check = runs["import numpy, networkx"], runs["check vaswani-base"]
    results = {
        **{name: stats(xs) for name, xs in runs.items()},
        "check_vaswani_base_vs_peer": ratio(check, peer),
        "check_vaswani_base_vs_frozen_peer": ratio(check, runs["import numpy, networkx; gc.freeze()"]),
        "check_48+48_vs_vaswani_base": ratio(runs["check 48+48 (TOML)"], check),
        "marginal_s_per_layer": round((statistics.median(runs["check 48+48 (TOML)"])
                                       - statistics.median(runs["check 6+6 (TOML)"])) / (96 - 12), 4),
        "others_cpu_share": others.share(),
        "command": "python benchmarks/cold_start.py",
    }
    out = HERE / "results" / "cold_start.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

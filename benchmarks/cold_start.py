"""Cold start of `qkvflow check`: a new process each time, imports included.

Peer: the same interpreter importing only numpy and networkx (the floor any
networkx-based checker pays). Reports medians and the ratio to the peer,
and how the check scales with depth (6+6 ... 48+48 layers).

    python benchmarks/cold_start.py            # writes benchmarks/results/cold_start.json
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = 9


def timed(cmd: list[str]) -> float:
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    py = sys.executable
    peer = timed([py, "-c", "import numpy, networkx"])
    results = {"peer_import_numpy_networkx_s": round(peer, 3)}
    check = timed([py, "-m", "qkvflow", "check", "vaswani-base"])
    results["check_vaswani_base_s"] = round(check, 3)
    results["check_vaswani_base_vs_peer"] = round(check / peer, 2)
    depth = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (6, 12, 24, 48):
            toml = Path(tmp) / f"deep{layers}.toml"
            toml.write_text(f'preset = "vaswani-base"\nencoder_layers = {layers}\ndecoder_layers = {layers}\n')
            depth[f"{layers}+{layers}"] = round(timed([py, "-m", "qkvflow", "check", str(toml)]), 3)
    results["check_by_depth_s"] = depth
    per_layer = (depth["48+48"] - depth["6+6"]) / (96 - 12)
    results["marginal_s_per_layer"] = round(per_layer, 4)
    results["command"] = "python benchmarks/cold_start.py"
    out = HERE / "results" / "cold_start.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

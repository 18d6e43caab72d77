"""What every benchmark here shares: contenders interleaved in a random order per round with a
pause between them, medians with min-max, and the CPU share other processes took."""

import os
import random
import statistics
import subprocess
import time

PAUSE = 0.2  # seconds between contenders: a library's threads may still spin after its run


def interleaved(contenders: dict, repeats: int, *, warm_up: bool = True) -> dict:
    """name -> seconds of each of ``repeats`` calls of that contender. Each round calls every
    contender once, in a new seeded random order: no contender always follows the same one
    (a fixed cyclic order made the one after torch pay for what torch left behind, ~20 %)."""
    if warm_up:
        for fn in contenders.values():
            fn()
    samples = {name: [] for name in contenders}
    names = list(contenders)
    shuffler = random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(names)
        for name in list(names):
            time.sleep(PAUSE)
            start = time.perf_counter()
            contenders[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def process(cmd: list):
    """A contender that runs ``cmd`` as a whole new process (its output discarded)."""
    return lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def stats(xs: list) -> dict:
    return {"median_s": round(statistics.median(xs), 4), "min_s": round(min(xs), 4), "max_s": round(max(xs), 4)}


def ratio(a: list, b: list) -> float:
    """Median of a over median of b."""
    return round(statistics.median(a) / statistics.median(b), 3)


def paired(a: list, b: list) -> float:
    """Median over rounds of a's sample over b's of the same round (from :func:`interleaved`):
    a slow spell of the machine slows both, so this ratio drifts less than one of medians."""
    return round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 3)


class OthersCpu:
    """The CPU share every other process took from creation to :meth:`share`, as a fraction
    of the machine (this process and its children excluded)."""

    def __init__(self) -> None:
        self.start = (_busy_ticks(), _own_cpu(), time.perf_counter())

    def share(self) -> float:
        ticks, own, began = self.start
        total = (_busy_ticks() - ticks) / os.sysconf("SC_CLK_TCK")
        wall = time.perf_counter() - began
        return round(max(0.0, (total - (_own_cpu() - own)) / (wall * os.cpu_count())), 3)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _busy_ticks() -> int:
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields[:3]) + sum(fields[5:8])  # user nice system (+ irq softirq steal), in ticks

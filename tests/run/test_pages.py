"""The logits' memory in small pages: NumPy's process-wide switch is put back as it was,
whatever happens and from threads at once, and on Linux the logits' mapping really is not
marked for huge pages where np.empty's is. The mappings are read in a new process whose
glibc maps every array of 4 MiB and more anew (MALLOC_MMAP_THRESHOLD_): in a long-lived
one a large array may reuse memory an earlier array had marked."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qkvflow.run import pages
from qkvflow.run.pages import empty_in_small_pages

needs_switch = pytest.mark.skipif(pages._set_madvise_hugepage is None, reason="this NumPy has no madvise switch")
needs_huge_pages = pytest.mark.skipif(
    pages._set_madvise_hugepage is None or not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    or not Path("/proc/self/smaps").exists(), reason="Linux with huge pages and a NumPy with the switch only")


def switch_state() -> bool:
    was = pages._set_madvise_hugepage(True)
    pages._set_madvise_hugepage(was)
    return was


@pytest.fixture
def restore_switch():
    was = switch_state()
    yield
    pages._set_madvise_hugepage(was)


@needs_switch
@pytest.mark.parametrize("state", [True, False])
def test_the_switch_is_put_back_as_it_was(state, restore_switch):
    pages._set_madvise_hugepage(state)
    a = empty_in_small_pages((3, 5, 7), np.float32)
    assert a.shape == (3, 5, 7) and a.dtype == np.float32 and a.flags.writeable and a.flags.c_contiguous
    assert switch_state() is state
    with pytest.raises(ValueError):
        empty_in_small_pages((-1, 4), np.float64)  # np.empty's own error, the switch back even so
    assert switch_state() is state


def test_threads_at_once_put_the_switch_back(monkeypatch):
    # A switch slow to answer: threads turning it off and back unserialized read each
    # other's "off" as what to put back, and the last to put its back leaves it off.
    state = [True]

    def slow_switch(on: bool) -> bool:
        was, state[0] = state[0], on
        time.sleep(0.001)
        return was
    monkeypatch.setattr(pages, "_set_madvise_hugepage", slow_switch)
    barrier = threading.Barrier(4)

    def many():
        barrier.wait()
        for _ in range(10):
            empty_in_small_pages((4, 8), np.float32)
    threads = [threading.Thread(target=many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state == [True]


# Run in a new process: prints, for each array, whether the mapping holding its middle byte
# is marked MADV_HUGEPAGE ("hg"; NumPy marks an array's whole pages, not the one its first
# byte shares with what lies before).
MAPPINGS = r'''
import dataclasses, sys
from pathlib import Path
import numpy as np
import qkvflow as qf
from qkvflow.run import execute, pages, parallel

def marked(a):
    address, inside = a.ctypes.data + a.nbytes // 2, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    raise SystemExit("no mapping holds the array")

pages._set_madvise_hugepage(True)
parallel.MIN_PART_ELEMENTS = 0          # a small model splits too
execute.usable_cores = lambda: 2        # on any machine
seen = []
run_parts = execute.run_parts
execute.run_parts = lambda fn, parts, then=None: seen.append(parts) or run_parts(fn, parts, then)
g = qf.trace(qf.load_model(dataclasses.replace(qf.preset("tiny"), vocab=24007)))
p = qf.init_params(g, seed=3, dtype="float32")
rng = np.random.default_rng(5)
feeds = {"src_ids": rng.integers(3, 24007, (6, 60)), "tgt_ids": rng.integers(3, 24007, (6, 64))}
split = qf.Executor(g, p, dtype="float32", workers=2).run(feeds)["logits"]   # 6 x 64 x 24007: 37 MB
one = qf.Executor(g, p, dtype="float32", workers=1).run(feeds)["logits"]
few = qf.forward(g, p, feeds["src_ids"][:1], feeds["tgt_ids"][:1, :60], dtype="float32")["logits"]  # 60 tokens: 5.8 MB
assert seen == [[(0, 3), (3, 6)]], seen
assert (split == one).all() and split.flags.c_contiguous and one.flags.c_contiguous
print(marked(np.empty((3, 1024, 1031), np.float32)), marked(pages.empty_in_small_pages((3, 1024, 1031), np.float32)),
      marked(split), marked(one), marked(few))
'''


@needs_huge_pages
def test_numpy_marks_a_large_array_for_huge_pages_and_no_logits_are():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4 << 20))
    done = subprocess.run([sys.executable, "-c", MAPPINGS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    plain, *ours = done.stdout.split()
    assert plain == "True"  # what np.empty of 12 MB gets here
    assert ours == ["False"] * 4  # empty_in_small_pages; the logits split, in one part, of a few tokens

"""The logits' memory in small pages: NumPy's process-wide switch is put back as it was, and
on Linux the mapping really is not marked for huge pages where np.empty's is (for arrays of
over 32 MiB, which glibc maps anew: a smaller one may reuse memory an earlier array had
marked)."""

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

import qkvflow as qf
from qkvflow.run import pages, parallel
from qkvflow.run.pages import empty_in_small_pages

needs_switch = pytest.mark.skipif(pages._set_madvise_hugepage is None, reason="this NumPy has no madvise switch")


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


@needs_switch
def test_threads_at_once_leave_the_switch_on(restore_switch):
    pages._set_madvise_hugepage(True)
    barrier = threading.Barrier(4)

    def many():
        barrier.wait()
        for _ in range(200):
            empty_in_small_pages((64, 1024), np.float32)
    threads = [threading.Thread(target=many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert switch_state() is True


def _huge_page_flag(a: np.ndarray) -> bool:
    """Whether the mapping holding ``a``'s middle byte is marked MADV_HUGEPAGE ("hg"); NumPy
    marks the array's whole pages, not the one its first byte shares with what is before."""
    address = a.ctypes.data + a.nbytes // 2
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    raise AssertionError("no mapping holds the array")


thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@needs_switch
@pytest.mark.skipif(not thp.exists() or not Path("/proc/self/smaps").exists(), reason="Linux with huge pages only")
def test_numpy_marks_a_large_array_for_huge_pages_and_this_one_is_not(restore_switch):
    pages._set_madvise_hugepage(True)
    big = (5, 2048, 1031)  # 42 MB of float32: over glibc's 32 MiB, from which it maps memory anew
    assert _huge_page_flag(np.empty(big, np.float32))  # what a plain allocation gets here
    assert not _huge_page_flag(empty_in_small_pages(big, np.float32))


@needs_switch
@pytest.mark.skipif(not thp.exists() or not Path("/proc/self/smaps").exists(), reason="Linux with huge pages only")
def test_the_logits_of_a_run_split_or_not_are_in_small_pages_and_the_same(monkeypatch, restore_switch):
    pages._set_madvise_hugepage(True)
    monkeypatch.setattr(parallel, "MIN_PART_ELEMENTS", 0)  # a small model splits too
    g = qf.trace(qf.load_model(dataclasses.replace(qf.preset("tiny"), vocab=24007)))
    p = qf.init_params(g, seed=3, dtype="float32")
    rng = np.random.default_rng(5)
    feeds = {"src_ids": rng.integers(3, 24007, (6, 60)), "tgt_ids": rng.integers(3, 24007, (6, 64))}
    seen = []
    run_parts = parallel.run_parts
    monkeypatch.setattr("qkvflow.run.execute.run_parts",
                        lambda fn, parts, then=None: seen.append(parts) or run_parts(fn, parts, then))
    split = qf.Executor(g, p, dtype="float32", workers=2).run(feeds)["logits"]  # 6 x 64 x 24007: 37 MB
    assert seen == [[(0, 3), (3, 6)]]
    one = qf.Executor(g, p, dtype="float32", workers=1).run(feeds)["logits"]
    np.testing.assert_array_equal(split, one)
    for logits in (split, one):
        assert logits.flags.c_contiguous and logits.flags.writeable and not _huge_page_flag(logits)
    assert switch_state() is True

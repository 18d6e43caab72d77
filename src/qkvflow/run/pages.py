"""A large array a run hands back (the logits), its memory in the system's small pages.

From 4 MiB, NumPy asks Linux for huge pages for a new array (madvise). Where Linux then
compacts memory to find them (``/sys/kernel/mm/transparent_hugepage/defrag`` set to
``madvise``, its default), the first writes into the array now and then stall for tens of
milliseconds. The logits are the one large value a run cannot reuse memory for (the
caller keeps them), so each run touches them fresh: vaswani-base at batch 8 x 64+64
(73 MB of float32 logits, a half written on each core) took 69-76 ms for them in 9 runs of
15 and 133-159 ms in the other 6; in small pages 76-85 ms in all 15. Arrays the run frees
keep NumPy's default: their memory is reused, not touched anew.

What this does not promise: memory glibc hands out again (a request the top of its heap
has room for, up to 64 MiB once its threshold for mapping memory anew has grown) keeps the
mark an earlier array gave it; and where Linux gives every region huge pages
(``transparent_hugepage/enabled`` set to ``always``) an unmarked array gets them too,
without the stall to compact memory for them.
"""

import threading

import numpy as np

__all__ = ["empty_in_small_pages"]

try:  # NumPy's switch for its madvise(MADV_HUGEPAGE) on new arrays (NumPy 2; 1.x below)
    from numpy._core.multiarray import _set_madvise_hugepage
except ImportError:  # pragma: no cover - NumPy 1.x
    try:
        from numpy.core.multiarray import _set_madvise_hugepage
    except ImportError:
        _set_madvise_hugepage = None

# The switch is process-wide: one thread of qkvflow's turns it off and back at a time (another
# library's array made meanwhile is not marked either).
_switch = threading.Lock()


def empty_in_small_pages(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose memory NumPy does not ask to be in huge pages."""
    if _set_madvise_hugepage is None:
        return np.empty(shape, dtype)
    with _switch:
        was = None
        try:
            was = _set_madvise_hugepage(False)
            return np.empty(shape, dtype)
        finally:
            if was is not None:
                _set_madvise_hugepage(was)

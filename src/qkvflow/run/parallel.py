"""A batched run as parts of its batch, one part per core.

BLAS spreads a large product over the cores, but NumPy runs everything between the
products (softmax, norms, masks, residual adds, the small per-head products) on one,
so a forward on two cores spent an eighth of its time with one of them idle. The rows
of a batch never meet in a Transformer forward, so the executor can instead run a part
of the batch on each core, every part with BLAS on one thread: then every step of the
forward uses every core.

* :func:`keeps_batch_apart` — the graph computes each row of ``batch`` from that row
  alone, read off the named shapes of its values (``batch`` leads each value it is in)
  and the axes its ops work along;
* :func:`batch_parts` — the parts a run of these sizes is split into: none unless
  each part is work enough, and keeps every value on the side of the kernels' layout
  and stacking threshold its unsplit run has it on, so the parts take the kernels' paths
  of one run (the numbers are one run's, to the last bits BLAS may round otherwise for
  another count of columns, as it does for another batch size);
* :func:`run_parts` — the parts on a thread pool, BLAS on one thread meanwhile.

Once the parts have ended, each writes its rows of the logits into one array of the whole
batch, again one part a core (``execute.Executor._run_parts``): a split run's products
never take BLAS's threads, which spin on a core after a product.
"""

import math
import os
import threading
import weakref

import networkx as nx

from ..ir.dims import factors, size_of
from ..ir.graph import arg_nodes
from ..ir.ops import spec

__all__ = ["batch_parts", "blas_threads", "keeps_batch_apart", "leads_with_batch", "run_parts", "tail_products",
           "usable_cores"]

BATCH = "batch"
# The mean size (elements) of the values a part's computing steps make, from which a run
# is split. Below it the parts' Python work, which one lock (the GIL) serializes, and each
# part reading every weight outweigh the second core. Measured paired on two cores, split
# over unsplit, checks on: vaswani-base parts of 4 x 64 tokens (a mean of 198k) 0.91x;
# 2 x 64 (99k) 1.06x; 4 x 32 (90k) 1.03x; 1 x 128 (117k) 0.97x; tiny 16 x 64 (69k) 1.07x.
MIN_PART_ELEMENTS = 2 ** 17
# The token count at which the kernels change layout and the executor stacks projections
# (kernels._FEW_ROWS, execute._STACK_ROWS): a split keeps the values of those kernels on
# the side of it its unsplit run has them on.
THRESHOLD = 64

_APART: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Ops whose every input and result carries ``batch`` first, each result row computed
# from the same row of its inputs, given the checks of _row_wise below.
_AXIS_OPS = {"softmax", "slice", "pick", "reverse", "cumsum", "roll", "prefix", "repeat", "split_part", "concat",
             "reduce"}
_BROADCASTING = {"elementwise", "add", "mask", "where", "matmul"}
_SHAPE_ONLY = {"causal_mask", "relative_bias"}  # read only the lengths of batched inputs
_NO_AXIS_OPS = {"input", "output", "embed", "positional", "linear", "split_heads", "merge_heads", "scores",
                "mask", "attend", "add", "norm", "activation", "padding_mask", "causal_mask", "unembed",
                "rotary", "relative_bias", "elementwise", "where", "reshape", "transpose", "tril", "triu",
                "fill", "constant", "param"}


def _has_batch(names: tuple) -> bool:
    return any(BATCH in factors(n) for n in names)


def leads_with_batch(names: tuple) -> bool:
    """``batch`` is the leading axis, alone or as the outer factor of a flattened one."""
    return bool(names) and factors(names[0])[:1] == (BATCH,)


def _batch_first_only(names: tuple) -> bool:
    """``batch`` leads ``names`` and appears nowhere else in them."""
    return leads_with_batch(names) and sum(f == BATCH for n in names for f in factors(n)) == 1


# Ops that act on their input's last axes (so many of them: a row of scores, one
# sequence): the batch must lead a batched input of more axes, unflattened if they are 2+.
_CORE_AXES = {"norm": 1, "softmax": 1, "scores": 2, "attend": 2, "mask": 2, "positional": 2, "rotary": 2,
              "split_heads": 2, "merge_heads": 3}


def keeps_batch_apart(g: nx.MultiDiGraph) -> bool:
    """Whether each row of ``batch`` is computed from that row alone, cached per graph:
    ``batch`` leads every value it is in (inputs and outputs included, and each output
    has it), no op works along it (a softmax, reduce, cumsum or concat along axis 0), no
    product contracts it and no gather indexes it."""
    known = _APART.get(g)
    if known is None:
        known = _APART[g] = BATCH in g.graph.get("dims", {}) and _row_wise(g)
    return known


def _row_wise(g: nx.MultiDiGraph) -> bool:
    shapes = {n: tuple(d.get("shape") or ()) for n, d in g.nodes(data=True)}
    if not all(shapes[o][:1] == (BATCH,) for o in g.graph["outputs"]):
        return False
    if any(_has_batch(shapes[n]) and shapes[n][:1] != (BATCH,) for n in g.graph["inputs"]):
        return False  # an input is cut into parts along its first axis
    for node, d in g.nodes(data=True):
        names, op, attrs = shapes[node], d["op"], d["attrs"]
        if _has_batch(names) and not _batch_first_only(names):
            return False  # e.g. (batch, batch) scores of pooled vectors: rows that meet
        if op == "arange" and _has_batch(names):
            return False  # 0..batch-1 in every part, not the part's own rows
        ins = [shapes[u] for u in arg_nodes(g, node)]
        batched = [x for x in ins if _has_batch(x)]
        if not batched:
            continue
        if not _has_batch(names) and op not in _SHAPE_ONLY:
            return False  # the rows made into a value of no batch: summed, or cut to a fixed size
        if op in ("tril", "triu") and len(batched[0]) < 3:
            return False  # the batch is one of the two axes the triangle is taken over
        core = _CORE_AXES.get(op, 0)
        if any(len(x) <= core or (core > 1 and x[0] != BATCH) for x in batched):
            return False  # the batch (or batch*seq flattened) among the axes the op works on
        if op in _BROADCASTING and any(len(x) != len(names) for x in batched):
            return False  # a lower-rank operand would broadcast its batch along another axis
        if op in _AXIS_OPS:
            axes = attrs.get("axis", ())
            axes = axes if isinstance(axes, (list, tuple)) else (axes,)
            if any(a is None or int(a) % len(batched[0]) == 0 for a in axes):
                return False  # along the batch, or over the flattened value
        elif op == "matmul":  # b's batch would be the contracted axis of a 2-d product
            if not _has_batch(names) or (_has_batch(ins[-1]) and len(ins[-1]) < 3):
                return False
        elif op == "gather":  # indexing the batch, not indexing with it
            if _has_batch(ins[0]):
                return False
        elif op == "einsum":
            if not _einsum_keeps_batch(attrs.get("equation", ""), [_has_batch(x) for x in ins]):
                return False
        elif op == "transpose":
            if list(attrs.get("perm", [0]))[:1] != [0]:
                return False
        elif op not in _NO_AXIS_OPS:
            return False  # ops the registry gains later: not known to keep rows apart
    return True


_TAIL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tail_products(g: nx.MultiDiGraph) -> set:
    """The products a split run makes once its parts have ended, each part's rows into
    one array of the whole batch: a product whose kernel writes ``into`` a given array
    (the logits), whose result only outputs read and whose input only it reads and owns
    (made fresh, not a view), so that no part frees, overwrites or needs either."""
    known = _TAIL.get(g)
    if known is None:
        from . import kernels  # noqa: F401 - attaches the kernels (fresh or not) to the registry
        outputs, known = set(g.graph["outputs"]), set()
        for node, d in g.nodes(data=True):
            if not spec(d["op"]).kernel.into or not set(g.successors(node)) or not set(g.successors(node)) <= outputs:
                continue
            ins = arg_nodes(g, node)
            if all(set(g.successors(u)) == {node} and u not in g.graph["inputs"]
                   and spec(g.nodes[u]["op"]).kernel.fresh for u in ins):
                known.add(node)
        _TAIL[g] = frozenset(known)
    return set(known)


def _einsum_keeps_batch(equation: str, batched: list) -> bool:
    """Every operand with ``batch`` (its first axis) names it by one letter, which the
    others do not use and which leads the result: ``bqd,bkd->bqk`` keeps rows apart,
    ``bd,bd->d`` sums over them."""
    if "..." in equation or "->" not in equation:
        return False
    given, result = equation.replace(" ", "").split("->")
    terms = given.split(",")
    if len(terms) != len(batched):
        return False
    letters = {t[:1] for t, b in zip(terms, batched) if b}
    if len(letters) != 1 or not result.startswith(next(iter(letters))):
        return False
    (letter,) = letters
    return all(letter not in t for t, b in zip(terms, batched) if not b)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_controller = None
_limit_lock = threading.Lock()
_limit_users = 0
_limiter = None


def _blas():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController
        _controller = ThreadpoolController()
    return _controller


def blas_threads() -> int:
    """The threads BLAS would use for a product now (OPENBLAS_NUM_THREADS, a
    threadpoolctl limit, ...): as many cores as the user lets NumPy take."""
    libs = [lib.num_threads for lib in _blas().select(user_api="blas").lib_controllers]
    return max(libs, default=1)


class _OneBlasThread:
    """BLAS on one thread while any split run is under way, in any thread: the first to
    enter sets it, the last to leave puts back what was there."""

    def __enter__(self):
        global _limit_users, _limiter
        with _limit_lock:
            if _limit_users == 0:
                _limiter = _blas().limit(limits=1, user_api="blas")
            _limit_users += 1

    def __exit__(self, *exc):
        global _limit_users, _limiter
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                _limiter.restore_original_limits()
                _limiter = None


_pool = None  # a concurrent.futures.ThreadPoolExecutor
_pool_lock = threading.Lock()


def _forget_in_child() -> None:
    """A forked child has none of its parent's threads: BLAS gets its threads back (a
    split run of another thread may have been under way) and a pool starts anew."""
    global _pool, _pool_lock, _limit_lock, _limit_users, _limiter
    if _limiter is not None:
        _limiter.restore_original_limits()
    _pool, _pool_lock, _limit_lock, _limit_users, _limiter = None, threading.Lock(), threading.Lock(), 0, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _workers_pool():
    """One pool for the process, a thread for each usable core but the caller's."""
    from concurrent.futures import ThreadPoolExecutor
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(usable_cores() - 1, 1), thread_name_prefix="qkvflow-part")
        return _pool


def batch_parts(plan: list, sizes: dict, workers: int) -> list[tuple[int, int]]:
    """The rows ``(lo, hi)`` of ``batch`` each part of a run of ``sizes`` takes: one part
    (no split) unless ``workers`` > 1, the values each part computes average
    MIN_PART_ELEMENTS, and every value of ``plan`` (the run's steps) laid out by its count
    of tokens has it on the same side of THRESHOLD in every part as in the whole
    run: the parts take the same kernels' paths, and the stacked products, as one run."""
    batch = sizes.get(BATCH)
    if not isinstance(batch, int) or workers < 2 or batch < 2:
        return [(0, batch)]
    n = min(workers, batch)
    while n > 1:
        smallest = batch // n
        part = dict(sizes, **{BATCH: smallest})
        if _enough_work(plan, part) and _same_sides(plan, sizes, part):
            break
        n -= 1
    lo, bounds = 0, []
    for i in range(n):
        hi = lo + batch // n + (i < batch % n)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _tokens(names: tuple, sizes: dict) -> int | None:
    counts = [size_of(n, sizes) for n in names[:-1]]
    return None if None in counts else math.prod(counts)


def _enough_work(plan: list, part: dict) -> bool:
    made = [math.prod(size_of(n, part) or 0 for n in step[5]) for step in plan
            if step[5] is not None and spec(step[1]).kernel.fresh]
    return bool(made) and sum(made) >= MIN_PART_ELEMENTS * len(made)


def _same_sides(plan: list, whole: dict, part: dict) -> bool:
    from .kernels import LAYOUT_BY_TOKENS
    for step in plan:
        names = step[5]
        if step[1] not in LAYOUT_BY_TOKENS or not names or not _has_batch(names):
            continue
        a, b = _tokens(names, whole), _tokens(names, part)
        if a is None or b is None:
            return False  # a dim the run binds as it goes: not known beforehand
        if (a >= THRESHOLD) != (b >= THRESHOLD):
            return False
    return True


def run_parts(fn, parts: list, then=None) -> list:
    """``fn(part)`` for each part, all at once: the first parts on the pool's threads, the
    last on this one, BLAS on one thread meanwhile. Once every part has ended, ``then()``
    gives a function that each part and its result are given, all at once alike (the
    products a split run makes last, which may take from a part's result what they read).
    The results of ``fn`` in order, or the error a part raised, once every part has ended
    (an interrupt, Ctrl-C, stops this thread's part and is raised when the others have
    ended: a thread of the pool cannot be stopped)."""
    with _OneBlasThread():
        results = _all_at_once(fn, parts)
        if then is not None:
            each = then()
            _all_at_once(lambda i: each(parts[i], results[i]), range(len(parts)))
        return results


def _all_at_once(fn, items) -> list:
    items = list(items)
    pool, futures = _workers_pool(), []
    try:
        for item in items[:-1]:
            futures.append(pool.submit(fn, item))
        last = fn(items[-1])
    finally:
        done = [f.exception() for f in futures]  # waits for every part: none outlives the run
    for f, err in zip(futures, done):
        if err is not None:
            raise err
    return [f.result() for f in futures] + [last]

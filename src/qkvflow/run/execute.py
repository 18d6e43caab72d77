"""The executor: walks the traced graph and calls one NumPy kernel per node.

It never re-runs model-building code. Checking has two layers:

* every produced array is compared with its node's named shape under one
  run-wide binding of the data dims (batch, src, tgt) — a dict lookup per
  axis, always on unless ``check=False``;
* each kernel runs under jaxtyping + beartype the first time it sees a
  given op with given input shapes and dtypes; later calls with the same
  signature skip it (their shapes were already verified), which keeps the
  cost of checking small (measured in ``benchmarks/``).
"""

import functools
import math
import weakref

import networkx as nx
import numpy as np

from ..ir.dims import describe_shape, size_of
from ..ir.dtypes import run_dtype
from ..ir.errors import ExecutionError, InputError, ParamError, QkvflowError
from ..ir.graph import arg_nodes, expect_graph, param_path, position_limit, vocabulary_of
from .parallel import (batch_parts, blas_threads, keeps_batch_apart, leads_with_batch, run_parts,
                       tail_products, usable_cores)
from .pages import empty_in_small_pages
from .params import all_finite, check_fits, validate_params
from .plan import fast_plan, steps

__all__ = ["Executor", "forward"]

# Signatures verified once per graph, by every executor of it: a kernel's typed signature
# for these input shapes (forward), a node at this step shape (incremental decoding).
_VERIFIED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CHECKED: dict = {}
# Per graph and run key: the shape each named shape had, when the inputs alone bound every
# dim (so a later run with the same input sizes must produce exactly these).
_SHAPES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STACK_ROWS = 64  # tokens from which the projections of one input are computed as one product


def run_kernel(node: str, op: str, source: str, fn, call, ins: list, attrs: dict, params: dict, sizes: dict,
               dtype: np.dtype, during: str = "") -> np.ndarray:
    """One node's kernel on its inputs: a failure becomes one ExecutionError naming the node
    and its source line; a float result takes the run's dtype (np.where of scalars is float64)."""
    try:
        out = call(fn, ins, attrs, params, sizes)
    except QkvflowError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExecutionError(f"node {node} ({op}, {source}) failed{during}: {first}") from err
    return out.astype(dtype) if out.dtype.kind == "f" and out.dtype != dtype else out


def _checked(op: str, kernel):
    fn = _CHECKED.get(op)
    if fn is None:
        from beartype import beartype
        from jaxtyping import jaxtyped
        fn = _CHECKED[op] = jaxtyped(typechecker=beartype)(kernel)
    return fn


class Executor:
    """A graph with its parameters validated and cast once, ready to run.

    Parameters
    ----------
    graph : the traced graph.
    params : path -> array (see :func:`qkvflow.init_params`).
    dtype : "float64" (default, a reference) or "float32".
    check : verify named shapes and kernel signatures (default True).
    workers : cores a plain run of a batch may take, a part of the batch on each (see
        :mod:`qkvflow.run.parallel`; the same numbers as one run); None (default): as
        many as BLAS would take for a product, at most the usable cores; 1: one part.
    """

    def __init__(self, graph: nx.MultiDiGraph, params: dict, *, dtype="float64", check: bool = True,
                 workers: int | None = None):
        expect_graph(graph)
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
            raise InputError(f"workers must be a whole number of cores, 1 or more, got {workers!r}")
        self.workers = workers
        self._split: dict = {}  # run sizes -> the parts of its batch
        self.dtype = run_dtype(dtype)
        if not isinstance(params, dict):
            raise ParamError(f"params must be a dict of parameter path -> array, got {type(params).__name__}")
        self.graph = graph
        self.plan = steps(graph)
        self._stacked = False  # see _plan_for
        # Arrays found finite by an earlier executor are not read again: a run whose
        # outputs are not finite reads them (it names a parameter changed in place since).
        self._reread = None if validate_params(graph, params) else params
        self.params = {k: np.asarray(v, dtype=self.dtype) for k, v in params.items()}  # validated: the same names
        self.check = check
        self._position_limit = position_limit(graph)
        self.seen: set = _VERIFIED.setdefault(graph, set())
        self.shapes: dict = _SHAPES.setdefault(graph, {})
        for node, data in graph.nodes(data=True):
            tied = data["attrs"].get("tied_to")
            if tied and tied not in self.params:
                raise ParamError(f"node {node} is tied to parameter {tied}, which the graph does not have")

    def _bind_inputs(self, feeds: dict) -> tuple[dict, dict]:
        g = self.graph
        sizes = dict(g.graph["dims"])
        values = {}
        # Inputs with a default come last: their shape is what the others bound.
        order = sorted(g.graph["inputs"], key=lambda n: "default" in g.nodes[n]["attrs"])
        for node in order:
            attrs = g.nodes[node]["attrs"]
            name, names = attrs["name"], attrs["shape"]
            if name not in feeds and "default" in attrs and all(size_of(n, sizes) for n in names):
                values[node] = np.full([size_of(n, sizes) for n in names], attrs["default"], dtype=np.int64)
                continue
            if name not in feeds:
                raise InputError(f"input {name} {describe_shape(names, sizes)} was not given")
            try:
                arr = np.asarray(feeds[name])
            except (ValueError, TypeError) as err:
                raise InputError(f"input {name} is not an array of one shape: {err}") from None
            if arr.ndim != len(names):
                raise InputError(f"input {name} has {arr.ndim} axes, expected {describe_shape(names, sizes)}")
            if attrs.get("dtype") == "int":
                if arr.dtype.kind not in "iu":
                    raise InputError(f"input {name} must hold integer token ids, got dtype {arr.dtype}")
                vocab = vocabulary_of(g, node)
                if arr.size and vocab and (arr.min() < 0 or arr.max() >= vocab):
                    bad = int(arr.max() if arr.max() >= vocab else arr.min())
                    raise InputError(f"input {name} has token id {bad}, expected ids in 0..{vocab - 1}")
            clash = _bind(names, arr.shape, sizes)
            if clash is not None:
                axis, dim, have = clash
                raise InputError(
                    f"input {name} has {dim} = {arr.shape[axis]} on axis {axis}, "
                    f"but {dim} = {have} elsewhere in this run"
                )
            if 0 in arr.shape:
                raise InputError(f"input {name} is empty along {names[arr.shape.index(0)]}")
            values[node] = arr
        limit = self._position_limit
        for dim in g.graph.get("sequences", {}):
            if limit and sizes.get(dim) is not None and sizes[dim] > limit:
                raise InputError(f"{dim} length {sizes[dim]} exceeds max_positions = {limit}")
        return values, sizes

    def run(self, feeds: dict, capture: bool = False, initial: dict | None = None,
            only: set | None = None) -> dict:
        """Execute the graph. ``feeds`` maps input names (src_ids, tgt_ids) to arrays.

        Returns the outputs by name; with ``capture`` also ``"activations"``:
        every node's array by path. ``initial`` gives node values computed before
        (by path, e.g. from a captured run): those nodes are taken, not computed,
        still checked against their named shapes. With
        :func:`qkvflow.ir.graph.independent_of` it computes the encoder once per source.
        ``only``: compute these nodes (and what they read) alone; the outputs are then
        not returned, only the activations (``capture``).
        """
        values, sizes = self._bind_inputs(feeds)
        initial = initial or {}
        stray = next((n for n in initial if n not in self.graph or n in self.graph.graph["inputs"]), None)
        if stray is not None:
            raise InputError(f"initial value for {stray!r}: not a computed node of the graph")
        plain = not (capture or initial or only is not None)
        parts = self._parts(sizes) if plain else ()
        if len(parts) > 1:
            failed = None
            try:
                result = self._run_parts(values, sizes, parts)
            except QkvflowError as err:
                failed = err
            if failed is not None:  # told of the whole batch, as one run tells it
                _let_go_of_frames(failed)  # the parts' frames hold their values and the logits' array
                self._execute(values, sizes, False, {}, None)
                raise failed
        else:
            values = self._execute(values, sizes, capture, initial, only)
            if only is not None:
                return {"activations": values}
            result = {self.graph.nodes[o]["attrs"]["name"]: values[o] for o in self.graph.graph["outputs"]}
        if self._reread is not None and not all(all_finite(v) for v in result.values() if v.dtype.kind == "f"):
            validate_params(self.graph, self._reread, reread=True)
        if capture and "activations" in result:
            raise InputError("the model has an output named 'activations'; run it without capture=True")
        if capture:
            result["activations"] = values
        return result

    def _execute(self, values: dict, sizes: dict, capture: bool, initial: dict, only: set | None,
                 skip: set = frozenset(), into: dict | None = None, record: bool = True) -> dict:
        """The plan's steps on the bound inputs ``values``: every value kept (``capture``,
        ``initial``, ``only``) or each freed after its last read. ``skip``: nodes not
        computed (what they read, there last, is then kept). ``into``: node -> the array its
        kernel writes its result into (a part's rows of a split run's output). ``record``:
        remember a run of these sizes as verified (not for a part of a split run, which
        leaves the whole batch's steps unverified)."""
        params = self.params
        plan, freed, stacks = self._plan_for(sizes, in_place=not (capture or initial or only is not None))
        skipped = ()
        if stacks and (only is not None or initial):  # a stack is computed when a member is to be
            needed = {st.node for st in stacks if any(
                (only is None or m in only) and m not in initial for m, _, _ in st.members)}
            only = None if only is None else set(only) | needed
            skipped = {st.node for st in stacks} - needed
        # A run whose every size was seen before has had every kernel signature verified:
        # its nodes' input shapes are the same (the named shapes are still checked below).
        run_key = self._run_key(sizes, only is None)
        verify = self.check and run_key not in self.seen
        self._fits_once(sizes, run_key)
        expected = self.shapes.get(run_key)
        if expected is None:
            expected, bound = {}, sum(v is not None for v in sizes.values())
        for i, (node, op, args, attrs, pnames, names, kernel, call, source) in enumerate(plan):
            if op == "input" or (only is not None and node not in only) or node in skipped or node in skip:
                continue
            if node in initial:
                out = np.asarray(initial[node])
                if self.check:
                    self._check_shape(node, names, out, sizes, source)
            else:
                ins = [values[a] for a in args]
                p = {n: params[param_path(node, n)] for n in pnames}
                if "tied_to" in attrs:
                    p["weight"] = params[attrs["tied_to"]]
                fn = kernel
                if verify and kernel is not None:
                    signature = (op, tuple((x.shape, x.dtype.char) for x in ins))
                    if signature not in self.seen:
                        self.seen.add(signature)
                        fn = _checked(op, kernel)
                if into and node in into:
                    call = functools.partial(call, out=into[node])
                out = run_kernel(node, op, source, fn, call, ins, attrs, p, sizes, self.dtype)
                if self.check and names is not None:  # a stacked projection has none: its slices do
                    self._check_shape(node, names, out, sizes, source, expected)
            values[node] = out
            for u in freed[i] if freed else ():
                del values[u]  # read for the last time: its memory goes back now
        if verify and not initial and record:
            self.seen.add(run_key)
        if (self.check and record and run_key not in self.shapes
                and sum(v is not None for v in sizes.values()) == bound):
            self.shapes[run_key] = expected  # no node bound a dim the inputs left free
        for st in stacks if capture or only is not None else ():
            values.pop(st.node, None)  # not a node of the graph
        return values

    def _parts(self, sizes: dict) -> list:
        """The rows of ``batch`` each part of a run of ``sizes`` takes (see parallel.py)."""
        if not isinstance(sizes.get("batch"), int) or sizes["batch"] < 2 or self.workers == 1:
            return ()
        if not keeps_batch_apart(self.graph):
            return ()
        workers = min(self.workers or blas_threads(), usable_cores())
        key = (workers, self._run_key(sizes, True))
        parts = self._split.get(key)
        if parts is None:
            parts = self._split[key] = batch_parts(self.plan, sizes, workers)
        return parts

    def _run_parts(self, values: dict, sizes: dict, parts: list) -> dict:
        """A plain run as parts of its batch at once, each on its own core, BLAS on one
        thread; then the products that make outputs alone (the logits: ``tail_products``),
        each part's rows written into one array of the whole batch, again a part a core.
        Other outputs are the parts' joined. No product of a split run takes BLAS's threads:
        after one, OpenBLAS's threads spin on a core for a while, which the next run's parts
        then share (vaswani-base back to back: one part ended 33 ms after the other, of a
        358 ms run). The logits wait for the parts to end, so their values are freed first."""
        g = self.graph
        self._fits_once(sizes, self._run_key(sizes, True))  # the whole batch's outputs are made here
        self._plan_for(sizes, in_place=True)  # stacks the weights, once, before the parts read them
        outputs = g.graph["outputs"]
        products = tail_products(g)
        tail = products | {o for o in outputs if arg_nodes(g, o)[0] in products}
        batched = {n for n in values if leads_with_batch(g.nodes[n]["shape"])}  # the inputs cut into parts

        def run_part(rows: tuple) -> dict:
            lo, hi = rows
            part = {n: v[lo:hi] if n in batched else v for n, v in values.items()}
            return self._execute(part, dict(sizes, batch=hi - lo), False, {}, None, skip=tail, record=False)
        read = {u for n in products for u in arg_nodes(g, n)}  # the part's rows the products read
        made = {}

        def tail_parts():  # once the parts have ended (and freed their values)
            made.update({n: empty_in_small_pages([size_of(d, sizes) for d in g.nodes[n]["shape"]], self.dtype)
                         for n in products})

            def tail_part(rows: tuple, done: dict) -> None:
                lo, hi = rows
                self._execute({u: done.pop(u) for u in read}, dict(sizes, batch=hi - lo), False, {}, tail,
                              into={n: out[lo:hi] for n, out in made.items()}, record=False)
            return tail_part
        done = run_parts(run_part, list(parts), then=tail_parts if products else None)
        return {g.nodes[o]["attrs"]["name"]: made[arg_nodes(g, o)[0]] if o in tail
                else np.concatenate([d[o] for d in done]) for o in outputs}

    def _plan_for(self, sizes: dict, in_place: bool) -> tuple[list, list, list]:
        """The run's plan, frees and stacks. The projections of one input are stacked when an
        input of them holds _STACK_ROWS tokens or more: for fewer, one product is not faster
        than several. This depends on the run's sizes alone, so the same inputs give the same
        numbers whatever ran before and whatever the run keeps (a stacked product may differ
        from separate ones in the last bits)."""
        stacks = fast_plan(self.graph, True, in_place)[2]
        rows = [math.prod(size_of(n, sizes) or 0 for n in st.rows) for st in stacks]
        stacked = bool(rows) and max(rows) >= _STACK_ROWS
        plan, freed, stacks = fast_plan(self.graph, stacked, in_place)
        if stacked and not self._stacked:
            self._stack(stacks)
        return plan, freed if in_place else (), stacks

    def _stack(self, stacks: list) -> None:
        """Each stack's weights and biases side by side, once per executor: a copy, which a
        parameter changed in place afterwards does not reach (build a new Executor). The
        members' parameters become views of it (row blocks, as contiguous as before), so
        nothing is held twice."""
        params = self.params
        size = sum(params[param_path(m, n)].nbytes for st in stacks for m, _, _ in st.members for n in st.params)
        check_fits(size, "stacking the projections' weights would")
        for st in stacks:
            for name in st.params:
                paths = [param_path(m, name) for m, _, _ in st.members]
                stacked = params[param_path(st.node, name)] = np.concatenate([params[p] for p in paths])
                for path, (_, lo, hi) in zip(paths, st.members):
                    params[path] = stacked[lo:hi]
        self._stacked = True

    def _run_key(self, sizes: dict, whole: bool) -> tuple:
        return ("run", self.dtype.char, whole, tuple(sorted((k, v) for k, v in sizes.items() if isinstance(v, int))))

    def _fits_once(self, sizes: dict, run_key: tuple) -> None:
        if ("fits",) + run_key not in self.seen:
            self._check_fits(sizes)
            self.seen.add(("fits",) + run_key)

    def _check_fits(self, sizes: dict) -> None:
        """Before anything is computed: the largest value of this run fits in memory."""
        largest, node, names = 0, None, ()
        for step in self.plan:
            dims = [size_of(n, sizes) for n in step[5]]
            if None not in dims and math.prod(dims) > largest:
                largest, node, names = math.prod(dims), step[0], step[5]
        try:
            check_fits(largest * self.dtype.itemsize, f"node {node}'s value {describe_shape(names, sizes)} would")
        except ParamError as err:
            raise InputError(f"this run is too large: {err}") from None

    @staticmethod
    def _check_shape(node: str, names: tuple, out: np.ndarray, sizes: dict, source: str,
                     expected: dict | None = None) -> None:
        """``out`` has the named shape ``names`` under ``sizes``, binding free dims. ``expected``
        remembers fully bound shapes by names, for this run and, when the inputs bound every
        dim, for later runs with the same input sizes (their shapes are then the same)."""
        if expected is not None:
            want = expected.get(names)
            if want is not None and out.shape == want:
                return
        if out.ndim != len(names):
            raise ExecutionError(
                f"node {node} ({source}) produced {out.ndim} axes {out.shape}, expected {describe_shape(names, sizes)}"
            )
        clash = _bind(names, out.shape, sizes)
        if clash is not None:
            axis, dim, want = clash
            raise ExecutionError(
                f"node {node} ({source}) produced shape {out.shape}, expected "
                f"{describe_shape(names, sizes)}: axis {axis} ({dim}) should be {want}"
            )
        if expected is not None:
            expected[names] = out.shape  # every dim of names is bound now, to these sizes


def _let_go_of_frames(err: BaseException) -> None:
    """Drop the tracebacks of ``err`` and the errors it was raised from: their frames keep
    what those functions held (a split run's values) alive."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        err.__traceback__ = None
        err = err.__cause__ or err.__context__


def _bind(names: tuple, shape: tuple, sizes: dict) -> tuple | None:
    """Bind free dims of ``names`` to ``shape`` in ``sizes``; the first clash
    as (axis, dim, expected size), or None when the shape agrees."""
    for axis, dim in enumerate(names):
        want = size_of(dim, sizes)
        if want is None:
            sizes[dim] = shape[axis]
        elif want != shape[axis]:
            return axis, dim, want
    return None


def forward(graph: nx.MultiDiGraph, params: dict, *inputs, dtype="float64",
            check: bool = True, capture: bool = False, initial: dict | None = None, **named) -> dict:
    """Run a traced graph on its inputs, e.g. token ids.

    Inputs are given in the order the model declares them (an
    encoder–decoder: ``src_ids, tgt_ids``) or by name (a decoder-only model
    with an input ``ids``: ``forward(g, params, ids=...)``). Returns the
    outputs by name, e.g. ``{"logits": (batch, tgt, vocab) array}`` (plus
    ``"activations"`` by node path with ``capture=True``). ``initial``: node
    values computed before, taken instead of computed (see
    :meth:`Executor.run`). An input named like one of forward's own keywords
    (``dtype``, ``check``, ``capture``, ``initial``) is given by position.

    Examples
    --------
    >>> import numpy as np, qkvflow as qf
    >>> g = qf.trace(qf.load_model("tiny"))
    >>> out = qf.forward(g, qf.init_params(g, seed=0), np.array([[5, 6, 7]]), np.array([[1, 8]]))
    >>> out["logits"].shape
    (1, 2, 41)
    """
    expect_graph(graph, "forward")
    names = [graph.nodes[n]["attrs"]["name"] for n in graph.graph["inputs"]]
    if len(inputs) > len(names):
        raise InputError(f"forward got {len(inputs)} positional inputs; the model takes "
                         f"{len(names)}: {', '.join(names)}")
    feeds = dict(zip(names, inputs))
    for name, value in named.items():
        if name not in names:
            raise InputError(f"forward got an input {name!r}; the model's inputs are {', '.join(names)}")
        if name in feeds:
            raise InputError(f"forward got input {name!r} twice, by position and by name")
        feeds[name] = value
    return Executor(graph, params, dtype=dtype, check=check).run(feeds, capture=capture, initial=initial)

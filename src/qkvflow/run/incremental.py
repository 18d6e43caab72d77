"""Incremental decoding: each step computes the new position only, from a cache.

Derived from the graph, not written per model, so a user's own blocks get it
too. Every axis named by the generated sequence dim (``tgt``, ``seq``) of
every node is one of two kinds:

- **Q** (new positions): the node is computed for the new tokens only. Every
  op that keeps positions apart (projections, norms, activations, heads,
  elementwise, positions and rotary angles with an offset) can do that,
  because in a causal stream the value at a position never changes later.
- **K** (all positions): the key axis of attention scores, and whatever an
  op mixes along the sequence (the keys and values a scores or weighted sum
  contracts over, a softmax, a cumulative sum, ...). Where such an op reads
  a Q-kind node, that node's new values are appended to a cache and the op
  reads the cache: the KV cache, found where the graph contracts over the
  sequence rather than by name.

The causal mask is then built for the new rows only (rows offset by the
cached length) and position ops take that offset. Beam search reorders the
caches by each new row's parent. :class:`NotIncremental` names a node that
cannot be run this way; :func:`qkvflow.run.generate.generate` then falls back
to full recompute and says why.
"""

from typing import NamedTuple

import numpy as np

from ..ir.dims import factors
from ..ir.errors import ExecutionError, QkvflowError
from ..ir.graph import arg_nodes, execution_order, param_path
from .execute import Executor, _checked, run_kernel

__all__ = ["NotIncremental", "IncrementalRunner"]

Q, K = "Q", "K"
_BROADCAST = {"add", "elementwise", "where", "mask", "output"}
_LAST_MIXING = {"linear", "norm", "unembed"}
_ALONG_AXIS = {"softmax", "cumsum", "reverse", "roll", "slice", "split_part", "repeat", "concat", "pick", "reduce"}
_POSITION_LOCAL = {"activation", "padding_mask", "split_heads", "merge_heads", "reshape", "positional", "rotary",
                   "embed", "tril", "triu"}


class NotIncremental(QkvflowError):
    """A node whose step-by-step computation qkvflow cannot derive."""


class Step(NamedTuple):
    """One node of a step, everything that does not change between steps resolved."""

    node: str
    op: str
    argspec: tuple  # (producer, read in full?) per argument
    attrs: dict
    offset: str | None  # the attr the cached length is added to
    params: dict
    names: tuple | None  # the named shape of a step (None: not a graph node)
    kernel: object
    call: object
    source: str
    special: bool  # computed by _special, not the kernel
    axis: int | None  # the axis its cache grows along (None: not cached)


class IncrementalRunner:
    """Runs ``executor``'s graph one step at a time over the sequence dim ``seq``.

    ``known`` node values (the encoder) are taken as given; they must not
    have the sequence axis.
    """

    def __init__(self, executor: Executor, seq: str, known: set) -> None:
        self.ex, self.g, self.seq, self.all = executor, executor.graph, seq, f"{seq}@all"
        self.known = set(known)
        self.kinds: dict = {}
        self.full: dict = {}  # (node, arg position) -> the axis of the producer read in full
        self._analyse()
        self.cached = {u: axis for (node, pos), (u, axis) in self.full.items()}
        self.cache: dict = {}
        self.length = 0

    # --- analysis -------------------------------------------------------------------------------
    def _seq_axes(self, node: str) -> list:
        names = self.g.nodes[node]["shape"]
        for n in names:
            if n != self.seq and self.seq in factors(n):
                raise NotIncremental(f"node {node} ({self.g.nodes[node].get('source', '?')}) merges the "
                                     f"generated sequence {self.seq} with another dim ({n})")
        return [i for i, n in enumerate(names) if n == self.seq]

    def _need_full(self, node: str, pos: int, producer: str, axis: int) -> None:
        """``node`` reads ``producer`` along ``axis`` in full: its new values are cached. Only a
        producer with that one positions axis can be: its old values never change."""
        if self.kinds[producer][axis] != Q:
            return
        others = [a for a, k in enumerate(self.kinds[producer]) if k is not None and a != axis]
        if others:
            raise NotIncremental(
                f"node {producer} ({self.g.nodes[producer].get('source', '?')}) has two {self.seq} axes and "
                f"would be read in full along one of them (keys and queries laid out another way, or a "
                f"mask of position comparisons)")
        previous = self.full.get((node, pos))
        if previous is not None and previous != (producer, axis):
            raise NotIncremental(f"node {node} reads {producer} in full along two axes")
        self.full[(node, pos)] = (producer, axis)

    def _analyse(self) -> None:
        g = self.g
        for node in execution_order(g):
            rank = len(g.nodes[node]["shape"])
            if node in self.known or g.nodes[node]["op"] == "param":
                self.kinds[node] = [None] * rank
                continue
            kinds = [None] * rank
            seq_axes = self._seq_axes(node)
            op = g.nodes[node]["op"]
            rule = getattr(self, f"_rule_{op}", None)
            if rule is not None:
                rule(node, kinds, seq_axes)
            elif op in _BROADCAST:
                self._broadcast(node, kinds, seq_axes)
            elif op in _LAST_MIXING or op in _ALONG_AXIS or op in _POSITION_LOCAL or op in ("gather", "input"):
                self._ordered(node, kinds, seq_axes, op)
            else:
                raise NotIncremental(f"node {node} ({g.nodes[node].get('source', '?')}): op {op} has no "
                                     "step-by-step rule")
            if kinds.count(Q) > 1:
                raise NotIncremental(
                    f"node {node} ({g.nodes[node].get('source', '?')}) has two {self.seq} axes of new positions "
                    f"(e.g. a mask compared from np.arange(T) twice); qkvflow cannot tell which holds the keys")
            self.kinds[node] = kinds

    def _args(self, node):
        return arg_nodes(self.g, node)

    def _broadcast(self, node, kinds, seq_axes) -> None:
        """Right-aligned broadcasting: an axis is K if any input's is; the others read in full."""
        rank = len(kinds)
        args = self._args(node)
        for axis in seq_axes:
            aligned = []
            for pos, u in enumerate(args):
                shift = len(self.kinds[u]) - rank
                if 0 <= axis + shift < len(self.kinds[u]) and self.kinds[u][axis + shift] is not None:
                    aligned.append((pos, u, axis + shift))
            kind = K if any(self.kinds[u][a] == K for _, u, a in aligned) else Q
            kinds[axis] = kind
            if kind == K:
                for pos, u, a in aligned:
                    self._need_full(node, pos, u, a)

    def _ordered(self, node, kinds, seq_axes, op) -> None:
        """Ops that keep the order of sequence axes: the k-th of the output is the k-th of the
        (first sequence-carrying) input; an axis the op mixes along is read in full."""
        g = self.g
        args = self._args(node)
        if op == "input":
            for axis in seq_axes:
                kinds[axis] = Q
            return
        pos = 1 if op == "gather" else 0
        if not args:
            kinds[:] = [Q if i in seq_axes else None for i in range(len(kinds))]
            return
        src = args[pos]
        src_axes = [i for i, k in enumerate(self.kinds[src]) if k is not None]
        attrs = g.nodes[node]["attrs"]
        rank_in = len(self.kinds[src])
        mixed = set()
        if op in _LAST_MIXING:
            mixed = {rank_in - 1}
        elif op in _ALONG_AXIS:
            axes = attrs.get("axis", -1)
            axes = axes if isinstance(axes, (list, tuple)) else [axes]
            mixed = {a % rank_in for a in axes}
            if op == "pick" and attrs.get("index") == -1:
                mixed = set()  # the last position is the last new one
        src_kinds = list(self.kinds[src])
        for a in src_axes:
            if a in mixed and src_kinds[a] == Q:
                self._need_full(node, pos, src, a)
                src_kinds[a] = K
        if op == "concat":
            for p, u in enumerate(args[1:], start=1):
                for a, k in enumerate(self.kinds[u]):
                    if k == Q and a in mixed:
                        self._need_full(node, p, u, a)
        dropped = mixed if op == "reduce" else {attrs["axis"] % rank_in} if op == "pick" else set()
        carried = [src_kinds[a] for a in src_axes if a not in dropped]
        if len(carried) != len(seq_axes):
            raise NotIncremental(f"node {node} ({g.nodes[node].get('source', '?')}): {op} changes the number of "
                                 f"{self.seq} axes")
        for axis, kind in zip(seq_axes, carried):
            kinds[axis] = kind

    def _rule_transpose(self, node, kinds, seq_axes) -> None:
        (src,) = self._args(node)
        for out_axis, in_axis in enumerate(self.g.nodes[node]["attrs"]["perm"]):
            kinds[out_axis] = self.kinds[src][in_axis]

    def _rule_scores(self, node, kinds, seq_axes) -> None:
        q, k = self._args(node)
        kinds[-2] = self.kinds[q][-2]
        if self.kinds[k][-2] is not None:
            self._need_full(node, 1, k, len(self.kinds[k]) - 2)
            kinds[-1] = K

    def _rule_attend(self, node, kinds, seq_axes) -> None:
        p, v = self._args(node)
        if self.kinds[p][-1] == Q:
            self._need_full(node, 0, p, len(self.kinds[p]) - 1)
        if self.kinds[v][-2] is not None:
            self._need_full(node, 1, v, len(self.kinds[v]) - 2)
        kinds[-2] = self.kinds[p][-2]

    def _rule_matmul(self, node, kinds, seq_axes) -> None:
        a, b = self._args(node)
        ka, kb = self.kinds[a], self.kinds[b]
        if ka[-1] is not None:
            self._need_full(node, 0, a, len(ka) - 1)
        if len(kb) >= 2 and kb[-2] is not None:
            self._need_full(node, 1, b, len(kb) - 2)
        rank = len(kinds)
        for axis in range(rank - 2):  # broadcast batch axes
            for ku in (ka, kb):
                shift = len(ku) - rank
                if 0 <= axis + shift < len(ku) - 2 and ku[axis + shift] is not None:
                    kinds[axis] = ku[axis + shift]
        kinds[-2] = ka[-2] if len(ka) >= 2 else None
        kinds[-1] = kb[-1]
        if kinds[-1] is not None and kinds[-2] is not None:  # (..., queries, keys): the later holds the keys
            self._need_full(node, 1, b, len(kb) - 1)
            kinds[-1] = K

    def _rule_einsum(self, node, kinds, seq_axes) -> None:
        lhs, out = self.g.nodes[node]["attrs"]["equation"].replace(" ", "").split("->")
        specs = lhs.split(",")
        args = self._args(node)
        letter_kind: dict = {}
        for spec, u in zip(specs, args):
            if "..." in spec and any(self.kinds[u]):
                raise NotIncremental(f"node {node}: an einsum with '...' over the {self.seq} axis")
            for a, ch in enumerate(spec):
                k = self.kinds[u][a] if a < len(self.kinds[u]) else None
                if k is not None:
                    letter_kind[ch] = K if K in (k, letter_kind.get(ch)) else Q
        seq_letters = [ch for ch in out if ch in letter_kind]
        full_letters = {ch for ch in letter_kind if ch not in out}  # contracted along the sequence
        full_letters |= {ch for ch in seq_letters if letter_kind[ch] == K}  # all positions somewhere
        if len(seq_letters) > 1:
            full_letters |= set(seq_letters[1:])  # (..., queries, keys)
        for pos, (spec, u) in enumerate(zip(specs, args)):
            if "..." in spec:
                raise NotIncremental(f"node {node}: an einsum with '...' over the {self.seq} axis")
            for a, ch in enumerate(spec):
                if ch in full_letters and self.kinds[u][a] == Q:
                    self._need_full(node, pos, u, a)
        for axis, ch in enumerate(out):
            if ch in letter_kind:
                kinds[axis] = K if ch in full_letters or letter_kind[ch] == K else Q

    def _rule_causal_mask(self, node, kinds, seq_axes) -> None:
        (ids,) = self._args(node)
        kinds[0], kinds[1] = (self.kinds[ids][-1] or Q), K

    def _rule_relative_bias(self, node, kinds, seq_axes) -> None:
        q_ids, k_ids = self._args(node)
        kinds[1] = self.kinds[q_ids][-1]
        if self.kinds[k_ids][-1] is not None:
            self._need_full(node, 1, k_ids, len(self.kinds[k_ids]) - 1)
            kinds[2] = K

    def _rule_fill(self, node, kinds, seq_axes) -> None:
        for n, axis in enumerate(seq_axes):
            kinds[axis] = Q if n == 0 else K

    def _rule_prefix(self, node, kinds, seq_axes) -> None:
        """table[:T]: the rows of the new positions (an offset into the table)."""
        (src,) = self._args(node)
        kinds[:] = list(self.kinds[src])
        kinds[self.g.nodes[node]["attrs"]["axis"]] = Q

    def _rule_arange(self, node, kinds, seq_axes) -> None:
        for axis in seq_axes:
            kinds[axis] = Q

    def _rule_constant(self, node, kinds, seq_axes) -> None:
        if seq_axes:
            raise NotIncremental(f"constant {node} has a {self.seq} axis")

    # --- one step ---------------------------------------------------------------------------------
    def _step_names(self, node: str) -> tuple:
        names = self.g.nodes[node]["shape"]
        kinds = self.kinds[node]
        return tuple(self.all if k == K else n for n, k in zip(names, kinds))

    def _prepare(self, known: set) -> list:
        """One entry per node to compute, everything that does not change between steps resolved."""
        ex = self.ex
        steps = []
        for node, op, args, attrs, pnames, names, kernel, call, source in ex.plan:
            if op == "input" or node in known:
                continue
            attrs, offset = self._static_attrs(node, op, attrs)
            p = {n: ex.params[param_path(node, n)] for n in pnames}
            if "tied_to" in attrs:
                p["weight"] = ex.params[attrs["tied_to"]]
            if op == "unembed":
                # (vocab, d_model) laid out column-major: x @ W.T then reads W.T row by row, which
                # BLAS does ~1.4x faster one token at a time (no copy if already so laid out)
                p["weight"] = np.asfortranarray(p["weight"])
            argspec = tuple((u, (node, pos) in self.full) for pos, u in enumerate(args))
            special = op in ("causal_mask", "arange", "prefix") and Q in self.kinds[node]
            steps.append(Step(node, op, argspec, attrs, offset, p, self._step_names(node), kernel, call, source,
                              special, self.cached.get(node)))
        return self._stack_projections(steps)

    def _stack_projections(self, steps: list) -> list:
        """Projections of one input (Q, K and V of a self-attention; a gated FFN's two) become one
        product with their weights stacked, then a slice each: for a token at a time, one large
        product reads weights about twice as fast as several small ones. The slices are the
        nodes, shape-checked as such."""
        groups: dict = {}
        for i, step in enumerate(steps):
            weight = step.params.get("weight")
            if step.op == "linear" and weight.ndim == 2:
                key = (step.argspec, weight.shape[1], step.params.get("bias") is not None, weight.dtype.str)
                groups.setdefault(key, []).append(i)
        fused = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            parts = [steps[i] for i in members]
            weight = np.asfortranarray(np.concatenate([m.params["weight"] for m in parts], axis=0))
            bias = (np.concatenate([m.params["bias"] for m in parts]) if parts[0].params.get("bias") is not None
                    else None)
            stacked = f"{parts[0].node}+stacked"
            replaced = [parts[0]._replace(node=stacked, attrs={}, params={"weight": weight, "bias": bias},
                                          names=None, axis=None)]
            lo = 0
            for m in parts:
                hi = lo + m.params["weight"].shape[0]
                replaced.append(m._replace(op="slice", argspec=((stacked, False),), attrs={}, params={}, kernel=None,
                                           call=lambda fn, ins, a, p, sz, lo=lo, hi=hi: ins[0][..., lo:hi]))
                lo = hi
            fused[members[0]] = replaced
            fused.update({i: [] for i in members[1:]})
        return [step for i, st in enumerate(steps) for step in fused.get(i, [st])]

    def _static_attrs(self, node, op, attrs) -> tuple[dict, str | None]:
        """The node's attrs for a step, and the attr the cached length is added to (an offset)."""
        kinds = self.kinds[node]
        if op in ("reshape", "fill") and "shape" in attrs and len(attrs["shape"]) == len(kinds):
            return {**attrs, "shape": self._step_names(node)}, None
        if op in ("positional", "rotary"):
            (src,) = arg_nodes(self.g, node)
            return attrs, ("offset" if self.kinds[src][-2] == Q else None)
        if op == "relative_bias":
            return attrs, ("offset" if kinds[1] == Q else None)
        if op in ("tril", "triu"):
            return attrs, ("k" if kinds[-2:] == [Q, K] else None)
        if op == "arange" and kinds == [K]:
            return {**attrs, "length": self.all}, None
        if op == "prefix" and kinds[attrs["axis"]] == K:
            return {**attrs, "length": self.all}, None
        return attrs, None

    def reorder(self, parents: np.ndarray) -> None:
        """Each row continues row ``parents[i]`` of the last step (beam search)."""
        for node, value in self.cache.items():
            self.cache[node] = take_rows(value, self._step_names(node), parents, self.g.graph["dims"])

    def run(self, feeds: dict, known: dict, n_past: int) -> dict:
        """Outputs for the new tokens ``feeds[seq input]`` after ``n_past`` cached positions.

        Runtime checks verify each node's named shape and kernel signature on the
        prefill and on the first one-token step: later steps differ only in the
        length of the cached (all-positions) axes, which the named shapes leave free."""
        ex, g = self.ex, self.g
        if n_past == 0:
            self.cache = {}
        if getattr(self, "_steps_for", None) != set(known):
            self._steps_for, self._steps = set(known), self._prepare(set(known))
        values, sizes = ex._bind_inputs(feeds)
        n_new = sizes[self.seq]
        sizes[self.all] = n_past + n_new
        values.update(known)
        full: dict = {}
        for node in list(values):
            if node in self.cached:
                self._keep(node, values[node], self.cached[node], full, n_past)
        seen, check = ex.seen, ex.check
        # A step's shapes but the length of the all-positions axes, which steps may grow.
        shape_key = (n_new, n_past > 0, ex.dtype.char,
                     tuple(sorted((k, v) for k, v in sizes.items() if k not in (self.seq, self.all))))
        for node, op, argspec, attrs, offset, p, names, kernel, call, source, special, axis in self._steps:
            ins = [full[u] if whole else values[u] for u, whole in argspec]
            if offset is not None and n_past:
                attrs = {**attrs, offset: attrs.get(offset, 0) + n_past}
            fresh = False
            if check:
                signature = (node, shape_key)
                fresh = signature not in seen
                if fresh:
                    seen.add(signature)
            if special:
                out = self._special(node, op, ins, attrs, n_past, n_new, source)
            else:
                fn = _checked(op, kernel) if fresh and kernel is not None else kernel
                out = run_kernel(node, op, source, fn, call, ins, attrs, p, sizes, ex.dtype,
                                 " in an incremental step")
            if fresh and names is not None:
                ex._check_shape(node, names, out, sizes, source)
            values[node] = out
            if axis is not None:
                self._keep(node, out, axis, full, n_past)
        self.length = n_past + n_new
        return {g.nodes[o]["attrs"]["name"]: values[o] for o in g.graph["outputs"]}

    def _keep(self, node, new, axis, full, n_past) -> None:
        """Append ``new`` to the node's cache along ``axis``: a buffer with room to grow
        (doubled when full), so a step writes its rows instead of copying the past."""
        n_new = new.shape[axis]
        end = n_past + n_new
        buf = self.cache.get(node) if n_past else None
        if buf is None or buf.shape[axis] < end or buf.dtype != new.dtype:
            shape = list(new.shape)
            shape[axis] = max(2 * end, 16)
            grown = np.empty(shape, dtype=new.dtype)
            if buf is not None:
                grown[_along(axis, 0, n_past)] = buf[_along(axis, 0, n_past)]
            buf = self.cache[node] = grown
        buf[_along(axis, n_past, end)] = new
        full[node] = buf[_along(axis, 0, end)]

    def _special(self, node, op, ins, attrs, n_past, n_new, source):
        """Ops whose new rows are not their kernel on the new inputs."""
        kinds = self.kinds[node]
        if op == "causal_mask" and kinds == [Q, K]:
            return np.tril(np.ones((n_new, n_past + n_new), dtype=bool), n_past)
        if op == "arange" and kinds == [Q]:
            return np.arange(n_past, n_past + n_new)
        x, axis = ins[0], attrs["axis"]  # prefix: the table's rows of the new positions
        if n_past + n_new > x.shape[axis]:
            raise ExecutionError(f"node {node} ({op}, {source}) failed in an incremental step: position "
                                 f"{n_past + n_new - 1} is beyond the table's {x.shape[axis]} rows")
        return x[_along(axis, n_past, n_past + n_new)]


def _along(axis: int, start: int, stop: int) -> tuple:
    return (slice(None),) * axis + (slice(start, stop),)


def take_rows(value: np.ndarray, names: tuple, rows: np.ndarray, dims: dict, batch: str = "batch") -> np.ndarray:
    """``value``'s batch rows ``rows``, also where batch is merged with model dims on one axis
    (``batch*heads``: the batch factor's rows, each with all of its heads)."""
    for axis, name in enumerate(names):
        parts = factors(name)
        if batch not in parts:
            continue
        if len(parts) == 1:
            return np.take(value, rows, axis=axis)
        sizes = [value.shape[axis] if f == batch else dims.get(f) for f in parts]
        if any(not isinstance(n, int) for n in sizes):
            raise ExecutionError(f"cannot pick batch rows of an axis {name}: a dim merged with batch has no size")
        sizes[parts.index(batch)] = value.shape[axis] // int(np.prod([n for f, n in zip(parts, sizes) if f != batch]))
        split = value.reshape(value.shape[:axis] + tuple(sizes) + value.shape[axis + 1:])
        taken = np.take(split, rows, axis=axis + parts.index(batch))
        return taken.reshape(value.shape[:axis] + (-1,) + value.shape[axis + 1:])
    return value


def seq_dim_of(graph, input_name: str) -> str:
    for node in graph.graph["inputs"]:
        if graph.nodes[node]["attrs"]["name"] == input_name:
            return graph.nodes[node]["shape"][-1]
    raise QkvflowError(f"no input {input_name!r}")


"""The tracer: runs model code on symbolic tensors and records the graph.

:func:`trace` calls ``model.build()`` with a :class:`Tracer` active. Every
:mod:`qkvflow.nn` call and every array operation on a :class:`Sym` becomes
one node whose shape is derived by name (:mod:`qkvflow.shapes`). When an
attention block returns, the tracer finds its scores, softmax and
weighted-sum nodes, walks Q, K and V back to the tensors they were computed
from, marks those edges with roles ``q``, ``k``, ``v`` and records the facts
beside the block's declaration in ``graph.graph["attention"]``: the origins,
the block's nodes that read them (``entries``), the masks, the line that
called the block and the lines of its annotations, so a finding can name
the line of the mistake.
"""

import ast
import collections
import functools
import inspect
import linecache
import textwrap
import tokenize

import networkx as nx

from .context import ENTRY_CODES, PACKAGE_DIR, Context, Model, activate
from ..ir.dims import DataDim, Dim, size_of
from ..ir.errors import QkvflowError, TraceError
from ..ir.graph import new_graph
from ..ir.shapes import Meta, ShapeIssue, infer

__all__ = ["trace", "Tracer", "Sym"]


class Sym:
    """A symbolic tensor: a graph node plus NumPy-style methods."""

    __slots__ = ("tracer", "node")
    __array_priority__ = 1000

    def __init__(self, tracer: "Tracer", node: str) -> None:
        self.tracer = tracer
        self.node = node

    # --- what the node knows -------------------------------------------------
    @property
    def meta(self) -> Meta:
        d = self.tracer.graph.nodes[self.node]
        return Meta(d["shape"], d["key_axis"], d["dtype"])

    @property
    def names(self) -> tuple:
        return self.tracer.graph.nodes[self.node]["shape"]

    @property
    def shape(self) -> tuple:
        return tuple(self.tracer.dim_for(n) for n in self.names)

    @property
    def ndim(self) -> int:
        return len(self.names)

    @property
    def dtype(self) -> str:
        return self.tracer.graph.nodes[self.node]["dtype"]

    def __repr__(self) -> str:
        return f"Sym({self.node}: ({', '.join(self.names)}))"

    def __bool__(self):
        raise TraceError(
            f"the truth value of traced tensor {self.node} is unknown while tracing; "
            "use qkvflow.nn.where instead of an if on array values"
        )

    def __len__(self) -> int:
        raise TraceError(f"len() of traced tensor {self.node}: use .shape[0]")

    # --- NumPy-style methods, all recorded through qkvflow.nn ----------------
    def reshape(self, *shape):
        from . import nn
        return nn.reshape(self, *shape)

    def transpose(self, *axes):
        from . import nn
        return nn.transpose(self, *axes)

    def swapaxes(self, a: int, b: int):
        from . import nn
        return nn.swapaxes(self, a, b)

    @property
    def T(self):
        from . import nn
        return nn.transpose(self)

    @property
    def mT(self):
        from . import nn
        return nn.swapaxes(self, -1, -2)

    def sum(self, axis=None, keepdims=False):
        from . import nn
        return nn.reduce("sum", self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        from . import nn
        return nn.reduce("mean", self, axis, keepdims)

    def max(self, axis=None, keepdims=False):
        from . import nn
        return nn.reduce("max", self, axis, keepdims)

    def min(self, axis=None, keepdims=False):
        from . import nn
        return nn.reduce("min", self, axis, keepdims)

    def __getitem__(self, index):
        from . import nn
        return nn.index(self, index)

    def __matmul__(self, other):
        from . import nn
        return nn.matmul(self, other)

    def __rmatmul__(self, other):
        from . import nn
        return nn.matmul(other, self)

    def _binary(self, fn, other, reverse=False):
        from . import nn
        return nn.elementwise(fn, other, self) if reverse else nn.elementwise(fn, self, other)

    def __add__(self, o):
        return self._binary("add", o)

    def __radd__(self, o):
        return self._binary("add", o, True)

    def __sub__(self, o):
        return self._binary("sub", o)

    def __rsub__(self, o):
        return self._binary("sub", o, True)

    def __mul__(self, o):
        return self._binary("mul", o)

    def __rmul__(self, o):
        return self._binary("mul", o, True)

    def __truediv__(self, o):
        return self._binary("div", o)

    def __rtruediv__(self, o):
        return self._binary("div", o, True)

    def __pow__(self, o):
        return self._binary("pow", o)

    def __and__(self, o):
        return self._binary("and", o)

    def __rand__(self, o):
        return self._binary("and", o, True)

    def __or__(self, o):
        return self._binary("or", o)

    def __ror__(self, o):
        return self._binary("or", o, True)

    def __eq__(self, o):  # noqa: D105 - elementwise like NumPy
        return self._binary("eq", o)

    def __ne__(self, o):
        return self._binary("ne", o)

    def __lt__(self, o):
        return self._binary("lt", o)

    def __le__(self, o):
        return self._binary("le", o)

    def __gt__(self, o):
        return self._binary("gt", o)

    def __ge__(self, o):
        return self._binary("ge", o)

    __hash__ = object.__hash__

    def __neg__(self):
        from . import nn
        return nn.elementwise("neg", self)

    def __invert__(self):
        from . import nn
        return nn.elementwise("not", self)

    # NumPy functions and ufuncs called on a Sym are recorded too.
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        from . import nn
        return nn.numpy_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        from . import nn
        return nn.numpy_function(func, args, kwargs)


class Tracer(Context):
    """Records operations into a MultiDiGraph with named-dim shapes."""

    def __init__(self, dims: dict, **graph_attrs) -> None:
        super().__init__(dims)
        self.graph = new_graph(dims=dict(dims), **graph_attrs)
        self.counts: collections.Counter = collections.Counter()
        self.order: list[str] = []  # nodes in the order they were recorded

    def dim_for(self, name: str):
        size = size_of(name, self.dims)
        return DataDim(name) if size is None else Dim(name, size)

    def unique_path(self, name: str, must_be_new: bool) -> str:
        path = self.path(name)
        if path not in self.graph:
            return path
        if must_be_new:
            raise TraceError(f"two parametrised ops are both named {path!r}; give them different names")
        while True:
            self.counts[path] += 1
            candidate = f"{path}_{self.counts[path]}"
            if candidate not in self.graph:
                return candidate

    def record(self, op: str, args: list, *, name: str | None = None, attrs: dict | None = None,
               params: dict | None = None, roles: list | None = None) -> Sym:
        attrs = dict(attrs or {})
        params = {k: tuple(v) for k, v in (params or {}).items()}
        for a in args:
            if not isinstance(a, Sym) or a.tracer is not self:
                raise TraceError(f"{op} got {type(a).__name__} where a traced tensor was expected")
        path = self.unique_path(name or op, must_be_new=bool(params))
        metas = [a.meta for a in args]
        try:
            meta = infer(op, metas, attrs, params, self.dims)
        except ShapeIssue as issue:
            meta = issue.fallback  # the checker reports it; keep tracing
        source = self.user_source()
        if source == "?" and args:  # recorded by trace() itself, e.g. an output marker
            source = self.graph.nodes[args[0].node]["source"]
        self.graph.add_node(
            path, op=op, path=path, shape=tuple(meta.shape), dtype=meta.dtype,
            key_axis=meta.key_axis, attrs=attrs, params=params,
            source=source, **self.scope_attrs(),
        )
        self.order.append(path)
        for i, a in enumerate(args):
            role = roles[i] if roles else None
            if role is None:
                role = {"bool": "mask", "int": "ids"}.get(a.dtype, "x")
            self.graph.add_edge(a.node, path, role=role, arg=i)
        return Sym(self, path)

    # --- attention blocks ----------------------------------------------------
    def finish_attention(self, path: str, record: dict, args: dict, out, start: int) -> None:
        """Find scores/softmax/attend inside block ``path``; trace Q, K, V back.

        ``start`` is the length of ``self.order`` when the block was entered.
        """
        g = self.graph
        inside = {n for n in self.order[start:] if n.startswith(path + ".")}
        record.update(
            args={k: v.node for k, v in args.items() if isinstance(v, Sym)},
            arg_shapes={k: v.names for k, v in args.items() if isinstance(v, Sym)},
            output=out.node if isinstance(out, Sym) else None,
            output_shape=out.names if isinstance(out, Sym) else None,
            nodes=len(inside),
            call_source=self.user_source(),  # the line that called the block
            annotation_sources=dict(_annotation_lines(record.get("source", ""))),
        )
        g.graph["attention"][path] = record
        softmaxes = [n for n in self.order[start:] if n in inside and g.nodes[n]["op"] == "softmax"]
        if not softmaxes:
            record["problem"] = ("no softmax inside the block; use qkvflow.nn.softmax so its scores, "
                                 "weights and weighted sum can be identified")
            return
        sm = softmaxes[0]
        scores = _nearest(g, sm, inside, {"scores", "matmul", "einsum"}, backwards=True)
        attend = _nearest(g, sm, inside, {"attend", "matmul", "einsum"}, backwards=False)
        if scores is None or attend is None:
            record["problem"] = "no scores product before the softmax or no weighted sum after it"
            return
        record.update(scores=scores, softmax=sm, attend=attend)
        record["origins"], record["entries"] = self._trace_qkv(scores, sm, attend, inside)
        record["masks"] = sorted(_mask_label(g, n) for n in _masks_beside(g, sm, scores, inside))

    def _trace_qkv(self, scores: str, sm: str, attend: str, inside: set) -> tuple[dict, dict]:
        """Label the Q, K, V (and probs) edges; return each role's origin and the
        block's node that reads it."""
        g = self.graph
        q_arg, k_arg = _query_key_args(g.nodes[scores])
        into_scores = {d["arg"]: (u, k) for u, _, k, d in g.in_edges(scores, keys=True, data=True)}
        into_attend = {d["arg"]: (u, k) for u, _, k, d in g.in_edges(attend, keys=True, data=True)}
        after_softmax = _within(g, sm, inside)  # block nodes the weights flow into
        v_arg = next((arg for arg, (u, _) in into_attend.items() if u != sm and u not in after_softmax), None)
        origins, entries = {}, {}
        for role, (first, key), consumer in (
            ("q", into_scores.get(q_arg, (None, None)), scores),
            ("k", into_scores.get(k_arg, (None, None)), scores),
            ("v", into_attend.get(v_arg, (None, None)), attend),
        ):
            if first is None:
                continue
            g.edges[first, consumer, key]["role"] = role
            origins[role], entry = self._walk_back(first, inside, role)
            entries[role] = entry or consumer
        for arg, (u, key) in into_attend.items():
            if arg != v_arg:
                g.edges[u, attend, key]["role"] = "probs"
        return origins, entries

    def _walk_back(self, node: str, inside: set, role: str) -> tuple:
        """Follow the data operand out of the block; label the chain's edges ``role``.

        Returns the origin (the first node outside the block) and the
        block's node that reads it (None when ``node`` is already outside).
        """
        g = self.graph
        entry = None
        while node in inside:
            preds = sorted(g.in_edges(node, keys=True, data=True), key=lambda e: e[3]["arg"])
            if not preds:
                return None, node
            u, _, k, _ = _data_operand(g, preds)
            g.edges[u, node, k]["role"] = role
            entry, node = node, u
        return node, entry


def _data_operand(g, preds: list) -> tuple:
    """The input edge carrying the data, not a mask: a full-shaped float
    operand (``where(keep, v, 0)`` and ``keep * v`` lead back through v)."""
    def rank(edge):
        d = g.nodes[edge[0]]
        return (d["dtype"] != "float", "1" in d["shape"], edge[3]["arg"])
    return min(preds, key=rank)


def _masks_beside(g, sm: str, scores: str, inside: set) -> set:
    """Mask ops that reach the softmax beside the scores product (not through Q or K),
    made inside the block or handed in."""
    region, outside, stack = set(), set(), [sm]
    while stack:
        for u in g.predecessors(stack.pop()):
            if u == scores or u in region:
                continue
            if u in inside:
                region.add(u)
                stack.append(u)
            else:
                outside.add(u)
    mask_ops = ("padding_mask", "causal_mask")
    found = {n for o in outside for n in nx.ancestors(g, o) | {o} if g.nodes[n]["op"] in mask_ops}
    return found | {n for n in region if g.nodes[n]["op"] in mask_ops}


def _query_key_args(scores: dict) -> tuple[int, int]:
    """Argument positions of Q and K in a scores product: (0, 1), except for an
    einsum written keys first ("bhkd,bhqd->bhqk"), told by the key axis."""
    if scores["op"] != "einsum" or scores.get("key_axis") is None:
        return 0, 1
    lhs, rhs = scores["attrs"]["equation"].replace(" ", "").split("->")
    specs = lhs.split(",")
    key_letter = rhs[scores["key_axis"]]
    k_arg = next((i for i, spec in enumerate(specs) if key_letter in spec), 1)
    return (1, 0) if k_arg == 0 else (0, k_arg)


def _within(g, start: str, inside: set) -> set:
    """Nodes of the block reachable from ``start`` (cost bounded by the block's size)."""
    seen, stack = set(), [start]
    while stack:
        for n in g.successors(stack.pop()):
            if n in inside and n not in seen:
                seen.add(n)
                stack.append(n)
    return seen


def _nearest(g, start: str, inside: set, ops: set, backwards: bool) -> str | None:
    """Breadth-first from ``start`` within the block to the nearest node of ``ops``."""
    frontier, seen = collections.deque([start]), {start}
    while frontier:
        node = frontier.popleft()
        nxt = g.predecessors(node) if backwards else g.successors(node)
        for n in sorted(set(nxt)):
            if n in seen or n not in inside:
                continue
            if g.nodes[n]["op"] in ops:
                return n
            seen.add(n)
            frontier.append(n)
    return None


@functools.lru_cache(maxsize=256)
def _annotation_lines(source: str) -> dict:
    """``file:line`` of each annotated argument (and ``return``) of the function
    defined at ``source``; {} when its source text cannot be read."""
    path, _, line = source.rpartition(":")
    if not line.isdigit():
        return {}
    try:
        block = inspect.getblock(linecache.getlines(path)[int(line) - 1:])
        tree = ast.parse(textwrap.dedent("".join(block)))
    except (SyntaxError, IndexError, ValueError, tokenize.TokenError):
        return {}
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {}
    first = int(line) - 1
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    found = {a.arg: f"{path}:{first + a.annotation.lineno}" for a in args if a.annotation}
    if fn.returns is not None:
        found["return"] = f"{path}:{first + fn.returns.lineno}"
    return found


def _mask_label(g, node: str) -> str:
    op = g.nodes[node]["op"]
    if op == "causal_mask":
        return "causal"
    ids = [u for u in nx.ancestors(g, node) if g.nodes[u]["op"] == "input"]
    name = g.nodes[ids[0]]["attrs"].get("name", "") if ids else ""
    return {"src_ids": "src_padding", "tgt_ids": "tgt_padding"}.get(name, f"{name}_padding")


def _failing_line(err: Exception) -> str:
    """``file:line`` of the innermost traceback frame in the user's own code:
    outside qkvflow, the standard library and installed packages."""
    import os
    import sysconfig
    import traceback
    frames = traceback.extract_tb(err.__traceback__)
    library = [PACKAGE_DIR] + [
        os.path.abspath(sysconfig.get_path(k)) for k in ("stdlib", "purelib", "platlib")]
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not any(path.startswith(root + os.sep) for root in library):
            return f"{frame.filename}:{frame.lineno}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def trace(model: Model) -> nx.MultiDiGraph:
    """Trace ``model`` into the qkvflow graph (symbolic: named dims, no numbers).

    Examples
    --------
    >>> import qkvflow as qf
    >>> g = qf.trace(qf.load_model("tiny"))
    >>> g.nodes["decoder.layers.0.cross_attn.k_proj"]["shape"]
    ('batch', 'src', 'heads*d_head')
    """
    if not isinstance(model, Model):
        raise TraceError(f"trace() needs a qkvflow Model, got {type(model).__name__}")
    tracer = Tracer(model.dims, config=dict(model.config), model=model.name)
    with activate(tracer):
        try:
            outputs = model.build()
        except QkvflowError:
            raise
        except Exception as err:  # the model's own code failed on symbolic arrays
            raise TraceError(
                f"tracing {model.name!r} failed at {_failing_line(err)}: {type(err).__name__}: {err}"
            ) from err
    if not isinstance(outputs, dict) or not all(isinstance(v, Sym) for v in outputs.values()):
        raise TraceError(f"model {model.name!r}: build() must return a dict of traced outputs")
    for name, sym in outputs.items():
        if tracer.graph.nodes[sym.node]["op"] != "output":
            from . import nn
            with activate(tracer):
                sym = nn.output(sym, name)
        tracer.graph.graph["outputs"].append(sym.node)
    return tracer.graph


ENTRY_CODES.add(trace.__code__)

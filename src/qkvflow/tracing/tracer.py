"""The tracer: runs model code on symbolic tensors and records the graph.

:func:`trace` calls ``model.build()`` with a :class:`Tracer` active. Every
:mod:`qkvflow.nn` call and every array operation on a
:class:`~qkvflow.tracing.tensor.Sym` becomes one node whose shape is derived
by name (the op's rule in :mod:`qkvflow.ir.ops`). A declared attention
block adds its declaration to ``graph.graph["attention"]``: kind, declared
Q/K/V states, mask and shapes, what it was handed and returned, the line
that called it and the lines of its annotations, so a finding can name the
line of a mistake. The tracer only records: where Q, K and V really come
from is worked out by the provenance pass (:mod:`qkvflow.passes.provenance`).
"""

import ast
import collections
import functools
import inspect
import linecache
import textwrap
import tokenize

import networkx as nx

from ..ir.dims import DataDim, Dim, DimTable, size_of
from ..ir.errors import QkvflowError, TraceError
from ..ir.graph import new_graph
from ..ir.ops import infer
from ..ir.shapes import ShapeIssue
from ..ir.text import shown_path
from .context import ENTRY_CODES, PACKAGE_DIR, Context, Model, activate
from .tensor import Sym, numpy_constants_traced

__all__ = ["trace", "Tracer"]

SEQUENCE_RULES = ("causal", "bidirectional")
# Nodes traced without being asked for more: ~35x a 48+48-layer Transformer (2,900 nodes).
# A config's layers are counted against it before anything is built.
MAX_NODES = 100_000
_NODES_PER_LAYER = 45  # above the most a built-in family's layer records


class Tracer(Context):
    """Records operations into a MultiDiGraph with named-dim shapes."""

    tracing = True

    def __init__(self, dims: dict, sequences: dict | None = None, *, max_nodes: int | None = MAX_NODES,
                 **graph_attrs) -> None:
        super().__init__(dims)
        self.max_nodes = max_nodes
        # Declared sequence dims, or (undeclared) grown from the token-id inputs.
        self.declared_sequences = sequences
        self.dims = DimTable(dims, sequences or ())
        self.graph = new_graph(dims=dict(dims), **graph_attrs)
        self.counts: collections.Counter = collections.Counter()

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
        if self.max_nodes is not None and len(self.graph) >= self.max_nodes:
            raise TraceError(_too_large(f"more than {self.max_nodes:,} graph nodes"))
        path = self.unique_path(name or op, must_be_new=bool(params))
        metas = [a.meta for a in args]
        try:
            meta = infer(op, metas, attrs, params, self.dims)
        except ShapeIssue as issue:
            meta = issue.fallback  # the checker reports it; keep tracing
        sources = self.user_sources()
        source = sources[0]
        if source == "?" and args:  # recorded by trace() itself, e.g. an output marker
            source = self.graph.nodes[args[0].node]["source"]
        self.graph.add_node(
            path, op=op, path=path, shape=tuple(meta.shape), dtype=meta.dtype,
            key_axis=meta.key_axis, attrs=attrs, params=params,
            source=source, **self.scope_attrs(),
        )
        if len(sources) > 1:  # made in a helper: the lines that called it, for findings
            self.graph.nodes[path]["callers"] = sources[1:]
        for i, a in enumerate(args):
            role = roles[i] if roles else None
            if role is None:
                role = {"bool": "mask", "int": "ids"}.get(a.dtype, "x")
            self.graph.add_edge(a.node, path, role=role, arg=i)
        return Sym(self, path)

    def record_input(self, name: str, attrs: dict) -> Sym:
        if any(self.graph.nodes[n]["attrs"]["name"] == name for n in self.graph.graph["inputs"]):
            raise TraceError(f"two inputs are both named {name!r}")
        sym = self.record("input", [], name=name, attrs=attrs)
        self.graph.graph["inputs"].append(sym.node)
        shape = attrs["shape"]
        if attrs["dtype"] == "int" and shape and self.declared_sequences is None:
            if self.dims.get(shape[-1], 0) is None:  # token ids: (..., sequence)
                self.dims.seq.add(shape[-1])
        return sym

    def declare_attention(self, record: dict, args: dict, out) -> None:
        """Record an attention block's declaration and what it was handed and returned."""
        path = self.here()
        if path in self.graph.graph["attention"]:
            raise TraceError(f"two attention blocks share the path {path!r}; call them with different names")
        where = self.scope_attrs()
        record.update(
            stream=where["stream"], layer=where["layer"],
            args={k: v.node for k, v in args.items() if isinstance(v, Sym)},
            arg_shapes={k: v.names for k, v in args.items() if isinstance(v, Sym)},
            output=out.node if isinstance(out, Sym) else None,
            output_shape=out.names if isinstance(out, Sym) else None,
            call_source=self.user_source(),  # the line that called the block
            annotation_sources=dict(_annotation_lines(record.get("source", ""))),
            span=_function_span(record.get("source", "")),
        )
        self.graph.graph["attention"][path] = record

@functools.lru_cache(maxsize=256)
def _function_lines(source: str) -> tuple[str, int, list] | None:
    """(file, first line, source lines) of the function defined at ``source``;
    None when its source text cannot be read."""
    path, _, line = source.rpartition(":")
    if not line.isdigit():
        return None
    try:
        block = inspect.getblock(linecache.getlines(path)[int(line) - 1:])
    except (SyntaxError, IndexError, ValueError, tokenize.TokenError):
        return None
    return (path, int(line), block) if block else None


@functools.lru_cache(maxsize=256)
def _annotation_lines(source: str) -> dict:
    """``file:line`` of each annotated argument (and ``return``) of the function
    defined at ``source``; {} when its source text cannot be read."""
    found = _function_lines(source)
    if found is None:
        return {}
    path, line, block = found
    try:
        tree = ast.parse(textwrap.dedent("".join(block)))
    except SyntaxError:
        return {}
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {}
    first = line - 1
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    found = {a.arg: f"{path}:{first + a.annotation.lineno}" for a in args if a.annotation}
    if fn.returns is not None:
        found["return"] = f"{path}:{first + fn.returns.lineno}"
    return found


@functools.lru_cache(maxsize=256)
def _function_span(source: str) -> list:
    """[file, first line, last line] of the function defined at ``source``; [] when unreadable."""
    found = _function_lines(source)
    if found is None:
        return []
    path, line, block = found
    return [shown_path(path), line, line + len(block) - 1]


def _failing_line(err: Exception, user_only: bool = False) -> str | None:
    """``file:line`` of the innermost traceback frame in the user's own code:
    outside qkvflow, the standard library and installed packages (else the
    innermost frame, or None with ``user_only``)."""
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
    if user_only:
        return None
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def trace(model: Model, *, allow_large: bool = False) -> nx.MultiDiGraph:
    """Record ``model`` into a graph (symbolic: named dims, no numbers).

    The graph holds operations and declarations only; :func:`qkvflow.trace`
    also runs the provenance pass over it. A model of more than
    :data:`MAX_NODES` nodes is refused unless ``allow_large``.
    """
    if not isinstance(model, Model):
        raise TraceError(f"trace() needs a qkvflow Model, got {type(model).__name__}")
    _check_declarations(model)
    if not allow_large:
        layers = sum(v for k, v in model.config.items() if k.endswith("layers") and type(v) is int and v > 0)
        if layers * _NODES_PER_LAYER > MAX_NODES:
            raise TraceError(_too_large(f"{layers:,} layers, about {layers * _NODES_PER_LAYER:,} graph nodes"))
    aliases = _aliases(model)
    tracer = Tracer(model.dims, model.sequences, config=dict(model.config), model=model.name, aliases=aliases,
                    max_nodes=None if allow_large else MAX_NODES)
    tracer.dims.aliases = aliases
    with activate(tracer), numpy_constants_traced():
        try:
            outputs = model.build()
        except TraceError as err:  # refused: say where in the user's code
            where = _failing_line(err, user_only=True)
            if where is None or str(err).startswith("tracing "):
                raise
            raise TraceError(f"tracing {model.name!r} failed at {where}: {err}") from err
        except (QkvflowError, KeyboardInterrupt):
            raise
        except BaseException as err:  # the model's own code failed on symbolic arrays
            raise TraceError(
                f"tracing {model.name!r} failed at {_failing_line(err)}: {type(err).__name__}: {err}"
            ) from err
    if not isinstance(outputs, dict) or not outputs or not all(
            isinstance(k, str) and isinstance(v, Sym) for k, v in outputs.items()):
        raise TraceError(f"model {model.name!r}: build() must return a non-empty dict of named traced "
                         f"outputs, got {type(outputs).__name__}")
    for name, sym in outputs.items():
        if tracer.graph.nodes[sym.node]["op"] != "output":
            with activate(tracer):
                sym = tracer.record("output", [sym], name=name, attrs={"name": name})
        tracer.graph.graph["outputs"].append(sym.node)
    g = tracer.graph
    g.graph["sequences"] = model.sequences or _derived_sequences(g, tracer.dims.seq)
    g.graph["streams"] = list(model.streams or _derived_streams(g))
    _check_use(model, g)
    return g


def _too_large(what: str) -> str:
    # Measured on vaswani-base layers: ~5 s to trace, ~7 s to check, ~400 MB per 100,000 nodes.
    return (f"the model has {what}, more than the {MAX_NODES:,} qkvflow traces unasked (tracing and "
            "checking take about 12 s and 400 MB per 100,000 nodes); pass --allow-large "
            "(Python: qkvflow.trace(model, allow_large=True)) if you mean it")


def _check_use(model: Model, g: nx.MultiDiGraph) -> None:
    """Declared sequences and streams are the ones the model's code uses."""
    named = {d["stream"] for _, d in g.nodes(data=True) if d["stream"]}
    undeclared = sorted(named - set(g.graph["streams"]))
    if undeclared:
        raise TraceError(f"model {model.name!r}: scopes name the stream(s) {', '.join(undeclared)}, "
                         f"which the model does not declare (streams: {', '.join(g.graph['streams'])})")
    unused = [s for s in g.graph["streams"] if s not in named]
    if unused:
        raise TraceError(f"model {model.name!r} declares the stream {unused[0]!r}, which no scope names")
    used = {f for _, shape in g.nodes(data="shape") for name in shape for f in name.split("*")}
    idle = [s for s in g.graph["sequences"] if s not in used]
    if idle:
        raise TraceError(f"model {model.name!r} declares the sequence dim {idle[0]!r}, which no tensor has")
    for node in g.graph["inputs"]:
        attrs = g.nodes[node]["attrs"]
        if attrs["dtype"] == "int" and attrs["shape"] and attrs["shape"][-1] not in g.graph["sequences"]:
            raise TraceError(f"model {model.name!r}: token input {attrs['name']!r} runs over "
                             f"{attrs['shape'][-1]!r}, which is not one of its sequence dims "
                             f"({', '.join(g.graph['sequences']) or 'none declared'})")


def _aliases(model: Model) -> dict:
    """The model's aliases, checked by size; kv_heads is heads when of one size."""
    from ..ir.dims import size_of
    aliases = dict(model.aliases)
    if model.dims.get("kv_heads") is not None and model.dims.get("kv_heads") == model.dims.get("heads"):
        aliases.setdefault("kv_heads", "heads")
    for name, meaning in aliases.items():
        have, want = size_of(name, model.dims), size_of(meaning, model.dims)
        if have is None or want is None or have != want:
            raise TraceError(f"model {model.name!r}: alias {name} = {meaning} needs both sized and equal, "
                             f"got {have} and {want}")
    return aliases


def _check_declarations(model: Model) -> None:
    free = [name for name, size in model.dims.items() if size is None]
    for name, rule in (model.sequences or {}).items():
        if name not in free:
            raise TraceError(f"model {model.name!r} declares sequence dim {name!r}, which is not a data "
                             f"dim of its dims table (data dims, of size None: {', '.join(free) or 'none'})")
        if rule not in SEQUENCE_RULES:
            raise TraceError(f"model {model.name!r}: sequence dim {name!r} is {rule!r}; "
                             f"expected one of {', '.join(SEQUENCE_RULES)}")
    if model.streams is not None and not all(isinstance(s, str) and s for s in model.streams):
        raise TraceError(f"model {model.name!r}: streams must be names, got {model.streams!r}")


def _derived_sequences(g: nx.MultiDiGraph, seq: set) -> dict:
    """Undeclared: the token inputs' sequence dims, causal where a ``decoder_self``
    (masked self-attention) block is handed them."""
    causal = {name for rec in g.graph["attention"].values() if rec["kind"] == "decoder_self"
              for shape in rec["arg_shapes"].values() for name in shape if name in seq}
    return {name: "causal" if name in causal else "bidirectional" for name in sorted(seq)}


def _derived_streams(g: nx.MultiDiGraph) -> list:
    return list(dict.fromkeys(d["stream"] for _, d in g.nodes(data=True) if d["stream"]))


ENTRY_CODES.add(trace.__code__)

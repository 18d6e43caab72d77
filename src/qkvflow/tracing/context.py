"""Where model code runs: traced (symbolic) or eager (NumPy arrays).

Model code is ordinary Python calling :mod:`qkvflow.nn` and array methods.
Inside ``trace`` it sees :class:`~qkvflow.tracing.tensor.Sym` values and every
operation becomes a graph node; inside :func:`eager` it sees NumPy arrays
and runs directly. Both keep the same scope stack, so a parameter is named
by the same path in both (``decoder.layers.1.cross_attn.k_proj.weight``).
"""

import contextlib
import contextvars
import os
import sys

from ..ir.dims import DataDim, Dim
from ..ir.dtypes import run_dtype
from ..ir.errors import InputError, ModelLoadError, ParamError, TraceError
from ..ir.text import shown_path

__all__ = ["Context", "Eager", "current", "scope", "dim", "eager", "Model"]

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("qkvflow_context", default=None)
_TRACE_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(_TRACE_DIR)
# Frames in these files are qkvflow machinery, not the code a node came from.
_INTERNAL = {os.path.join(_TRACE_DIR, f) for f in ("context.py", "tracer.py", "tensor.py", "nn.py")}
# Code objects of entry points (``trace``): frames beyond them are the caller's.
ENTRY_CODES: set = set()


class Model:
    """A buildable model: named dims, a config and a ``build()`` function.

    ``build()`` creates its inputs with :func:`qkvflow.nn.input` and returns
    a dict of named outputs. It runs under ``trace`` (symbolic) or
    :func:`eager` (arrays) unchanged.

    ``dims`` maps each dim name to its size, None for data dims (batch and
    sequence lengths). ``sequences`` declares which data dims are token
    sequences and how positions may read each other: ``"causal"`` (position
    t depends on tokens <= t only, as in a decoder) or ``"bidirectional"``
    (on every non-padding token), e.g. ``{"src": "bidirectional", "tgt":
    "causal"}`` or ``{"seq": "causal"}``. ``streams`` names the model's
    residual streams (the ``stream=`` of its scopes), e.g. ``("encoder",
    "decoder")``. ``aliases`` names one dim two ways, e.g. ``{"d_v": "d_head",
    "d_model": "heads*d_head"}``; ``kv_heads`` is ``heads`` when they are of
    one size (no grouping). Undeclared, the sequences are the last dims of the token-id
    inputs, causal where a ``decoder_self`` block reads them, and the streams
    are those the scopes name.
    """

    def __init__(self, name: str, dims: dict, build, config: dict | None = None, *,
                 sequences: dict | None = None, streams=None, aliases: dict | None = None) -> None:
        _check_model(name, dims, build, config, sequences, streams)
        if aliases is not None and not (isinstance(aliases, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in aliases.items())):
            raise ModelLoadError(f"model {name!r}: aliases must map a dim name to a dim name or product, "
                                 f"got {aliases!r}"[:300])
        self.aliases = dict(aliases or {})
        self.name = name
        self.dims = dict(dims)
        self.build = build
        self.config = dict(config or {})
        self.sequences = None if sequences is None else dict(sequences)
        self.streams = None if streams is None else tuple(streams)
        self.params = None  # an imported model's weights (qkvflow.load_model("hf:PATH")), by parameter path

    def __repr__(self) -> str:
        return f"Model({self.name!r})"


def _check_model(name, dims, build, config, sequences, streams) -> None:
    """One sentence for a Model whose parts are not of the kinds it needs."""
    def bad(what: str, got) -> ModelLoadError:
        return ModelLoadError(f"model {name!r}: {what}, got {type(got).__name__} {got!r}"[:300])

    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"a model's name must be a non-empty string, got {name!r}"[:300])
    if not isinstance(dims, dict) or not all(
            isinstance(k, str) and (v is None or (isinstance(v, int) and not isinstance(v, bool)))
            for k, v in dims.items()):
        raise bad("dims must map dim names to integer sizes (None for data dims)", dims)
    if not callable(build):
        raise bad("build must be a function returning the model's outputs", build)
    if config is not None and not isinstance(config, dict):
        raise bad("config must be a dict", config)
    if sequences is not None and not (isinstance(sequences, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in sequences.items())):
        raise bad("sequences must map sequence dims to 'causal' or 'bidirectional'", sequences)
    if streams is not None and (isinstance(streams, str) or not isinstance(streams, (tuple, list))
                                or not all(isinstance(s, str) and s for s in streams)):
        raise bad("streams must be a tuple of stream names", streams)
    if streams is not None and len(set(streams)) != len(streams):
        raise bad("streams names a stream twice", streams)


class Context:
    """Scope stack and dims table shared by tracing and eager execution."""

    tracing = False  # a Tracer records nodes; other contexts compute

    def __init__(self, dims: dict) -> None:
        self.dims = dict(dims)
        self.scopes: list[tuple[str, dict]] = []

    def path(self, name: str) -> str:
        return ".".join([s for s, _ in self.scopes if s] + [name])

    def here(self) -> str:
        """The current scope's path."""
        return ".".join(s for s, _ in self.scopes if s)

    def scope_attrs(self) -> dict:
        attrs = {"stream": None, "layer": None, "block": None, "block_path": None, "attention": None,
                 "attention_block": None}
        parts = []
        for name, extra in self.scopes:
            if name:
                parts.append(name)
            for key, value in extra.items():
                attrs[key] = value
                if key == "block":
                    # An unnamed block scope groups nodes without renaming them.
                    attrs["block_path"] = ".".join(parts if name else parts + [value])
                elif key == "attention":  # a declared attention block: its nodes know it
                    attrs["attention_block"] = ".".join(parts)
        return attrs

    @contextlib.contextmanager
    def scope(self, name: str, **attrs):
        self.scopes.append((name, attrs))
        try:
            yield
        finally:
            self.scopes.pop()

    def dim(self, name: str):
        if name not in self.dims:
            raise TraceError(f"unknown dim {name!r}; known dims: {', '.join(sorted(self.dims))}")
        size = self.dims[name]
        return DataDim(name) if size is None else Dim(name, size)

    @staticmethod
    def user_source() -> str:
        """``file:line`` of the code a node came from.

        The innermost frame outside the qkvflow package (the user's own
        block, even when it calls a qkvflow helper), else the innermost
        frame outside qkvflow's tracing machinery (a built-in block).
        """
        return Context.user_sources(depth=1)[0]

    @staticmethod
    def user_sources(depth: int = 4) -> list:
        """Up to ``depth`` ``file:line`` of the user's frames, innermost first (a
        helper's line, then the line in the block that called it), else the
        innermost frame outside qkvflow's tracing machinery; ["?"] for none."""
        frame = sys._getframe(1)
        fallback, found = None, []
        while frame is not None and frame.f_code not in ENTRY_CODES and len(found) < depth:
            filename = frame.f_code.co_filename
            if filename not in _INTERNAL:
                if fallback is None:
                    fallback = frame
                if not filename.startswith(PACKAGE_DIR + os.sep):
                    found.append(_where(frame))
            frame = frame.f_back
        return found or [_where(fallback) if fallback is not None else "?"]


def _where(frame) -> str:
    return f"{shown_path(frame.f_code.co_filename)}:{frame.f_lineno}"


class Eager(Context):
    """Runs model code on NumPy arrays with the given parameters and inputs."""

    def __init__(self, dims: dict, params: dict, feeds: dict, dtype) -> None:
        super().__init__(dims)
        self.params = params
        self.feeds = feeds
        self.dtype = dtype

    def dim(self, name: str):
        value = super().dim(name)
        if isinstance(value, DataDim):
            raise TraceError(f"dim {name!r} has no size outside a run; read it from an array's shape")
        return int(value)

    def param(self, path: str):
        try:
            return self.params[path]
        except KeyError:
            raise TraceError(f"parameter {path!r} is missing") from None


def current() -> Context | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(ctx: Context):
    token = _ACTIVE.set(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def scope(name: str, **attrs):
    """Name a part of the model: ``with qf.scope("layers.0", layer=0): ...``.

    Keyword attrs (``stream``, ``layer``, ``block``) are recorded on every
    node created inside. Outside a trace or eager run it does nothing.
    """
    ctx = current()
    if ctx is None:
        yield
        return
    with ctx.scope(name, **attrs):
        yield


def dim(name: str):
    """A model dim by name: a :class:`Dim` while tracing, an ``int`` when eager."""
    ctx = current()
    if ctx is None:
        raise TraceError(f"dim({name!r}) needs a trace or an eager run")
    return ctx.dim(name)


def eager(model: Model, params: dict, feeds: dict, dtype="float64"):
    """Run ``model.build()`` on arrays: returns its outputs as arrays.

    This runs the model's own Python code (unlike :func:`qkvflow.forward`,
    which executes the traced graph); jaxtyping checks sizes on each block.
    """
    import numpy as np

    def arrays(values, what: str, error, **kw) -> dict:
        if not isinstance(values, dict):
            raise error(f"eager: {what} must be a dict of name -> array, got {type(values).__name__}")
        try:
            return {k: np.asarray(v, **kw) for k, v in values.items()}
        except (ValueError, TypeError) as err:
            raise error(f"eager: {what} holds a value that is not an array of one shape: {err}") from None

    dtype = run_dtype(dtype)
    sizes = dict(model.dims)
    ctx = Eager(sizes, arrays(params, "params", ParamError, dtype=dtype), arrays(feeds, "feeds", InputError), dtype)
    with activate(ctx):
        return model.build()

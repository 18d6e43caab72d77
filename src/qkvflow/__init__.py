"""qkvflow: where the queries, keys and values of every attention come from.

One graph, four consumers: :func:`trace` a model into a networkx graph, then
:func:`check` it, :func:`render` it, :func:`explain` it or run it
(:func:`forward`). Stages are imported on first use, so ``qkvflow check``
does not pay for graphviz or the executor.
"""

from .config import PRESETS, Config, load_toml, preset
from .context import Model, dim, eager, scope
from .errors import QkvflowError
from .loader import load_model
from .nn import attention
from .tracer import trace

__all__ = [
    "trace", "check", "render", "explain", "forward", "Executor",
    "init_params", "load_params", "save_params",
    "load_model", "preset", "load_toml", "Config", "PRESETS", "Model",
    "attention", "scope", "dim", "eager", "QkvflowError", "__version__",
]

__version__ = "0.1.0"

_LAZY = {
    "check": ("checker", "check"),
    "render": ("renderer", "render"),
    "explain": ("explainer", "explain"),
    "forward": ("execute", "forward"),
    "Executor": ("execute", "Executor"),
    "init_params": ("params", "init_params"),
    "load_params": ("params", "load_params"),
    "save_params": ("params", "save_params"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    if name in ("transformer", "testing", "graph", "kernels"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'qkvflow' has no attribute {name!r}")

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
    "trace", "check", "render", "explain", "forward", "generate",
    "init_params", "load_params", "save_params",
    "load_model", "preset", "load_toml", "Config", "PRESETS", "Model",
    "attention", "scope", "dim", "eager", "QkvflowError", "__version__",
]

__version__ = "0.1.0"

_LAZY = {
    "check": ("check", "check"),
    "render": ("render", "render"),
    "explain": ("explain", "explain"),
    "forward": ("execute", "forward"),
    "generate": ("execute", "generate"),
    "init_params": ("params", "init_params"),
    "load_params": ("params", "load_params"),
    "save_params": ("params", "save_params"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'qkvflow' has no attribute {name!r}")

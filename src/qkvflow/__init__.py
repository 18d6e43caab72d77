"""qkvflow: where the queries, keys and values of every attention come from.

One graph, four consumers: :func:`trace` a model into a networkx graph, then
:func:`check` it, :func:`render` it, :func:`explain` it or run it
(:func:`forward`). Stages are imported on first use, so ``qkvflow check``
does not pay for graphviz or the executor.

The package is laid out as the path of data: ``ir`` (the graph, dims, the
op registry), ``tracing`` (model code -> graph), ``passes`` (provenance,
shapes, information flow, the checks), ``views`` (render, explain), ``run``
(the executor and its kernels), ``models`` (configs and builders) and
``interop`` (torch).
"""

import sys as _sys

from .ir.errors import QkvflowError
from .models.config import PRESETS, Config, load_toml, preset
from .models import loader as _loader
from .tracing import nn
from .tracing.context import Model, dim, eager, scope
from .tracing.nn import attention, param
from .tracing.tracer import trace as _trace

# `import qkvflow.nn` and `from qkvflow import nn` give the same module.
_sys.modules[f"{__name__}.nn"] = nn

__all__ = [
    "trace", "check", "format_diagnostics", "render", "explain", "forward", "Executor",
    "init_params", "load_params", "save_params", "nest_params",
    "load_model", "import_hf", "diff", "generate", "from_torch_state_dict", "preset", "load_toml", "Config", "PRESETS", "Model",
    "attention", "param", "scope", "dim", "eager", "nn", "QkvflowError", "__version__",
]

__version__ = "0.1.0"



def trace(model, *, allow_large: bool = False):
    """Trace ``model`` into the qkvflow graph, annotated by the provenance pass.

    The tracer records every operation with named dims (no numbers); the
    provenance pass then labels the Q, K and V edges of every attention and
    writes its sites into ``graph.graph["attention"]``. A model of more than
    100,000 nodes (about 2,000 layers) is refused unless ``allow_large``.

    Examples
    --------
    >>> import qkvflow as qf
    >>> g = qf.trace(qf.load_model("tiny"))
    >>> g.nodes["decoder.layers.0.cross_attn.k_proj"]["shape"]
    ('batch', 'src', 'heads*d_head')
    >>> g.graph["attention"]["decoder.layers.0.cross_attn"]["sites"][0]["origins"]["k"]
    'encoder.layers.1.norm2'
    """
    from .passes.provenance import annotate
    return annotate(_trace(model, allow_large=allow_large))


def load_model(spec):
    """A Model from a preset name, a ``.toml`` path, ``module:factory``, a Config or a
    Model, or ``hf:PATH``: a local Hugging Face folder (config.json + safetensors), its
    weights in the model's ``params``.

    Examples
    --------
    >>> import qkvflow as qf
    >>> qf.load_model("gpt2-tiny").config["family"]
    'decoder_only'
    """
    if isinstance(spec, str) and spec.startswith("hf:"):
        from .interop.hf import import_hf
        imported = import_hf(spec[3:])
        imported.model.params = imported.params
        return imported.model
    model = _loader.load_model(spec)
    if spec == "toy-en-zh":  # the one preset whose trained weights ship with qkvflow
        from .models import toy_translation
        model.params = toy_translation.load()[1]
    return model


_LAZY = {
    "import_hf": ("interop.hf", "import_hf"),
    "diff": ("interop.diff", "diff"),
    "from_torch_state_dict": ("interop.torch_import", "from_torch_state_dict"),
    "check": ("passes.checks", "check"),
    "format_diagnostics": ("passes.formats", "format_diagnostics"),
    "render": ("views.render", "render"),
    "explain": ("views.explain", "explain"),
    "forward": ("run.execute", "forward"),
    "generate": ("run.generate", "generate"),
    "Executor": ("run.execute", "Executor"),
    "init_params": ("run.params", "init_params"),
    "load_params": ("run.params", "load_params"),
    "save_params": ("run.params", "save_params"),
    "nest_params": ("run.params", "nest_params"),
}
# Modules reachable as attributes: qf.transformer.build(...), qf.graph.tabular(...).
_MODULES = {
    "transformer": "models.encoder_decoder",
    "graph": "ir.graph",
    "kernels": "run.kernels",
    "testing": "testing",
}


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_MODULES))


def __getattr__(name):
    import importlib
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    if name in _MODULES:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    raise AttributeError(f"module 'qkvflow' has no attribute {name!r}")

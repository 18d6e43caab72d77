"""One exception hierarchy for everything a user can trigger.

The CLI turns any :class:`QkvflowError` into one line on stderr and exit
code 2; anything else escaping is a bug in qkvflow.
"""

__all__ = [
    "QkvflowError",
    "ConfigError",
    "ModelLoadError",
    "TraceError",
    "GraphError",
    "ExecutionError",
    "ParamError",
    "InputError",
    "RenderError",
]


class QkvflowError(Exception):
    """Base class of every error qkvflow raises on purpose."""


class ConfigError(QkvflowError):
    """A preset name, TOML file or config value cannot be used."""


class ModelLoadError(QkvflowError):
    """A MODEL argument (preset, TOML file or module:factory) cannot be loaded."""


class TraceError(QkvflowError):
    """Model code did something the tracer cannot record."""


class GraphError(QkvflowError):
    """A graph is not well formed (cycle, undefined input, unknown op)."""


class ExecutionError(QkvflowError):
    """The executor met an array that disagrees with its node's named shape."""


class ParamError(QkvflowError):
    """Parameters are missing, misshapen, non-finite or cannot be read."""


class InputError(QkvflowError):
    """Token ids or other run inputs are malformed or out of range."""


class RenderError(QkvflowError):
    """A diagram cannot be produced or written."""

"""Resolve a MODEL argument: a preset name, a TOML file or ``module:factory``.

``module:factory`` is ``package.module:function`` or ``path/to/file.py:function``;
the factory is called with no arguments and returns a :class:`~qkvflow.Model`
(or a :class:`~qkvflow.models.config.Config`, built as an encoder–decoder).
"""

import importlib
import importlib.util
import sys
from pathlib import Path

from .config import PRESETS, Config, did_you_mean, load_toml, preset
from ..tracing.context import Model
from ..ir.errors import ConfigError, ModelLoadError, QkvflowError

__all__ = ["load_model"]


def _from_config(cfg: Config) -> Model:
    from .families import build
    return build(cfg)


def _import_factory(spec: str):
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelLoadError(f"model file {target!r} does not exist")
        name = f"qkvflow_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except (QkvflowError, KeyboardInterrupt):
            raise
        except BaseException as err:  # a model file must not end the checker, whatever it raises
            raise ModelLoadError(f"importing {target!r} failed: {type(err).__name__}: {err}") from err
    else:
        if not target or not all(part.isidentifier() for part in target.split(".")):
            raise ModelLoadError(
                f"MODEL {spec!r}: expected package.module:factory or path/to/file.py:factory"
            )
        try:
            module = importlib.import_module(target)
        except (QkvflowError, KeyboardInterrupt):
            raise
        except BaseException as err:
            raise ModelLoadError(
                f"cannot import module {target!r} for MODEL {spec!r}: {type(err).__name__}: {err}"
            ) from err
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"{target!r} has no callable {attr!r} for MODEL {spec!r}")
    return factory


def load_model(spec) -> Model:
    """A Model from a preset name, a ``.toml`` path, ``module:factory``, a Config or a Model."""
    if isinstance(spec, Model):
        return spec
    if isinstance(spec, Config):
        return _from_config(spec)
    if not isinstance(spec, str):
        raise ModelLoadError(f"MODEL must be a preset, a TOML file or module:factory, got {spec!r}")
    if spec in PRESETS:
        return _from_config(preset(spec))
    if spec.endswith(".toml"):
        return _from_config(load_toml(spec))
    if ":" in spec:
        factory = _import_factory(spec)
        try:
            made = factory()
        except (QkvflowError, KeyboardInterrupt):
            raise
        except BaseException as err:
            raise ModelLoadError(f"factory {spec!r} failed: {type(err).__name__}: {err}") from err
        if isinstance(made, Config):
            return _from_config(made)
        if not isinstance(made, Model):
            raise ModelLoadError(
                f"factory {spec!r} returned {type(made).__name__}, expected a qkvflow Model or Config"
            )
        return made
    raise ConfigError(
        f"unknown model {spec!r}{did_you_mean(spec, PRESETS)}: not a preset ({', '.join(sorted(PRESETS))}), "
        "not a .toml file, "
        "not package.module:factory or path/to/file.py:factory, not hf:PATH, not a graph .json"
    )

"""Helpers for a user's own test suite.

>>> from qkvflow.testing import assert_clean
>>> assert_clean("tiny")
"""

from .passes.checks import check
from .models.loader import load_model
from . import trace

__all__ = ["assert_clean"]


def assert_clean(model, *, strict: bool = True) -> None:
    """Fail (AssertionError) with every finding when ``model`` does not check clean.

    ``model`` is anything ``qkvflow`` accepts as MODEL: a preset name, a TOML
    path, ``module:factory``, a Config or a Model. ``strict`` (default) also
    fails on warnings.
    """
    graph = trace(load_model(model))
    found = check(graph, strict=strict)
    if found:
        lines = "\n".join(d.text() for d in found)
        raise AssertionError(f"qkvflow found {len(found)} problem(s) in {graph.graph.get('model')}:\n{lines}")

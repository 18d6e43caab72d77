"""The zoo's registry and the helpers its models share."""

import dataclasses
import inspect
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

import qkvflow
from qkvflow import nn, transformer
from qkvflow.models.config import Config

__all__ = ["Bug", "bug", "ENTRIES", "TINY", "SILENT_LENGTH", "tiny", "heads", "merge", "project", "scaled_scores"]

TINY = qkvflow.preset("tiny")  # d_model 21 = heads 3 * d_head 7
# Sequence length at which src, tgt and d_head all coincide in TINY.
SILENT_LENGTH = TINY.head_dim

ENTRIES: list["Bug"] = []


@dataclasses.dataclass(frozen=True)
class Bug:
    name: str
    code: str
    node: str  # path prefix of the finding
    build: Callable[[Config], qkvflow.Model]
    size_silent: bool
    coincide: str | None  # the sizes that must be equal for size checks to pass
    what: str

    @property
    def file(self) -> Path:
        return Path(inspect.getsourcefile(self.build))

    @property
    def line(self) -> int | None:
        """The line marked ``# BUG(<name>)``, or None (config findings have no line)."""
        marker = re.compile(rf"#\s*BUG\({re.escape(self.name)}\)")
        hits = [i for i, text in enumerate(self.file.read_text().splitlines(), 1) if marker.search(text)]
        if len(hits) > 1:
            raise AssertionError(f"{self.name}: {len(hits)} lines are marked")
        return hits[0] if hits else None

    def model(self, cfg: Config = TINY) -> qkvflow.Model:
        return self.build(dataclasses.replace(cfg, name=self.name))

    def __str__(self) -> str:
        return self.name


def bug(code: str, node: str, *, size_silent: bool, coincide: str | None = None):
    """Register a model factory ``cfg -> Model`` as a zoo entry named after it."""
    def register(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        ENTRIES.append(Bug(fn.__name__, code, node, fn, size_silent, coincide, doc[0] if doc else ""))
        return fn
    return register


def tiny(cfg: Config, **blocks) -> qkvflow.Model:
    """The built-in encoder-decoder of ``cfg`` with some blocks replaced."""
    return transformer.build(cfg, **blocks)


# --- correct pieces the broken blocks share (NumPy style) -------------------------

def heads(t):
    """(B, T, H*Dh) -> (B, H, T, Dh)."""
    B, T, _ = t.shape
    H, Dh = qkvflow.dim("heads"), qkvflow.dim("d_head")
    return t.reshape(B, T, H, Dh).transpose(0, 2, 1, 3)  # (B, T, H, Dh) -> (B, H, T, Dh)


def merge(o):
    """(B, H, T, Dh) -> (B, T, H*Dh) -> out_proj -> (B, T, d_model)."""
    B, _, T, _ = o.shape
    o = o.transpose(0, 2, 1, 3).reshape(B, T, -1)  # (B, T, H, Dh) -> (B, T, H*Dh)
    return nn.linear(o, "d_model", name="out_proj")


def project(x, name: str):
    """``name`` projection of x, split into heads: (B, T, d_model) -> (B, H, T, Dh)."""
    return heads(nn.linear(x, "heads*d_head", name=name))


def scaled_scores(q, k):
    """(B, H, T, Dh) x (B, H, S, Dh) -> (B, H, T, S)."""
    return q @ k.swapaxes(-1, -2) / np.sqrt(qkvflow.dim("d_head"))

"""Blocks written under ``from __future__ import annotations``, jaxtyping
imported only for type checkers: the style of qkvflow's own models."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

import qkvflow
from qkvflow import nn
from zoo.registry import merge, project, scaled_scores

if TYPE_CHECKING:
    from jaxtyping import Bool, Float


def _attend(y, memory, src_keep):
    q, k, v = project(y, "q_proj"), project(memory, "k_proj"), project(memory, "v_proj")
    s = np.where(src_keep[:, None, None, :], scaled_scores(q, k), -np.inf)
    return merge(nn.softmax(s, axis=-1) @ v)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def cross(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch src d_model"],
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    return _attend(y, memory, src_keep)


@qkvflow.attention("cross", q="decoder", k="memory", v="memory", mask="src_padding")
def misdeclared_cross(
    y: Float[np.ndarray, "batch tgt d_model"],
    memory: Float[np.ndarray, "batch tgt d_model"],  # src written as tgt
    src_keep: Bool[np.ndarray, "batch src"],
) -> Float[np.ndarray, "batch tgt d_model"]:
    """Cross-attention. Q: decoder stream; K, V: the memory; mask: source padding."""
    return _attend(y, memory, src_keep)

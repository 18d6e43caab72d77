"""Attention heatmaps: the weights every attention gave, read off a run's activations.

:func:`attention_maps` finds each attention's softmax in the graph and takes its
value from the activations of one run (``qkvflow.forward(..., capture=True)``):
one (queries x keys) map per block, for one batch row, averaged over the heads
or for one head. :func:`plot_attention` draws them with matplotlib (an optional
dependency: ``pip install 'qkvflow[plot]'``): a row per kind of attention
(encoder self, decoder self, cross), a column per layer, the axes labelled with
the tokens. Masked weights are exactly 0, so the causal triangle and padded keys
show as empty cells.
"""

import dataclasses
import io
import os

import networkx as nx
import numpy as np

from ..atomic import write_atomic
from ..ir.errors import InputError, RenderError

__all__ = ["AttentionMap", "attention_maps", "draw_attention", "plot_attention"]

_KIND_ORDER = ("encoder_self", "decoder_self", "cross")
_KIND_TITLE = {"encoder_self": "encoder self", "decoder_self": "decoder self (masked)", "cross": "cross"}


@dataclasses.dataclass(frozen=True)
class AttentionMap:
    """One attention's weights: ``weights[q, k]`` is how much query position q took
    from key position k (rows sum to 1, or 0 for a fully masked query)."""

    block: str
    kind: str
    layer: int | None
    queries: str  # the sequence dim of the query axis, e.g. "tgt"
    keys: str
    weights: np.ndarray  # (queries, keys)


def attention_maps(g: nx.MultiDiGraph, activations: dict, *, batch_row: int = 0,
                   head: int | None = None) -> list[AttentionMap]:
    """Every attention's (queries x keys) weights in one run, in layer order."""
    sequences = set(g.graph.get("sequences", {}))
    maps = []
    for block, rec in g.graph["attention"].items():
        for site in rec.get("sites", []):
            node = site.get("softmax")
            if node not in activations:
                continue
            maps.append(_one_map(g, block, rec, node, np.asarray(activations[node]), sequences, batch_row, head))
    return sorted(maps, key=lambda m: (_KIND_ORDER.index(m.kind) if m.kind in _KIND_ORDER else 9,
                                       m.layer if m.layer is not None else -1, m.block))


def _one_map(g, block: str, rec: dict, node: str, probs: np.ndarray, sequences: set, batch_row: int,
             head: int | None) -> AttentionMap:
    names = list(g.nodes[node]["shape"])
    key_axis = g.nodes[node]["attrs"].get("axis", -1) % len(names)
    query_axis = next((i for i, n in enumerate(names) if n in sequences and i != key_axis), None)
    if query_axis is None or probs.ndim != len(names):
        raise RenderError(f"attention {block}: cannot tell its query and key axes in {tuple(names)}")
    index: list = [slice(None)] * probs.ndim
    if "batch" in names:
        rows = probs.shape[names.index("batch")]
        if not 0 <= batch_row < rows:
            raise InputError(f"batch row {batch_row} does not exist; the run has {rows} row(s)")
        index[names.index("batch")] = batch_row
    if head is not None:
        if "heads" not in names:
            raise InputError(f"attention {block} has no heads axis to pick head {head} from")
        heads = probs.shape[names.index("heads")]
        if not 0 <= head < heads:
            raise InputError(f"head {head} does not exist; {block} has {heads} heads (0..{heads - 1})")
        index[names.index("heads")] = head
    kept = [i for i, part in enumerate(index) if isinstance(part, slice)]
    picked = probs[tuple(index)]
    q, k = kept.index(query_axis), kept.index(key_axis)
    others = tuple(i for i in range(picked.ndim) if i not in (q, k))
    weights = picked.mean(axis=others) if others else picked
    if q > k:
        weights = weights.T
    return AttentionMap(block, rec["kind"], rec.get("layer"), names[query_axis], names[key_axis], weights)


def plot_attention(maps: list[AttentionMap], path: str | os.PathLike, *, tokens: dict | None = None,
                   title: str = "") -> "os.PathLike":
    """Draw ``maps`` to ``path`` (.png or .svg, written atomically): a row per kind of
    attention, a column per layer. ``tokens`` maps a sequence dim (``src``, ``tgt``,
    ``seq``) to the labels of its positions."""
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise RenderError(f"cannot draw heatmaps to {path!r}: use a .png or .svg file")
    return write_atomic(path, draw_attention(maps, fmt, tokens=tokens, title=title))


def draw_attention(maps: list[AttentionMap], fmt: str = "svg", *, tokens: dict | None = None,
                   title: str = "") -> bytes:
    """The heatmaps of :func:`plot_attention` as PNG or SVG bytes."""
    if not maps:
        raise RenderError("the run has no attention weights to draw")
    plt = _pyplot()
    tokens = tokens or {}
    kinds = [k for k in _KIND_ORDER if any(m.kind == k for m in maps)] + sorted(
        {m.kind for m in maps} - set(_KIND_ORDER))
    columns = max(sum(m.kind == k for m in maps) for k in kinds)
    cell = max(2.2, 0.32 * max(max(m.weights.shape) for m in maps) + 1.2)
    fig, axes = plt.subplots(len(kinds), columns, figsize=(cell * columns + 1.2, cell * len(kinds) + 0.8),
                             squeeze=False, layout="constrained")
    image = None
    for r, kind in enumerate(kinds):
        row = [m for m in maps if m.kind == kind]
        for c in range(columns):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            m = row[c]
            image = ax.imshow(m.weights, vmin=0.0, vmax=1.0, cmap="viridis", aspect="equal")
            ax.set_title(f"{_KIND_TITLE.get(kind, kind)}, layer {m.layer}" if m.layer is not None else m.block,
                         fontsize=8)
            for axis, dim, size in ((ax.xaxis, m.keys, m.weights.shape[1]), (ax.yaxis, m.queries, m.weights.shape[0])):
                labels = [str(t) for t in list(tokens.get(dim, range(size)))[:size]]
                labels += [str(i) for i in range(len(labels), size)]
                axis.set_ticks(range(size), labels if fmt == "svg" else _drawable(labels), fontsize=7)
            plt.setp(ax.get_xticklabels(), rotation=60, ha="right")
            ax.set_xlabel(f"keys ({m.keys})", fontsize=7)
            ax.set_ylabel(f"queries ({m.queries})", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    if title:
        fig.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=110, metadata={"Date": None} if fmt == "svg" else None)
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RenderError("heatmaps need matplotlib: pip install 'qkvflow[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "qkvflow"  # the same SVG for the same weights
    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text: a browser draws any script
    matplotlib.rcParams["text.parse_math"] = False  # names and tokens are drawn as written, "$" included
    # Latin first, then a CJK font where one is installed (Debian: fonts-wqy-microhei)
    # Latin first, then a CJK font where one is installed (Debian: fonts-wqy-microhei)
    matplotlib.rcParams["font.family"] = [name for name, _ in _fonts()]
    import matplotlib.pyplot as plt
    return plt


_CJK_FONTS = ["WenQuanYi Micro Hei", "Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC",
              "Droid Sans Fallback", "AR PL UMing CN"]


def _fonts() -> list[tuple[str, str]]:
    """(family, file) of the label fonts installed here, DejaVu Sans (matplotlib's own) first."""
    from matplotlib import font_manager
    found = []
    for family in ["DejaVu Sans", *_CJK_FONTS]:
        try:
            found.append((family, font_manager.findfont(family, fallback_to_default=False)))
        except ValueError:
            continue
    return found


def _drawable(labels: list[str]) -> list[str]:
    """Labels as given, but a label with glyphs no installed font has becomes its
    position's number (a PNG would show empty boxes; the SVG keeps the text)."""
    from matplotlib.ft2font import FT2Font
    fonts = [FT2Font(path) for _, path in _fonts()]
    out = []
    for i, label in enumerate(labels):
        ok = all(any(f.get_char_index(ord(ch)) for f in fonts) for ch in label if not ch.isspace())
        out.append(label if ok else f"#{i}")
    return out

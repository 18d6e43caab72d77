"""The bug zoo: realistic attention mistakes, each a small model.

Every entry is a model factory registered with :func:`~zoo.registry.bug`:
the code qkvflow must report, the node (path prefix) it must report it at,
and the line of the mistake, marked in the source with ``# BUG(<entry>)``.
``size_silent`` entries pass every size-based check when the sizes they
confuse coincide (``coincide`` names them; None when the sizes never
matter), so NumPy and jaxtyping run them without complaint.

The families: :mod:`zoo.provenance` (Q/K/V read from the wrong state inside
a block), :mod:`zoo.wiring` (a hand-written model hands a block the wrong
state), :mod:`zoo.shapes` (head split/merge, products, softmax, block
signatures), :mod:`zoo.masks` (masks and information flow) and
:mod:`zoo.configs` (configs).
"""

from . import configs, masks, provenance, shapes, wiring  # noqa: F401 - they register
from .registry import ENTRIES, SILENT_LENGTH, TINY, Bug, bug

__all__ = ["ENTRIES", "Bug", "bug", "TINY", "SILENT_LENGTH"]

"""Atomic file output: write a temporary file beside the target, then rename.

A failed or interrupted write never leaves a half-written file behind, and
an unwritable path becomes one clear sentence.
"""

import os
import tempfile
from pathlib import Path

from .ir.errors import QkvflowError

__all__ = ["OutputError", "write_atomic"]


class OutputError(QkvflowError):
    """An output file cannot be written."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OutputError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OutputError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
    return path

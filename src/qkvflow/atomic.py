"""Atomic file output: write temporary files beside the targets, then rename.

A failed or interrupted write never leaves a half-written file behind; files
written together appear all or not at all; an existing file keeps its mode
and owner, and a read-only one is refused, never replaced; an unwritable
path becomes one clear sentence.
"""

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .ir.errors import QkvflowError

__all__ = ["OutputError", "write_atomic", "write_together", "staged_folder"]


class OutputError(QkvflowError):
    """An output file cannot be written."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    return write_together({path: data})[0]


def write_together(files: dict) -> list[Path]:
    """Write every ``path -> data`` or none: all are written to temporary files
    first, and only when each has been written are they renamed into place."""
    targets = [(_target(Path(p)), data.encode("utf-8") if isinstance(data, str) else data)
               for p, data in files.items()]
    written = []
    try:
        for target, payload in targets:
            written.append((_write_temporary(target, payload), target))
        for tmp, target in written:
            os.replace(tmp, target)
    except OSError as err:
        for tmp, _ in written:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        failed = targets[len(written)][0] if len(written) < len(targets) else written[-1][1]
        raise OutputError(f"cannot write {str(failed)!r}: {err.strerror or err}") from None
    return [target for target, _ in targets]


def _target(path: Path) -> Path:
    """The file really written (a symbolic link's target), refused when it is a
    directory, read-only, or owned by someone whose ownership a rename would take."""
    if "\x00" in str(path):
        raise OutputError(f"cannot write {str(path)!r}: a file name cannot hold a NUL character")
    real = Path(os.path.realpath(path))
    if real.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: it is a directory")
    try:
        st = real.stat()
    except FileNotFoundError:
        return real
    except OSError as err:
        raise OutputError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
    if not st.st_mode & stat.S_IWUSR:
        raise OutputError(f"{str(path)!r} is read-only; qkvflow does not replace it (make it writable, "
                          "or write elsewhere)")
    return real


def _write_temporary(target: Path, payload: bytes) -> str:
    """A temporary file beside ``target`` holding ``payload``, with the mode (and, where
    allowed, the owner) of the file it will replace, else what open() would give."""
    folder = target.parent
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        _take_mode(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _take_mode(new: str | Path, target: Path) -> None:
    """Give ``new`` the mode and owner of the ``target`` it replaces, else what open() would."""
    try:
        st = target.stat()
    except FileNotFoundError:
        os.chmod(new, 0o666 & ~_umask())  # mkstemp makes 0600
        return
    os.chmod(new, stat.S_IMODE(st.st_mode))
    if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
        os.chown(new, st.st_uid, st.st_gid)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike):
    """A folder to write many files into, moved into ``out`` only if the block ends
    without an error: either every file appears in ``out`` or none does (and a new
    ``out`` is not left behind empty)."""
    out = Path(os.path.realpath(out))  # a link's target: the stage must sit on its file system
    if out.exists() and not out.is_dir():
        raise OutputError(f"{str(out)!r} is a file; expected a folder to write into")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as err:
        raise OutputError(f"cannot create the folder {str(out)!r}: {err.strerror or err}") from None
    try:
        yield stage
        if not out.exists():
            os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700
            os.rename(stage, out)
        else:  # every file made ready beside its target first, then renamed (each atomic)
            moves = []
            try:
                for staged in sorted(stage.iterdir()):
                    target = _target(out / staged.name)
                    if os.stat(target.parent).st_dev != os.stat(staged).st_dev:  # a link to elsewhere
                        staged = Path(_write_temporary(target, staged.read_bytes()))
                    moves.append((staged, target))
            except OSError:
                for ready, _ in moves:
                    if ready.parent != stage:
                        ready.unlink(missing_ok=True)
                raise
            for ready, target in moves:
                _take_mode(ready, target)
                os.replace(ready, target)
    except OSError as err:
        raise OutputError(f"cannot write into {str(out)!r}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)

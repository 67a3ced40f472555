"""Atomic file writing, the one home for every file diagcompile writes: checkpoints, metrics and model files
(``train``), plots, sweep tables, and the artifacts of ``diagcompile.export`` (.pt2, .onnx, TensorRT engines).

A writer produces its file under a temporary name in the target's directory and renames it over the target
only once the file is complete and flushed to disk, so an interrupted export never leaves a truncated
artifact where a good one was. The finished file gets the permissions any other newly created file would
(``0o666`` minus the umask; ``tempfile.mkstemp`` would give ``0o600``), or keeps the mode of the file it
replaces.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "check_output_path"]


def check_output_path(path: str | os.PathLike, what: str, suffix: str | None = None) -> Path:
    """``path`` as a ``Path``; ``ValueError`` if it names an existing directory, or (with ``suffix``) a file
    name that does not end in ``suffix`` (an ONNX file named ``.pt2`` only misleads whoever opens it next).

    Called before the (slow) export so a wrong ``--out`` fails at once, with a message instead of an
    ``IsADirectoryError`` from the final rename.
    """
    path = Path(path)
    example = path / f"model{suffix or ''}"
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a directory; give the path of the file to write (e.g. {example})")
    if suffix is not None and path.suffix != suffix:
        raise ValueError(f"{what}: {path} should end in {suffix}")
    return path


def _create_temp(path: Path) -> Path:
    """Create an empty, unique temporary file next to ``path``, with the mode a new file gets here.

    ``os.open(..., 0o666)`` lets the kernel apply the process umask (and any default ACL of the directory),
    which is exactly what a fresh ``open(path, "w")`` would get, without reading the umask (``os.umask`` can
    only be read by setting it, which races with other threads).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        # Ends in the target's suffix: some writers (torch.export.save, onnx.save_model) look at it.
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows), where it is skipped.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, what: str = "write") -> Iterator[Path]:
    """Yield a temporary path to write the file to; on success it replaces ``path`` atomically.

    The parent directory is created if needed. On an exception the temporary file is removed and ``path``
    is left as it was.

    Example::

        with atomic_write(path, "save") as tmp:
            torch.export.save(ep, tmp)
    """
    path = check_output_path(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have used its own handle: flush the data to disk here
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            # Overwriting: keep the permissions someone chose for the existing file.
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)

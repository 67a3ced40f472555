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
import re
import secrets
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale temporary files are judged by their age alone
    fcntl = None  # type: ignore[assignment]

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


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create an empty, unique temporary file next to ``path``, with the mode a new file gets here; return it
    and an open descriptor of it that holds an exclusive ``flock`` until it is closed (-1 without fcntl: Windows).

    ``os.open(..., 0o666)`` lets the kernel apply the process umask (and any default ACL of the directory),
    which is exactly what a fresh ``open(path, "w")`` would get, without reading the umask (``os.umask`` can
    only be read by setting it, which races with other threads). The lock tells a later write of ``path`` that
    this file is in use (:func:`_remove_stale_temps`); the kernel drops it when the process dies, however it dies.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        # Ends in the target's suffix: some writers (torch.export.save, onnx.save_model) look at it.
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        if fcntl is None:
            # No locks (Windows), and there an open handle would make the final os.replace fail: close it now.
            os.close(fd)
            return tmp, -1
        with contextlib.suppress(OSError):  # a file system without locks: the age rule alone then
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return tmp, fd
    raise FileExistsError(f"could not create a temporary file next to {path}")


#: Where file locks are not available (Windows, a file system without them), a temporary file of a target is
#: removed by a later successful write of that target only once it has not been written to for this long (a
#: writer at work touches its file at every write); elsewhere, as soon as no process holds its lock.
STALE_TEMP_AGE_S = 60.0


def _temp_pattern(path: Path) -> re.Pattern[str]:
    """The names :func:`_create_temp` gives the temporary files of ``path``, and no other."""
    return re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{8}}\.tmp{re.escape(path.suffix)}")


def _abandoned(file: str, mtime: float) -> bool:
    """Whether no writer is at work on the temporary file ``file``: nobody holds its lock (its writer died: a
    SIGKILL, a power cut), or, without locks, it is older than :data:`STALE_TEMP_AGE_S`."""
    if fcntl is not None:
        try:
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True  # (closing fd releases it again: harmless, no writer takes an existing name, see O_EXCL)
        except BlockingIOError:
            return False  # a live writer holds it
        except OSError:
            pass  # no locks on this file system
        finally:
            os.close(fd)
    return time.time() - mtime >= STALE_TEMP_AGE_S


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files of ``path`` that interrupted writes left behind (an exception removes its
    own; a killed process cannot), which would otherwise stay forever.

    Only regular files named exactly as :func:`_create_temp` names this target's, and no writer's at work
    (:func:`_abandoned`), are touched: two processes writing the same target at once is not a supported use
    (the last rename wins), but neither loses its file under it. Best effort: a file that cannot be removed
    stays.
    """
    pattern = _temp_pattern(path)
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and _abandoned(entry.path, st.st_mtime):
                    os.unlink(entry.path)


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
    is left as it was. A successful write also removes the temporary files of ``path`` that interrupted
    writes left behind (:func:`_remove_stale_temps`).

    Example::

        with atomic_write(path, "save") as tmp:
            torch.export.save(ep, tmp)
    """
    path = check_output_path(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, lock = _create_temp(path)
    handling = sys.exc_info()[1]  # an exception the caller is handling (a save on Ctrl-C): not ours to re-raise
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have used its own handle: flush the data to disk here
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            # Overwriting: keep the permissions someone chose for the existing file.
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        interrupt = e.__context__
        if (
            isinstance(interrupt, KeyboardInterrupt)
            and interrupt is not handling
            and not isinstance(e, KeyboardInterrupt)
        ):
            # A writer that cleans up after an interrupt can fail doing so (torch.save: "unexpected pos"); the
            # interrupt is what happened, and what callers handle.
            raise interrupt from None
        raise
    finally:
        if lock >= 0:
            os.close(lock)
    _fsync_dir(path.parent)
    _remove_stale_temps(path)

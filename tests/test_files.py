"""The atomic writer behind save / to_onnx / build_engine: permissions, overwrite, failure, bad paths."""

import os
import stat

import pytest

from diagcompile._files import atomic_write, check_output_path


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_file_gets_the_mode_a_fresh_file_would(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "sub" / "a.bin") as tmp:
            tmp.write_bytes(b"data")
        with open(tmp_path / "plain.bin", "wb") as f:  # what any other program writing a file gets
            f.write(b"data")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "sub" / "a.bin").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode)
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"data"


def test_overwriting_keeps_the_existing_mode(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    path.chmod(0o640)
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".bin" and tmp != path
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_directory_is_not_an_output_file(tmp_path):
    with pytest.raises(ValueError, match=r"to_onnx: .* is a directory"):
        check_output_path(tmp_path, "to_onnx")
    with pytest.raises(ValueError, match="is a directory"):
        with atomic_write(tmp_path):
            pass
    assert check_output_path(str(tmp_path / "x.onnx"), "to_onnx") == tmp_path / "x.onnx"
    assert check_output_path(str(tmp_path / "x.onnx"), "to_onnx", ".onnx") == tmp_path / "x.onnx"
    with pytest.raises(ValueError, match=r"to_onnx: .*x.pt2 should end in .onnx"):
        check_output_path(tmp_path / "x.pt2", "to_onnx", ".onnx")


def _hold_lock(path):
    """An open, flock-ed descriptor of ``path``: what a writer at work in another process holds."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_write_removes_the_temporary_files_that_killed_writes_left(tmp_path):
    # A SIGKILL during a checkpoint write left `.checkpoint.pt.<hex>.tmp.pt` behind, forever.
    path = tmp_path / "checkpoint.pt"
    stale = [tmp_path / ".checkpoint.pt.0123abcd.tmp.pt", tmp_path / ".checkpoint.pt.deadbeef.tmp.pt"]
    for p in stale:
        p.write_bytes(b"")
    live = tmp_path / ".checkpoint.pt.11112222.tmp.pt"  # a writer at work holds its lock
    live.write_bytes(b"half")
    others = [  # not this target's temporary files: never touched
        ".checkpoint.pt.0123abcd.tmp.pt2",
        ".model.pt.0123abcd.tmp.pt",
        ".checkpoint.pt.0123ABCD.tmp.pt",
        ".checkpoint.pt.0123abc.tmp.pt",
        "checkpoint.pt.0123abcd.tmp.pt",
        ".checkpoint.pt.0123abcd.tmp.pt.bak",
    ]
    for name in others:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / ".checkpoint.pt.33334444.tmp.pt").mkdir()  # not a regular file
    (tmp_path / ".checkpoint.pt.55556666.tmp.pt").symlink_to(tmp_path / "model.pt")
    fd = _hold_lock(live)
    try:
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"new")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"new"
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & {p.name for p in stale}
    assert {live.name, *others, ".checkpoint.pt.33334444.tmp.pt", ".checkpoint.pt.55556666.tmp.pt"} <= left
    # Its writer gone (the lock released with its process), the next write removes it too.
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"newer")
    assert live.name not in {p.name for p in tmp_path.iterdir()}


def test_without_file_locks_a_stale_temporary_file_is_judged_by_its_age(tmp_path, monkeypatch):
    import time

    from diagcompile import _files

    monkeypatch.setattr(_files, "fcntl", None, raising=False)
    path = tmp_path / "a.bin"
    old, young = tmp_path / ".a.bin.0123abcd.tmp.bin", tmp_path / ".a.bin.89abcdef.tmp.bin"
    old.write_bytes(b"")
    young.write_bytes(b"")
    past = time.time() - _files.STALE_TEMP_AGE_S - 1
    os.utime(old, (past, past))
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == [young.name, "a.bin"]


def test_an_interrupted_writer_s_cleanup_error_is_reported_as_the_interrupt(tmp_path):
    """torch.save interrupted by Ctrl-C fails again in its own cleanup ("unexpected pos"): the interrupt is
    what happened, and what the CLI turns into its message."""
    target = tmp_path / "f.pt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            try:
                tmp.write_bytes(b"half")
                raise KeyboardInterrupt
            finally:
                raise RuntimeError("unexpected pos 9560064 vs 9559952")  # noqa: B012 - torch's cleanup does this
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_write_error_inside_the_caller_s_own_interrupt_handler_stays_that_error(tmp_path):
    """Saving on Ctrl-C (inside ``except KeyboardInterrupt``) and hitting a full disk: the caller must see the
    disk error, not the interrupt it is already handling."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        with pytest.raises(BaseException) as info:  # (a KeyboardInterrupt escaping would stop pytest itself)
            with atomic_write(tmp_path / "f.pt") as tmp:
                tmp.write_bytes(b"half")
                raise OSError(28, "No space left on device")  # noqa: B904 - the implicit context is the point
    assert isinstance(info.value, OSError) and info.value.errno == 28, repr(info.value)
    assert list(tmp_path.iterdir()) == []

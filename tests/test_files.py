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

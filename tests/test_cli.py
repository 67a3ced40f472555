"""The ``diagcompile`` command line."""

import subprocess
import sys

import pytest

from diagcompile import cli
from diagcompile.ops import reference


def test_check_passes(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "3072x768" in out


def test_check_fails_when_the_math_is_wrong(monkeypatch, capsys):
    real = reference.gather_ref
    monkeypatch.setattr(reference, "gather_ref", lambda a, v, o: real(a, v, o) * 1.01)
    from diagcompile.ops import force_path

    with force_path("reference"):
        assert cli.main(["check"]) == 1
    assert "CHECK FAILED" in capsys.readouterr().out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "diagcompile.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "check" in out.stdout


def test_unknown_command_exits_nonzero():
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code != 0


def test_python_m_diagcompile(tmp_path):
    out = subprocess.run([sys.executable, "-m", "diagcompile", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--task" in out.stdout
    argv = [sys.executable, "-m", "diagcompile", "train", "--task", "digits-vit", "--steps", "-3", "--out", "x"]
    bad = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("diagcompile train: error: TrainConfig.steps must be")


def test_demo_pool_and_faithful_are_exclusive(capsys):
    # --faithful used to win silently over an explicit --pool.
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--pool", "3", "--faithful"])
    assert e.value.code == 2 and "not allowed with argument --pool" in capsys.readouterr().err

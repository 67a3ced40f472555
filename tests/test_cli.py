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


def _subparser(name):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


@pytest.mark.parametrize("command", ["train", "sweep", "check", "demo"])
def test_every_option_has_help(command):
    missing = [a.option_strings for a in _subparser(command)._actions if a.option_strings and not a.help]
    assert not missing


def test_train_help_states_the_task_defaults():
    # The defaults live in train.TASK_DEFAULTS; the help (which must not import train: --help is instant)
    # repeats them, so a changed default must change the help too.
    import re

    from diagcompile.train import TASK_DEFAULTS

    helps = {a.dest: a.help for a in _subparser("train")._actions}
    numbers = {k: {float(n) for n in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", h or "")} for k, h in helps.items()}
    digits, chars = TASK_DEFAULTS["digits-vit"], TASK_DEFAULTS["chars-gpt"]
    assert {digits["epochs"]} <= numbers["epochs"] and {chars["steps"]} <= numbers["steps"]
    for key in ("batch_size", "weight_decay"):
        assert {digits[key], chars[key]} <= numbers[key], key
    lrs = {digits["lr"], chars["lr"], digits["sparse_lr"], chars["sparse_lr"], *chars["relaxation_lr"].values()}
    assert lrs <= numbers["lr"]


def test_train_refuses_a_sparsity_for_dense(tmp_path, capsys):
    # The README promises options that would do nothing are refused; dense used to ignore --sparsity silently.
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--task", "digits-vit", "--sparsity", "0.5", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "--sparsity applies to the sparse methods, not dense" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

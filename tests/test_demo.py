"""``diagcompile demo``: its checks fail on broken models and artifacts, and a short run passes end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from diagcompile import DiagLinear, sparsify_
from diagcompile.config import DiagSparsityConfig
from diagcompile.demo import DemoConfig, check_artifact, check_outputs_match, check_sparse_model, run_demo
from diagcompile.testing import make_export_model, tiny_mlp


def _sparse_mlp() -> nn.Module:
    return sparsify_(tiny_mlp(seed=0), DiagSparsityConfig(sparsity=0.75)).eval()


def _batches(n_in: int = 16) -> list[tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return [(torch.randn(b, n_in),) for b in (1, 7)]


# ---- check_outputs_match ------------------------------------------------------------------------------
def test_outputs_match_passes_on_the_same_model():
    model = _sparse_mlp()
    check = check_outputs_match("same", model, model, _batches())
    assert check.passed, check


def test_outputs_match_fails_on_a_perturbed_model():
    model = _sparse_mlp()
    broken = _sparse_mlp()
    with torch.no_grad():
        next(m for m in broken.modules() if isinstance(m, DiagLinear)).values[0, 0] += 1.0
    check = check_outputs_match("perturbed", model, broken, _batches())
    assert not check.passed and "max |diff|" in check.detail


@pytest.mark.parametrize(
    "candidate, needle",
    [
        (lambda x: torch.zeros(x.shape[0], 3), "shape"),
        (lambda x: torch.full((x.shape[0], 5), float("nan")), "non-finite"),
        (lambda x: (_ for _ in ()).throw(RuntimeError("kernel exploded")), "kernel exploded"),
    ],
    ids=["shape", "nan", "raises"],
)
def test_outputs_match_fails_on_wrong_shape_nan_or_crash(candidate, needle):
    check = check_outputs_match("broken", _sparse_mlp(), candidate, _batches())
    assert not check.passed and needle in check.detail, check


# ---- check_sparse_model -------------------------------------------------------------------------------
def test_sparse_model_check_fails_on_a_dense_model_and_on_too_little_sparsity():
    assert not check_sparse_model(tiny_mlp(seed=0), 0.9).passed
    half = sparsify_(tiny_mlp(seed=0), DiagSparsityConfig(sparsity=0.5))
    assert not check_sparse_model(half, 0.9).passed
    assert check_sparse_model(half, 0.5).passed


# ---- check_artifact on real artifacts, then deliberately broken ones ----------------------------------
def test_pt2_check_fails_when_the_program_no_longer_matches_the_model(tmp_path):
    from diagcompile.export import check_program, export_program, save

    model, example = make_export_model()
    path = save(export_program(model, example), tmp_path / "m.pt2")
    good = check_artifact("pt2", lambda: check_program(path, model, example, raise_on_failure=False))
    assert good.passed, good
    with torch.no_grad():  # the artifact is now stale: the model it is checked against changed
        next(m for m in model.modules() if isinstance(m, DiagLinear)).values.mul_(1.5)
    bad = check_artifact("pt2", lambda: check_program(path, model, example, raise_on_failure=False))
    assert not bad.passed, bad


@pytest.mark.parametrize("mode", ["portable", "plugin"])
def test_onnx_check_fails_on_a_tampered_file(tmp_path, mode):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from diagcompile.export import check_onnx, to_onnx

    model, example = make_export_model()
    path = to_onnx(model, example, tmp_path / "m.onnx", mode=mode)
    good = check_artifact("onnx", lambda: check_onnx(path, model, example, raise_on_failure=False))
    assert good.passed, good

    proto = onnx.load(str(path))
    biggest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    tampered = numpy_helper.to_array(biggest) * 2.0 + 0.5
    biggest.CopyFrom(numpy_helper.from_array(tampered.astype(numpy_helper.to_array(biggest).dtype), biggest.name))
    onnx.save(proto, str(path))
    bad = check_artifact("onnx", lambda: check_onnx(path, model, example, raise_on_failure=False))
    assert not bad.passed, bad


def test_check_artifact_turns_a_crash_into_a_failed_check(tmp_path):
    from diagcompile.export import check_onnx

    model, example = make_export_model()
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file")
    check = check_artifact("onnx", lambda: check_onnx(garbage, model, example, raise_on_failure=False))
    assert not check.passed and check.detail


# ---- configuration and the end-to-end run -------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"device": "tpu"}, "device"),
        ({"epochs": 0}, "epochs"),
        ({"pool": 0.5}, "pool"),
    ],
)
def test_demo_config_rejects_bad_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DemoConfig(**kwargs)


@pytest.mark.slow
def test_short_demo_runs_end_to_end(tmp_path):
    """Six epochs each, no layer timing: every stage runs, every check passes, every promised file exists."""
    out = tmp_path / "demo"
    rc = run_demo(DemoConfig(out=str(out), epochs=6, device="cpu", layer_timing=False, min_accuracy=30.0))
    summary = json.loads((out / "summary.json").read_text())
    failed = [c for c in summary["checks"] if not c["passed"]]
    assert rc == 0 and not failed, failed
    names = {c["name"] for c in summary["checks"]}
    assert {"compiled == eager", "ONNX portable in onnxruntime", "ONNX plugin in onnxruntime"} <= names
    for label, path in summary["files"].items():
        assert Path(path).is_file(), label
    for png in ("pattern.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cfg = DemoConfig(
        out=str(tmp_path / "strict"), epochs=1, device="cpu", compile=False, layer_timing=False, min_accuracy=101.0
    )  # an impossible bar: the run must report the failed check and exit 1
    assert run_demo(cfg) == 1


def test_cli_demo_rejects_a_bad_sparsity(capsys):
    from diagcompile.cli import main

    assert main(["demo", "--sparsity", "1.5", "--out", "unused"]) == 2
    assert "sparsity" in capsys.readouterr().err


def test_an_interrupted_demo_run_is_continued_or_moved_aside(tmp_path):
    # The harness refuses to start over on an unfinished run; the demo owns its folders and resumes (same
    # configuration) or keeps the old checkpoint next to it (another configuration).
    from diagcompile.demo import _continue_interrupted
    from diagcompile.train import TrainConfig, train

    base = dict(task="digits-vit", method="dense", epochs=1, model={"dim": 16, "depth": 1}, quiet=True)
    tc = TrainConfig(out=str(tmp_path), **base)
    assert _continue_interrupted(tc) is tc  # nothing there yet
    train(TrainConfig(out=str(tmp_path), stop_after=2, **base))
    assert _continue_interrupted(tc).resume
    other = TrainConfig(out=str(tmp_path), **{**base, "seed": 1})
    assert not _continue_interrupted(other).resume
    assert (tmp_path / "checkpoint.pt.stale").exists() and not (tmp_path / "checkpoint.pt").exists()
    train(other)  # the folder is free again
    # a checkpoint of an earlier diagcompile (format /1), which this version cannot resume: moved aside too
    train(TrainConfig(out=str(tmp_path), stop_after=2, **base))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "format": "diagcompile.train.checkpoint/1"}, tmp_path / "checkpoint.pt")
    assert not _continue_interrupted(tc).resume
    assert not (tmp_path / "checkpoint.pt").exists()
    train(tc)
    # trained, but interrupted in its final evaluation (no metrics.json): the same configuration evaluates it
    (tmp_path / "metrics.json").unlink()
    resumed = _continue_interrupted(tc)
    assert resumed.resume and train(resumed)["status"] == "complete"
    # and with results there, a finished run is replaced by a new one
    assert _continue_interrupted(tc) is tc

"""The training harness with the mask baselines (diagcompile.dst.MaskSparsifier through make_sparsifier):
method lists in sync, a short run of every baseline (metrics, saved model, realised density), bit-identical
resume, and the train CLI."""

import json

import pytest
import torch
from torch import nn

from diagcompile import cli
from diagcompile import train as train_mod
from diagcompile.data import load_digits_split
from diagcompile.dst import SPARSIFIER_METHODS
from diagcompile.dst.mask_config import MASK_METHODS
from diagcompile.sweep import parse_variant
from diagcompile.train import CHECKPOINT_NAME, METRICS_NAME, MODEL_NAME, TrainConfig, load_model, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _quick(**kw):
    base = dict(task="digits-vit", steps=24, eval_every=6, batch_size=16, quiet=True, model={"dim": 16, "depth": 1})
    kw.setdefault("dst", {"update_every": 4})
    return TrainConfig(**{**base, **kw})


def test_method_lists_agree():
    assert train_mod.BASELINE_METHODS == MASK_METHODS
    assert set(train_mod.METHODS) == {"dense", *SPARSIFIER_METHODS}
    assert cli._METHODS == train_mod.METHODS
    for m in MASK_METHODS:
        assert parse_variant(m) == {"method": m} and parse_variant(f"{m}@erk") == {"method": m}
    with pytest.raises(ValueError, match="relaxation/pool/offsets_from apply to diagonal methods"):
        TrainConfig(task="digits-vit", method="rigl", pool=2.0)
    with pytest.raises(ValueError, match="not the mask baseline 'srigl'"):
        TrainConfig(task="digits-vit", method="srigl", offsets_from="model.pt")
    with pytest.raises(ValueError, match=r"\['freeze_at'\] do not apply to method 'srigl'"):
        train(_quick(method="srigl", dst={"freeze_at": 0.5}))


@pytest.mark.parametrize("method", MASK_METHODS)
def test_every_baseline_trains_saves_and_reports_its_density(tmp_path, method):
    m = train(_quick(out=str(tmp_path), method=method, sparsity=0.8))
    assert m["status"] == "complete" and m["dst"]["config"]["method"] == method
    summ = m["dst"]["summary"]
    assert summ["layers"] == 4 and m["params"]["sparse_layers"] == 4
    assert m["params"]["sparse_layer_density"] == summ["density"] == summ["nnz"] / summ["numel"]
    assert 0.15 <= summ["density"] <= 0.26  # 80% sparsity in the diagonal methods' units (k / P ~ 0.2)
    assert m["final"]["acc"] == pytest.approx(m["final_before_finalize"]["acc"])  # trained on the final masks
    model, example = load_model(tmp_path / MODEL_NAME)
    sparse = {f: mod for f, mod in model.named_modules() if isinstance(mod, nn.Linear) and f.startswith("blocks.")}
    assert len(sparse) == 4 and all(type(mod) is nn.Linear for mod in sparse.values())
    nnz = sum(int((mod.weight != 0).sum()) for mod in sparse.values())
    assert nnz <= summ["nnz"] and nnz >= 0.9 * summ["nnz"]
    ds = load_digits_split("test")
    with torch.no_grad():
        acc = 100.0 * (model(ds.x_eval).argmax(-1) == ds.y_eval).double().mean().item()
    assert acc == m["final"]["acc"]
    assert model(*example).shape == (2, 10)


def test_metrics_count_the_kept_weights_of_a_mask_method_under_an_accurate_name(tmp_path):
    # params.sparse_layer_weights_stored counts the non-zeros, while a mask method's model.pt stores dense weights
    m = train(_quick(out=str(tmp_path), method="rigl", sparsity=0.8, steps=4))
    params = m["params"]
    state = torch.load(tmp_path / MODEL_NAME, weights_only=True)["state_dict"]
    weights = [state[f"{fqn}.weight"] for fqn in m["dst"]["diagnostics"]]
    assert sum(w.numel() for w in weights) == params["sparse_layer_weights_dense"]  # stored dense
    assert sum(int(w.count_nonzero()) for w in weights) == params["sparse_layer_weights_kept"]
    assert params["sparse_layer_weights_stored"] == params["sparse_layer_weights_kept"]  # the old name stays
    assert "sparse_layer_weights_kept" in train_mod.__doc__


@pytest.mark.parametrize("method", ["srigl", "nm-mask-decay"])
def test_resume_is_bit_identical(tmp_path, method):
    straight = train(_quick(out=str(tmp_path / "a"), method=method))
    part = train(_quick(out=str(tmp_path / "b"), method=method, stop_after=11))
    assert part["status"] == "interrupted"
    assert torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)["sparsifier"]["kind"] == "mask"
    torch.manual_seed(12345)
    resumed = train(_quick(out=str(tmp_path / "b"), method=method, resume=True))
    strip = ("time", "env", "memory", "resumed_from_step", "config")
    assert {k: v for k, v in resumed.items() if k not in strip} == {k: v for k, v in straight.items() if k not in strip}
    a = torch.load(tmp_path / "a" / MODEL_NAME, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / MODEL_NAME, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_train_with_a_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "digits-vit", "--method", "rigl", "--sparsity", "0.8", "--steps", "12"]
    argv += ["--batch-size", "16", "--model", "dim=16", "--model", "depth=1", "--out", str(out), "--quiet"]
    argv += ["--dst", "update_every=4", "--dst", "distribution=erk"]
    assert cli.main(argv) == 0
    assert "digits-vit rigl" in capsys.readouterr().out
    m = json.loads((out / METRICS_NAME).read_text())
    assert m["dst"]["config"]["distribution"] == "erk" and m["dst"]["config"]["seed"] == 0


def test_cli_an_explicit_nm_sets_the_recorded_sparsity(tmp_path, capsys):
    # --dst nm_n=2 --dst nm_m=4 trained 2:4 while metrics.json recorded --sparsity's default 0.9
    argv = ["train", "--task", "digits-vit", "--method", "nm-srste", "--steps", "4", "--batch-size", "16"]
    argv += ["--model", "dim=16", "--model", "depth=1", "--quiet", "--dst", "nm_n=2", "--dst", "nm_m=4"]
    assert cli.main([*argv, "--out", str(tmp_path / "run")]) == 0
    m = json.loads((tmp_path / "run" / METRICS_NAME).read_text())
    assert m["sparsity"] == m["dst"]["config"]["sparsity"] == 0.5
    assert m["params"]["sparse_layer_density"] == 0.5
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a --sparsity given explicitly must agree
        cli.main([*argv, "--sparsity", "0.9", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--sparsity 0.9 contradicts --dst nm_n=2 --dst nm_m=4" in err and "0.5" in err
    assert not (tmp_path / "bad").exists()
    assert cli.main([*argv, "--sparsity", "0.5", "--out", str(tmp_path / "same")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # another method is told the options are not its own, not about N:M
        cli.main([*argv[:4], "rigl", *argv[5:], "--sparsity", "0.9", "--out", str(tmp_path / "rigl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "applies to method in" in err and "not method='rigl'" in err

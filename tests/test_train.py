"""The training harness: learning on real data, checkpoints (weights_only, atomic), bit-identical resume,
load_model, metrics, the ``train`` CLI."""

import json
import math
import os
import re
import signal

import pytest
import torch
from torch import nn

from diagcompile import DiagLinear, cli
from diagcompile import train as train_mod
from diagcompile.data import VOCAB_SIZE, load_chars, load_digits_split
from diagcompile.train import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    MODEL_NAME,
    TrainConfig,
    atomic_torch_save,
    dst_config_dict,
    dst_options,
    load_checkpoint,
    load_model,
    train,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


TINY_VIT = {"dim": 32, "depth": 1}
TINY_GPT = {"dim": 32, "depth": 1, "block_size": 32}
# A short digits run that learns: 8 epochs of 35 steps.
LEARN = dict(task="digits-vit", epochs=8, batch_size=32, lr=1e-2, model=TINY_VIT, quiet=True)
DST_VARIANTS = {
    "dynadiag": dict(method="dynadiag"),
    "dynadiag-softmax": dict(method="dynadiag", relaxation="softmax_clamp"),
    "dynadiag-pool2": dict(method="dynadiag", pool=2.0),
    "diagheur": dict(method="diagheur"),
}


# ---- learning ----------------------------------------------------------------------------------------
def test_dense_digits_beats_chance():
    m = train(TrainConfig(**LEARN))
    assert m["status"] == "complete" and m["final"]["acc"] >= 70.0, m["final"]  # chance: 10%
    assert m["curve"][-1]["train_loss"] < 0.5 * m["curve"][0]["train_loss"]


@pytest.mark.parametrize("variant", list(DST_VARIANTS))
def test_dst_digits_beats_chance(variant):
    m = train(TrainConfig(**LEARN, sparsity=0.9, dst={"update_every": 10}, **DST_VARIANTS[variant]))
    assert m["final"]["acc"] >= 50.0, m["final"]  # chance: 10%
    # Every converted layer ends compact at the target density: k / P ~ 0.1.
    assert m["params"]["sparse_layers"] == 4
    assert 0.09 <= m["params"]["sparse_layer_density"] <= 0.13
    assert m["final"]["acc"] == pytest.approx(m["final_before_finalize"]["acc"], abs=0.5)
    assert m["dst"]["summary"]["k_eff"] == m["dst"]["summary"]["k"]  # hard top-k at the end


def _unigram_bpc() -> float:
    counts = torch.bincount(load_chars("test").train.long(), minlength=VOCAB_SIZE).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


@pytest.mark.parametrize("method", ["dense", "dynadiag-pool2"])
def test_chars_gpt_learns_context(method):
    kw = dict(method="dense") if method == "dense" else dict(method="dynadiag", pool=2.0, dst={"update_every": 10})
    m = train(
        TrainConfig(
            task="chars-gpt",
            steps=120,
            batch_size=16,
            lr=1e-2,
            model=TINY_GPT,
            eval_every=60,
            eval_blocks=32,
            final_eval_blocks=64,
            quiet=True,
            sparsity=0.8,
            **kw,
        )
    )
    # Chance is log2(97) = 6.6 bpc; a model without context can reach the unigram entropy (~4.5) at best.
    assert m["final"]["bpc"] < _unigram_bpc() - 0.3, (m["final"], _unigram_bpc())
    assert m["data"]["file_list_sha256"] and m["data"]["train_chars"] > 1_000_000


# ---- checkpoints -------------------------------------------------------------------------------------
def _quick(task="digits-vit", **kw):
    base = dict(task=task, steps=24, eval_every=6, batch_size=16, quiet=True)
    if task == "digits-vit":
        base["model"] = {"dim": 16, "depth": 1}
    else:
        base.update(model={"dim": 16, "depth": 1, "block_size": 16}, eval_blocks=8, final_eval_blocks=16)
    if kw.get("method", "dense") != "dense":
        # Topology updates every 4 steps; the dynadiag freeze at step 12, after the interruption at 11.
        kw.setdefault("dst", {"update_every": 4, "freeze_at": 0.5})
    return TrainConfig(**{**base, **kw})


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _strip_time(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("time", "env", "memory", "resumed_from_step", "config")}


RESUME_CASES = {
    "dense": dict(method="dense"),
    **DST_VARIANTS,
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_identical(tmp_path, case):
    straight = train(_quick(out=str(tmp_path / "a"), **RESUME_CASES[case]))
    part = train(_quick(out=str(tmp_path / "b"), stop_after=11, **RESUME_CASES[case]))
    assert part["status"] == "interrupted" and part["step"] == 11
    assert not (tmp_path / "b" / METRICS_NAME).exists()
    # The resumed process starts from a different global RNG state: the checkpoint must restore it.
    torch.manual_seed(12345)
    resumed = train(_quick(out=str(tmp_path / "b"), resume=True, **RESUME_CASES[case]))
    assert resumed["resumed_from_step"] == 11
    assert _strip_time(resumed) == _strip_time(straight)
    for name in (MODEL_NAME, CHECKPOINT_NAME):
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / name, weights_only=True)
        _assert_same_state(*(x["state_dict"] if name == MODEL_NAME else x["model"] for x in (a, b)))


def test_resume_chars_is_bit_identical(tmp_path):
    kw = dict(task="chars-gpt", method="diagheur")
    straight = train(_quick(out=str(tmp_path / "a"), **kw))
    train(_quick(out=str(tmp_path / "b"), stop_after=13, **kw))
    resumed = train(_quick(out=str(tmp_path / "b"), resume=True, **kw))
    assert _strip_time(resumed) == _strip_time(straight)
    a = torch.load(tmp_path / "a" / MODEL_NAME, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / MODEL_NAME, weights_only=True)["state_dict"]
    _assert_same_state(a, b)


def test_checkpoint_is_weights_only_loadable(tmp_path):
    train(_quick(out=str(tmp_path), method="dynadiag", pool=2.0, stop_after=5))
    path = tmp_path / CHECKPOINT_NAME
    ckpt = torch.load(path, weights_only=True)  # raises on any pickled object
    assert ckpt["step"] == 5 and ckpt["config"]["method"] == "dynadiag" and ckpt["config"]["pool"] == 2.0
    for key in ("model", "optimizer", "sparsifier", "scheduler", "data", "rng", "history"):
        assert ckpt[key] is not None, key
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor) and isinstance(ckpt["data"]["gen"], torch.Tensor)
    assert any(k.endswith("candidate_offsets") for k in ckpt["model"])
    assert load_checkpoint(path)["step"] == 5
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a diagcompile training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"v": torch.arange(3)}, path)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes that are not a checkpoint")
        f.flush()
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"v": torch.arange(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(3))  # the old one, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left behind

    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(torch, "save", dying_save)
        atomic_torch_save({"v": 1}, tmp_path / "fresh.pt")
    assert not (tmp_path / "fresh.pt").exists()


def test_sigint_checkpoints_then_resumes(tmp_path):
    cfg = _quick(out=str(tmp_path / "b"), method="diagheur")

    def interrupt_at_7(step, total, info):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="stopped at step 7"):
        train(cfg, progress=interrupt_at_7)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)["step"] == 7
    resumed = train(_quick(out=str(tmp_path / "b"), method="diagheur", resume=True))
    straight = train(_quick(out=str(tmp_path / "a"), method="diagheur"))
    assert _strip_time(resumed) == _strip_time(straight)


def test_resume_refuses_a_different_config(tmp_path):
    train(_quick(out=str(tmp_path), stop_after=3))
    with pytest.raises(ValueError, match=r"different configuration \(lr"):
        train(_quick(out=str(tmp_path), resume=True, lr=0.5))


def test_out_that_is_a_file_fails_before_any_step(tmp_path):
    (tmp_path / "afile").write_text("")
    steps = []
    with pytest.raises(ValueError, match="afile' is an existing file, not a folder"):
        train(_quick(out=str(tmp_path / "afile")), progress=lambda s, t, i: steps.append(s))
    assert steps == []


def test_stop_after_zero_writes_the_checkpoint_it_reports(tmp_path):
    r = train(_quick(out=str(tmp_path / "s0"), method="diagheur", stop_after=0))
    assert r["status"] == "interrupted" and r["step"] == 0
    assert load_checkpoint(r["checkpoint"])["step"] == 0
    resumed = train(_quick(out=str(tmp_path / "s0"), method="diagheur", resume=True))
    straight = train(_quick(out=str(tmp_path / "a"), method="diagheur"))
    assert resumed["resumed_from_step"] == 0 and _strip_time(resumed) == _strip_time(straight)
    assert train(_quick(stop_after=0))["checkpoint"] is None  # no out: no checkpoint to claim


def test_resume_with_another_ckpt_every(tmp_path):
    # ckpt_every only says when checkpoints are written: a runtime setting, like stop_after
    train(_quick(out=str(tmp_path), method="diagheur", stop_after=3))
    m = train(_quick(out=str(tmp_path), method="diagheur", resume=True, ckpt_every=2))
    assert m["status"] == "complete" and m["resumed_from_step"] == 3


def test_a_new_run_does_not_overwrite_an_unfinished_one(tmp_path):
    train(_quick(out=str(tmp_path), method="diagheur", stop_after=5))
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint from an earlier run \(step 5 of 24\); pass --resume"):
        train(_quick(out=str(tmp_path), method="dynadiag"))
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    with pytest.raises(ValueError, match="cannot resume.*method"):  # checked before any training too
        train(_quick(out=str(tmp_path), method="dynadiag", resume=True))
    # a finished run is results, not progress: running again into its folder starts over (the demo does)
    train(_quick(out=str(tmp_path), method="diagheur", resume=True))
    assert train(_quick(out=str(tmp_path), method="diagheur"))["resumed_from_step"] is None


# ---- outputs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dense", "dynadiag", "diagheur"])
def test_load_model_roundtrip(tmp_path, method):
    m = train(_quick(out=str(tmp_path), method=method, sparsity=0.8))
    rng = torch.get_rng_state()
    model, example = load_model(tmp_path / MODEL_NAME)
    assert torch.equal(torch.get_rng_state(), rng)  # loading does not consume the caller's randomness
    assert not model.training and example[0].shape == (2, 16, 4)
    diag = [mod for mod in model.modules() if isinstance(mod, DiagLinear)]
    assert len(diag) == (0 if method == "dense" else 4)
    assert all(0.18 <= d.density <= 0.25 for d in diag)
    ds = load_digits_split("test")
    with torch.no_grad():
        acc = 100.0 * (model(ds.x_eval).argmax(-1) == ds.y_eval).double().mean().item()
    assert acc == m["final"]["acc"]  # the saved model is the one that was evaluated
    assert model(*example).shape == (2, 10)


def test_load_model_chars_example_and_bad_files(tmp_path):
    train(_quick(task="chars-gpt", out=str(tmp_path), method="diagheur"))
    model, (idx,) = load_model(tmp_path / MODEL_NAME)
    assert idx.dtype == torch.int64 and idx.shape == (2, 16)
    assert model(idx).shape == (2, 16, VOCAB_SIZE)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.blocks[0].mlp.fc1, DiagLinear)
    with pytest.raises(ValueError, match="is a training checkpoint .* the model file is .*model.pt"):
        load_model(tmp_path / CHECKPOINT_NAME)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a diagcompile model file"):
        load_model(tmp_path / "other.pt")


def test_metrics_json(tmp_path):
    m = train(_quick(out=str(tmp_path), method="dynadiag", pool=2.0))
    on_disk = json.loads((tmp_path / METRICS_NAME).read_text())
    assert on_disk["final"] == m["final"] and on_disk["status"] == "complete"
    for key in ("curve", "best", "time", "params", "memory", "dst", "env", "data", "resolved", "model_config"):
        assert on_disk[key], key
    assert [c["step"] for c in on_disk["curve"]] == [6, 12, 18, 24]
    assert on_disk["env"]["torch"] == torch.__version__ and on_disk["env"]["device"] == "cpu"
    dst = on_disk["dst"]
    assert set(dst["diagnostics"]) == {
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    }
    assert dst["max_memory_bytes"] > 0 and len(dst["history"]) == 4
    assert dst["config"]["pool"] == 2.0 and dst["config"]["total_steps"] == 24
    # The sweep's cache judges a finished run by exactly this record: it must be what dst_config_dict resolves.
    cfg = _quick(out=str(tmp_path), method="dynadiag", pool=2.0)
    assert dst["config"] == json.loads(json.dumps(dst_config_dict(cfg, 24)))
    assert on_disk["params"]["final_model"] < on_disk["params"]["dense_model"]


def test_train_config_validation():
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="mnist")
    with pytest.raises(ValueError, match="method"):
        TrainConfig(task="digits-vit", method="set")
    with pytest.raises(ValueError, match="epochs or steps"):
        TrainConfig(task="digits-vit", epochs=1, steps=3)
    with pytest.raises(ValueError, match="sparsity"):
        TrainConfig(task="digits-vit", sparsity=1.0)
    with pytest.raises(ValueError, match="resume needs out"):
        TrainConfig(task="digits-vit", resume=True)
    with pytest.raises(ValueError, match="DST methods"):
        TrainConfig(task="digits-vit", relaxation="threshold")
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        TrainConfig(task="digits-vit", model={"width": 3})
    with pytest.raises(TypeError, match="TrainConfig"):
        train({"task": "digits-vit"})


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="diagheur", relaxation="softmax_clamp"), "relaxation/pool apply to method 'dynadiag' only"),
        (dict(method="diagheur", pool=2.0), "relaxation/pool apply to method 'dynadiag' only"),
        (dict(method="dynadiag", offsets_from="run/model.pt"), "offsets_from applies to method 'diagheur' only"),
        (dict(method="diagheur", dst={"temperature_start": 0.1}), "temperature_start.*'dynadiag' only"),
        (dict(method="dynadiag", dst={"sparsity": 0.5}), r"dst may not set \['sparsity'\]"),
        (dict(method="rigl", dst={"total_steps": 5}), r"dst may not set \['total_steps'\]"),
        (dict(method="dynadiag", dst={"relaxation": "gumbel"}), "DSTConfig.relaxation='gumbel'"),
        (dict(method="dynadiag", steps=10, dst={"freeze_at": 11}), "freeze_at=11"),
    ],
)
def test_train_config_refuses_options_that_would_do_nothing_or_fail_later(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(task="digits-vit", **kw)


def test_dst_options_precedence(monkeypatch):
    # recipe < the task's overlay < relaxation/pool < cfg.dst; the seed only for configs that take one.
    monkeypatch.setitem(
        train_mod.TASK_DST_RECIPE,
        "chars-gpt",
        {
            ("dynadiag", "threshold"): {"alpha_lr": 0.5, "freeze_at": 0.3},
            ("dynadiag", "threshold", "pool"): {"alpha_lr": 0.7},
        },
    )
    base = dict(task="chars-gpt", method="dynadiag", seed=7)
    opts = dst_options(TrainConfig(**base, dst={"freeze_at": 0.2}))
    assert opts == {**train_mod.DST_RECIPE[("dynadiag", "threshold")], "alpha_lr": 0.5, "freeze_at": 0.2}
    pooled = dst_options(TrainConfig(**base, pool=2.0))
    assert pooled["alpha_lr"] == 0.7 and pooled["freeze_at"] == 0.3 and pooled["pool"] == 2.0
    assert "alpha_lr" not in dst_options(TrainConfig(task="digits-vit", method="dynadiag"))  # other task
    assert "alpha_lr" not in dst_options(TrainConfig(**base, relaxation="softmax_clamp"))  # other key
    assert dst_options(TrainConfig(task="chars-gpt", method="rigl", seed=7))["seed"] == 7
    with pytest.raises(ValueError, match="'dense' has no sparsifier"):
        dst_options(TrainConfig(task="chars-gpt"))
    with pytest.raises(ValueError, match=r"option\(s\) \['bogus'\] do not apply to method 'diagheur'"):
        dst_config_dict(TrainConfig(task="chars-gpt", method="diagheur", dst={"bogus": 1}), 10)


def test_default_lr_per_method_and_relaxation(monkeypatch):
    # dense gets the task's lr, every diagonal DST method its sparse_lr, unless the task tuned one for the
    # relaxation; an explicit lr always wins.
    monkeypatch.setitem(
        train_mod.TASK_DEFAULTS,
        "chars-gpt",
        {**train_mod.TASK_DEFAULTS["chars-gpt"], "lr": 1.0, "sparse_lr": 2.0, "relaxation_lr": {"softmax_clamp": 3.0}},
    )
    lr = {
        name: TrainConfig(task="chars-gpt", **kw).get("lr")
        for name, kw in {
            "dense": {},
            "threshold": {"method": "dynadiag"},
            "pool": {"method": "dynadiag", "pool": 2.0},
            "softmax": {"method": "dynadiag", "relaxation": "softmax_clamp"},
            "diagheur": {"method": "diagheur"},
            "explicit": {"method": "dynadiag", "relaxation": "softmax_clamp", "lr": 4.0},
        }.items()
    }
    assert lr == {"dense": 1.0, "threshold": 2.0, "pool": 2.0, "softmax": 3.0, "diagheur": 2.0, "explicit": 4.0}
    # digits tuned no per-relaxation lr: softmax_clamp takes its sparse_lr
    digits = TrainConfig(task="digits-vit", method="dynadiag", relaxation="softmax_clamp")
    assert digits.get("lr") == train_mod.TASK_DEFAULTS["digits-vit"]["sparse_lr"]


def test_lr_schedule_shape():
    f = [train_mod._lr_factor(s, 100, 0.1, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert max(f) == pytest.approx(1.0) and f[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # then non-increasing (cosine)


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "digits-vit", "--method", "dynadiag", "--pool", "2", "--sparsity", "0.8"]
    argv += ["--steps", "12", "--batch-size", "16", "--model", "dim=16", "--model", "depth=1", "--out", str(out)]
    argv += ["--dst", "update_every=4", "--quiet"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "digits-vit dynadiag" in text and "test accuracy" in text
    m = json.loads((out / METRICS_NAME).read_text())
    assert m["config"]["pool"] == 2.0 and m["config"]["dst"] == {"update_every": 4} and m["steps"] == 12
    assert m["env"]["torch_threads"] == 1
    # --resume of a finished run only re-evaluates.
    assert cli.main([*argv, "--resume"]) == 0
    m2 = json.loads((out / METRICS_NAME).read_text())
    assert m2["final"] == m["final"] and m2["resumed_from_step"] == 12
    assert math.isfinite(m2["final"]["acc"])


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--steps", "-3"], "steps must be a positive int"),
        (["--method", "dynadiag", "--dst", "sparsity=0.5"], r"dst may not set \['sparsity'\]"),
        (["--method", "diagheur", "--relaxation", "softmax_clamp"], "apply to method 'dynadiag' only"),
        (["--method", "dynadiag", "--dst", "bogus=1"], r"\['bogus'\] do not apply"),
        (["--threads", "0"], "--threads: must be an int >= 1"),
        (["--out", "FILE"], "is an existing file"),
        (["--device", "tpu"], "--device='tpu' is not a torch device"),
        (["--out", "FILE/sub"], "cannot write in .*FILE/sub'"),
        (["--out", ""], "must name a folder, got an empty path"),
        (["--seed", str(10**20)], r"seed must be in \[-2\*\*63, 2\*\*64\)"),
    ],
)
def test_cli_train_reports_bad_arguments_as_usage_errors(tmp_path, capsys, monkeypatch, extra, match):
    (tmp_path / "FILE").write_text("")
    monkeypatch.setattr(train_mod, "_train", lambda *a, **k: pytest.fail("training started"))
    extra = [str(tmp_path / a) if a.startswith("FILE") else a for a in extra]
    argv = ["train", "--task", "digits-vit", "--steps", "2", "--out", str(tmp_path / "o"), "--quiet", *extra]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("diagcompile train: error: ") and re.search(match, last), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_refuses_cuda_on_a_machine_without_it(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--task", "digits-vit", "--device", "cuda", "--out", "x"])
    # A CPU-only build and a CUDA build on a machine without a GPU (torch from PyPI) give different reasons.
    why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
    assert e.value.code == 2 and f"--device='cuda': {why}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--steps", "2", "--sparsity", "0.999"], r"layer 'blocks.0.attn.qkv' \(192x64\): sparsity=0.999 is outside"),
        # epochs: the step count is known only once the data is (1 epoch of digits = 22 steps)
        (
            ["--epochs", "1", "--dst", "freeze_at=100"],
            r"freeze_at=100 \(an absolute step\) must be in \[0, total_steps=22\]",
        ),
        (["--steps", "2", "--batch-size", "100000"], "batch_size=100000 exceeds the 1437 training images"),
    ],
)
def test_cli_train_reports_what_the_model_rules_out_as_usage_errors(tmp_path, capsys, extra, match):
    # Only the model's shapes and the run's length tell these apart: found while setting up, before any step.
    out = tmp_path / "o"
    argv = ["train", "--task", "digits-vit", "--method", "dynadiag", "--out", str(out), "--quiet"]
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and re.search(match, err.strip().splitlines()[-1]), err
    assert not out.exists()  # the folder this run made, still empty, is gone


def test_cli_train_interrupted_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def stop(cfg):
        raise train_mod.Interrupted(7, 20)

    monkeypatch.setattr(train_mod, "train", stop)
    argv = ["train", "--task", "digits-vit", "--steps", "20", "--out", str(tmp_path / "o"), "--quiet"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "stopped at step 7/20" in err and "with --resume to continue" in err and "resume=True" not in err


def test_ddp_two_workers_match_one_process(tmp_path):
    # gloo workers on the CPU; each takes half of every global batch, so the run matches the single-process
    # one up to floating-point summation order (the topology decisions are made on all-reduced probes).
    # A moderate lr: with dynadiag's default (sparse_lr, 10x larger) the summation-order differences grow past
    # the tolerance over the run, which says nothing about DDP.
    kw = dict(method="dynadiag", pool=2.0, lr=2e-3)
    one = train(_quick(out=str(tmp_path / "one"), **kw))
    two = train(_quick(out=str(tmp_path / "two"), nproc=2, **kw))
    assert two["status"] == "complete" and two["env"]["world_size"] == 2 and one["env"]["world_size"] == 1
    a = torch.load(tmp_path / "one" / MODEL_NAME, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two" / MODEL_NAME, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("offsets"):
            assert torch.equal(a[k], b[k]), k  # the same diagonals were chosen
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    for ca, cb in zip(one["curve"], two["curve"]):
        assert ca["train_loss"] == pytest.approx(cb["train_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="divisible by nproc"):
        train(_quick(batch_size=15, nproc=2))


def test_offsets_from_retrains_a_found_topology(tmp_path):
    train(_quick(out=str(tmp_path / "found"), method="dynadiag", pool=2.0, sparsity=0.8))
    found = torch.load(tmp_path / "found" / MODEL_NAME, weights_only=True)["state_dict"]
    kw = dict(method="diagheur", dst={"update_end": 0.0}, offsets_from=str(tmp_path / "found" / MODEL_NAME))
    m = train(_quick(out=str(tmp_path / "again"), **kw))
    again = torch.load(tmp_path / "again" / MODEL_NAME, weights_only=True)["state_dict"]
    offs = [k for k in found if k.endswith(".offsets")]
    assert len(offs) == 4 and all(torch.equal(found[k], again[k]) for k in offs)  # static: the same diagonals
    assert m["dst"]["summary"]["offsets_changed_total"] == 0
    with pytest.raises(ValueError, match="not a diagcompile model file"):
        train(_quick(method="diagheur", offsets_from=str(tmp_path / "found" / CHECKPOINT_NAME)))
    with pytest.raises(ValueError, match="not 'dense'"):
        _quick(offsets_from=str(tmp_path / "found" / MODEL_NAME))


# ---- resume with the resolved defaults spelled out; what each reported number was measured on ---------------
def test_resume_accepts_explicit_values_equal_to_the_resolved_defaults(tmp_path):
    # Interrupted with batch_size / lr / weight_decay left to the task defaults; resumed with the values they
    # resolved to spelled out (e.g. copied from the first run's output): the same run.
    kw = dict(method="diagheur", batch_size=None)
    straight = train(_quick(out=str(tmp_path / "a"), **kw))
    train(_quick(out=str(tmp_path / "b"), stop_after=5, **kw))
    ckpt = load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)
    resolved = {"batch_size": 64, "lr": 2e-2, "weight_decay": 0.05}  # digits-vit's defaults for diagheur
    assert ckpt["resolved"] == resolved and ckpt["config"]["lr"] is None
    explicit = {**kw, **resolved}
    resumed = train(_quick(out=str(tmp_path / "b"), resume=True, **explicit))
    assert resumed["resumed_from_step"] == 5 and _strip_time(resumed) == _strip_time(straight)
    # A value that differs from the one used is still refused, named with the value the run used.
    train(_quick(out=str(tmp_path / "c"), stop_after=5, **kw))
    with pytest.raises(ValueError, match=r"different configuration \(lr: checkpoint 0.02 vs now 0.01\)"):
        train(_quick(out=str(tmp_path / "c"), resume=True, **{**explicit, "lr": 0.01}))
    with pytest.raises(ValueError, match=r"different configuration \(batch_size: checkpoint 64 vs now 32\)"):
        train(_quick(out=str(tmp_path / "c"), resume=True, **{**explicit, "batch_size": 32}))


def test_resume_of_a_checkpoint_without_resolved_values_works_as_before(tmp_path):
    # Checkpoints written before the record: the same config resumes; spelled-out defaults are refused as they
    # were (nothing says which values the run used).
    kw = dict(method="diagheur", batch_size=None)
    train(_quick(out=str(tmp_path), stop_after=5, **kw))
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    del ckpt["resolved"]
    atomic_torch_save(ckpt, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match=r"different configuration \(lr: checkpoint None vs now 0.02\)"):
        train(_quick(out=str(tmp_path), resume=True, **kw, lr=0.02))
    assert train(_quick(out=str(tmp_path), resume=True, **kw))["resumed_from_step"] == 5


def test_cli_resume_with_the_resolved_defaults_spelled_out(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["train", "--task", "digits-vit", "--method", "diagheur", "--steps", "8", "--seed", "1"]
    argv += ["--model", "dim=16", "--model", "depth=1", "--dst", "update_every=2", "--out", out, "--quiet"]
    kw = dict(task="digits-vit", method="diagheur", steps=8, seed=1, model={"dim": 16, "depth": 1}, out=out)
    train(TrainConfig(**kw, dst={"update_every": 2}, quiet=True, stop_after=3))
    assert cli.main([*argv, "--resume", "--lr", "0.02", "--batch-size", "64"]) == 0
    assert json.loads((tmp_path / "run" / METRICS_NAME).read_text())["resumed_from_step"] == 3


def test_chars_metrics_say_what_best_and_final_were_measured_on(tmp_path):
    # The periodic evaluations (the curve, "best") use eval_blocks blocks of the validation text; the final one
    # final_eval_blocks: the two numbers are not comparable at the same step, and the metrics must say so.
    m = train(_quick(task="chars-gpt", out=str(tmp_path), steps=6, eval_every=6))
    last = m["curve"][-1]
    assert last["step"] == 6 == m["best"]["step"] and m["best"]["value"] == last["bpc"]
    n_val = (load_chars("test").eval.numel() - 1) // 16  # blocks of 16 characters in the validation text
    assert m["periodic_eval"] == {"split": "val", "blocks": 8, "blocks_available": n_val, "chars": 8 * 16}
    assert m["final_eval"] == {"split": "val", "blocks": 16, "blocks_available": n_val, "chars": 16 * 16}
    assert m["final"]["eval_chars"] == m["final_eval"]["chars"] and last["eval_chars"] == m["periodic_eval"]["chars"]
    on_disk = json.loads((tmp_path / METRICS_NAME).read_text())
    assert on_disk["periodic_eval"] == m["periodic_eval"] and on_disk["final_eval"] == m["final_eval"]
    line = train_mod.result_summary(m)
    assert f"final {m['final']['bpc']:.4g} validation bits/char (16 of {n_val} val blocks" in line, line
    assert f"best {m['best']['value']:.4g} bits/char at step 6 (periodic eval, 8 of {n_val} val blocks" in line, line


def test_digits_metrics_say_what_best_and_final_were_measured_on(tmp_path):
    m = train(_quick(method="diagheur"))
    n = load_digits_split("test").y_eval.numel()
    assert m["periodic_eval"] == m["final_eval"] == {"split": "test", "images": n}
    line = train_mod.result_summary(m)
    assert f"final {m['final']['acc']:.4g}% test accuracy ({n} test images, after finalize)" in line, line
    assert f"(periodic eval, {n} test images, before finalize)" in line, line


def test_a_run_steps_its_sparsifier_exactly_total_steps_times(tmp_path):
    # The sparsifier warns when step() goes past total_steps; the harness (straight, and resumed) never does.
    import warnings

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for method in ("dynadiag", "diagheur", "rigl"):
            kw = dict(method=method, dst={"update_every": 4})
            train(_quick(out=str(tmp_path / method), stop_after=7, **kw))
            m = train(_quick(out=str(tmp_path / method), resume=True, **kw))
            assert m["dst"]["config"]["total_steps"] == m["steps"] == 24
    assert not [w for w in rec if "beyond total_steps" in str(w.message)]


def test_numpy_numbers_in_the_config_stay_out_of_checkpoints_and_json():
    # np.float64 is a float subclass and passed validation, then made checkpoint.pt unloadable with
    # weights_only=True; an np.int64 in dst broke metrics.json at the very end of a run.
    import numpy as np

    cfg = TrainConfig(
        task="digits-vit",
        method="dynadiag",
        sparsity=np.float64(0.9),
        steps=np.int64(3),
        lr=np.float32(0.02),
        seed=np.int64(1),
        dst={"update_every": np.int64(2)},
        out="unused",
    )
    d = cfg.to_dict()
    for name in ("sparsity", "lr"):
        assert type(getattr(cfg, name)) is float and type(d[name]) is float
    assert type(cfg.steps) is int and type(cfg.seed) is int and type(cfg.dst["update_every"]) is int
    json.dumps(d)


# ---- what a user trial found: damaged checkpoints, Ctrl-C without a checkpoint or with workers, --dst defaults -----
def _damage(path, kind: str) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":  # a copy cut short: the zip archive's directory at its end is missing
        torch.save({"format": "diagcompile.train.checkpoint/2", "model": {"w": torch.zeros(4096)}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(bytes(range(256)) * 20)


def _assert_checkpoint_refused(out, expected: str, error: type = ValueError, **cfg) -> None:
    """check_out, with and without resume, and load_checkpoint refuse ``out``'s checkpoint with ``expected``."""
    for resume in (False, True):
        with pytest.raises(error, match=expected):
            train_mod.check_out(_quick(out=str(out), resume=resume, **cfg))
    with pytest.raises(error, match=expected):
        load_checkpoint(out / CHECKPOINT_NAME)


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage"])
def test_an_unreadable_checkpoint_is_named_with_what_to_do(tmp_path, capsys, monkeypatch, kind):
    # torch.load raised its own errors (RuntimeError "mmap can only be used with files saved with ...
    # _use_new_zipfile_serialization", EOFError, UnpicklingError), with or without resume, before any training.
    path = tmp_path / CHECKPOINT_NAME
    _damage(path, kind)
    expected = rf"checkpoint {re.escape(str(path))} is unreadable: it is .*move it away or delete it"
    _assert_checkpoint_refused(tmp_path, expected)
    monkeypatch.setattr(train_mod, "_train", lambda *a, **k: pytest.fail("training started"))
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--task", "digits-vit", "--steps", "2", "--out", str(tmp_path), "--quiet", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("diagcompile train: error: ") and re.search(expected, last), err
        assert "choose another --out" in last and "_use_new_zipfile_serialization" not in last


def test_an_unreadable_model_file_is_named_too(tmp_path):
    # load_model and offsets_from read model.pt files with the same guard as checkpoints.
    path = tmp_path / "model.pt"
    _damage(path, "truncated")
    with pytest.raises(ValueError, match=rf"model file {re.escape(str(path))} is unreadable: .*another model.pt"):
        load_model(path)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"offsets_from model file .* is unreadable: .*finished run's model.pt"):
        train_mod._mark_offsets_from(model, str(path), "digits-vit")


def test_a_tagged_file_without_its_fields_is_named(tmp_path):
    # The right format tag with fields missing raised KeyError('step') (check_out) or KeyError('state_dict').
    ckpt, model = tmp_path / CHECKPOINT_NAME, tmp_path / "model.pt"
    torch.save({"format": "diagcompile.train.checkpoint/2", "model": {}}, ckpt)
    torch.save({"format": "diagcompile.model/1", "diag_layers": {}}, model)
    expected = r"has the format tag .* but no config, step, total_steps, optimizer, .*changed after diagcompile"
    _assert_checkpoint_refused(tmp_path, expected)
    with pytest.raises(ValueError, match=r"model.pt has the format tag .* but no model_config, state_dict: "):
        load_model(model)
    with pytest.raises(ValueError, match=r"but no model_config, state_dict"):
        train_mod._mark_offsets_from(torch.nn.Sequential(torch.nn.Linear(4, 4)), str(model), "digits-vit")


def test_a_checkpoint_of_the_earlier_optimizer_layout_is_refused_not_resumed(tmp_path):
    # Format /1 (values appended to their param group) resumed with the values in the weight's place: AdamW failed
    # with a shape mismatch, or with equal shapes would swap moments silently (review).
    train(_quick(out=str(tmp_path), method="diagheur", sparsity=0.5, stop_after=5))
    path = tmp_path / CHECKPOINT_NAME
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "format": "diagcompile.train.checkpoint/1"}, path)
    expected = r"written by an earlier diagcompile \(format .*/1', step 5 of 24\).*cannot be resumed"
    _assert_checkpoint_refused(tmp_path, expected, train_mod.OutdatedCheckpointError, method="diagheur", sparsity=0.5)
    torch.save({**ckpt, "format": "diagcompile.train.checkpoint/1", "step": 24}, path)  # a finished run's
    train_mod.check_out(_quick(out=str(tmp_path), method="diagheur", sparsity=0.5))  # a new run may replace it


def test_an_interruption_without_out_does_not_claim_a_checkpoint():
    # A sweep's runs have no out: the message said "the checkpoint is saved: resume with resume=True".
    def interrupt_at_3(step, total, info):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(train_mod.Interrupted) as e:
        train(_quick(), progress=interrupt_at_3)
    assert "nothing was saved" in str(e.value) and "checkpoint is saved" not in str(e.value)
    assert e.value.step == 3 and e.value.saved is False
    # It crosses process boundaries (sweep --jobs workers) with its fields.
    import pickle

    again = pickle.loads(pickle.dumps(e.value))
    assert (again.step, again.total, again.saved, str(again)) == (3, 24, False, str(e.value))


def test_cli_ctrl_c_of_a_ddp_run_says_how_to_resume(tmp_path):
    # A terminal's Ctrl-C (SIGINT to the whole process group) of `train --nproc 2` printed mp.spawn's
    # KeyboardInterrupt traceback. Sent once the first checkpoint exists (every worker is in the training loop
    # then), so the outcome does not depend on timing: the workers stop after a step or two of 400.
    import subprocess
    import sys
    import time

    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "diagcompile", "train", "--task", "digits-vit", "--method", "diagheur"]
    argv += ["--steps", "400", "--batch-size", "16", "--model", "dim=16", "--model", "depth=1", "--eval-every", "200"]
    argv += ["--ckpt-every", "1", "--dst", "update_every=4", "--nproc", "2", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / CHECKPOINT_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    step = load_checkpoint(out / CHECKPOINT_NAME)["step"]
    assert 0 < step < 400
    assert f"stopped at step {step}/400; the checkpoint is saved in {out}" in stderr, stderr
    assert "run the same command with --resume to continue" in stderr


@pytest.mark.filterwarnings("ignore:.*no update happens")  # (24 steps: rigl's default update_every=100 is long)
def test_resume_accepts_a_dst_option_given_explicitly_with_its_default(tmp_path):
    # rigl's update_every defaults to 100: `--dst update_every=100` is the run that left it out (as --lr is).
    train(_quick(out=str(tmp_path), method="rigl", dst={}, stop_after=3))
    m = train(_quick(out=str(tmp_path), method="rigl", dst={"update_every": 100}, resume=True, stop_after=5))
    assert m["status"] == "interrupted" and m["step"] == 5
    with pytest.raises(ValueError, match=r"different configuration \(dst.update_every: checkpoint 100 vs now 50\)"):
        train(_quick(out=str(tmp_path), method="rigl", dst={"update_every": 50}, resume=True))
    assert train(_quick(out=str(tmp_path), method="rigl", dst={}, resume=True))["resumed_from_step"] == 5


def test_cli_summary_counts_parameters_comparably_across_methods(tmp_path, capsys):
    # final_params counted a mask method's pruned zeros (rigl at 90%: the dense count), dynadiag's compact
    # layers not: the summary compared unlike numbers.
    argv = ["train", "--task", "digits-vit", "--steps", "2", "--batch-size", "16", "--model", "dim=16"]
    argv += ["--model", "depth=1", "--sparsity", "0.8", "--quiet", "--dst", "update_every=1"]
    counts = {}
    for method in ("rigl", "dynadiag"):
        assert cli.main([*argv, "--method", method, "--out", str(tmp_path / method)]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        summary = json.loads(line[line.index("{") :])
        params = json.loads((tmp_path / method / METRICS_NAME).read_text())["params"]
        # Every parameter but a sparse layer's pruned weights: one formula for every method.
        kept = params["dense_model"] - params["sparse_layer_weights_dense"] + params["sparse_layer_weights_stored"]
        assert summary["final_params_kept"] == params["final_model_kept"] == kept < params["dense_model"]
        assert summary["final_params_total"] == params["final_model"]  # the old field keeps its meaning
        counts[method] = params
    assert counts["rigl"]["final_model"] == counts["rigl"]["dense_model"]  # dense matrices, pruned weights 0
    assert counts["dynadiag"]["final_model_kept"] == counts["dynadiag"]["final_model"]  # compact already


def test_a_new_run_replaces_a_finished_one_when_it_starts(tmp_path):
    """An interrupted new run must not leave the old run's results in the folder looking like its own."""
    train(_quick(out=str(tmp_path), method="diagheur"))
    assert (tmp_path / METRICS_NAME).exists() and (tmp_path / MODEL_NAME).exists()
    r = train(_quick(out=str(tmp_path), method="diagheur", seed=7, stop_after=3))
    assert r["status"] == "interrupted"
    assert not (tmp_path / METRICS_NAME).exists() and not (tmp_path / MODEL_NAME).exists()
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["step"] == 3 and ckpt["config"]["seed"] == 7


def test_a_run_that_finished_training_but_not_its_evaluation_needs_resume(tmp_path):
    train(_quick(out=str(tmp_path)))
    (tmp_path / METRICS_NAME).unlink()  # what an interrupted final evaluation leaves
    with pytest.raises(ValueError, match=r"finished training \(step 24 of 24\) but not its final evaluation"):
        train(_quick(out=str(tmp_path)))
    assert train(_quick(out=str(tmp_path), resume=True))["resumed_from_step"] == 24


def test_an_out_folder_that_cannot_be_written_fails_before_any_step(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(train_mod.tempfile, "TemporaryFile", refuse)  # root ignores a read-only mode
    steps = []
    with pytest.raises(ValueError, match=r"cannot write in TrainConfig.out=.*: Permission denied"):
        train(_quick(out=str(tmp_path / "ro")), progress=lambda s, t, i: steps.append(s))
    assert steps == []


def test_sigterm_checkpoints_like_ctrl_c_and_says_so(tmp_path, capsys):
    def terminate_at_7(step, total, info):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt, match="stopped at step 7"):
        train(_quick(out=str(tmp_path), quiet=False), progress=terminate_at_7)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 7
    assert "[train] SIGTERM: stopping after this step, with a checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def _interrupt_final_evaluation(monkeypatch, times: int) -> None:
    """Send SIGINT ``times`` times from the first final evaluation."""
    evaluate = train_mod._evaluate

    def evaluate_and_interrupt(cfg, model, ds, device, final):
        if final and not getattr(evaluate_and_interrupt, "done", False):
            evaluate_and_interrupt.done = True
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return evaluate(cfg, model, ds, device, final)

    monkeypatch.setattr(train_mod, "_evaluate", evaluate_and_interrupt)


def test_a_first_ctrl_c_in_the_final_evaluation_lets_it_finish(tmp_path, monkeypatch, capsys):
    _interrupt_final_evaluation(monkeypatch, 1)
    m = train(_quick(out=str(tmp_path), quiet=False))
    assert m["status"] == "complete" and (tmp_path / METRICS_NAME).exists()
    assert "[train] Ctrl-C: finishing the final evaluation first" in capsys.readouterr().err


def test_cli_second_ctrl_c_in_the_final_evaluation_says_how_to_resume(tmp_path, monkeypatch, capsys):
    _interrupt_final_evaluation(monkeypatch, 2)
    argv = ["train", "--task", "digits-vit", "--steps", "6", "--batch-size", "16", "--out", str(tmp_path), "--quiet"]
    assert cli.main([*argv, "--model", "dim=16", "--model", "depth=1"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"stopped at once; the last checkpoint in {tmp_path} (step 6/6) is intact" in err
    assert "--resume to redo the final evaluation" in err
    assert not (tmp_path / METRICS_NAME).exists()


def test_cli_refuses_to_run_under_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--task", "digits-vit", "--steps", "2", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "run it once with --nproc 2 instead of under torchrun" in capsys.readouterr().err


def test_saved_files_say_which_run_and_code_made_them(tmp_path):
    train(_quick(out=str(tmp_path), method="diagheur", sparsity=0.75, seed=3))
    meta = torch.load(tmp_path / MODEL_NAME, weights_only=True)["meta"]
    assert (meta["task"], meta["method"], meta["seed"], meta["sparsity"]) == ("digits-vit", "diagheur", 3, 0.75)
    assert meta["config"]["seed"] == 3 and meta["env"]["torch"] == torch.__version__
    env = json.loads((tmp_path / METRICS_NAME).read_text())["env"]
    assert env["diagcompile"] and env["numba"]
    # offsets_from names a model of the other task as such
    with pytest.raises(ValueError, match=r"is a digits-vit model; this run trains chars-gpt"):
        train(_quick("chars-gpt", out=str(tmp_path / "c"), method="diagheur", offsets_from=str(tmp_path / MODEL_NAME)))


def test_an_edited_checkpoint_is_refused_by_name(tmp_path):
    train(_quick(out=str(tmp_path), method="diagheur", stop_after=5))
    path = tmp_path / CHECKPOINT_NAME
    good = load_checkpoint(path)
    atomic_torch_save({**good, "step": 500}, path)
    with pytest.raises(ValueError, match=r"step 500 of 24 is impossible"):
        train(_quick(out=str(tmp_path), method="diagheur", resume=True))
    name = next(k for k in good["model"] if k.endswith("values"))
    atomic_torch_save({**good, "model": {**good["model"], name: good["model"][name][:1]}}, path)
    with pytest.raises(train_mod.CheckpointReadError, match=r"does not fit the model its configuration builds"):
        train(_quick(out=str(tmp_path), method="diagheur", resume=True))


def test_sigterm_is_left_to_a_handler_the_caller_installed_and_seeds_keep_torch_s_range(tmp_path, capsys):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:

        def terminate_at_3(step, total, info):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

        # negative seeds worked before a range check was added: torch takes [-2**63, 2**64)
        m = train(_quick(seed=-1, quiet=False), progress=terminate_at_3)  # no out: no checkpoint promised
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert m["status"] == "complete" and seen == [signal.SIGTERM]
    assert "[train]" not in capsys.readouterr().err  # the caller's handler took it; nothing was announced

    def interrupt_at_3(step, total, info):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        train(_quick(quiet=False), progress=interrupt_at_3)
    err = capsys.readouterr().err
    assert "[train] Ctrl-C: stopping after this step (" in err and "checkpoint" not in err.split("[train]")[1]


def test_a_stop_before_a_new_run_replaced_a_finished_one_says_nothing_was_saved(tmp_path):
    train(_quick(out=str(tmp_path)))
    msg = train_mod.saved_checkpoint(tmp_path)
    assert msg == f"nothing of this run was saved; the finished run in {tmp_path} is as it was"
    (tmp_path / METRICS_NAME).unlink()
    assert "(step 24/24) is intact: run the same command with --resume to redo the final evaluation" in (
        train_mod.saved_checkpoint(tmp_path)
    )
    assert train_mod.saved_checkpoint(tmp_path / "none") == f"there is no checkpoint to resume in {tmp_path / 'none'}"


def test_a_second_run_into_an_out_in_use_is_refused_until_the_first_dies(tmp_path, capsys):
    # Two runs into one --out both passed check_out while neither had a checkpoint yet, then replaced each
    # other's checkpoint, model.pt and metrics.json file by file (a seed-0 model beside seed-1 metrics). The
    # first run here is a real process in its training loop (its marker: step 1; no checkpoint until step 4000).
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    marker = tmp_path / "training"
    code = (
        "import pathlib, time\n"
        "from diagcompile.train import TrainConfig, train\n"
        f"cfg = TrainConfig(task='digits-vit', steps=4000, eval_every=4000, batch_size=16, quiet=True, seed=0, "
        f"model={{'dim': 16, 'depth': 1}}, out={str(out)!r})\n"
        f"train(cfg, progress=lambda s, t, i: (pathlib.Path({str(marker)!r}).touch(), time.sleep(0.01)))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    argv = ["train", "--task", "digits-vit", "--steps", "4", "--eval-every", "2", "--batch-size", "16"]
    argv += ["--model", "dim=16", "--model", "depth=1", "--seed", "1", "--out", str(out), "--quiet"]
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate()[1]
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"another diagcompile train (process {proc.pid}) is writing to {out}" in err, err
        assert "Traceback" not in err
    finally:
        proc.kill()  # SIGKILL: the kernel drops its lock, which must not block the next run
        proc.communicate()
    assert cli.main(argv) == 0
    assert json.loads((out / METRICS_NAME).read_text())["seed"] == 1
    assert not (out / ".train.lock").exists()  # removed with the run that held it


def test_without_a_terminal_each_evaluation_is_a_progress_line(tmp_path, capsys):
    # The progress bar needs a terminal; to a log file or a pipe a long run (the demo's two trainings) printed
    # nothing for minutes, which reads as a hang.
    cfg = TrainConfig(task="digits-vit", steps=8, eval_every=4, batch_size=16, model=TINY_VIT, out=str(tmp_path))
    train(cfg)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[train] digits-vit dense: step")]
    assert [ln.split(",")[0].rsplit(" ", 1)[1] for ln in lines] == ["4/8", "8/8"], lines
    assert all("loss " in ln and "acc " in ln for ln in lines), lines
    train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "quiet"), "quiet": True}))
    assert "[train]" not in capsys.readouterr().err

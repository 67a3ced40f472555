"""Sweeps: variant names, the run grid, skipping finished runs, aggregation (mean ± std), the plot, the CLI."""

import csv
import dataclasses
import json
import re
import statistics

import pytest

from diagcompile import cli
from diagcompile import sweep as sweep_mod
from diagcompile import train as train_mod
from diagcompile.sweep import SweepConfig, aggregate, parse_variant, plan_runs, run_name, run_sweep

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


TINY = {"steps": 6, "batch_size": 16, "model": {"dim": 16, "depth": 1}, "eval_every": 3}


def test_parse_variant():
    assert parse_variant("dense") == {"method": "dense"}
    assert parse_variant("diagheur") == {"method": "diagheur"}
    assert parse_variant("dynadiag") == {"method": "dynadiag"}
    assert parse_variant("dynadiag-softmax") == {"method": "dynadiag", "relaxation": "softmax_clamp"}
    assert parse_variant("dynadiag-threshold-pool1.5") == {"method": "dynadiag", "relaxation": "threshold", "pool": 1.5}
    assert parse_variant("dynadiag-pool2-faithful") == {"method": "dynadiag"}
    assert parse_variant("dynadiag-softmax@t0.1_f=0.3") == parse_variant("dynadiag-softmax")
    assert parse_variant("dense@lr2e-3") == {"method": "dense"}
    for bad, msg in [
        ("set", "unknown method"),
        ("rigl-erk", "unknown method"),
        ("dense-softmax", "takes no modifiers"),
        ("diagheur-pool2", "takes no modifiers"),
        ("dynadiag-poolx", "pool modifier"),
        ("dynadiag-fast", "unknown modifier"),
        ("", "non-empty"),
        ("dynadiag@a/b", "label"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_variant(bad)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(methods=("diagheur", "dense", "diagheur")), r"methods has duplicate entries \['diagheur'\]"),
        (dict(sparsities=(0.5, 0.9, 0.5)), r"sparsities has duplicate entries \['0.5'\]"),
        (dict(sparsities=(0.5, 0.5000001)), r"sparsities has duplicate entries \['0.5'\]"),  # one run name
        (dict(seeds=(0, 1, 0)), r"seeds has duplicate entries \['0'\]"),
    ],
)
def test_duplicate_grid_entries_are_refused(tmp_path, kw, match):
    base = dict(task="digits-vit", out=str(tmp_path), methods=("diagheur",), sparsities=(0.5,), seeds=(0,))
    with pytest.raises(ValueError, match=match):
        SweepConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--sparsities", "0.5,0.5"], "sparsities has duplicate entries"),
        (["--methods", "dense,dense"], "methods has duplicate entries"),
        (["--seeds", "0"], "--seeds: must be an int >= 1"),
        (["--threads", "-1"], "--threads: must be an int >= 1"),
        (["--methods", "diagheur", "--dst", "pool=2"], "pool=2.*'dynadiag' only"),
        (["--variant-dst", "diagheur"], "--variant-dst expects VARIANT:KEY=VALUE"),
        (["--aggregate-only"], "no run results under .* for this grid"),
        (["--methods", "dynadiag", "--sparsities", "0.999"], "sparsity=0.999 is outside"),
    ],
)
def test_cli_sweep_reports_bad_arguments_as_usage_errors(tmp_path, capsys, monkeypatch, extra, match):
    def train(cfg, **kw):
        if "0.999" not in extra:
            pytest.fail("training started")
        return train_mod.train(cfg, **kw)  # stops in its set-up: the model rules the sparsity out

    monkeypatch.setattr(sweep_mod, "train", train)
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--task", "digits-vit", "--steps", "2", "--out", str(tmp_path), "--quiet", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("diagcompile sweep: error: ") and re.search(match, last), err


def test_plan_runs_grid(tmp_path):
    cfg = SweepConfig(
        task="digits-vit",
        out=str(tmp_path),
        methods=("dense", "dynadiag-softmax", "diagheur"),
        sparsities=(0.5, 0.9),
        seeds=(0, 1, 2),
        train={"steps": 10, "dst": {"update_every": 5}},
        variant_dst={"diagheur": {"drop_fraction": 0.1}},
        variant_train={"dense": {"lr": 0.01}},
    )
    plan = plan_runs(cfg)
    assert len(plan) == 3 + 2 * 2 * 3  # dense once per seed
    names = [n for n, _ in plan]
    assert len(set(names)) == len(names)
    by = dict(plan)
    assert by[run_name("digits-vit", "dense", None, 2)].method == "dense"
    soft = by[run_name("digits-vit", "dynadiag-softmax", 0.9, 1)]
    assert soft.relaxation == "softmax_clamp" and soft.sparsity == 0.9 and soft.seed == 1 and soft.steps == 10
    assert dict(by[run_name("digits-vit", "diagheur", 0.5, 0)].dst) == {"update_every": 5, "drop_fraction": 0.1}
    assert not by[run_name("digits-vit", "dense", None, 0)].dst
    assert by[run_name("digits-vit", "dense", None, 0)].lr == 0.01 and soft.lr is None


def test_sweep_config_validation(tmp_path):
    with pytest.raises(ValueError, match="variant_dst names variants"):
        SweepConfig(task="digits-vit", out=str(tmp_path), methods=("dense",), variant_dst={"diagheur": {}})
    with pytest.raises(ValueError, match="may not set 'seed'"):
        SweepConfig(task="digits-vit", out=str(tmp_path), train={"seed": 3})
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        SweepConfig(task="digits-vit", out=str(tmp_path), train={"epoch": 3})
    with pytest.raises(ValueError, match="may not set 'pool'"):
        SweepConfig(task="digits-vit", out=str(tmp_path), methods=("dense",), variant_train={"dense": {"pool": 2}})
    with pytest.raises(ValueError, match="jobs"):
        SweepConfig(task="digits-vit", out=str(tmp_path), jobs=0)


def test_run_sweep_aggregates_and_skips_finished_runs(tmp_path, monkeypatch):
    cfg = SweepConfig(
        task="digits-vit",
        out=str(tmp_path),
        methods=("dense", "dynadiag-pool2", "diagheur"),
        sparsities=(0.5, 0.9),
        seeds=(0, 1),
        train={**TINY, "dst": {"update_every": 2}},
        quiet=True,
        name="tab",
    )
    res = run_sweep(cfg)
    assert res["ran"] == 2 + 2 * 2 * 2 and res["skipped"] == 0
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")}
    assert len(runs) == 10

    # The aggregate table against an independent computation from the run files.
    with open(tmp_path / "tab.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + 2 * 2
    for row in rows:
        variant, sp = row["variant"], float(row["sparsity"])
        accs = [
            m["final"]["acc"]
            for name, m in runs.items()
            if name.split("__")[1] == variant and (variant == "dense" or f"__s{sp:g}__" in name)
        ]
        assert len(accs) == 2 == int(row["n_seeds"])
        assert float(row["acc_mean"]) == pytest.approx(statistics.fmean(accs))
        assert float(row["acc_std"]) == pytest.approx(statistics.stdev(accs))
    with open(tmp_path / "tab_runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 10

    md = (tmp_path / "tab.md").read_text()
    assert "| dynadiag-pool2 |" in md and "± " in md and "torch" in md and "DSTConfig" in md
    png = (tmp_path / "tab.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # A second invocation finds every run done: it must not train anything.
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep_mod, "train", no_training)
    res2 = run_sweep(cfg)
    assert res2["ran"] == 0 and res2["skipped"] == 10
    # A missing run (deleted JSON) is the only one redone.
    monkeypatch.undo()
    (tmp_path / "runs" / f"{run_name('digits-vit', 'diagheur', 0.9, 1)}.json").unlink()
    assert run_sweep(cfg)["ran"] == 1
    # Finished runs of another configuration are not silently reused.
    changed = dataclasses.replace(cfg, train={**TINY, "dst": {"update_every": 3}})
    with pytest.raises(ValueError, match="another configuration.*dst"):
        run_sweep(changed)
    # The sparsifier config is judged by what the run recorded: the same value given explicitly is no difference.
    monkeypatch.setattr(sweep_mod, "train", no_training)
    same = dataclasses.replace(cfg, variant_dst={"diagheur": {"drop_fraction": 0.3}})  # DSTConfig's default
    assert run_sweep(same)["ran"] == 0
    monkeypatch.undo()
    # Nor are runs trained before a tuned DST default (which the TrainConfig does not hold) changed.
    monkeypatch.setitem(train_mod.TASK_DST_RECIPE, "digits-vit", {("diagheur", None): {"drop_fraction": 0.2}})
    with pytest.raises(ValueError, match="another configuration.*dst.drop_fraction: 0.3 there vs 0.2 now"):
        run_sweep(cfg)
    monkeypatch.undo()
    # A run from before a config field existed counts as trained with that field's default (fields are added
    # with a default that keeps the old behaviour); any other value of it is a difference.
    for path in (tmp_path / "runs").glob("*dynadiag-pool2*.json"):
        old = json.loads(path.read_text())
        del old["dst"]["config"]["soft_scale"]
        path.write_text(json.dumps(old))
    monkeypatch.setattr(sweep_mod, "train", no_training)
    assert run_sweep(cfg)["ran"] == 0
    monkeypatch.undo()
    monkeypatch.setitem(train_mod.TASK_DST_RECIPE, "digits-vit", {("dynadiag", "threshold"): {"soft_scale": "rms"}})
    with pytest.raises(ValueError, match="dst.soft_scale: None there vs 'rms' now"):
        run_sweep(cfg)
    monkeypatch.undo()
    # A learning rate left to the task default matches the same value given explicitly (judged by what each
    # run recorded it used), and only that value.
    used = {m["variant"]: m["resolved"]["lr"] for m in runs.values()}
    assert runs[run_name("digits-vit", "diagheur", 0.9, 0)]["config"]["lr"] is None
    assert used["dense"] != used["diagheur"]  # the two defaults differ, so the check below is per variant
    explicit = dataclasses.replace(cfg, variant_train={v: {"lr": used[v]} for v in cfg.methods})
    monkeypatch.setattr(sweep_mod, "train", no_training)
    assert run_sweep(explicit)["ran"] == 0
    other = dataclasses.replace(cfg, variant_train={"diagheur": {"lr": 2 * used["diagheur"]}})
    with pytest.raises(ValueError, match="another configuration.*lr"):
        run_sweep(other)
    # Left to the default on both sides, but the task default has changed since the run: not the same run.
    monkeypatch.setitem(
        train_mod.TASK_DEFAULTS, "digits-vit", {**train_mod.TASK_DEFAULTS["digits-vit"], "sparse_lr": 1.0}
    )
    with pytest.raises(ValueError, match=rf"lr: {used['diagheur']!r} there vs 1.0 now"):
        run_sweep(cfg)


def _fake_run(variant: str, sparsity: float, seed: int, acc: float) -> dict:
    return {
        "metric": "acc",
        "higher_is_better": True,
        "method": variant.split("-")[0],
        "sparsity": sparsity,
        "seed": seed,
        "final": {"acc": acc},
        "best": {"value": acc + 1, "step": 5},
        "steps": 10,
        "time": {"train_s": 1.0},
        "memory": {"train_state_bytes_peak": 1000},
        "params": {"sparse_layer_density": 1 - sparsity},
        "dst": None if variant == "dense" else {"max_memory_bytes": 500, "summary": {}, "config": {"pool": None}},
        "data": {"eval_split": "test"},
        "model_config": {},
        "resolved": {},
        "env": {"torch": "x"},
    }


def test_aggregate_math_on_known_numbers(tmp_path):
    cfg = SweepConfig(
        task="digits-vit", out=str(tmp_path), methods=("dense", "dynadiag"), sparsities=(0.9,), seeds=(0, 1, 2)
    )
    (tmp_path / "runs").mkdir()
    values = {"dense": [90.0, 92.0, 94.0], "dynadiag": [80.0, 80.0, 86.0]}
    for v, accs in values.items():
        for seed, acc in enumerate(accs):
            sp = None if v == "dense" else 0.9
            m = _fake_run(v, 0.0 if sp is None else sp, seed, acc)
            (tmp_path / "runs" / f"{run_name('digits-vit', v, sp, seed)}.json").write_text(json.dumps(m))
    files = aggregate(cfg)
    rows = {r["variant"]: r for r in csv.DictReader(open(files["csv"]))}
    assert float(rows["dense"]["acc_mean"]) == 92.0 and float(rows["dense"]["acc_std"]) == 2.0
    assert float(rows["dynadiag"]["acc_mean"]) == 82.0
    assert float(rows["dynadiag"]["acc_std"]) == pytest.approx(12**0.5)  # sample std of 80, 80, 86
    md = open(files["md"]).read()
    assert "| dynadiag | 82.00 ± 3.46 (n=3) |" in md and "| dense | 92.00 ± 2.00 (n=3) |" in md


def test_markdown_states_the_runs_thread_count_and_the_realised_sparsity(tmp_path):
    # The time table's caption said "1 thread" whatever the runs used; the sparsity columns are targets of the
    # converted layers, whose realised sparsity differs (k is rounded up: 0.9 keeps 10.29% of the digits ViT's).
    cfg = SweepConfig(
        task="digits-vit", out=str(tmp_path), methods=("dense", "dynadiag"), sparsities=(0.9,), seeds=(0,)
    )
    (tmp_path / "runs").mkdir()
    for v, sp in (("dense", None), ("dynadiag", 0.9)):
        m = _fake_run(v, 0.0 if sp is None else sp, 0, 90.0)
        m["env"]["torch_threads"] = 2
        if sp is not None:
            m["params"]["sparse_layer_density"] = 5056 / 49152
        (tmp_path / "runs" / f"{run_name('digits-vit', v, sp, 0)}.json").write_text(json.dumps(m))
    md = open(aggregate(cfg)["md"]).read()
    assert "1 thread" not in md and "2 threads" in md
    assert "0.9: 0.8971" in md and "embeddings and the head stay dense" in md


def test_dense_only_table_shows_its_values(tmp_path):
    # a dense-only sweep (a learning-rate search) has no sparsity column of its own; its values must still show
    cfg = SweepConfig(task="digits-vit", out=str(tmp_path), methods=("dense", "dense@lr4e-3"), seeds=(0,))
    (tmp_path / "runs").mkdir()
    for v, acc in (("dense", 90.0), ("dense@lr4e-3", 93.0)):
        m = _fake_run(v, 0.0, 0, acc)
        (tmp_path / "runs" / f"{run_name('digits-vit', v, None, 0)}.json").write_text(json.dumps(m))
    md = open(aggregate(cfg)["md"]).read()
    assert "| dense | 90.00 (n=1) |" in md and "| dense@lr4e-3 | 93.00 (n=1) |" in md


def test_cli_sweep_end_to_end(tmp_path, capsys):
    argv = ["sweep", "--task", "chars-gpt", "--methods", "dense,diagheur", "--sparsities", "0.9", "--seeds", "1"]
    argv += ["--steps", "4", "--batch-size", "8", "--model", "dim=16", "--model", "depth=1"]
    argv += ["--model", "block_size=16", "--out", str(tmp_path), "--name", "dst_chars", "--quiet"]
    argv += ["--variant-dst", "diagheur:update_every=2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "ran 2, skipped 0" in out
    for suffix in (".csv", "_runs.csv", ".md", ".png"):
        assert (tmp_path / f"dst_chars{suffix}").exists(), suffix
    md = (tmp_path / "dst_chars.md").read_text()
    assert "bits per character" in md and "| diagheur |" in md
    assert cli.main([*argv, "--aggregate-only"]) == 0
    # Tables rebuilt from runs of another configuration would carry this command's settings: refused, as the
    # same command without --aggregate-only refuses to reuse them (it once wrote the tables, exit 0).
    longer = [*argv[: argv.index("--steps") + 1], "6", *argv[argv.index("--steps") + 2 :], "--aggregate-only"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(longer)
    assert e.value.code == 2 and "another configuration (steps: 4 there vs 6 now)" in capsys.readouterr().err


def test_parallel_jobs_give_the_same_results(tmp_path):
    kw = dict(task="digits-vit", methods=("dense", "diagheur"), sparsities=(0.8,), seeds=(0,), quiet=True)
    kw["train"] = {**TINY, "dst": {"update_every": 2}}
    run_sweep(SweepConfig(out=str(tmp_path / "seq"), jobs=1, threads=1, **kw))
    res = run_sweep(SweepConfig(out=str(tmp_path / "par"), jobs=2, threads=1, **kw))
    assert res["ran"] == 2
    for p in (tmp_path / "seq" / "runs").glob("*.json"):
        a, b = json.loads(p.read_text()), json.loads((tmp_path / "par" / "runs" / p.name).read_text())
        assert a["final"] == b["final"] and a["curve"] == b["curve"], p.name


def test_a_single_seed_has_no_std(tmp_path):
    # The sample std of one value is undefined: the CSV says so (NaN, like every other undefined cell) instead of
    # claiming 0.0, the markdown omits the ±, and the plot draws the mean without an error bar or band.
    cfg = SweepConfig(
        task="digits-vit", out=str(tmp_path), methods=("dense", "dynadiag"), sparsities=(0.5, 0.9), seeds=(0, 1)
    )
    (tmp_path / "runs").mkdir()
    # dense and dynadiag at 0.9 have one seed each (the other run is missing)
    runs = [("dense", None, 0, 90.0), ("dynadiag", 0.5, 0, 85.0), ("dynadiag", 0.5, 1, 87.0)]
    runs.append(("dynadiag", 0.9, 0, 80.0))
    for v, sp, seed, acc in runs:
        m = _fake_run(v, 0.0 if sp is None else sp, seed, acc)
        (tmp_path / "runs" / f"{run_name('digits-vit', v, sp, seed)}.json").write_text(json.dumps(m))
    files = aggregate(cfg)
    rows = {(r["variant"], float(r["sparsity"])): r for r in csv.DictReader(open(files["csv"]))}
    for key in (("dense", 0.0), ("dynadiag", 0.9)):
        assert rows[key]["n_seeds"] == "1" and rows[key]["acc_std"] == "nan", rows[key]
        assert float(rows[key]["acc_mean"]) == (90.0 if key[0] == "dense" else 80.0)
    assert float(rows[("dynadiag", 0.5)]["acc_std"]) == pytest.approx(2**0.5)
    md = open(files["md"]).read()
    assert "| dense | 90.00 (n=1) | 90.00 (n=1) |" in md and "| dynadiag | 86.00 ± 1.41 (n=2) | 80.00 (n=1) |" in md
    assert open(files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_sweep_ctrl_c_keeps_the_finished_runs_and_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    # Ctrl-C printed the traceback of the run's Interrupted, which claimed a checkpoint was saved: sweep runs
    # have none. The real stop path: a SIGINT during the second run, caught by its training loop.
    import os
    import signal

    calls = []

    def train(cfg, **kw):
        calls.append(cfg)

        def interrupt(step, total, info):
            if len(calls) == 2 and step == 2:
                os.kill(os.getpid(), signal.SIGINT)

        return train_mod.train(cfg, progress=interrupt)

    monkeypatch.setattr(sweep_mod, "train", train)
    argv = ["sweep", "--task", "digits-vit", "--methods", "dense,diagheur", "--sparsities", "0.8", "--seeds", "2"]
    argv += ["--steps", "6", "--batch-size", "16", "--model", "dim=16", "--model", "depth=1", "--quiet"]
    argv += ["--dst", "update_every=2", "--out", str(tmp_path)]
    try:
        rc = cli.main(argv)
    except KeyboardInterrupt as e:  # (escaping, it would stop the whole pytest session)
        pytest.fail(f"the interruption escaped the CLI: {e!r}")
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err, err
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [f"{run_name('digits-vit', 'dense', None, 0)}.json"]
    assert f"sweep interrupted: 1 of 4 runs are finished, their results kept in {runs}" in err, err
    assert "run the same sweep again to continue with the remaining 3" in err and "starts over" in err
    assert "resume=True" not in err and "checkpoint is saved" not in err
    # Rerunning the same command does just that.
    monkeypatch.undo()
    assert cli.main(argv) == 0
    assert "ran 3, skipped 1" in capsys.readouterr().out

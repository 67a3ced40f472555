"""Sweeps: methods x sparsities x seeds of :func:`diagcompile.train.train`, a results table and a plot.

``run_sweep(SweepConfig)`` runs every missing run of the grid (a run whose metrics JSON exists in
``out/runs/`` is skipped, so an interrupted sweep resumes where it stopped), then ``aggregate`` writes:

* ``out/<name>_runs.csv``  one row per run (metric, best, time, memory, DST summary);
* ``out/<name>.csv``       mean and sample std (ddof=1; ``nan`` for a single seed) over seeds per method variant x
  sparsity;
* ``out/<name>.md``        the same as a markdown table, headed by date, device, versions and hyper-parameters;
* ``out/<name>.png``       metric vs sparsity per variant (error bars: std), dense as a horizontal band.

Method variants are named ``<method>[-<modifier>...][@label]``: ``dense``, ``diagheur``, ``dynadiag`` (threshold
relaxation, all ``P`` candidates), ``dynadiag-softmax`` (the paper's ``softmax_clamp``), ``dynadiag-pool2``
(candidate pool of ``2k``: sparse-to-sparse), combinable (``dynadiag-softmax-pool2``). Dense ignores the
sparsity and runs once per seed. The mask baselines (``rigl``, ``srigl``, ``nm-srste``, ``nm-mask-decay``,
``nm-structure-decay``) take no modifiers: set their ``MaskConfig`` options with ``variant_dst`` (and ``@label``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diagcompile._files import atomic_write
from diagcompile.dst.config import DIAGHEUR_ONLY, DYNADIAG_ONLY
from diagcompile.train import TASKS, SetupError, TrainConfig, atomic_write_text, env_stamp, train

__all__ = [
    "SweepConfig",
    "SweepInterrupted",
    "parse_variant",
    "run_name",
    "plan_runs",
    "check_finished_runs",
    "run_sweep",
    "aggregate",
]


def parse_variant(name: str) -> dict[str, Any]:
    """``"dynadiag-softmax-pool2"`` -> ``{"method": "dynadiag", "relaxation": "softmax_clamp", "pool": 2.0}``.

    Modifiers (dynadiag only): ``softmax`` / ``threshold`` (relaxation), ``pool<c>`` (candidate pool of
    ``c*k``), ``faithful`` (all ``P`` candidates, the default). A trailing ``@label`` names a configuration
    of the same variant (e.g. ``dynadiag@t0.1`` with ``variant_dst={"dynadiag@t0.1": {...}}``, for tuning
    grids); it does not change the parsed settings.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method variant must be a non-empty string, got {name!r}")
    base, at, label = name.partition("@")
    if at and not re.fullmatch(r"[A-Za-z0-9_.=+-]+", label):
        raise ValueError(f"variant {name!r}: the label after '@' may use only letters, digits and _ . = + -")
    from diagcompile.train import BASELINE_METHODS

    if base in BASELINE_METHODS:  # mask baselines (dst-baselines): no modifiers; options via variant_dst + @label
        return {"method": base}
    method, *mods = base.split("-")
    if method not in ("dense", "dynadiag", "diagheur"):
        raise ValueError(
            f"unknown method {method!r} in variant {name!r} (expected dense, dynadiag, diagheur or one of "
            f"{', '.join(BASELINE_METHODS)})"
        )
    out: dict[str, Any] = {"method": method}
    for m in mods:
        if method != "dynadiag":
            raise ValueError(f"variant {name!r}: {method} takes no modifiers")
        if m == "softmax":
            out["relaxation"] = "softmax_clamp"
        elif m == "threshold":
            out["relaxation"] = "threshold"
        elif m == "faithful":
            out.pop("pool", None)
        elif m.startswith("pool"):
            try:
                c = float(m[4:])
            except ValueError:
                raise ValueError(f"variant {name!r}: pool modifier must look like pool2 or pool1.5") from None
            out["pool"] = c
        else:
            raise ValueError(f"variant {name!r}: unknown modifier {m!r} (softmax, threshold, pool<c>, faithful)")
    return out


def run_name(task: str, variant: str, sparsity: float | None, seed: int) -> str:
    """File stem of one run's metrics JSON."""
    sp = "" if sparsity is None else f"__s{sparsity:g}"
    return f"{task}__{variant}{sp}__seed{seed}"


@dataclass(frozen=True)
class SweepConfig:
    """A grid of runs. ``train`` holds overrides for every run (``TrainConfig`` fields such as ``epochs``,
    ``lr``, ``tune``, ``dst``, ``model``); ``variant_dst`` / ``variant_train`` hold ``DSTConfig`` /
    ``TrainConfig`` overrides per variant name (on top of ``train``).
    """

    task: str
    out: str
    methods: tuple[str, ...] = ("dense", "dynadiag", "dynadiag-softmax", "diagheur")
    sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    name: str = "results"
    jobs: int = 1
    threads: int | None = None
    train: Mapping[str, Any] = field(default_factory=dict)
    variant_dst: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    variant_train: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    quiet: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"SweepConfig.task={self.task!r} must be one of {TASKS}")
        if not self.methods or not self.seeds:
            raise ValueError("SweepConfig: methods and seeds must not be empty")
        # A repeated entry would train its runs twice and count each of them twice in the table (n, std).
        # Sparsities are compared as run names show them (``%g``): two that print alike share a run file.
        for what, names in (
            ("methods", list(self.methods)),
            ("sparsities", [f"{s:g}" if isinstance(s, (int, float)) else s for s in self.sparsities]),
            ("seeds", list(self.seeds)),
        ):
            dup = sorted({str(n) for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"SweepConfig.{what} has duplicate entries {dup}; give each one once")
        for m in self.methods:
            parse_variant(m)
        if any(m != "dense" for m in self.methods) and not self.sparsities:
            raise ValueError("SweepConfig: DST methods need at least one sparsity")
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"SweepConfig.jobs must be a positive int, got {self.jobs!r}")
        for what in ("variant_dst", "variant_train"):
            unknown = set(getattr(self, what)) - set(self.methods)
            if unknown:
                raise ValueError(f"SweepConfig.{what} names variants not in methods: {sorted(unknown)}")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        for what, overrides in [
            ("train", self.train),
            *((f"variant_train[{v!r}]", o) for v, o in self.variant_train.items()),
        ]:
            bad = set(overrides) - fields
            if bad:
                raise ValueError(f"SweepConfig.{what}: unknown TrainConfig fields {sorted(bad)}")
            for f in ("task", "method", "sparsity", "seed", "out", "resume", "relaxation", "pool"):
                if f in overrides:
                    raise ValueError(f"SweepConfig.{what} may not set {f!r}: the sweep sets it per run")


def plan_runs(cfg: SweepConfig) -> list[tuple[str, TrainConfig]]:
    """Every run of the grid as ``(name, TrainConfig)`` (dense once per seed)."""
    runs: list[tuple[str, TrainConfig]] = []
    base = dict(cfg.train)
    for variant in cfg.methods:
        spec = parse_variant(variant)
        sparsities: Sequence[float | None] = [None] if spec["method"] == "dense" else list(cfg.sparsities)
        for sp in sparsities:
            for seed in cfg.seeds:
                kw = {**base, **dict(cfg.variant_train.get(variant, {}))}
                if spec["method"] != "dense":
                    dst = {**dict(base.get("dst", {})), **dict(cfg.variant_dst.get(variant, {}))}
                    kw.update(dst=dst, **{k: v for k, v in spec.items() if k != "method"})
                else:
                    kw.pop("dst", None)
                tc = TrainConfig(
                    task=cfg.task,
                    method=spec["method"],
                    sparsity=0.9 if sp is None else sp,
                    seed=seed,
                    quiet=True,
                    **kw,
                )
                runs.append((run_name(cfg.task, variant, sp, seed), tc))
    return runs


def _run_one(args: tuple[str, dict, str, int | None]) -> tuple[str, float, dict]:
    """Worker: train one run, write its JSON atomically; returns ``(name, seconds, summary)``."""
    name, tc_dict, path, threads = args
    import torch

    if threads:
        torch.set_num_threads(threads)
    tc = TrainConfig(**tc_dict)
    t0 = time.perf_counter()
    m = train(tc)
    dt = time.perf_counter() - t0
    m["variant"] = name.split("__")[1]
    atomic_write_text(json.dumps(m, indent=1) + "\n", path)
    return name, dt, {m["metric"]: m["final"][m["metric"]]}


def _check_same_config(path: Path, tc: TrainConfig) -> None:
    """A finished run is reused only if it was trained with the configuration the grid asks for now."""
    run = json.loads(path.read_text())
    # The sparsifier config a run trained with comes from tuned defaults (DST_RECIPE, TASK_DST_RECIPE) as well as
    # from the TrainConfig's relaxation / pool / dst, so it is judged whole, by the config the run recorded (as a
    # default lr is judged by the lr the run used): a run from before a tuned default changed is refused, and a
    # setting once left to a default and now given explicitly with the same value is not a difference.
    saved_dst = (run.get("dst") or {}).get("config")
    diff = tc.differences(run.get("config", {}), run.get("resolved"), saved_dst, run.get("steps"))
    if diff:
        detail = ", ".join(f"{k}: {was!r} there vs {now!r} now" for k, was, now in diff)
        raise SetupError(f"{path} was trained with another configuration ({detail}); delete it or use another out")


def check_finished_runs(cfg: SweepConfig) -> None:
    """Raise ``SetupError`` unless every finished run of ``cfg``'s grid (``out/runs``) was trained with the
    configuration ``cfg`` asks for: before a sweep reuses them, and before tables are rebuilt from them alone."""
    runs_dir = Path(cfg.out) / "runs"
    for n, tc in plan_runs(cfg):
        p = runs_dir / f"{n}.json"
        if p.exists():
            _check_same_config(p, tc)


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`run_sweep`: ``finished`` of the grid's ``total`` runs have their results in
    ``runs_dir``, kept; running the same sweep again runs the others. A run that was in progress is lost (a
    sweep's runs keep no checkpoint): it starts over."""

    def __init__(self, finished: int, total: int, runs_dir: str) -> None:
        left = total - finished
        super().__init__(
            f"sweep interrupted: {finished} of {total} runs are finished, their results kept in {runs_dir}; "
            f"run the same sweep again to continue with the remaining {left} (a run that was in progress starts "
            "over: sweep runs keep no checkpoint)"
        )
        self.finished, self.total, self.runs_dir = finished, total, runs_dir

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.finished, self.total, self.runs_dir)


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run the missing runs of the grid, then :func:`aggregate`; returns ``{"ran": n, "skipped": n, "files": ...}``.

    Ctrl-C stops the runs in progress (after their current step) and raises :class:`SweepInterrupted`; the
    finished runs' results are kept, so running the sweep again continues with the rest. (With ``jobs > 1`` a
    run the process pool had already queued cannot be cancelled: it may still run before the sweep exits.)
    """
    out = Path(cfg.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_runs(cfg)
    todo = [(n, tc) for n, tc in plan if not (runs_dir / f"{n}.json").exists()]
    skipped = len(plan) - len(todo)
    check_finished_runs(cfg)
    threads = cfg.threads
    if threads is None and cfg.jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    jobs = [(n, tc.to_dict(), str(runs_dir / f"{n}.json"), threads) for n, tc in todo]

    bar = None
    interactive = not cfg.quiet and sys.stderr.isatty()
    if interactive:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), initial=skipped, desc=f"sweep {cfg.task}", unit="run", dynamic_ncols=True)
    elif not cfg.quiet:
        print(f"[sweep] {len(plan)} runs, {skipped} already done, {len(todo)} to run", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    done = skipped

    def report(name: str, dt: float, summ: dict) -> None:
        nonlocal done
        done += 1
        msg = ", ".join(f"{k}={v:.4g}" for k, v in summ.items())
        if bar is not None:
            bar.set_postfix_str(f"{name.split('__', 1)[1]}: {msg}")
            bar.update(1)
        elif not cfg.quiet:
            print(f"[sweep {done}/{len(plan)}] {name}: {msg} ({dt:.1f} s)", file=sys.stderr, flush=True)

    try:
        if cfg.jobs == 1:
            for job in jobs:
                report(*_run_one(job))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn: a forked child would inherit the parent's OpenMP thread pool state. The workers keep the
            # default SIGINT handling: a Ctrl-C stops the run each is training (after its step) and kills an idle
            # one (with a traceback). Started ignoring SIGINT, they outlived a parent killed by repeated Ctrl-C.
            with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=mp.get_context("spawn")) as ex:
                futures = [ex.submit(_run_one, job) for job in jobs]
                try:
                    for fut in as_completed(futures):
                        report(*fut.result())
                except KeyboardInterrupt:
                    # Runs not started yet must not start while the pool shuts down; leaving the block waits for
                    # the running ones, which the same Ctrl-C stops.
                    for fut in futures:
                        fut.cancel()
                    raise
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        finished = sum((runs_dir / f"{n}.json").exists() for n, _ in plan)
        raise SweepInterrupted(finished, len(plan), str(runs_dir)) from None
    if bar is not None:
        bar.close()
    files = aggregate(cfg)
    return {"ran": len(todo), "skipped": skipped, "seconds": time.perf_counter() - t0, "files": files}


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------
def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the values present; NaN where undefined (no value; one value for the std,
    which is not 0: one seed says nothing about the spread, and a 0.0 in the CSV would claim it does)."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan


def _load_runs(cfg: SweepConfig) -> list[dict]:
    runs = []
    for name, _ in plan_runs(cfg):
        p = Path(cfg.out) / "runs" / f"{name}.json"
        if p.exists():
            m = json.loads(p.read_text())
            m["variant"] = name.split("__")[1]
            runs.append(m)
    return runs


def _run_row(m: dict) -> dict[str, Any]:
    metric = m["metric"]
    dst = m.get("dst") or {}
    return {
        "variant": m["variant"],
        "method": m["method"],
        "sparsity": m["sparsity"],
        "seed": m["seed"],
        metric: m["final"][metric],
        f"best_{metric}": m["best"]["value"] if m.get("best") else None,
        "steps": m["steps"],
        "train_s": round(m["time"]["train_s"], 2),
        "train_state_bytes_peak": m["memory"]["train_state_bytes_peak"],
        "dst_memory_bytes_peak": dst.get("max_memory_bytes"),
        "sparse_layer_density": m["params"]["sparse_layer_density"],
        "offsets_changed_total": sum(d.get("offsets_changed_total", 0) for d in (dst.get("diagnostics") or {}).values())
        if dst
        else None,
    }


def _fmt_bytes(b: float) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "—"
    return f"{b / 1024:.0f} KiB" if b < 1024**2 else f"{b / 1024**2:.2f} MiB"


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def aggregate(cfg: SweepConfig) -> dict[str, str]:
    """Write the tables and the plot from the run JSONs present; returns ``{kind: path}``."""
    out = Path(cfg.out)
    runs = _load_runs(cfg)
    if not runs:
        raise FileNotFoundError(f"no run results under {out / 'runs'} for this grid")
    metric = runs[0]["metric"]
    higher = runs[0]["higher_is_better"]
    per_run = [_run_row(m) for m in runs]
    _write_csv(out / f"{cfg.name}_runs.csv", per_run)

    groups: dict[tuple[str, float], list[dict]] = {}
    for r in per_run:
        groups.setdefault((r["variant"], r["sparsity"]), []).append(r)
    agg: list[dict[str, Any]] = []
    for variant in cfg.methods:
        for (v, sp), rows in sorted(groups.items(), key=lambda kv: kv[0][1]):
            if v != variant:
                continue
            mean, std = _mean_std([r[metric] for r in rows])
            bmean, bstd = _mean_std([r[f"best_{metric}"] for r in rows])
            agg.append(
                {
                    "variant": variant,
                    "sparsity": sp,
                    "n_seeds": len(rows),
                    f"{metric}_mean": mean,
                    f"{metric}_std": std,
                    f"best_{metric}_mean": bmean,
                    "train_s_mean": _mean_std([r["train_s"] for r in rows])[0],
                    "train_state_bytes_peak": _mean_std([r["train_state_bytes_peak"] for r in rows])[0],
                    "dst_memory_bytes_peak": _mean_std(
                        [r["dst_memory_bytes_peak"] for r in rows if r["dst_memory_bytes_peak"] is not None]
                    )[0],
                    "sparse_layer_density": rows[0]["sparse_layer_density"],
                }
            )
    _write_csv(out / f"{cfg.name}.csv", agg)
    files = {"runs_csv": str(out / f"{cfg.name}_runs.csv"), "csv": str(out / f"{cfg.name}.csv")}
    files["md"] = str(_write_markdown(cfg, runs, agg, metric, higher))
    title = f"{cfg.task}: mean ± std over {len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''}"
    png = out / f"{cfg.name}.png"
    files["png"] = str(plot(agg, metric, higher, png, title=title, split=_split_name(runs, metric)))
    return files


def _split_name(runs: list[dict], metric: str) -> str:
    """What the runs' final metric was measured on: ``test`` (digits) / ``validation`` (chars), or ``tune-split``."""
    if runs[0]["data"].get("eval_split") == "tune":
        return "tune-split"
    return "test" if metric == "acc" else "validation"


def _write_markdown(cfg: SweepConfig, runs: list[dict], agg: list[dict], metric: str, higher: bool) -> Path:
    env = runs[0].get("env") or env_stamp()
    split = _split_name(runs, metric)
    unit = f"{split} accuracy (%)" if metric == "acc" else f"{split} bits per character"
    sps = sorted({a["sparsity"] for a in agg if a["variant"] != "dense" and not _is_dense(a["variant"])})
    # dense rows are shown in every sparsity column; a dense-only sweep (an lr search) gets the one column "0"
    sps = sps or [0.0]
    lines = [f"# {cfg.task}: {unit} vs sparsity", ""]
    lines += [f"Mean ± sample std over seeds {list(cfg.seeds)} ({'higher' if higher else 'lower'} is better)."]
    lines += ["", "| method | " + " | ".join(f"{s:g}" for s in sps) + " |", "|---|" + "---|" * len(sps)]
    by = {(a["variant"], a["sparsity"]): a for a in agg}
    for variant in cfg.methods:
        cells = []
        for s in sps:
            a = by.get((variant, 0.0)) if _is_dense(variant) else by.get((variant, s))
            cells.append("—" if a is None else _cell(a, metric))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    # The columns are target sparsities; k is rounded up per layer, so the converted layers keep a little more.
    realised: dict[float, set[float]] = {}
    for a in agg:
        d = a.get("sparse_layer_density")
        if not _is_dense(a["variant"]) and isinstance(d, (int, float)) and not math.isnan(d):
            realised.setdefault(a["sparsity"], set()).add(round(1.0 - d, 4))
    if realised:
        per = "; ".join(f"{s:g}: {' / '.join(f'{x:.4f}' for x in sorted(v))}" for s, v in sorted(realised.items()))
        lines += [
            "",
            "Sparsity is the target of the converted layers (the transformer blocks' linears; embeddings and the "
            f"head stay dense). The fraction of their weights not kept (the realised sparsity), per target: {per}.",
        ]
    dates = sorted(m["env"]["date"] for m in runs if m.get("env", {}).get("date"))
    if dates:
        lines += ["", f"Runs dated {dates[0]} to {dates[-1]}."]
    threads = sorted({t for m in runs if isinstance(t := (m.get("env") or {}).get("torch_threads"), int)})
    if not threads:
        th = "thread count not recorded"
    else:
        th = "/".join(map(str, threads)) + (" thread" if threads == [1] else " threads")
    lines += ["", f"Time per run (wall clock of the training loop, {th}; the machine was shared, so times are"]
    lines += ["noisy) and training-state memory (parameters + buffers + optimizer state, peak over the run):", ""]
    lines += ["| method | sparsity | train s / run | train state | DST layers (params + opt. state) |"]
    lines += ["|---|---|---|---|---|"]
    for a in agg:
        lines.append(
            f"| {a['variant']} | {a['sparsity']:g} | {a['train_s_mean']:.1f} "
            f"| {_fmt_bytes(a['train_state_bytes_peak'])} | {_fmt_bytes(a['dst_memory_bytes_peak'])} |"
        )
    r0 = runs[0]
    lines += ["", "## Setup", ""]
    lines += [f"- **{k}**: {v}" for k, v in env.items()]
    lines += [f"- **data**: `{json.dumps(r0['data'])}`"]
    lines += [f"- **model**: `{json.dumps(r0['model_config'])}`"]
    resolved: dict[str, dict] = {}
    for m in runs:
        resolved.setdefault(m["variant"], m["resolved"])
    common = {k: v for k, v in r0["resolved"].items() if all(r.get(k) == v for r in resolved.values())}
    lines += [f"- **training** (every method): `{json.dumps(common)}`"]
    for v, r in resolved.items():
        own = {k: x for k, x in r.items() if k not in common}
        if own:
            lines += [f"- **{v}** training: `{json.dumps(own)}`"]
    dst_cfgs: dict[str, dict] = {}
    for m in runs:
        if m.get("dst") and m["variant"] not in dst_cfgs:
            dst_cfgs[m["variant"]] = _relevant_dst_fields(dict(m["dst"].get("config") or {}))
    for v, c in dst_cfgs.items():
        lines += [f"- **{v}** DSTConfig: `{json.dumps(c)}`"]
    lines += [
        f"- **command**: sweep of {len(runs)} runs, methods {list(cfg.methods)}, sparsities {list(cfg.sparsities)}"
    ]
    if cfg.notes:
        lines += ["", cfg.notes.strip()]
    path = Path(cfg.out) / f"{cfg.name}.md"
    atomic_write_text("\n".join(lines) + "\n", path)
    return path


def _relevant_dst_fields(c: dict) -> dict:
    """The DSTConfig fields the method reads (the per-run sparsity is in the table)."""
    c.pop("sparsity", None)
    if c.get("method") == "diagheur":
        return {k: v for k, v in c.items() if k not in DYNADIAG_ONLY}
    drop = DIAGHEUR_ONLY if c.get("pool") is not None else (*DIAGHEUR_ONLY, "update_every", "drop_fraction")
    return {k: v for k, v in c.items() if k not in drop}


def _cell(a: dict, metric: str) -> str:
    digits = 2 if metric == "acc" else 3
    mean, std, n = a[f"{metric}_mean"], a[f"{metric}_std"], a["n_seeds"]
    return f"{mean:.{digits}f} (n=1)" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


def _is_dense(variant: str) -> bool:
    return parse_variant(variant)["method"] == "dense"


def plot(agg: list[dict], metric: str, higher: bool, path: Path, title: str = "", split: str | None = None) -> Path:
    """Metric vs sparsity per variant (error bars = std), dense as a band (mean ± std). Agg backend.

    ``split`` names what the metric was measured on (default: test for accuracy, validation for bpc)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    def spread(a: dict) -> float:  # no error bar (band) where the std is undefined: a single seed
        s = a[f"{metric}_std"]
        return 0.0 if math.isnan(s) else s

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    variants = list(dict.fromkeys(a["variant"] for a in agg))
    dense_seen = 0
    for v in variants:
        rows = sorted((a for a in agg if a["variant"] == v), key=lambda a: a["sparsity"])
        if _is_dense(v):
            # the first dense line is grey; further ones (an lr search) need their own colour to be told apart
            color = "0.3" if dense_seen == 0 else ("C3", "C2", "C4", "C1", "C9", "C6")[(dense_seen - 1) % 6]
            m, s = rows[0][f"{metric}_mean"], spread(rows[0])
            if s > 0:
                ax.axhspan(m - s, m + s, color="0.85", zorder=0)
            ax.axhline(m, color=color, ls="--", lw=1, label=f"{v} (mean ± std)")
            dense_seen += 1
            continue
        xs = [a["sparsity"] for a in rows]
        ax.errorbar(
            xs,
            [a[f"{metric}_mean"] for a in rows],
            yerr=[spread(a) for a in rows],
            marker="o",
            capsize=3,
            label=v,
        )
    ax.set_xlabel("sparsity of the converted layers")
    split = split or ("test" if metric == "acc" else "validation")
    ax.set_ylabel(f"{split} accuracy (%)" if metric == "acc" else f"{split} bits / char (lower is better)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "plot") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path

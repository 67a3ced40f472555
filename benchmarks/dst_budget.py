"""DynaDiag vs DiagHeur vs training budget, sparsity 0.9, from committed runs (nothing is trained here).

Reads the per-run tables the sweeps wrote (``benchmarks/dst_sweep.sh``; every budget of a task uses the same
protocol and hyper-parameters):

* digits-vit, test accuracy:
  40 epochs (the task default) ``results/dst_digits_runs.csv`` (``dst_sweep.sh digits``, 5 seeds);
  120 epochs ``results/dst_digits_e120_runs.csv``
  (``EPOCHS=120 LONG_SEEDS=10 METHODS=dense,dynadiag,diagheur,dynadiag-pool2 dst_sweep.sh digits-long``);
  360 epochs ``results/dst_digits_e360_runs.csv``
  (``EPOCHS=360 LONG_SEEDS=10 METHODS=dynadiag,diagheur,dynadiag-pool2 dst_sweep.sh digits-long``; no dense run).
* chars-gpt, validation bits per character:
  800 steps (the task default) ``results/dst_chars_lr1e-2_runs.csv``
  (``CHARS_LR=0.002 CHARS_SPARSE_LR=0.01 CHARS_KNOBS=digits CHARS_SEEDS=3 CHARS_NAME=dst_chars_lr1e-2
  dst_sweep.sh chars``);
  2400 steps ``results/dst_chars_s2400_runs.csv``
  (``STEPS=2400 LONG_SEEDS=3 METHODS=dynadiag-pool2,dense,dynadiag,diagheur CHARS_LR=0.002 CHARS_SPARSE_LR=0.01
  CHARS_KNOBS=digits dst_sweep.sh chars-long``).
* chars-gpt at its own tuned settings, validation bits per character:
  800 steps ``results/dst_chars_runs.csv`` (``dst_sweep.sh chars``, 5 seeds);
  2400 steps ``results/dst_chars_s2400_tuned_runs.csv``
  (``STEPS=2400 LONG_SEEDS=3 METHODS=dense,dynadiag,dynadiag-pool2,diagheur LONG_NAME=chars_s2400_tuned
  dst_sweep.sh chars-long``).

and writes ``results/dst_budget.md`` (mean ± std per method and budget, and the seed-paired differences
DynaDiag − DiagHeur, in both of DynaDiag's memory modes, with their t statistics) and ``results/dst_budget.png``
(metric vs budget, one panel per task).

    python benchmarks/dst_budget.py
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, env_stamp  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes

METHODS = ("dense", "dynadiag", "dynadiag-pool2", "diagheur")
#: the paired differences reported: DynaDiag in both memory modes (faithful, pool of 2k) minus DiagHeur
PAIRS = (("dynadiag", "diagheur"), ("dynadiag-pool2", "diagheur"))
SPARSITY = 0.9


@dataclass(frozen=True)
class Task:
    """One task's budget series: which column of which per-run CSV, per budget."""

    name: str
    metric: str  # the per-run CSV column
    label: str  # axis / table label
    unit: str  # what the budget counts
    higher_is_better: bool
    sources: dict[int, str]  # budget -> per-run CSV under results/
    digits: int  # decimals shown
    note: str = ""  # printed under the task's heading


TASKS = (
    Task(
        "digits-vit",
        "acc",
        "test accuracy (%)",
        "epochs",
        True,
        {40: "dst_digits_runs.csv", 120: "dst_digits_e120_runs.csv", 360: "dst_digits_e360_runs.csv"},
        2,
    ),
    Task(
        "chars-gpt",
        "bpc",
        "validation bits per character",
        "steps",
        False,
        {800: "dst_chars_lr1e-2_runs.csv", 2400: "dst_chars_s2400_runs.csv"},
        3,
        "Both budgets with the settings used before chars had its own tuning (dense lr 2e-3, every sparse "
        "method 1e-2, digits' DST knobs); with chars-tuned lrs and knobs: the next table.",
    ),
    Task(
        "chars-gpt, tuned",
        "bpc",
        "validation bits per character",
        "steps",
        False,
        {800: "dst_chars_runs.csv", 2400: "dst_chars_s2400_tuned_runs.csv"},
        3,
        "chars-gpt's own tuned settings (dense lr 8e-3, every sparse method 4e-2, the chars DST knobs).",
    ),
)


def load(path: Path, metric: str) -> dict[str, dict[int, float]]:
    """``variant -> seed -> metric`` for dense and the two diagonal methods at :data:`SPARSITY`."""
    out: dict[str, dict[int, float]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            v = row["variant"]
            if v not in METHODS or (v != "dense" and float(row["sparsity"]) != SPARSITY):
                continue
            out.setdefault(v, {})[int(row["seed"])] = float(row[metric])
    return out


def _mean_std(xs: list[float], digits: int) -> str:
    if len(xs) < 2:
        return "—"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f} (n={len(xs)})"


def _paired(d: dict[str, dict[int, float]], a: str, b: str, digits: int) -> list[str]:
    """``[a − b paired mean ± std (n), t]`` over the seeds both ran, or dashes if fewer than two."""
    seeds = sorted(set(d.get(a, {})) & set(d.get(b, {})))
    if len(seeds) < 2:
        return ["—", "—"]
    diff = [d[a][s] - d[b][s] for s in seeds]
    mean, std = statistics.fmean(diff), statistics.stdev(diff)
    return [f"{mean:+.{digits}f} ± {std:.{digits}f} (n={len(diff)})", f"{mean / (std / math.sqrt(len(diff))):+.1f}"]


def _table(task: Task, data: dict[int, dict[str, dict[int, float]]]) -> list[str]:
    better = "higher" if task.higher_is_better else "lower"
    pairs = [f"{a} − {b} (paired) | t" for a, b in PAIRS]
    lines = [
        f"## {task.name}: {task.label} ({better} is better)",
        "",
        *([task.note, ""] if task.note else []),
        f"| {task.unit} | {' | '.join(METHODS)} | {' | '.join(pairs)} |",
        "|---" * (1 + len(METHODS) + 2 * len(PAIRS)) + "|",
    ]
    for budget, d in data.items():
        cells = [_mean_std(list(d.get(m, {}).values()), task.digits) for m in METHODS]
        cells += [c for a, b in PAIRS for c in _paired(d, a, b, task.digits)]
        lines.append(f"| {budget} | {' | '.join(cells)} |")
    return lines + [""]


def _panel(ax: Axes, task: Task, data: dict[int, dict[str, dict[int, float]]]) -> None:
    for i, m in enumerate(METHODS):
        pts = [(b, list(d[m].values())) for b, d in data.items() if len(d.get(m, {})) > 1]
        x = [b * (1 + 0.03 * (i - 1.5)) for b, _ in pts]  # a small offset so the error bars do not overlap
        ax.errorbar(
            x,
            [statistics.fmean(v) for _, v in pts],
            yerr=[statistics.stdev(v) for _, v in pts],
            marker="o",
            capsize=3,
            label=m,
            linestyle="--" if m == "dense" else "-",
        )
    ax.set_xscale("log")
    ax.minorticks_off()  # only the budgets measured are labelled
    ax.set_xticks(list(task.sources), [str(b) for b in task.sources])
    ax.set_xlabel(f"training {task.unit} (log scale)")
    ax.set_ylabel(task.label)
    ax.set_title(f"{task.name}, sparsity {SPARSITY}")
    ax.grid(alpha=0.3)
    ax.legend()


def main() -> int:
    data = {t.name: {b: load(RESULTS_DIR / f, t.metric) for b, f in t.sources.items()} for t in TASKS}
    lines = [
        "# DynaDiag vs DiagHeur vs training budget (sparsity 0.9)",
        "",
        "Mean ± sample std over seeds, from the committed sweep runs (`benchmarks/dst_budget.py` lists them).",
        "Paired: DynaDiag − DiagHeur on the same seed (same init and data order), mean ± std, and",
        "t = mean / (std / sqrt(n)). DynaDiag is ahead where the difference is positive on digits (accuracy)",
        "and negative on chars (bits per character). `dynadiag` holds values for all P candidates (the paper's",
        'form), `dynadiag-pool2` a pool of 2k (sparse-to-sparse); both are `method="dynadiag"`. A dash: not run.',
        "",
    ]
    for t in TASKS:
        lines += _table(t, data[t.name])
    lines += ["## Setup (of this aggregation; each run's own stamp is in its sweep's .md)", ""]
    lines += [f"- **{k}**: {v}" for k, v in env_stamp().items()]
    (RESULTS_DIR / "dst_budget.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6.0 * len(TASKS), 4.2))
    for ax, t in zip(axes, TASKS):
        _panel(ax, t, data[t.name])
    fig.suptitle("DynaDiag vs DiagHeur vs training budget: mean ± std over seeds")
    fig.savefig(RESULTS_DIR / "dst_budget.png", dpi=130, bbox_inches="tight")
    print(f"wrote {RESULTS_DIR / 'dst_budget.md'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DynaDiag vs DiagHeur vs training budget: digits-vit, test split, sparsity 0.9 (from committed runs).

Reads the per-run tables the sweeps wrote (nothing is trained here):

* 40 epochs (the task default): ``results/dst_digits_runs.csv`` (``dst_sweep.sh digits``, 5 seeds),
* 120 epochs: ``results/dst_digits_e120_runs.csv`` (``EPOCHS=120 LONG_SEEDS=10 dst_sweep.sh digits-long``),
* 360 epochs: ``results/dst_digits_e360_runs.csv``
  (``EPOCHS=360 LONG_SEEDS=10 METHODS=dynadiag,diagheur dst_sweep.sh digits-long``; no dense run at 360),

and writes ``results/dst_budget.md`` (mean ± std per method and budget, and the seed-paired difference
DynaDiag − DiagHeur with its t statistic) and ``results/dst_budget.png`` (accuracy vs epochs).

    python benchmarks/dst_budget.py
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, env_stamp  # noqa: E402

#: epochs -> per-run CSV (every budget uses the same protocol and hyper-parameters; see dst_sweep.sh)
SOURCES = {40: "dst_digits_runs.csv", 120: "dst_digits_e120_runs.csv", 360: "dst_digits_e360_runs.csv"}
METHODS = ("dense", "dynadiag", "diagheur")
SPARSITY = 0.9


def load(path: Path) -> dict[str, dict[int, float]]:
    """``variant -> seed -> test accuracy`` for dense and the two diagonal methods at :data:`SPARSITY`."""
    out: dict[str, dict[int, float]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            v = row["variant"]
            if v not in METHODS or (v != "dense" and float(row["sparsity"]) != SPARSITY):
                continue
            out.setdefault(v, {})[int(row["seed"])] = float(row["acc"])
    return out


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f} (n={len(xs)})" if len(xs) > 1 else "—"


def main() -> int:
    data = {e: load(RESULTS_DIR / name) for e, name in SOURCES.items()}
    lines = [
        "# DynaDiag vs DiagHeur vs training budget (digits-vit, test split, sparsity 0.9)",
        "",
        "Test accuracy (%), mean ± sample std over seeds, from the committed sweep runs (`benchmarks/dst_budget.py`"
        " lists them). Paired: DynaDiag − DiagHeur on the same seed (same init and data order), mean ± std, and",
        "t = mean / (std / sqrt(n)).",
        "",
        "| epochs | dense | dynadiag | diagheur | dynadiag − diagheur (paired) | t |",
        "|---|---|---|---|---|---|",
    ]
    for e, d in data.items():
        seeds = sorted(set(d.get("dynadiag", {})) & set(d.get("diagheur", {})))
        diff = [d["dynadiag"][s] - d["diagheur"][s] for s in seeds]
        t = statistics.fmean(diff) / (statistics.stdev(diff) / math.sqrt(len(diff)))
        cells = [_mean_std(list(d.get(m, {}).values())) for m in METHODS]
        lines.append(
            f"| {e} | {' | '.join(cells)} | {statistics.fmean(diff):+.2f} ± {statistics.stdev(diff):.2f} "
            f"(n={len(diff)}) | {t:+.1f} |"
        )
    lines += ["", "## Setup (of this aggregation; each run's own stamp is in its sweep's .md)", ""]
    lines += [f"- **{k}**: {v}" for k, v in env_stamp().items()]
    (RESULTS_DIR / "dst_budget.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, m in enumerate(METHODS):
        pts = [(e, list(d[m].values())) for e, d in data.items() if len(d.get(m, {})) > 1]
        x = [e * (1 + 0.03 * (i - 1)) for e, _ in pts]  # a small offset so the error bars do not overlap
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
    ax.set_xticks(list(SOURCES), [str(e) for e in SOURCES])
    ax.set_xlabel("training epochs (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits-vit at sparsity 0.9: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(RESULTS_DIR / "dst_budget.png", dpi=130, bbox_inches="tight")
    print(f"wrote {RESULTS_DIR / 'dst_budget.md'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

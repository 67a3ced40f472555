"""Why does DynaDiag trail DiagHeur on digits? Separate the topology it finds from the way it trains.

On the tune split at sparsity 0.9 (three seeds), with the tuned settings of ``benchmarks/dst_sweep.sh``:

* ``dynadiag``            the tuned DynaDiag run (its final offsets are saved);
* ``found, retrained``    a fresh model trained with those offsets fixed from step 0 (diagheur with no update:
                          a static mask), same budget — the topology without DynaDiag's soft phase;
* ``random, static``      the same with random offsets (diagheur, no update) — the no-learning control;
* ``diagheur``            the tuned DiagHeur run (drop/grow every 50 steps until 75% of training).

    nice -n 10 python benchmarks/dst_diagnose.py      # writes benchmarks/results/dst_diagnosis.md
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

from diagcompile.train import MODEL_NAME, TrainConfig, env_stamp, train

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)
BASE = dict(task="digits-vit", sparsity=0.9, tune=True, quiet=True)


def main() -> int:
    torch.set_num_threads(1)
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="dst-diagnose-") as td:
        for seed in SEEDS:
            found = f"{td}/dynadiag{seed}"
            runs = {
                "dynadiag (tuned: T 0.1 -> 0.001, freeze at 50%)": TrainConfig(
                    **BASE, seed=seed, method="dynadiag", dst={"temperature_start": 0.1}, out=found
                ),
                "found by dynadiag, retrained static": TrainConfig(
                    **BASE,
                    seed=seed,
                    method="diagheur",
                    dst={"update_end": 0.0},
                    offsets_from=f"{found}/{MODEL_NAME}",
                ),
                "random diagonals, static": TrainConfig(**BASE, seed=seed, method="diagheur", dst={"update_end": 0.0}),
                "diagheur (tuned: update every 50)": TrainConfig(
                    **BASE, seed=seed, method="diagheur", dst={"update_every": 50}
                ),
            }
            for name, cfg in runs.items():
                m = train(cfg)
                rows.setdefault(name, []).append(m["final"]["acc"])
                print(f"seed {seed} {name}: {m['final']['acc']:.2f}", file=sys.stderr, flush=True)
    env = env_stamp()
    lines = [
        "# DST diagnosis: DynaDiag's topology vs its training (digits-vit, tune split, sparsity 0.9)",
        "",
        __doc__.split("\n\n")[1].strip(),
        "",
        "| run | tune accuracy (%) mean ± std | per seed |",
        "|---|---|---|",
    ]
    for name, accs in rows.items():
        lines.append(
            f"| {name} | {statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f} "
            f"| {', '.join(f'{a:.2f}' for a in accs)} |"
        )
    lines += ["", "## Setup", "", *[f"- **{k}**: {v}" for k, v in env.items()], f"- seeds: {list(SEEDS)}"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dst_diagnosis.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'dst_diagnosis.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of DynaDiag with a candidate pool (``pool=c``, sparse-to-sparse) vs the faithful all-``P`` layer.

Each configuration trains for a few steps in a fresh Python process (so the process peak RSS belongs to that
run alone), on the chars task with a wider GPT than the default (so the layers, not the torch runtime,
dominate). Reported per configuration:

* ``dst_layers``: parameters + optimizer state of the converted layers (``DiagSparsifier.diagnostics()``
  ``memory_bytes``; excludes the transient ``(P, D)`` probe buffer of an update step);
* ``train_state``: parameters + buffers + optimizer state of the whole model (peak over the run);
* ``peak_rss_delta``: process peak RSS minus the RSS after data loading and imports (activations, probes and
  allocator slack included).

    nice -n 10 python benchmarks/dst_memory.py          # writes benchmarks/results/dst_memory.{md,csv}
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

MODEL = {"dim": 384, "depth": 2, "heads": 6, "block_size": 64}
CONFIGS = {
    "dense": {"method": "dense"},
    "dynadiag (faithful, all P)": {"method": "dynadiag"},
    "dynadiag pool=2": {"method": "dynadiag", "pool": 2.0},
    "dynadiag pool=1.25": {"method": "dynadiag", "pool": 1.25},
    "diagheur": {"method": "diagheur"},
}

_CHILD = """
import json, resource, sys, torch
torch.set_num_threads(1)
from diagcompile.data import load_chars
from diagcompile.train import TrainConfig, train
load_chars("test")
import diagcompile.dst  # imports before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
kw = json.loads(sys.argv[1])
m = train(TrainConfig(**kw))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "state": m["memory"]["train_state_bytes_peak"],
                  "dst": (m["dst"] or {}).get("max_memory_bytes"), "bpc": m["final"]["bpc"],
                  "density": m["params"]["sparse_layer_density"]}))
"""


def measure(name: str, cfg: dict, steps: int, sparsity: float) -> dict:
    kw = {
        "task": "chars-gpt",
        "steps": steps,
        "batch_size": 8,
        "eval_every": steps,
        "eval_blocks": 8,
        "final_eval_blocks": 8,
        "quiet": True,
        "model": MODEL,
        "sparsity": sparsity,
        **cfg,
    }
    if cfg["method"] != "dense":
        kw["dst"] = {"update_every": max(1, steps // 4)}  # include probe/refresh steps
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(kw)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "config": name,
        "sparsity": sparsity if cfg["method"] != "dense" else 0.0,
        "dst_layers_MiB": None if r["dst"] is None else r["dst"] / 2**20,
        "train_state_MiB": r["state"] / 2**20,
        "peak_rss_delta_MiB": (r["peak"] - r["base"]) / 2**20,
        "peak_rss_MiB": r["peak"] / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--sparsity", type=float, default=0.9)
    args = p.parse_args(argv)
    from diagcompile.train import env_stamp

    rows = []
    for name, cfg in CONFIGS.items():
        rows.append(measure(name, cfg, args.steps, args.sparsity))
        print(rows[-1], file=sys.stderr, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "dst_memory.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    env = env_stamp()
    env["torch_threads"] = 1
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        "# DST training memory: candidate pool (pool=c) vs faithful (all P candidates)",
        "",
        f"chars-gpt with a wider model ({json.dumps(MODEL)}), batch 8, {args.steps} steps, sparsity "
        f"{args.sparsity} of the 8 converted block linears; each configuration in a fresh process.",
        "",
        "| configuration | DST layers: params + Adam state (MiB) | whole model: params + buffers + Adam (MiB) "
        "| peak RSS over baseline (MiB) | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {fmt(r['dst_layers_MiB'])} | {fmt(r['train_state_MiB'])} "
            f"| {fmt(r['peak_rss_delta_MiB'])} | {fmt(r['peak_rss_MiB'])} |"
        )
    lines += [
        "",
        "The DST-layer column is `DiagSparsifier.diagnostics()[...]['memory_bytes']` summed over layers (its peak "
        "over the run). It does not count the transient `(P, D)` float32 probe that a topology update (diagheur, "
        "pool refresh) accumulates for one step; the RSS columns do.",
        "",
        "## Setup",
        "",
        *[f"- **{k}**: {v}" for k, v in env.items()],
    ]
    (RESULTS / "dst_memory.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'dst_memory.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared benchmark plumbing: environment stamp, CPU timing, CSV + markdown writers.

GPU timings use ``triton.testing.do_bench`` medians (see ``bench_ops.py``); CPU timings use the median of
repeated wall-clock runs after warm-up, rotating over several copies of the weights so that a layer's
weights come from DRAM as they would in a real model (a single copy would sit in the L3 cache).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["env_stamp", "median_time_ms", "compare_ms", "write_results", "RESULTS_DIR"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def env_stamp() -> dict[str, str]:
    """Who/what/when of a benchmark run: device, versions, git SHA, UTC date.

    Built from ``diagcompile.train.env_stamp`` (the one home of these facts) in the benchmark tables' layout.
    """
    from diagcompile.train import env_stamp as library_stamp

    lib = library_stamp("cuda" if torch.cuda.is_available() else "cpu")
    stamp = {
        "date": lib["date"],
        "git": lib["git"],
        "torch": lib["torch"],
        "python": lib["python"],
        "cpu": f"{lib['cpu']} ({lib['cpu_count']} logical cores, torch threads={lib['torch_threads']})",
    }
    if "gpu" in lib:
        stamp["gpu"] = lib["gpu"]
        try:
            import triton

            stamp["triton"] = triton.__version__
        except ImportError:
            stamp["triton"] = "not installed"
    try:
        import numba

        stamp["numba"] = numba.__version__
    except ImportError:
        pass
    return stamp


def median_time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20, min_time_s: float = 0.3) -> float:
    """Median wall time of ``fn()`` in milliseconds (CPU), repeating until ``reps`` and ``min_time_s``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) > 10 * reps:
            break
    times.sort()
    return 1e3 * times[len(times) // 2]


def compare_ms(fns: dict[str, Callable[[], object]], rounds: int = 3, **kw) -> dict[str, float]:
    """Median time of each function, measured in ``rounds`` interleaved rounds; the best round counts.

    Interleaving keeps a transient slowdown of the machine (a noisy neighbour, the VM paging memory back
    in) from landing on one contender only.
    """
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], median_time_ms(fn, **kw))
    return best


def write_results(name: str, rows: Sequence[dict], title: str, notes: str = "", out_dir: Path | None = None) -> Path:
    """Write ``<name>.csv`` and ``<name>.md`` (a table headed by the environment stamp); return the .md path."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = env_stamp()
    cols = list(rows[0].keys()) if rows else []
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in stamp.items()]
    if notes:
        lines += ["", notes.strip()]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)

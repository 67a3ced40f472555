"""Regenerate one device's section of ``ops/dispatch_table.py`` from measurements.

    python benchmarks/tune_dispatch.py --device cpu            # rewrites the _CPU section
    python benchmarks/tune_dispatch.py --device cuda           # rewrites the _CUDA section (on the GPU machine)
    python benchmarks/tune_dispatch.py --device cpu --dry-run  # print the table, write nothing

The table has one rule per op (``fwd``, ``dx``, ``dv``), shape class (orientation - square, wide or tall - x D
bucket, ``dispatch_table.SHAPE_CLASSES``) and, on the CPU, thread bucket (1 thread, or several: measured at 1 and at
torch's default count); the grid holds layer shapes of every class, narrow (the bundled models'
64-512-wide layers) and broad (ViT-B, Llama). For each op, shape class, density bucket (measured at the
bucket's upper edge, its most expensive density), each layer shape of that class and each ``M`` of the grid,
the script times the real op with the path forced (``diagcompile.ops.force_path``): ``kernel`` and ``dense``
in the kernel dtype, ``reference`` and ``dense`` in the reference dtype. A path *wins* at ``M`` when it is
faster than ``dense`` by the margin (default 10%). The rule keeps, per bucket, the largest ``M`` up to which
the path wins at every grid point and on every shape of the class (a loss anywhere ends the run of wins;
between the last win and the first loss, the ``M`` where the ratio interpolated in ``log M`` crosses the
margin), made non-increasing in density, so dispatch never picks a path where it was measured slower than
dense.
Where the kernel still wins by 1.5x at the largest ``M`` of the grid (both sides are compute bound there:
their ratio no longer changes with ``M``), the threshold is unbounded.

Timing: on the CPU, the median of repeated wall-clock runs in interleaved rounds (best round), rotating
over several copies of the weights so they come from DRAM like in a real model (``benchmarks/common.py``);
on CUDA, ``triton.testing.do_bench`` medians (it flushes the L2 between runs). Dtypes: the kernel is timed
in float32 on the CPU and bfloat16 on CUDA; the reference rule matters where no kernel runs, so on the CPU
(whose kernel covers float32/float64) it is timed in bfloat16.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare_ms, env_stamp  # noqa: E402

import diagcompile  # noqa: E402,F401  (registers the ops)
from diagcompile.ops import dispatch, dispatch_table, force_path  # noqa: E402
from diagcompile.testing import random_offsets  # noqa: E402

OPS = ("fwd", "dx", "dv")
TABLE_FILE = Path(dispatch_table.__file__)
UNBOUNDED = 2**31 - 1


@dataclass(frozen=True)
class Grid:
    shapes: tuple[tuple[int, int], ...]  # (in_features, out_features)
    ms: tuple[int, ...]
    kernel_dtype: torch.dtype
    reference_dtype: torch.dtype


#: Narrow layers (tall and wide): D = 64, the digits ViT's qkv, proj, fc1, fc2 (diagcompile/models.py); D = 128,
#: the chars GPT's, and D = 256, the edge of that bucket.
_NARROW = (
    *((64, 192), (64, 256), (64, 64), (256, 64)),
    *((128, 384), (128, 512), (256, 1024), (128, 128), (512, 128), (1024, 256)),
)

GRIDS = {
    # Narrow layers and ViT-B's (tall, wide and square). M up to 4096 rows, as in CPU training of the bundled
    # models (the chars GPT: batch 32 x 128 characters).
    "cpu": Grid(
        shapes=(*_NARROW, (768, 3072), (3072, 768), (768, 768)),
        ms=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
        kernel_dtype=torch.float32,
        reference_dtype=torch.bfloat16,
    ),
    "cuda": Grid(
        shapes=(
            *((4096, 14336), (14336, 4096), (4096, 4096)),
            *((768, 3072), (3072, 768), (256, 1024), (1024, 256), (256, 256)),
            *((64, 256), (256, 64), (64, 64)),
        ),
        ms=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536),
        kernel_dtype=torch.bfloat16,
        reference_dtype=torch.bfloat16,
    ),
}
QUICK = {  # not every shape class: the others keep their current rules
    "cpu": Grid(((768, 3072), (256, 64)), (1, 16, 256), torch.float32, torch.bfloat16),
    "cuda": Grid(((4096, 14336), (3072, 768)), (1, 64, 4096), torch.bfloat16, torch.bfloat16),
}


def classes_of(shapes: tuple[tuple[int, int], ...]) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """The grid's shapes ``(in, out)`` grouped by dispatch's shape class, in ``SHAPE_CLASSES`` order."""
    out: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for cls in dispatch_table.SHAPE_CLASSES:
        members = [(n_in, n_out) for n_in, n_out in shapes if dispatch.shape_class(n_out, n_in) == cls]
        if members:
            out[cls] = members
    return out


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------
def _copies(device: str, n_in: int, n_out: int, dtype: torch.dtype) -> int:
    if device != "cpu":
        return 1  # do_bench flushes the L2 itself
    # Enough copies of the dense weight to overflow a 32 MB L3 twice (as benchmarks/bench_cpu.py).
    return max(2, min(16, (64 << 20) // (dtype.itemsize * n_in * n_out) + 1))


def _time(device: str, fns: dict[str, Callable[[], object]], cost_hint_s: float) -> dict[str, float]:
    """Milliseconds per call for each function (CPU: interleaved wall-clock medians; CUDA: do_bench)."""
    if device == "cuda":
        from triton.testing import do_bench

        return {name: float(do_bench(fn, return_mode="median")) for name, fn in fns.items()}
    # Fewer repetitions for slow calls so that the grid finishes in minutes.
    reps = 20 if cost_hint_s < 2e-3 else 7 if cost_hint_s < 50e-3 else 3
    return compare_ms(fns, rounds=3, reps=reps, warmup=1 if cost_hint_s > 50e-3 else 3, min_time_s=0.05)


class Problem:
    """Random inputs for one (op, shape, k, M, dtype), with the weights rotated over several copies."""

    def __init__(self, device: str, op: str, n_in: int, n_out: int, k: int, M: int, dtype: torch.dtype):
        g = torch.Generator().manual_seed(0)
        D = min(n_in, n_out)
        c = _copies(device, n_in, n_out, dtype)
        self.op, self.n_in, self.n_out = op, n_in, n_out

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        self.values = [rnd(k, D) for _ in range(c)]
        self.offsets = random_offsets(n_out, n_in, k, g).to(device)
        self.bias = rnd(n_out)
        self.x = rnd(M, n_in)
        self.dy = rnd(M, n_out)
        self.i = 0

    def __call__(self) -> torch.Tensor:
        self.i = (self.i + 1) % len(self.values)
        v = self.values[self.i]
        ops = torch.ops.diagcompile
        if self.op == "fwd":
            return ops.diag_linear(self.x, v, self.offsets, self.bias, self.n_out)
        if self.op == "dx":
            return ops.diag_linear_dx(self.dy, v, self.offsets, self.n_in)
        return ops.diag_linear_dv(self.dy, self.x, self.offsets)


def _forced(path: str, prob: Problem) -> Callable[[], object]:
    def fn():
        with force_path(path):
            return prob()

    return fn


def _compare(device: str, op: str, path: str, dtype: torch.dtype, n_in: int, n_out: int, k: int, M: int, log):
    """``dense_ms / path_ms`` for one point of the grid (above 1: the path is faster)."""
    prob = Problem(device, op, n_in, n_out, k, M, dtype)
    if path == "kernel" and not dispatch._kernel_supports(device, dtype):
        raise SystemExit(f"no {device} kernel for {dtype}: cannot tune the kernel rule")
    with torch.no_grad():
        # One untimed call: the JIT compile / autotune and the cost estimate for the repetition count.
        t0 = time.perf_counter()
        _forced("dense", prob)()
        cost = time.perf_counter() - t0
        t = _time(device, {path: _forced(path, prob), "dense": _forced("dense", prob)}, cost)
    ratio = t["dense"] / t[path]
    log(
        f"{op:3s} {path:9s} {n_in}->{n_out} k={k} (density {k / max(n_in, n_out):.3f}) M={M}: "
        f"{path} {t[path]:.3f} ms, dense {t['dense']:.3f} ms, x{ratio:.2f}"
    )
    return ratio


def measure(
    device: str,
    op: str,
    path: str,
    dtype: torch.dtype,
    shapes: list[tuple[int, int]],
    ms: tuple[int, ...],
    margin: float,
    log,
) -> list[int]:
    """For each density bucket, the largest M up to which ``path`` beats ``dense`` on every one of ``shapes``.

    The advantage of a diagonal path shrinks as ``M`` grows (from weight-bandwidth bound to compute bound)
    and as the density grows, so: a clear win (1.5x) at the top of the M grid, checked at its bottom and
    middle too, makes the bucket unbounded for that shape; otherwise M is scanned upwards to the first loss.
    At the smallest ``M`` both paths can cost the same fixed per-call overhead (the op call, the numpy views
    and the weight's materialization are each a few us, the arithmetic less), so the ratio starts near 1
    and rises before it falls: a *tie* there (within the margin either way) neither wins nor ends the scan,
    and the bucket then follows the wins after it. Only a loss (slower than dense by more than the margin),
    or any point below the margin once the path has won, ends it. Thresholds are then made non-increasing in
    density, so measurement noise can never make a denser bucket more permissive than a sparser one.
    """
    out = []
    for edge in dispatch_table._EDGES:
        best_m = UNBOUNDED
        for n_in, n_out in shapes:
            if best_m == 0:  # a shape already lost at the first grid point
                break
            P = max(n_in, n_out)
            k = max(1, min(P, math.floor(edge * P)))

            def ratio(M, k=k, n_in=n_in, n_out=n_out):
                return _compare(device, op, path, dtype, n_in, n_out, k, M, log)

            if (
                path == "kernel"
                and ratio(ms[-1]) >= 1.5
                and ratio(ms[len(ms) // 2]) >= margin
                and ratio(ms[0]) * margin >= 1
            ):
                continue  # unbounded for this shape
            last_win, last_r = 0, 0.0
            for M in ms:
                r = ratio(M)
                if r < margin:
                    if not last_win and r * margin >= 1:
                        continue  # a tie before any win: the fixed cost dominates both paths; look further
                    # the first loss: the threshold lies between the last win and here
                    last_win = crossing(last_win, last_r, M, r, margin) if last_win else 0
                    break
                last_win, last_r = M, r
                if M >= best_m:  # wins up to where another shape already ended the bucket
                    break
            best_m = min(best_m, last_win)
        out.append(best_m)
    for i in range(1, len(out)):
        out[i] = min(out[i], out[i - 1])
    return out


def crossing(m_win: int, r_win: float, m_loss: int, r_loss: float, margin: float) -> int:
    """The ``M`` between a win (ratio ``r_win >= margin`` at ``m_win``) and the next grid point's loss where the
    ratio, interpolated linearly in ``log M``, falls to ``margin``; rounded down (from 64 on, to a multiple of
    16) and never below ``m_win``. The ratio falls smoothly with ``M`` (from weight-bound to compute-bound),
    so between grid points the path still wins by about the margin: a threshold at the last win alone would
    hand calls just past it (a 64-image digits batch is M = 1088, the grid has 1024 and 2048) to the slower
    path."""
    t = (r_win - margin) / (r_win - r_loss)
    m = m_win * (m_loss / m_win) ** t
    return max(m_win, int(m) if m < 64 else int(m) // 16 * 16)


# ----------------------------------------------------------------------------------------------------
# Writing the table
# ----------------------------------------------------------------------------------------------------
RuleKey = tuple[str, str, int, int]  # (op, orientation, d_edge, t_edge): dispatch_table.RULE_KEYS


def _m(m: int) -> str:
    return "_ANY_M" if m == UNBOUNDED else str(m)


def render(device: str, rules: dict[RuleKey, dict[str, list[int] | dict]], header: list[str]) -> str:
    """The device's section of ``dispatch_table.py``: one entry per (op, orientation, d_edge, t_edge)."""
    var = f"_{device.upper()}"
    lines = [f"# {line}" for h in header for line in textwrap.wrap(h, 116)]
    lines.append(f"{var}: dict[tuple[str, str, int, int], dict[str, Rule]] = {{")
    for key in rules:
        op, orientation, d_edge, t_edge = key
        lines.append(f'    ("{op}", "{orientation}", {_m(d_edge)}, {_m(t_edge)}): {{')
        for path in ("kernel", "reference"):
            rule = rules[key][path]
            # A rule kept from before may be on other edges (the CUDA section's own): write those, not _EDGES.
            max_m, edges = (rule["max_m"], rule["density_edges"]) if isinstance(rule, dict) else (rule, None)
            ms = ", ".join(_m(m) for m in max_m)
            edge_src = "_EDGES" if edges is None or list(edges) == dispatch_table._EDGES else f"{list(edges)}"
            lines.append(f'        "{path}": {{"density_edges": {edge_src}, "max_m": [{ms}]}},')
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines)


def write_section(device: str, body: str, path: Path = TABLE_FILE) -> None:
    """Replace the lines between ``BEGIN <DEV> TABLE`` and ``# END <DEV> TABLE``; atomic."""
    text = path.read_text()
    tag = device.upper()
    pat = re.compile(rf"(BEGIN {tag} TABLE\n)(.*?)(# END {tag} TABLE)", re.S)
    if not pat.search(text):
        raise SystemExit(f"{path}: no 'BEGIN {tag} TABLE' ... '# END {tag} TABLE' markers")
    new = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text, count=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dispatch_table.", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), required=True)
    ap.add_argument("--quick", action="store_true", help="a small grid, for a smoke test (implies --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="print the table, do not rewrite dispatch_table.py")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--paths", default="kernel,reference", help="rules to re-measure; the others are kept")
    ap.add_argument("--margin", type=float, default=1.1, help="a path wins when margin * its time < dense's")
    ap.add_argument(
        "--threads",
        default=None,
        help="CPU: comma-separated torch thread counts to measure with; the rule of each thread bucket "
        "(dispatch_table.THREAD_EDGES) keeps the smallest threshold over the counts in it. Default: 1 and torch's "
        "current count",
    )
    ap.add_argument(
        "--classes",
        default=None,
        help="shape classes to re-measure, e.g. wide:64,tall:256,tall:any (orientation:d_edge); the others are "
        "kept. Default: all",
    )
    ap.add_argument("--log", default=None, help="also write the measurements to this file")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU")
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    elif args.device == "cpu":
        thread_counts = sorted({1, torch.get_num_threads()})
    else:
        thread_counts = [torch.get_num_threads()]
    grid = (QUICK if args.quick else GRIDS)[args.device]
    ops = [o for o in args.ops.split(",") if o]
    log_file = open(args.log, "w") if args.log else None  # noqa: SIM115 - closed below

    def log(msg: str) -> None:
        print(msg, flush=True)
        if log_file:
            log_file.write(msg + "\n")

    torch.manual_seed(0)
    start = time.time()
    paths = [p for p in args.paths.split(",") if p]
    if set(paths) - {"kernel", "reference"}:
        raise SystemExit(f"--paths takes kernel and/or reference, got {args.paths}")
    by_class = classes_of(grid.shapes)
    if args.classes:
        wanted = {(o, UNBOUNDED if d == "any" else int(d)) for o, d in (c.split(":") for c in args.classes.split(","))}
        if wanted - set(dispatch_table.SHAPE_CLASSES):
            raise SystemExit(f"--classes: unknown {sorted(wanted - set(dispatch_table.SHAPE_CLASSES))}")
        by_class = {cls: shapes for cls, shapes in by_class.items() if cls in wanted}
    rules: dict[RuleKey, dict[str, list[int] | dict]] = {key: {} for key in dispatch_table.RULE_KEYS}
    kept = []
    for op in OPS:
        for orientation, d_edge in dispatch_table.SHAPE_CLASSES:
            shapes = by_class.get((orientation, d_edge))
            for path in ("kernel", "reference"):
                measured: dict[int, list[int]] = {}  # thread count -> thresholds
                if op in ops and path in paths and shapes:
                    dtype = grid.kernel_dtype if path == "kernel" else grid.reference_dtype
                    for n in thread_counts:
                        torch.set_num_threads(n)
                        log(f"# {op} {path} {orientation} D<={_m(d_edge)}: {n} thread(s)")
                        measured[n] = measure(args.device, op, path, dtype, shapes, grid.ms, args.margin, log)
                for t_edge in dispatch_table.THREAD_EDGES:
                    key = (op, orientation, d_edge, t_edge)
                    # On the CPU each thread bucket takes the counts measured in it; a GPU has one bucket's worth.
                    counts = [n for n in measured if args.device != "cpu" or dispatch.thread_bucket(n) == t_edge]
                    current = dispatch_table.TABLE.get((args.device, *key))
                    if counts:
                        rules[key][path] = [min(ms) for ms in zip(*(measured[n] for n in counts))]
                    elif current is not None:  # keep the rule not re-measured, on its own density edges
                        rules[key][path] = {
                            "max_m": list(current[path]["max_m"]),
                            "density_edges": list(current[path]["density_edges"]),
                        }
                        kept.append(f"{op}/{path}")
                    else:
                        raise SystemExit(f"the {args.device} table has no rule for {key} yet: measure it")
    stamp = env_stamp()
    header = [
        f"Generated by `python benchmarks/tune_dispatch.py --device {args.device}` "
        f"({time.time() - start:.0f} s, margin {args.margin}):",
        f"{stamp['date']}, git {stamp['git']}, torch {stamp['torch']}, {stamp.get('gpu', stamp['cpu'])}; "
        f"torch thread counts {thread_counts} (a thread bucket's rule: the smallest threshold over its counts).",
        f"kernel timed in {grid.kernel_dtype}, reference in {grid.reference_dtype}; shapes (in, out) by class "
        + "; ".join(f"{o} D<={_m(d)}: {shapes}" for (o, d), shapes in by_class.items())
        + f"; M {list(grid.ms)}, thresholds between grid points interpolated to the margin in log M.",
    ]
    if kept:
        n_keys = len(dispatch_table.SHAPE_CLASSES) * len(dispatch_table.THREAD_EDGES)
        counts = ", ".join(f"{k} ({n} of {n_keys})" for k, n in collections.Counter(kept).items())
        header.append(f"Kept from before (not in this run's grid or options), rules per op/path: {counts}.")
    body = render(args.device, rules, header)
    print(body)
    if log_file:
        log_file.write(body + "\n")
        log_file.close()
    if args.dry_run or args.quick:
        return
    write_section(args.device, body)
    print(f"wrote the {args.device.upper()} section of {TABLE_FILE}")


if __name__ == "__main__":
    main()

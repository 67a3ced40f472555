"""CPU speed of the diagonal op vs dense ``F.linear``, per dispatch path, float32.

    python benchmarks/bench_cpu.py            # full table -> benchmarks/results/cpu_ops.{csv,md}
    python benchmarks/bench_cpu.py --quick    # one shape, for a smoke test

Speed is reported as a ratio ``F.linear_ms / path_ms`` (above 1 = faster than dense) from the same run.
Weights rotate over several copies so each call streams its weights from DRAM, like a real model whose
layers do not all fit in the last-level cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare_ms, write_results  # noqa: E402

import diagcompile  # noqa: E402,F401
from diagcompile.ops import dispatch, force_path, k_from_sparsity  # noqa: E402
from diagcompile.testing import random_offsets  # noqa: E402

#: (name, in_features, out_features)
SHAPES = [
    ("decode up 4096->14336", 4096, 14336),
    ("decode down 14336->4096", 14336, 4096),
    ("ViT-B fc1 768->3072", 768, 3072),
    ("ViT-B fc2 3072->768", 3072, 768),
    ("ViT-B qkv 768->2304", 768, 2304),
    ("ViT-B proj 768->768", 768, 768),
]


def _copies(n_in: int, n_out: int) -> int:
    # Enough copies of the dense weight to overflow a 32 MB L3 twice.
    return max(2, min(16, (64 << 20) // (4 * n_in * n_out) + 1))


def _call(path: str, x, values, offsets, bias, n_out):
    with force_path(None if path == "auto" else path):
        return torch.ops.diagcompile.diag_linear(x, values, offsets, bias, n_out)


def run(shapes, ms, sparsity: float, paths: list[str]) -> list[dict]:
    rows = []
    for name, n_in, n_out in shapes:
        k = k_from_sparsity(n_out, n_in, sparsity)
        D = min(n_in, n_out)
        c = _copies(n_in, n_out)
        dense_w = [torch.randn(n_out, n_in) for _ in range(c)]
        vals = [torch.randn(k, D) for _ in range(c)]
        offs = random_offsets(n_out, n_in, k)
        bias = torch.randn(n_out)
        for M in ms:
            x = torch.randn(M, n_in)
            it = {"i": 0}

            def nxt(seq):
                it["i"] = (it["i"] + 1) % c
                return seq[it["i"]]

            fns = {"F.linear": lambda: F.linear(x, nxt(dense_w), bias)}
            for path in paths:
                p = dispatch.Problem("fwd", "cpu", torch.float32, M, n_out, n_in, k)
                if path == "kernel" and not dispatch._kernel_supports(p):
                    continue
                fns[path] = lambda path=path: _call(path, x, nxt(vals), offs, bias, n_out)
            t = compare_ms(fns, reps=10 if M > 1 else 20)
            row = {"layer": name, "M": M, "sparsity": sparsity, "k": k, "F.linear_ms": t["F.linear"]}
            for path in paths:
                row[f"{path}_ms"] = t.get(path, float("nan"))
                row[f"{path}_x"] = t["F.linear"] / t[path] if path in t else float("nan")
            row["auto_path"] = dispatch.choose_path(dispatch.Problem("fwd", "cpu", torch.float32, M, n_out, n_in, k))
            rows.append(row)
            print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--paths", default="reference,dense,kernel,auto")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = SHAPES[2:3] if args.quick else SHAPES
    ms = [1] if args.quick else [1, 197]
    rows = run(shapes, ms, args.sparsity, args.paths.split(","))
    md = write_results(
        "cpu_ops_quick" if args.quick else "cpu_ops",
        rows,
        f"CPU forward, float32, {int(args.sparsity * 100)}% sparsity: diagonal op vs dense F.linear",
        notes="`F.linear_ms` = dense nn.Linear forward (the baseline). `<path>_x` = F.linear time / path "
        "time from the same run (above 1 = faster than dense). Paths: `reference` = vectorized "
        "torch gathers, `dense` = materialize W then F.linear, `kernel` = native CPU kernel, "
        "`auto` = what dispatch picks (`auto_path`).",
        out_dir=args.out,
    )
    print(f"wrote {md}")


if __name__ == "__main__":
    main()

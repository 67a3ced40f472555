"""Training step of a ViT-B MLP block, dense vs 90% diagonal-sparse: time and weight + optimizer memory.

    python benchmarks/bench_train_step.py --out benchmarks/results     # H100, bf16 (~1 min)
    python benchmarks/bench_train_step.py --smoke                       # tiny block, any device

The block is ``fc2(GELU(fc1(x)))`` with fc1 768 -> 3072 and fc2 3072 -> 768 on ``x`` of shape (16, 197, 768)
(a ViT-B/16 batch of 16 images), parameters in bf16. One step = forward, an MSE loss against a fixed random
target, backward (including fc1's input gradient, as inside a network), ``AdamW.step()``,
``zero_grad(set_to_none=True)``. Contenders: dense ``nn.Linear``;
``DiagLinear`` at 90% sparsity with shape-based dispatch (``diag``), and forced to the Triton kernels for
all three products (``diag_kernel``). Timing: ``triton.testing.do_bench`` median (L2 flushed per step).

Memory: bytes of the two layers' parameters and buffers (``values``, ``offsets``, biases) plus every AdamW
state tensor after the first step, measured from the tensors themselves. Target: step time ratio
(dense / sparse) >= 0.95 and sparse weight + optimizer bytes <= 15% of dense.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import _atomic_write  # noqa: E402
from common import env_stamp, median_time_ms  # noqa: E402

import diagcompile  # noqa: E402,F401
from diagcompile import DiagLinear  # noqa: E402
from diagcompile.ops import force_path  # noqa: E402


def _block(kind: str, d: int, h: int, sparsity: float) -> torch.nn.Module:
    if kind == "dense":
        return torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.GELU(), torch.nn.Linear(h, d))
    return torch.nn.Sequential(
        DiagLinear(d, h, sparsity=sparsity), torch.nn.GELU(), DiagLinear(h, d, sparsity=sparsity)
    )


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, buffers and optimizer state of ``model`` (every tensor counted once)."""
    seen: set[int] = set()

    def size(ts) -> int:
        n = 0
        for t in ts:
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel() > 0:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
        return n

    params = size(model.parameters())
    buffers = size(model.buffers())
    optim = size(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"params": params, "buffers": buffers, "optimizer": optim, "total": params + buffers + optim}


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    d, h = (args.dim, 4 * args.dim)
    shape = (args.batch, args.tokens, d)
    g = torch.Generator().manual_seed(0)
    # x needs a gradient, as the output of the layer before this block would: fc1's input gradient is a third of
    # its backward, and a leaf input would let both contenders skip it.
    x = torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(True)
    target = torch.randn(*shape, generator=g).to(device, dtype)
    if device == "cuda":
        import triton.testing

        def timer(fn):
            fn()
            torch.cuda.synchronize()
            return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    else:

        def timer(fn):
            return median_time_ms(fn, warmup=1, reps=3, min_time_s=0.05)

    def measure(kind: str, path: str | None) -> tuple[float, str, dict[str, int]]:
        torch.manual_seed(0)
        model = _block("dense" if kind == "dense" else "diag", d, h, args.sparsity).to(device, dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

        def step():
            with force_path(path):
                loss = F.mse_loss(model(x), target)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            x.grad = None

        try:
            step()  # creates the AdamW state; compiles the kernels
            ms, note = timer(step), ""
        except Exception as e:  # noqa: BLE001 - report, e.g. a forced kernel on a device without one
            ms, note = float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return ms, note, state_bytes(model, opt)

    rows = []
    dense_ms = dense_bytes = None
    for kind, path in (("dense", None), ("diag", None), ("diag_kernel", "kernel")):
        ms, note, mem = measure(kind, path)
        if kind == "dense":
            dense_ms, dense_bytes = ms, mem["total"]
        rows.append(
            {
                "contender": kind,
                "sparsity": 0.0 if kind == "dense" else args.sparsity,
                "tokens": args.batch * args.tokens,
                "step_ms": ms,
                "x_vs_dense": dense_ms / ms if dense_ms and ms == ms else float("nan"),
                "params_bytes": mem["params"],
                "buffers_bytes": mem["buffers"],
                "optimizer_bytes": mem["optimizer"],
                "weights_plus_optimizer_bytes": mem["total"],
                "fraction_of_dense_bytes": mem["total"] / dense_bytes if dense_bytes else float("nan"),
                "note": note,
            }
        )
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict], args, device: str) -> str:
    lines = [f"# ViT-B MLP block training step, dense vs {int(args.sparsity * 100)}% diagonal ({device})", ""]
    lines += [f"- **{k}**: {v}" for k, v in env_stamp().items()]
    lines += [
        f"- **block**: fc1 {args.dim}->{4 * args.dim}, GELU, fc2 {4 * args.dim}->{args.dim}; x "
        f"({args.batch}, {args.tokens}, {args.dim}); params {'bf16' if device == 'cuda' else 'fp32'}; AdamW",
        "",
    ]
    if device == "cuda" and not args.smoke:
        diag = next(r for r in rows if r["contender"] == "diag")
        ok_t = diag["x_vs_dense"] >= 0.95
        ok_m = diag["fraction_of_dense_bytes"] <= 0.15
        lines += [
            "| target | measured | verdict |",
            "|---|---|---|",
            f"| step time ratio dense/sparse >= 0.95 | {diag['x_vs_dense']:.3f} | {'PASS' if ok_t else 'FAIL'} |",
            f"| sparse weights + AdamW state <= 15% of dense | {diag['fraction_of_dense_bytes']:.3%} | "
            f"{'PASS' if ok_m else 'FAIL'} |",
            "",
        ]
    cols = list(rows[0])
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--smoke", action="store_true", help="a tiny block (dim 64, 2 x 17 tokens)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=197)
    args = ap.parse_args(argv)
    if args.smoke:
        args.dim, args.batch, args.tokens = 64, 2, 17
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    rows = run(args)
    name = "gpu_train_step" if device == "cuda" and not args.smoke else "smoke_train_step"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    _atomic_write(args.out / f"{name}.csv", buf.getvalue())
    md = markdown(rows, args, device)
    _atomic_write(args.out / f"{name}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

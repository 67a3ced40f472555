"""GPU speed of the diagonal op vs dense ``F.linear`` and vendor sparse formats: the op-level sweep.

    python benchmarks/bench_ops.py --mode fwd    --out benchmarks/results     # forward sweep (H100: ~8 min)
    python benchmarks/bench_ops.py --mode fwdbwd --out benchmarks/results     # forward + backward
    python benchmarks/bench_ops.py --smoke                                     # tiny sizes, any device (CI)

Sweep: layers 768x768, 2304x768, 3072x768, 768x3072, 4096x14336, 14336x4096 (N_out x N_in);
M in {1, 16, 197, 4096, 50432}; sparsity in {0.5, 0.8, 0.9, 0.95, 0.99}; bf16. Contenders, all timed in
the same run on the same inputs:

* ``dense``        ``F.linear(x, W, b)`` with a dense random ``W``: the baseline of every ratio.
* ``diag``         ``torch.ops.diagcompile.diag_linear`` with shape-based dispatch (what users get).
* ``diag_kernel``  the same op forced to the Triton kernel; ``diag_dense`` forced to materialize + cuBLAS.
* ``csr``          cuSPARSE CSR SpMM of the same diagonal ``W`` (``torch.mm(W_csr, x.T).T + b``).
* ``bsr``          block-sparse BSR with 64x64 blocks at the same density (random block mask).
* ``2:4``          ``to_sparse_semi_structured`` (cuSPARSELt), at 50% only (a random 2:4 pattern).

Timing: ``triton.testing.do_bench`` medians (it flushes the 256 MB L2 before every call, so weights come
from DRAM, and the flush hides host-side launch overhead). A contender whose single warm call exceeds
``--slow-ms`` is timed as the median of 3 flushed calls instead. Each unsupported baseline records the
reason (its exception) instead of a time. Data is random normal, never zeros. Cases run most important
first (90%, then 99%, ...) and the sweep stops starting new cases after ``--time-budget-s``, still writing
its results. Output: ``gpu_ops_<mode>.csv`` (every timing), ``.md`` (environment stamp, the targets of the
issue with PASS/FAIL, a pivoted table) and ``.png`` (ratio vs dense per layer), written atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_stamp, median_time_ms  # noqa: E402

import diagcompile  # noqa: E402,F401
from diagcompile.ops import dispatch, force_path, k_from_sparsity, to_dense  # noqa: E402
from diagcompile.testing import random_offsets  # noqa: E402

#: (name, N_in, N_out)
LAYERS = [
    ("proj 768->768", 768, 768),
    ("qkv 768->2304", 768, 2304),
    ("fc1 768->3072", 768, 3072),
    ("fc2 3072->768", 3072, 768),
    ("up 4096->14336", 4096, 14336),
    ("down 14336->4096", 14336, 4096),
]
MS = [1, 16, 197, 4096, 50432]
SPARSITIES = [0.9, 0.99, 0.95, 0.8, 0.5]  # most important first: the sweep may stop on its time budget
SMOKE_LAYERS = [("smoke wide 96->48", 96, 48), ("smoke tall 48->96", 48, 96)]

CONTENDERS = ["dense", "diag", "diag_kernel", "diag_dense", "csr", "bsr", "2:4"]
#: What the files say while the sweep is still running (they are rewritten after every layer).
PARTIAL = "partial results, written after each layer; the sweep had not finished (or was killed) when they were"


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------
class Timer:
    """GPU: do_bench medians with an L2 flush per call; CPU (smoke): wall-clock medians."""

    def __init__(self, device: str, slow_ms: float):
        self.cuda = device == "cuda"
        self.slow_ms = slow_ms
        if self.cuda:
            import triton.testing

            self._do_bench = triton.testing.do_bench
            self._flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def _one(self, fn: Callable[[], object]) -> float:
        self._flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, str]:
        """``(median ms, method)``; the first call (JIT compile, cuBLAS heuristics) is never timed."""
        if not self.cuda:
            return median_time_ms(fn, warmup=1, reps=5, min_time_s=0.05), "wall-median"
        fn()
        torch.cuda.synchronize()
        first = self._one(fn)
        if first > 10 * self.slow_ms:  # e.g. CSR at M = 50432: one call says enough
            return first, "single"
        if first > self.slow_ms:
            times = sorted([first, self._one(fn), self._one(fn)])
            return times[1], "median-of-3"
        return float(self._do_bench(fn, warmup=10, rep=50, return_mode="median")), "do_bench"


# ----------------------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------------------
def _block_mask(n_out: int, n_in: int, density: float, block: int, g: torch.Generator) -> torch.Tensor:
    rb, cb = math.ceil(n_out / block), math.ceil(n_in / block)
    n = max(1, round(density * rb * cb))
    keep = torch.zeros(rb * cb, dtype=torch.bool)
    keep[torch.randperm(rb * cb, generator=g)[:n]] = True
    mask = keep.view(rb, cb).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return mask[:n_out, :n_in]


def _mask_2to4(n_out: int, n_in: int, g: torch.Generator) -> torch.Tensor:
    groups = torch.rand(n_out, n_in // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n_out, n_in // 4, 4, dtype=torch.bool)
    mask.scatter_(-1, groups, True)
    return mask.view(n_out, n_in)


class Layer:
    """Every contender's weights for one (layer, sparsity), built once; ``M`` varies per call."""

    def __init__(self, name, n_in, n_out, sparsity, device, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.name, self.n_in, self.n_out, self.sparsity = name, n_in, n_out, sparsity
        self.device, self.dtype = device, dtype
        self.k = k_from_sparsity(n_out, n_in, sparsity)
        self.D = min(n_in, n_out)
        self.nnz = self.k * self.D
        self.offsets = random_offsets(n_out, n_in, self.k, g).to(device)
        self.values = torch.randn(self.k, self.D, generator=g).to(device, dtype)
        self.bias = torch.randn(n_out, generator=g).to(device, dtype)
        self.W = torch.randn(n_out, n_in, generator=g).to(device, dtype)  # the dense layer of this shape
        self.errors: dict[str, str] = {}
        self.csr = self.bsr = self.w24 = None
        try:
            self.csr = to_dense(self.values, self.offsets, n_out, n_in).to_sparse_csr()
        except Exception as e:  # noqa: BLE001 - record why a baseline is missing
            self.errors["csr"] = _reason(e)
        try:
            dens = 1.0 - sparsity
            Wb = self.W * _block_mask(n_out, n_in, dens, 64, g).to(device)
            self.bsr = Wb.to_sparse_bsr((64, 64))
        except Exception as e:  # noqa: BLE001
            self.errors["bsr"] = _reason(e)
        if sparsity == 0.5:
            try:
                from torch.sparse import to_sparse_semi_structured

                self.w24 = to_sparse_semi_structured(self.W * _mask_2to4(n_out, n_in, g).to(device))
            except Exception as e:  # noqa: BLE001
                self.errors["2:4"] = _reason(e)
        else:
            self.errors["2:4"] = "n/a: 2:4 is 50% sparse by construction"

    def weight_bytes(self, contender: str) -> int:
        e = self.values.element_size()
        if contender == "dense" or contender == "2:4" and self.w24 is None:
            return self.n_out * self.n_in * e
        if contender == "2:4":
            return self.n_out * self.n_in * e // 2 + self.n_out * self.n_in // 8  # values + 2-bit metadata
        if contender == "csr":
            return self.nnz * (e + 8) + (self.n_out + 1) * 8  # values + int64 column indices + row pointers
        if contender == "bsr":
            nb = self.bsr.values().shape[0] if self.bsr is not None else 0
            return nb * 64 * 64 * e + nb * 8
        return self.nnz * e + self.k * 4  # diag: values + int32 offsets

    def flops(self, contender: str, M: int) -> float:
        if contender == "dense":
            return 2.0 * M * self.n_out * self.n_in
        if contender == "2:4":
            return 2.0 * M * self.n_out * self.n_in / 2
        if contender == "bsr" and self.bsr is not None:
            return 2.0 * M * self.bsr.values().numel()
        return 2.0 * M * self.nnz  # the useful work of the diagonal layer

    def fn(self, contender: str, x: torch.Tensor, g: torch.Tensor | None):
        """A closure running one call (forward, or forward + backward when ``g`` is given), or a reason."""
        n_out = self.n_out
        if contender == "dense":
            if g is None:
                return lambda: F.linear(x, self.W, self.bias)
            W, b = self.W.detach().requires_grad_(True), self.bias.detach().requires_grad_(True)

            def dense_fb():
                y = F.linear(x, W, b)
                return torch.autograd.grad(y, (x, W, b), g)

            return dense_fb
        if contender.startswith("diag"):
            path = {"diag": None, "diag_kernel": "kernel", "diag_dense": "dense"}[contender]
            op = torch.ops.diagcompile.diag_linear
            if g is None:

                def diag_f():
                    with force_path(path):
                        return op(x, self.values, self.offsets, self.bias, n_out)

                return diag_f
            v, b = self.values.detach().requires_grad_(True), self.bias.detach().requires_grad_(True)

            def diag_fb():
                with force_path(path):
                    y = op(x, v, self.offsets, b, n_out)
                    return torch.autograd.grad(y, (x, v, b), g)

            return diag_fb
        if contender in self.errors:
            return self.errors[contender]
        if g is not None:
            return "n/a: no backward through a sparse-layout weight in torch"
        if contender == "csr":
            return lambda: torch.mm(self.csr, x.t()).t() + self.bias
        if contender == "bsr":
            return lambda: F.linear(x, self.bsr, self.bias)
        if contender == "2:4":
            return lambda: F.linear(x, self.w24, self.bias)
        raise ValueError(contender)


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"unsupported: {type(e).__name__}: {msg[:160]}"


def _diag_path(layer: Layer, M: int, backward: bool) -> str:
    """The path dispatch takes for forward (and, with ``backward``, for dx and dV): e.g. ``kernel/kernel/dense``."""
    ops = ("fwd", "dx", "dv") if backward else ("fwd",)
    dev = torch.device(layer.device).type
    return "/".join(
        dispatch.choose_path(dispatch.Problem(op, dev, layer.dtype, M, layer.n_out, layer.n_in, layer.k)) for op in ops
    )


# ----------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------
def run(args, on_layer: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], str]:
    """The sweep. ``on_layer(rows)`` is called after each (sparsity, layer) with every row so far."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timer = Timer(device, args.slow_ms)
    layers = [spec for spec in (SMOKE_LAYERS if args.smoke else LAYERS) if not args.layers or spec[0] in args.layers]
    ms = args.m or ([1, 16] if args.smoke else MS)
    sparsities = args.sparsity or ([0.9, 0.5] if args.smoke else SPARSITIES)
    contenders = args.contenders or CONTENDERS
    backward = args.mode == "fwdbwd"
    rows: list[dict] = []
    t_start = time.monotonic()
    stopped = ""
    total = len(layers) * len(ms) * len(sparsities)
    done = 0
    for s in sparsities:
        for name, n_in, n_out in layers:
            if time.monotonic() - t_start > args.time_budget_s:
                stopped = f"stopped on the time budget ({args.time_budget_s:.0f} s) after {done} of {total} cases"
                break
            layer = Layer(name, n_in, n_out, s, device, dtype)
            for M in ms:
                x = torch.randn(M, n_in, device=device, dtype=dtype, requires_grad=backward)
                g = torch.randn(M, n_out, device=device, dtype=dtype) if backward else None
                t_dense = None
                for c in contenders:
                    row = {
                        "layer": name,
                        "N_in": n_in,
                        "N_out": n_out,
                        "M": M,
                        "sparsity": s,
                        "k": layer.k,
                        "mode": args.mode,
                        "contender": c,
                        "path": _diag_path(layer, M, backward) if c == "diag" else c,
                        "ms": float("nan"),
                        "x_vs_dense": float("nan"),
                        "tflops_eff": float("nan"),
                        "gb_s": float("nan"),
                        "method": "",
                        "note": "",
                    }
                    fn = layer.fn(c, x, g)
                    if isinstance(fn, str):
                        row["note"] = fn
                        rows.append(row)
                        continue
                    if t_dense is not None and c in ("diag_kernel", "csr", "bsr") and args.skip_hopeless:
                        # A lower bound from the useful FLOPs at 40 TFLOP/s: never faster than that.
                        if layer.flops(c, M) * (3 if backward else 1) / 40e12 * 1e3 > 50 * t_dense:
                            row["note"] = "skipped: > 50x dense by its FLOP lower bound"
                            rows.append(row)
                            continue
                    try:
                        ms_, method = timer(fn)
                    except Exception as e:  # noqa: BLE001 - a baseline that fails at run time
                        row["note"] = _reason(e)
                        rows.append(row)
                        if device == "cuda":
                            torch.cuda.synchronize()
                        continue
                    if c == "dense":
                        t_dense = ms_
                    mult = 3 if backward else 1
                    act = x.numel() + M * n_out
                    byts = (act + (2 * act if backward else 0)) * x.element_size()
                    byts += layer.weight_bytes(c) * (3 if backward else 1)
                    row.update(
                        ms=ms_,
                        method=method,
                        x_vs_dense=(t_dense / ms_) if t_dense else float("nan"),
                        tflops_eff=layer.flops(c, M) * mult / (ms_ * 1e-3) / 1e12,
                        gb_s=byts / (ms_ * 1e-3) / 1e9,
                    )
                    rows.append(row)
                done += 1
                last = [r for r in rows[-len(contenders) :] if r["ms"] == r["ms"]]
                summary = ", ".join(f"{r['contender']}={r['ms']:.4g}ms" for r in last)
                print(f"[{time.monotonic() - t_start:6.0f}s] {name} s={s} M={M}: {summary}", flush=True)
                del x, g
            del layer
            if device == "cuda":
                torch.cuda.empty_cache()
            if on_layer is not None:
                on_layer(rows)
        if stopped:
            break
    return rows, stopped


# ----------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _find(rows, **kw):
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


def _ratio(rows, layer, M, s, contender="diag", mode=None) -> float:
    got = [r for r in _find(rows, layer=layer, M=M, sparsity=s, contender=contender) if mode in (None, r["mode"])]
    return got[0]["x_vs_dense"] if got else float("nan")


def targets(rows: list[dict], mode: str) -> list[tuple[str, str, str, str]]:
    """The issue's targets that this sweep can check: (case, target, measured, verdict)."""
    out = []

    def verdict(vals, thr):
        # A NaN is a case that was not measured (failed, skipped, or past the time budget): it must not let the
        # measured ones alone decide a PASS.
        measured = [v for v in vals if v == v]
        if not measured:
            return "not measured", "-"
        shown = ", ".join(f"{v:.2f}" if v == v else "n/a" for v in vals)
        if min(measured) < thr:
            return shown, "FAIL"
        missing = len(vals) - len(measured)
        return shown, "PASS" if not missing else f"INCOMPLETE ({missing} of {len(vals)} not measured)"

    up, down, fc1, fc2 = "up 4096->14336", "down 14336->4096", "fc1 768->3072", "fc2 3072->768"
    for M, thr in ((1, 7.0), (16, 6.0)):
        m, v = verdict([_ratio(rows, up, M, 0.9), _ratio(rows, down, M, 0.9)], thr)
        out.append((f"M={M}, 4096->14336 and 14336->4096, 90% ({mode})", f">= {thr}x", m, v))
    m, v = verdict([_ratio(rows, fc1, 197, 0.9), _ratio(rows, fc2, 197, 0.9)], 1.8)
    out.append((f"ViT-B fc1 / fc2, M=197, 90% ({mode})", ">= 1.8x", m, v))
    big = [r["x_vs_dense"] for r in rows if r["contender"] == "diag" and r["M"] >= 4096 and r["sparsity"] == 0.9]
    m, v = verdict(big, 0.95)
    low = min((b for b in big if b == b), default=None)  # min() over NaNs depends on their order
    out.append((f"every layer, M >= 4096, 90% ({mode}; min shown)", ">= 0.95x", f"min {low:.2f}" if low else m, v))
    m, v = verdict([_ratio(rows, fc2, 50432, 0.99)], 4.0)
    out.append((f"M=50432, 3072->768, 99% ({mode})", ">= 4x", m, v))
    vs_csr = []
    for r in rows:
        if r["contender"] == "diag" and r["M"] >= 16 and r["sparsity"] == 0.9:
            c = _find(rows, layer=r["layer"], M=r["M"], sparsity=0.9, contender="csr", mode=r["mode"])
            if c:  # a NaN time on either side stays a NaN ratio: a case not measured
                vs_csr.append(c[0]["ms"] / r["ms"])
    m, v = verdict(vs_csr, 10.0)
    low = min((c for c in vs_csr if c == c), default=None)
    out.append((f"vs CSR, 90%, every M >= 16 ({mode}; min shown)", ">= 10x", f"min {low:.1f}" if low else m, v))
    return out


def markdown(rows: list[dict], mode: str, stopped: str, device: str) -> str:
    stamp = env_stamp()
    lines = [f"# Diagonal op vs dense and vendor sparse formats ({mode}, {device})", ""]
    lines += [f"- **{k}**: {v}" for k, v in stamp.items()]
    lines += [
        "",
        "Ratios are dense `F.linear` time / contender time from the same run (above 1 = faster than dense).",
        "`diag` is the op with shape-based dispatch (`path` says which path it took); `diag_kernel` / "
        "`diag_dense` force a path. do_bench medians with an L2 flush before every call.",
    ]
    if stopped:
        lines += ["", f"**Incomplete:** {stopped}."]
    if device == "cuda":
        lines += ["", "## Targets", "", "| case | target | measured | verdict |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(rows, mode)]
    else:
        lines += ["", "Smoke run on the CPU: tiny layers, no targets evaluated; the numbers say nothing about speed."]
    cols = ["dense", "diag", "diag_kernel", "diag_dense", "csr", "bsr", "2:4"]
    lines += [
        "",
        "## Ratio vs dense",
        "",
        "| layer | M | sparsity | dense ms | diag path | " + " | ".join(cols[1:]) + " | diag TFLOP/s | diag GB/s |",
        "|" + "---|" * (len(cols) + 6),
    ]
    keys = []
    for r in rows:
        key = (r["layer"], r["M"], r["sparsity"])
        if key not in keys:
            keys.append(key)
    for layer, M, s in keys:
        group = {r["contender"]: r for r in _find(rows, layer=layer, M=M, sparsity=s)}
        d = group.get("dense", {})
        dg = group.get("diag", {})
        cells = []
        for c in cols[1:]:
            r = group.get(c)
            if r is None:
                cells.append("")
            elif r["ms"] == r["ms"]:
                cells.append(f"{r['x_vs_dense']:.2f}")
            else:
                cells.append("—" if r["note"].startswith(("n/a", "skipped")) else "err")
        lines.append(
            f"| {layer} | {M} | {s} | {d.get('ms', float('nan')):.4g} | {dg.get('path', '')} | "
            + " | ".join(cells)
            + f" | {dg.get('tflops_eff', float('nan')):.3g} | {dg.get('gb_s', float('nan')):.3g} |"
        )
    notes = sorted({f"{r['contender']}: {r['note']}" for r in rows if r["note"] and r["note"].startswith("unsupp")})
    if notes:
        lines += ["", "## Unsupported baselines", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], mode: str) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers = []
    for r in rows:
        if r["layer"] not in layers:
            layers.append(r["layer"])
    n = len(layers)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((n + cols - 1) // cols)))
    axes = [axes] if n == 1 else list(getattr(axes, "flat", axes))
    for ax, layer in zip(axes, layers):
        for s in sorted({r["sparsity"] for r in rows}):
            pts = sorted(
                (r["M"], r["x_vs_dense"])
                for r in _find(rows, layer=layer, sparsity=s, contender="diag")
                if r["x_vs_dense"] == r["x_vs_dense"]
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"diag {int(round(s * 100))}%")
        csr = sorted(
            (r["M"], r["x_vs_dense"])
            for r in _find(rows, layer=layer, sparsity=0.9, contender="csr")
            if r["x_vs_dense"] == r["x_vs_dense"]
        )
        if csr:
            ax.plot(*zip(*csr), "k--", marker="x", label="CSR 90%")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=10)
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("speed vs dense F.linear")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[n:]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"diag_linear ({mode}) vs dense, same run")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write(rows: list[dict], out: Path, mode: str, stopped: str, device: str, png: bool = True) -> Path:
    name = f"gpu_ops_{mode}" if device == "cuda" else f"smoke_ops_{mode}"
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _atomic_write(out / f"{name}.csv", buf.getvalue())
    md = out / f"{name}.md"
    _atomic_write(md, markdown(rows, mode, stopped, device))
    image = chart(rows, mode) if rows and png else None
    if image:
        _atomic_write(out / f"{name}.png", image)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwd")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--smoke", action="store_true", help="tiny layers, M in {1, 16}: runs anywhere, incl. CPU")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    ap.add_argument("--layers", nargs="+", help="subset of layer names")
    ap.add_argument("--m", type=int, nargs="+")
    ap.add_argument("--sparsity", type=float, nargs="+")
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS)
    ap.add_argument("--time-budget-s", type=float, default=480.0, help="start no new case after this")
    ap.add_argument("--slow-ms", type=float, default=25.0, help="time slower calls as a median of 3")
    ap.add_argument("--no-skip-hopeless", dest="skip_hopeless", action="store_false")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"

    def checkpoint(rows: list[dict]) -> None:
        # The csv and md after every layer: a run killed from outside (the device call's time limit, `timeout`)
        # still leaves what it measured; the final write replaces them and adds the chart.
        write(rows, args.out, args.mode, PARTIAL, device, png=False)

    rows, stopped = run(args, on_layer=checkpoint)
    md = write(rows, args.out, args.mode, stopped, device)
    print(md.read_text().split("## Ratio vs dense")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

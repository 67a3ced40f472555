"""CPU speed of the diagonal ops vs dense, per dispatch path, float32; and a CPU training step.

    python benchmarks/bench_cpu.py            # ops table -> benchmarks/results/cpu_ops.{csv,md}
    python benchmarks/bench_cpu.py --train    # + ViT-B MLP block training step -> cpu_train.{csv,md}
    python benchmarks/bench_cpu.py --quick    # one shape, for a smoke test (cpu_ops_quick.*)
    python benchmarks/bench_cpu.py --narrow --cpu-time  # the bundled models' 64-512-wide layers (cpu_ops_narrow_*)
    python benchmarks/bench_cpu.py --models --cpu-time  # a training step of the bundled models (cpu_models_*)
    python benchmarks/bench_cpu.py --layers --cpu-time  # per-call cost of their modules at small M (cpu_layers_*)

Ops: ``fwd`` (``y = x W^T + b``; baseline ``F.linear``), ``dx`` (``dy W``; baseline ``dy @ W``, what
autograd runs for ``nn.Linear``), ``dv`` (the values gradient; baseline the dense weight gradient
``dy^T x``). Speed is a ratio ``baseline_ms / path_ms`` from the same run (above 1 = faster than dense).
Weights rotate over several copies so each call streams them from DRAM, like a real model whose layers do
not all fit in the last-level cache. Every figure is the best of several interleaved rounds of medians
(``compare_ms``); run it ``--repeat`` times to see the run-to-run spread on a shared machine.

At ``M = 1`` the op is bound by the weight bytes, so the roofline speedup is ``dense bytes / diagonal
bytes`` (~10x at 90%); ``kernel_GBps`` is the diagonal bytes (values + offsets) over the kernel's time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time_ms, write_results  # noqa: E402

import diagcompile  # noqa: E402,F401
from diagcompile import DiagLinear, DiagSparsityConfig, sparsify_  # noqa: E402
from diagcompile.models import CharGPT, DigitsViT, GPTConfig, ViTConfig, sparse_filter  # noqa: E402
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
#: the bundled models' sparse layers (diagcompile/models.py), far narrower than the shapes the CPU dispatch
#: table was tuned on: does dispatch still never lose to dense there?
NARROW_SHAPES = [
    ("digits ViT qkv 64->192", 64, 192),
    ("digits ViT proj 64->64", 64, 64),
    ("digits ViT fc1 64->256", 64, 256),
    ("digits ViT fc2 256->64", 256, 64),
    ("chars GPT qkv 128->384", 128, 384),
    ("chars GPT fc1 128->512", 128, 512),
    ("chars GPT fc2 512->128", 512, 128),
]
#: one image / one sequence, and a training batch (digits: 64 images x 16 patches; chars: 32 x 128 characters)
NARROW_MS = "16,128,1024,4096"
OPS = torch.ops.diagcompile


def _copies(n_in: int, n_out: int) -> int:
    # Enough copies of the dense weight to overflow a 32 MB L3 twice.
    return max(2, min(16, (64 << 20) // (4 * n_in * n_out) + 1))


class _Rotor:
    """Cycles through copies so consecutive calls never find the weights in cache."""

    def __init__(self, items: list):
        self.items, self.i = items, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def median_cpu_ms(fn, warmup: int = 3, reps: int = 20, min_time_s: float = 0.0) -> float:
    """Median CPU time of ``fn()`` on the calling thread, in ms: immune to being descheduled by other
    processes (only meaningful with one torch thread, where all the work runs on the calling thread)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


_TIMER = {"fn": median_time_ms}


def _compare_adaptive(fns: dict, rounds: int, reps: int) -> dict[str, float]:
    """``compare_ms`` with fewer repetitions for slow functions (the reference path at large M takes seconds)."""
    median = _TIMER["fn"]
    cost = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        cost[name] = time.perf_counter() - t0
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            slow = cost[name] > 0.1
            kw = {"warmup": 1, "reps": 3, "min_time_s": 0.0} if slow else {"warmup": 3, "reps": reps}
            best[name] = min(best[name], median(fn, **kw))
    return best


def _op_call(op: str, path: str, x, dy, values, offsets, bias, n_in: int, n_out: int):
    with force_path(None if path == "auto" else path):
        if op == "fwd":
            return OPS.diag_linear(x, values, offsets, bias, n_out)
        if op == "dx":
            return OPS.diag_linear_dx(dy, values, offsets, n_in)
        return OPS.diag_linear_dv(dy, x, offsets)


def run_ops(shapes, ms, ops, sparsity: float, paths: list[str], rounds: int) -> list[dict]:
    rows = []
    for name, n_in, n_out in shapes:
        k = k_from_sparsity(n_out, n_in, sparsity)
        D = min(n_in, n_out)
        c = _copies(n_in, n_out)
        dense_w = _Rotor([torch.randn(n_out, n_in) for _ in range(c)])
        vals = _Rotor([torch.randn(k, D) for _ in range(c)])
        offs = random_offsets(n_out, n_in, k)
        bias = torch.randn(n_out)
        for op in ops:
            for M in ms:
                x, dy = torch.randn(M, n_in), torch.randn(M, n_out)
                baseline = {
                    "fwd": lambda: F.linear(x, dense_w(), bias),
                    "dx": lambda: torch.mm(dy, dense_w()),
                    "dv": lambda: torch.mm(dy.t(), x),
                }[op]
                fns = {"baseline": baseline}
                problem = dispatch.Problem(op, "cpu", torch.float32, M, n_out, n_in, k)
                for path in paths:
                    if path == "kernel" and not dispatch._kernel_supports(problem.device_type, problem.dtype):
                        continue
                    fns[path] = lambda path=path: _op_call(op, path, x, dy, vals(), offs, bias, n_in, n_out)
                with torch.no_grad():
                    t = _compare_adaptive(fns, rounds=rounds, reps=10 if M > 1 else 30)
                row = {"op": op, "layer": name, "M": M, "sparsity": sparsity, "k": k, "baseline_ms": t["baseline"]}
                for path in paths:
                    row[f"{path}_ms"] = t.get(path, float("nan"))
                    row[f"{path}_x"] = t["baseline"] / t[path] if path in t else float("nan")
                row["auto_path"] = dispatch.choose_path(problem)
                if M == 1 and "kernel" in t:
                    row["kernel_GBps"] = (k * D * 4 + k * 4) / (t["kernel"] * 1e6)
                    row["roofline_x"] = (n_in * n_out) / (k * D + k)
                else:
                    row["kernel_GBps"] = row["roofline_x"] = float("nan")
                rows.append(row)
                print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# Layer calls: what a user's module pays per call at small M (fixed Python cost, not the kernel)
# ----------------------------------------------------------------------------------------------------
LAYER_MS = (1, 16, 128)
OP_NAMES = ("fwd", "dx", "dv")


def _op_paths(M: int, n_out: int, n_in: int, k: int) -> str:
    """Dispatch's ``fwd/dx/dv`` choice for one float32 CPU layer shape at ``M`` rows."""
    return "/".join(
        dispatch.choose_path(dispatch.Problem(op, "cpu", torch.float32, M, n_out, n_in, k)) for op in OP_NAMES
    )


def run_layers(shapes, ms, sparsity: float, rounds: int) -> list[dict]:
    """``DiagLinear`` vs ``nn.Linear`` per call, through the modules (validation, dispatch and autograd
    included): inference (``no_grad``) and a forward + backward to ``x`` and the parameters. Hot weights: at
    these ``M`` the fixed per-call cost is what is measured."""
    rows = []
    for name, n_in, n_out in shapes:
        torch.manual_seed(0)
        dense = nn.Linear(n_in, n_out)
        diag = DiagLinear(n_in, n_out, sparsity=sparsity)
        for M in ms:
            x = torch.randn(M, n_in)
            xg = x.clone().requires_grad_()
            dy = torch.randn(M, n_out)

            def train(m, xg=xg, dy=dy):
                m(xg).backward(dy)

            with torch.no_grad():
                t = _compare_adaptive({"dense_infer": lambda: dense(x), "diag_infer": lambda: diag(x)}, rounds, 200)
            t.update(
                _compare_adaptive({"dense_train": lambda: train(dense), "diag_train": lambda: train(diag)}, rounds, 100)
            )
            row = {"layer": name, "M": M, "sparsity": sparsity}
            for mode in ("infer", "train"):
                d, s = t[f"dense_{mode}"], t[f"diag_{mode}"]
                row[f"dense_{mode}_us"], row[f"diag_{mode}_us"], row[f"{mode}_x"] = 1e3 * d, 1e3 * s, d / s
            row["paths fwd/dx/dv"] = _op_paths(M, n_out, n_in, diag.k)
            rows.append(row)
            print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# Training step: ViT-B MLP block (LayerNorm -> fc1 -> GELU -> fc2, residual), AdamW
# ----------------------------------------------------------------------------------------------------
class MLPBlock(nn.Module):
    def __init__(self, fc1: nn.Module, fc2: nn.Module, dim: int = 768):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), fc1, fc2

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(b.numel() * b.element_size() for b in model.buffers())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


def run_train(batches: list[int], sparsity: float, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    dense = MLPBlock(nn.Linear(768, 3072), nn.Linear(3072, 768))
    diag = MLPBlock(DiagLinear(768, 3072, sparsity=sparsity), DiagLinear(3072, 768, sparsity=sparsity))
    rows = []
    for B in batches:
        x = torch.randn(B, 197, 768)
        models = {"dense": copy.deepcopy(dense), "diag auto": copy.deepcopy(diag), "diag kernel": copy.deepcopy(diag)}
        opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

        def step(name):
            m, opt = models[name], opts[name]
            with force_path("kernel" if name == "diag kernel" else None):
                loss = m(x).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        fns = {name: (lambda name=name: step(name)) for name in models}
        t = _compare_adaptive(fns, rounds=rounds, reps=5)
        M = B * 197
        k1 = models["diag auto"].fc1.values.shape[0]
        fc1_paths = "/".join(
            dispatch.choose_path(dispatch.Problem(op, "cpu", torch.float32, M, 3072, 768, k1))
            for op in ("fwd", "dx", "dv")
        )
        row = {
            "block": "ViT-B MLP 768-3072-768 + LN, AdamW",
            "batch": B,
            "M": M,
            "sparsity": sparsity,
            "dense_ms": t["dense"],
            "diag_auto_ms": t["diag auto"],
            "diag_auto_x": t["dense"] / t["diag auto"],
            "diag_kernel_ms": t["diag kernel"],
            "diag_kernel_x": t["dense"] / t["diag kernel"],
            "fc1_paths": fc1_paths,
            "state_vs_dense": _state_bytes(models["diag auto"], opts["diag auto"])
            / _state_bytes(models["dense"], opts["dense"]),
        }
        rows.append(row)
        print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    return rows


#: (task, model, batch): the bundled models at `diagcompile train`'s default batch sizes (train.TASK_DEFAULTS).
MODELS = [
    ("digits-vit", lambda: DigitsViT(ViTConfig()), 64),
    ("chars-gpt", lambda: CharGPT(GPTConfig()), 32),
]


def _layer_paths(model: nn.Module, M: int) -> str:
    """Dispatch's fwd/dx/dv choice for each distinct sparse layer shape of ``model`` at ``M`` rows."""
    seen = {}
    for m in model.modules():
        if isinstance(m, DiagLinear) and (m.in_features, m.out_features) not in seen:
            seen[m.in_features, m.out_features] = _op_paths(M, m.out_features, m.in_features, m.values.shape[0])
    return ", ".join(f"{i}->{o} {p}" for (i, o), p in seen.items())


def run_models(sparsity: float, rounds: int) -> list[dict]:
    """One training step (forward, cross-entropy, backward, AdamW) of each bundled model, dense vs diagonal."""
    rows = []
    for task, build, batch in MODELS:
        torch.manual_seed(0)
        dense = build()
        diag = sparsify_(copy.deepcopy(dense), DiagSparsityConfig(sparsity=sparsity), filter_fn=sparse_filter)
        (x,) = dense.example_input(batch)
        models = {"dense": dense, "diag auto": diag}
        models.update({name: copy.deepcopy(diag) for name in ("diag kernel", "diag dense")})
        opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
        logits = dense(x)
        target = torch.randint(0, logits.shape[-1], logits.shape[:-1])
        M = x.shape[0] * (x.shape[1] + 1 if task == "digits-vit" else x.shape[1])  # the ViT adds a [CLS] token

        def step(name, x=x, target=target):
            m, opt = models[name], opts[name]
            with force_path(name.removeprefix("diag ") if name in ("diag kernel", "diag dense") else None):
                out = m(x)
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        t = _compare_adaptive({name: (lambda name=name: step(name)) for name in models}, rounds=rounds, reps=5)
        row = {"model": task, "batch": batch, "M": M, "sparsity": sparsity, "dense_ms": t["dense"]}
        for name in ("diag auto", "diag kernel", "diag dense"):
            col = name.replace(" ", "_")
            row[f"{col}_ms"], row[f"{col}_x"] = t[name], t["dense"] / t[name]
        row["paths (in->out fwd/dx/dv)"] = _layer_paths(diag, M)
        rows.append(row)
        print({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
    return rows


def _spread(runs: list[list[dict]], keys: list[str]) -> list[dict]:
    """Median over repeated runs, with min-max of each ratio column, so the table shows the noise."""
    out = []
    for rows in zip(*runs):
        row = dict(rows[0])
        for key in keys:
            vals = [r[key] for r in rows]
            row[key] = statistics.median(vals)
            if key.endswith("_x") and len(vals) > 1:
                row[key + "_range"] = f"{min(vals):.2f}-{max(vals):.2f}"
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--paths", default="reference,dense,kernel,auto")
    ap.add_argument("--ops", default="fwd,dx,dv")
    ap.add_argument("--ms", default=None, help=f"rows M (default 1,197; with --narrow {NARROW_MS})")
    ap.add_argument("--narrow", action="store_true", help="the bundled models' narrow layers (NARROW_SHAPES)")
    ap.add_argument("--train", action="store_true", help="also time a training step of a ViT-B MLP block")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--models", action="store_true", help="only a training step of the bundled models (MODELS)")
    ap.add_argument("--layers", action="store_true", help="only per-call cost of the narrow layers' modules, small M")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement (best counts)")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the whole table; report median and range")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread, timed by the thread's CPU time (not wall clock): a comparison that other processes "
        "on a shared machine cannot distort by descheduling us; results go to cpu_*_cputime.*",
    )
    args = ap.parse_args()
    if args.cpu_time:
        args.threads = 1
        _TIMER["fn"] = median_cpu_ms
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    suffix = "_cputime" if args.cpu_time else ""
    timing = (
        " Timed by the calling thread's CPU time with 1 thread (immune to descheduling by other processes)."
        if args.cpu_time
        else " Timed by wall clock."
    )
    repeated = f" Repeated {args.repeat}x: ratios are medians, `_range` columns give min-max."
    noise = timing + (repeated if args.repeat > 1 else "")
    if args.layers:
        ms = [int(m) for m in args.ms.split(",")] if args.ms else list(LAYER_MS)
        runs = [run_layers(NARROW_SHAPES, ms, args.sparsity, args.rounds) for _ in range(args.repeat)]
        cols = [f"{a}_{m}_us" for m in ("infer", "train") for a in ("dense", "diag")] + ["infer_x", "train_x"]
        md = write_results(
            "cpu_layers" + suffix,
            _spread(runs, cols),
            f"CPU per-call cost of the bundled models' layers, float32, {int(args.sparsity * 100)}% sparsity, "
            f"{threads} threads",
            notes="One call of the module (`nn.Linear` vs `DiagLinear`, validation, dispatch and autograd "
            "included), hot weights, in microseconds. `infer` = forward under `no_grad`; `train` = forward and "
            "backward to the input and the parameters. `_x` = dense time / diagonal time, same run (above 1 = "
            "faster than dense). At these M the fixed per-call cost dominates, not the kernel." + noise,
            out_dir=args.out,
        )
        print(f"wrote {md}")
        return
    if args.models:
        runs = [run_models(args.sparsity, args.rounds) for _ in range(args.repeat)]
        cols = [f"{c}_{s}" for c in ("diag_auto", "diag_kernel", "diag_dense") for s in ("ms", "x")]
        md = write_results(
            "cpu_models" + suffix,
            _spread(runs, ["dense_ms", *cols]),
            f"CPU training step of the bundled models, float32, {int(args.sparsity * 100)}% sparsity, "
            f"{threads} threads",
            notes="One step = forward, cross-entropy, backward, AdamW step of the models `diagcompile train` "
            "builds (diagcompile/models.py), at the tasks' default batch sizes; `M` = rows through each linear. "
            "`dense` = nn.Linear layers; `diag auto` = their blocks' qkv/proj/fc1/fc2 as 90% DiagLinears "
            "(`sparsify_` with `models.sparse_filter`) with shape-based dispatch; `diag kernel` / `diag dense` "
            "= every diagonal op forced to the numba kernel / to materialize + dense GEMM. `_x` = dense time / "
            "that time, same run. The last column is dispatch's choice per sparse layer shape." + noise,
            out_dir=args.out,
        )
        print(f"wrote {md}")
        return
    if not args.train_only:
        shapes = SHAPES[2:3] if args.quick else NARROW_SHAPES if args.narrow else SHAPES
        ms_arg = args.ms or (NARROW_MS if args.narrow else "1,197")
        ms = [1] if args.quick else [int(m) for m in ms_arg.split(",")]
        paths = args.paths.split(",")
        runs = [run_ops(shapes, ms, args.ops.split(","), args.sparsity, paths, args.rounds) for _ in range(args.repeat)]
        keys = ["baseline_ms", "kernel_GBps"] + [f"{p}_{s}" for p in paths for s in ("ms", "x")]
        md = write_results(
            ("cpu_ops_quick" if args.quick else "cpu_ops_narrow" if args.narrow else "cpu_ops") + suffix,
            _spread(runs, keys),
            f"CPU diagonal ops, float32, {int(args.sparsity * 100)}% sparsity, {threads} threads: vs dense",
            notes="`baseline_ms` = the dense baseline (fwd: `F.linear`; dx: `dy @ W`; dv: `dy^T @ x`). `<path>_x` = "
            "baseline time / path time from the same run (above 1 = faster than dense). Paths: `reference` = "
            "vectorized torch gathers, `dense` = materialize W then the dense GEMM, `kernel` = the numba CPU "
            "kernel (ops/cpu_kernels.py), `auto` = what dispatch picks (`auto_path`). Weights are cold "
            "(rotated copies). `kernel_GBps` = diagonal bytes / kernel time at M=1; `roofline_x` = dense "
            "bytes / diagonal bytes, the speedup a purely bandwidth-bound kernel would reach." + noise,
            out_dir=args.out,
        )
        print(f"wrote {md}")
    if args.train or args.train_only:
        batches = [1] if args.quick else [1, 8]
        runs = [run_train(batches, args.sparsity, args.rounds) for _ in range(args.repeat)]
        md = write_results(
            ("cpu_train_quick" if args.quick else "cpu_train") + suffix,
            _spread(runs, ["dense_ms", "diag_auto_ms", "diag_auto_x", "diag_kernel_ms", "diag_kernel_x"]),
            f"CPU training step, ViT-B MLP block, float32, {int(args.sparsity * 100)}% sparsity, {threads} threads",
            notes="One step = forward, backward, AdamW step, on `x` of shape (batch, 197, 768); loss = mean "
            "square. `dense` = nn.Linear layers; `diag auto` = DiagLinear with shape-based dispatch; "
            "`diag kernel` = DiagLinear with the numba kernel forced. `fc1_paths` = dispatch's choice for "
            "fc1's fwd/dx/dv. `state_vs_dense` = (parameters + buffers + AdamW state) bytes of the "
            "diagonal block / the dense block's (LayerNorm included)." + noise,
            out_dir=args.out,
        )
        print(f"wrote {md}")


if __name__ == "__main__":
    main()

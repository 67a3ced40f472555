"""``diagcompile demo``: the whole story on bundled data, end to end, with checks that can fail.

1. Train a small ViT on scikit-learn's digits twice: dense, and with DynaDiag at 90% sparsity.
2. ``finalize()`` (done by the harness): compact ``DiagLinear`` layers (k x D values + offsets).
3. Compile the sparse model with the ``diagcompile`` torch.compile backend; check it against eager.
4. Export it to ``.pt2`` and ONNX (portable and TensorRT-plugin form); run each artifact (the .pt2 reloaded
   from disk, ONNX in onnxruntime) against the eager model.
5. Time dense vs sparse on this machine (the small model, and one decode-sized layer where the diagonal
   kernel matters).
6. Print one summary table; write checkpoints, artifacts, a PNG of a learned diagonal pattern and a PNG of
   the training curves into the output folder. Exit non-zero if any check failed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from diagcompile.train import TrainConfig

__all__ = ["DemoConfig", "Check", "run_demo", "check_outputs_match", "check_artifact", "check_sparse_model"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``diagcompile demo``.

    Attributes:
        out: output folder (created; an earlier demo there is overwritten).
        sparsity: DynaDiag's target sparsity.
        epochs: training epochs per model (``None``: the harness default for digits).
        seed: seeds data order, init and the sparsifier.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
        compile: run the ``torch.compile`` step (Inductor needs a C++ compiler on CPU).
        layer_timing: also time one decode-sized layer (4096 -> 14336, batch 1).
        min_accuracy: the sparse model's test accuracy (%) below which the "learned" check fails.
        pool: DynaDiag's candidate pool (``DSTConfig.pool``): at most ``pool * k`` candidate diagonals per layer
            (sparse-to-sparse training; 2 is the best setting in benchmarks/results/dst_digits.md), or ``None``
            for the faithful form that trains all ``P`` candidates.
    """

    out: str = "demo_out"
    sparsity: float = 0.9
    epochs: float | None = None
    seed: int = 0
    device: str = "auto"
    compile: bool = True
    layer_timing: bool = True
    min_accuracy: float = 50.0
    pool: float | None = 2.0

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"DemoConfig.sparsity={self.sparsity} must be in (0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"DemoConfig.device={self.device!r} must be 'auto', 'cpu' or 'cuda'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("DemoConfig.device='cuda' but no CUDA device is available")
        if self.pool is not None and not self.pool >= 1.0:
            raise ValueError(f"DemoConfig.pool={self.pool} must be >= 1 (or None for all P candidates)")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"DemoConfig.epochs={self.epochs} must be positive")


@dataclass
class Check:
    """One pass/fail check of the demo."""

    name: str
    passed: bool
    detail: str

    def __str__(self) -> str:
        return f"[{'PASS' if self.passed else 'FAIL'}] {self.name}: {self.detail}"


@dataclass
class _Report:
    checks: list[Check] = field(default_factory=list)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    timings: list[dict[str, Any]] = field(default_factory=list)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        print(f"    {check}", flush=True)
        return check


# ----------------------------------------------------------------------------------------------------
# Checks (public so tests can feed them broken models and artifacts)
# ----------------------------------------------------------------------------------------------------
def check_outputs_match(
    name: str,
    reference: Callable[..., Tensor],
    candidate: Callable[..., Tensor],
    batches: Sequence[tuple[Tensor, ...]],
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> Check:
    """``candidate`` reproduces ``reference`` on every batch: ``max|a - b| <= atol + rtol * max|b|``."""
    worst, scale = 0.0, 0.0
    try:
        with torch.no_grad():
            for args in batches:
                ref = reference(*args).float()
                got = candidate(*args).float()
                if got.shape != ref.shape:
                    return Check(name, False, f"shape {tuple(got.shape)} != expected {tuple(ref.shape)}")
                if not torch.isfinite(got).all():
                    return Check(name, False, "non-finite outputs")
                worst = max(worst, float((got - ref).abs().max()) if ref.numel() else 0.0)
                scale = max(scale, float(ref.abs().max()) if ref.numel() else 0.0)
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported with its message
        return Check(name, False, f"raised {type(e).__name__}: {e}")
    tol = atol + rtol * scale
    sizes = ", ".join(str(a[0].shape[0]) for a in batches)
    return Check(name, worst <= tol, f"max |diff| = {worst:.2e} (tolerance {tol:.1e}) at batch sizes {sizes}")


def check_artifact(name: str, run_check: Callable[[], Any]) -> Check:
    """Wrap an export-layer check (``check_program`` / ``check_onnx``) as a demo ``Check``."""
    try:
        result = run_check()
    except Exception as e:  # noqa: BLE001 - a failing or crashing artifact is a failed check
        return Check(name, False, f"{type(e).__name__}: {e}")
    return Check(name, bool(result.passed), str(result))


def check_sparse_model(model: nn.Module, sparsity: float) -> Check:
    """Every converted layer is a compact ``DiagLinear`` at (about) the target sparsity."""
    from diagcompile.modules import DiagLinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, DiagLinear)}
    if not layers:
        return Check("sparse model", False, "no DiagLinear layer in the model")
    bad = {n: m.sparsity for n, m in layers.items() if m.sparsity < sparsity - 0.02}
    dense_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    detail = (
        f"{len(layers)} DiagLinear layers (sparsity {min(m.sparsity for m in layers.values()):.3f}"
        f"-{max(m.sparsity for m in layers.values()):.3f}); dense linears kept: {dense_linears or 'none'}"
    )
    if bad:
        return Check("sparse model", False, f"layers below the target sparsity {sparsity}: {bad}")
    return Check("sparse model", True, detail)


# ----------------------------------------------------------------------------------------------------
def _device(cfg: DemoConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _stage(i: int, n: int, title: str) -> None:
    print(f"\n[{i}/{n}] {title}", flush=True)


def _weight_stats(model: nn.Module) -> dict[str, int]:
    """Stored linear-weight entries and bytes (values + offsets for diagonal layers)."""
    from diagcompile.modules import DiagLinear

    entries, nbytes = 0, 0
    for m in model.modules():
        if isinstance(m, DiagLinear):
            entries += m.values.numel()
            nbytes += m.values.numel() * m.values.element_size() + m.offsets.numel() * m.offsets.element_size()
        elif isinstance(m, nn.Linear):
            entries += m.weight.numel()
            nbytes += m.weight.numel() * m.weight.element_size()
    return {"weight_entries": entries, "weight_bytes": nbytes}


def _median_ms(fn: Callable[[], Any], device: str, min_time: float = 0.4, reps: int = 15) -> float:
    for _ in range(3):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    times.sort()
    return 1e3 * times[len(times) // 2]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _continue_interrupted(tc: TrainConfig) -> TrainConfig:
    """``tc``, resuming a run of the same configuration that an interruption (Ctrl-C) left in ``tc.out``.

    The harness refuses to start over on an unfinished run's checkpoint; the demo owns its folders, so it
    continues that run, or, if the checkpoint is from another configuration (other flags, other code), moves it
    aside to ``checkpoint.pt.stale`` (nothing is lost) and starts over.
    """
    import dataclasses

    from diagcompile.train import CHECKPOINT_NAME, OutdatedCheckpointError, load_checkpoint, run_finished

    path = Path(tc.out) / CHECKPOINT_NAME
    if not path.exists():
        return tc
    try:
        ckpt = load_checkpoint(path)
    except OutdatedCheckpointError:
        stale = path.with_name(CHECKPOINT_NAME + ".stale")
        os.replace(path, stale)
        print(f"  (a checkpoint of an earlier diagcompile, which this one cannot resume, moved to {stale})", flush=True)
        return tc
    step, total = int(ckpt["step"]), int(ckpt["total_steps"])
    if run_finished(tc.out, ckpt):
        return tc  # a new run replaces it
    # Unfinished, or trained but interrupted in its final evaluation (no results yet): the same configuration
    # continues (resuming a trained run redoes its final evaluation), another one is moved aside.
    if tc.differences(ckpt["config"], ckpt.get("resolved")):
        stale = path.with_name(CHECKPOINT_NAME + ".stale")
        os.replace(path, stale)
        print(f"  (an interrupted run of another configuration moved to {stale})", flush=True)
        return tc
    print(f"  (continuing the interrupted run from step {step} of {total})", flush=True)
    return dataclasses.replace(tc, resume=True)


# ----------------------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig) -> int:
    """Run the demo; return 0 when every check passed, 1 otherwise."""
    from diagcompile.train import TrainConfig, load_model, train

    t_start = time.perf_counter()
    device = _device(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = _Report()
    n = 6
    print(
        f"diagcompile demo: digits ViT, dense vs DynaDiag at {cfg.sparsity:.0%} sparsity "
        f"({'all P candidates' if cfg.pool is None else f'candidate pool {cfg.pool:g}k'}), on {device}; "
        f"output in {out}/",
        flush=True,
    )

    # 1-2. Train both models (the harness finalizes the sparse one and saves compact model files).
    metrics: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}
    example: tuple[Tensor, ...] = ()
    for i, method in enumerate(("dense", "dynadiag"), start=1):
        label = "dense" if method == "dense" else f"dynadiag {cfg.sparsity:.0%}"
        _stage(i, n, f"train {label} ViT on sklearn digits")
        tc = TrainConfig(
            task="digits-vit",
            method=method,
            sparsity=cfg.sparsity,
            epochs=cfg.epochs,
            seed=cfg.seed,
            device=device,
            out=str(out / method),
            pool=cfg.pool if method == "dynadiag" else None,
        )
        metrics[label] = train(_continue_interrupted(tc))
        models[label], example = load_model(out / method / "model.pt", device=device)
        rep.files[f"{method} checkpoint"] = str(out / method / "checkpoint.pt")
        rep.files[f"{method} model"] = str(out / method / "model.pt")
    dense_label, sparse_label = list(models)
    dense, sparse = models[dense_label], models[sparse_label]
    rep.add(check_sparse_model(sparse, cfg.sparsity * 0.98))
    m_sparse = metrics[sparse_label]
    before, after = m_sparse.get("final_before_finalize", {}), m_sparse.get("final", {})
    rep.add(
        Check(
            "finalize keeps the function",
            bool(before) and math.isclose(before.get("acc", -1), after.get("acc", -2), abs_tol=1e-9),
            f"test accuracy {before.get('acc', float('nan')):.2f}% before finalize, "
            f"{after.get('acc', float('nan')):.2f}% after (compact DiagLinear)",
        )
    )
    acc = {k: m["final"]["acc"] for k, m in metrics.items()}
    rep.add(
        Check(
            "sparse model learned",
            acc[sparse_label] >= cfg.min_accuracy,
            f"test accuracy {acc[sparse_label]:.2f}% (chance 10%; dense {acc[dense_label]:.2f}%)",
        )
    )

    torch.manual_seed(cfg.seed)
    batches = [tuple(torch.randn(b, *example[0].shape[1:], device=device) for _ in example) for b in (1, 7, 64)]

    # 3. Compile with the diagcompile backend.
    _stage(3, n, "torch.compile(backend='diagcompile') the sparse model")
    compiled = None
    if cfg.compile:
        import diagcompile

        torch._dynamo.reset()
        t0 = time.perf_counter()
        compiled = diagcompile.compile(sparse, fullgraph=True)
        check = rep.add(check_outputs_match("compiled == eager", sparse, compiled, batches))
        rep.rows.setdefault("compile", {})["seconds"] = time.perf_counter() - t0
        if not check.passed:
            compiled = None
    else:
        rep.add(Check("compiled == eager", True, "skipped (--no-compile)"))

    # 4. Export.
    _stage(4, n, "export: torch.export (.pt2) and ONNX (portable + TensorRT-plugin form), checked")
    from diagcompile import export as dx

    pt2 = out / "dynadiag.pt2"
    ep = dx.export_program(sparse.cpu(), tuple(t.cpu() for t in example))
    dx.save(ep, pt2)
    rep.files["torch.export program"] = str(pt2)
    n_nodes = sum(1 for nd in ep.graph.nodes if nd.op == "call_function" and "diagcompile" in str(nd.target))
    rep.add(
        check_artifact(
            f".pt2 reloaded from disk ({n_nodes} diag_linear nodes)",
            lambda: dx.check_program(str(pt2), sparse, tuple(t.cpu() for t in example), raise_on_failure=False),
        )
    )
    for mode, fname in (("portable", "dynadiag.onnx"), ("plugin", "dynadiag.plugin.onnx")):
        path = out / fname
        dx.to_onnx(sparse, tuple(t.cpu() for t in example), path, mode=mode)
        rep.files[f"ONNX ({mode})"] = str(path)
        rep.add(
            check_artifact(
                f"ONNX {mode} in onnxruntime",
                lambda path=path: dx.check_onnx(path, sparse, tuple(t.cpu() for t in example), raise_on_failure=False),
            )
        )
    sparse.to(device)

    # 5. Timing on this machine.
    _stage(5, n, f"timing on this machine ({device}, {torch.get_num_threads()} threads)")
    for b in (1, 256):
        x = torch.randn(b, *example[0].shape[1:], device=device)
        row: dict[str, Any] = {"what": f"digits ViT, batch {b}"}
        with torch.no_grad():
            row["dense eager ms"] = _median_ms(lambda x=x: dense(x), device)
            row["sparse eager ms"] = _median_ms(lambda x=x: sparse(x), device)
            if compiled is not None:
                row["sparse compiled ms"] = _median_ms(lambda x=x: compiled(x), device)
        rep.timings.append(row)
    if cfg.layer_timing:
        rep.timings.append(_layer_timing(cfg.sparsity, device))

    # 6. Pictures and the summary.
    _stage(6, n, "plots and summary")
    from diagcompile.modules import DiagLinear
    from diagcompile.plots import plot_diagonal_pattern, plot_training_curves

    name, layer = next((nm, m) for nm, m in sparse.named_modules() if isinstance(m, DiagLinear) and "fc1" in nm)
    rep.files["diagonal pattern"] = str(
        plot_diagonal_pattern(layer, out / "pattern.png", title=f"learned by DynaDiag: {name}")
    )
    freeze = m_sparse.get("dst_config", {}).get("freeze_step") or _freeze_step(m_sparse)
    rep.files["training curves"] = str(
        plot_training_curves(metrics, out / "curves.png", markers=[("DynaDiag freeze", freeze)] if freeze else ())
    )

    summary = _summary(
        cfg, device, metrics, {dense_label: dense, sparse_label: sparse}, rep, time.perf_counter() - t_start
    )
    (out / "summary.md").write_text(summary + "\n")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "device": device,
                "checks": [asdict(c) for c in rep.checks],
                "timings": rep.timings,
                "files": rep.files,
                "accuracy": acc,
                "wall_s": time.perf_counter() - t_start,
            },
            indent=2,
            default=str,
        )
    )
    print("\n" + summary, flush=True)
    failed = [c for c in rep.checks if not c.passed]
    print(
        f"\n{len(rep.checks) - len(failed)}/{len(rep.checks)} checks passed; "
        f"demo took {time.perf_counter() - t_start:.0f} s",
        flush=True,
    )
    return 1 if failed else 0


def _freeze_step(m: dict[str, Any]) -> int | None:
    try:
        dst = m["config"].get("dst") or {}
        frac = dst.get("freeze_at", 0.5)
        return int(round(frac * m["steps"])) if isinstance(frac, float) else int(frac)
    except (KeyError, TypeError):
        return None


def _layer_timing(sparsity: float, device: str) -> dict[str, Any]:
    """One decode-sized layer (4096 -> 14336, batch 1): where the diagonal kernel's bandwidth win shows."""
    import torch.nn.functional as F

    from diagcompile.modules import DiagLinear

    n_in, n_out = 4096, 14336
    torch.manual_seed(0)
    # Two copies of each weight, used alternately, so the dense weight streams from DRAM as it would in a
    # model whose layers do not all fit in the last-level cache.
    dense_w = [torch.randn(n_out, n_in, device=device) * 0.01 for _ in range(2)]
    layers = [DiagLinear(n_in, n_out, bias=False, sparsity=sparsity, device=device) for _ in range(2)]
    x = torch.randn(1, n_in, device=device)
    i = {"n": 0}

    def flip() -> int:
        i["n"] ^= 1
        return i["n"]

    with torch.no_grad():
        t_dense = _median_ms(lambda: F.linear(x, dense_w[flip()]), device)
        t_sparse = _median_ms(lambda: layers[flip()](x), device)
    return {"what": f"one layer {n_in}->{n_out}, batch 1", "dense eager ms": t_dense, "sparse eager ms": t_sparse}


def _summary(cfg: DemoConfig, device: str, metrics: dict, models: dict, rep: _Report, wall: float) -> str:
    parts = [f"## diagcompile demo — digits ViT, dense vs DynaDiag {cfg.sparsity:.0%} ({device})", ""]
    rows = []
    for label, m in metrics.items():
        ws = _weight_stats(models[label])
        rows.append(
            [
                label,
                f"{m['final']['acc']:.2f}%",
                f"{sum(p.numel() for p in models[label].parameters()):,}",
                f"{ws['weight_entries']:,}",
                _fmt_bytes(ws["weight_bytes"]),
                f"{m.get('time', {}).get('train_s', float('nan')):.1f}",
            ]
        )
    parts += [
        _table(["model", "test acc", "parameters", "linear weights stored", "linear weight memory", "train s"], rows),
        "",
    ]
    t_rows = []
    for t in rep.timings:
        d, s = t.get("dense eager ms"), t.get("sparse eager ms")
        c = t.get("sparse compiled ms")
        t_rows.append(
            [
                t["what"],
                f"{d:.3f}",
                f"{s:.3f}",
                f"{c:.3f}" if c is not None else "-",
                f"{d / s:.2f}x" if d and s else "-",
                f"{d / c:.2f}x" if c else "-",
            ]
        )
    parts += [
        _table(
            ["latency (median)", "dense ms", "sparse ms", "sparse compiled ms", "sparse speedup", "compiled speedup"],
            t_rows,
        ),
        "",
    ]
    parts += [
        _table(["check", "result", "detail"], [[c.name, "PASS" if c.passed else "FAIL", c.detail] for c in rep.checks]),
        "",
    ]
    parts += [_table(["output", "path"], [[k, v] for k, v in rep.files.items()]), ""]
    parts += [
        f"Wall time {wall:.0f} s; torch {torch.__version__}; {os.cpu_count()} CPU cores"
        + (f"; {torch.cuda.get_device_name()}" if device == "cuda" else "")
        + "."
    ]
    return "\n".join(parts)

"""The ``diagcompile`` command line. Each subcommand imports its layer lazily, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser"]

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

# name -> (help, add_arguments, run), in the order ``--help`` lists them.
_COMMANDS: dict[str, tuple[str, AddArgs, Run]] = {}


class UsageError(Exception):
    """Raised by a subcommand for arguments that fail validation before any work starts; ``main`` reports it
    as that subcommand's usage error (one line, exit status 2), as argparse does for its own checks."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def command(name: str, help: str, add_arguments: AddArgs) -> Callable[[Run], Run]:
    """Register a subcommand: ``run(args) -> exit code``."""

    def deco(run: Run) -> Run:
        _COMMANDS[name] = (help, add_arguments, run)
        return run

    return deco


# ----------------------------------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--sparsity", type=float, default=0.9, help="DynaDiag's target sparsity (default: 0.9)")
    p.add_argument("--epochs", type=float, default=None, help="training epochs per model (default: 40)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: CUDA when available")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--pool", type=float, default=2.0, help="DynaDiag candidate pool, x k diagonals (default: 2)")
    pool.add_argument("--faithful", action="store_true", help="DynaDiag with all P candidates instead of a pool")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile step")
    p.add_argument("--no-layer-timing", action="store_true", help="skip timing the decode-sized layer")


@command(
    "demo",
    "the whole story on bundled data: train dense and DynaDiag, compile, export, check, time, plot",
    _demo_args,
)
def _demo(args: argparse.Namespace) -> int:
    from diagcompile.demo import DemoConfig, run_demo

    try:
        cfg = DemoConfig(
            out=args.out,
            sparsity=args.sparsity,
            epochs=args.epochs,
            seed=args.seed,
            device=args.device,
            compile=not args.no_compile,
            layer_timing=not args.no_layer_timing,
            pool=None if args.faithful else args.pool,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_demo(cfg)


# ----------------------------------------------------------------------------------------------------
def _device(text: str) -> str:
    """argparse type: a device torch can run on here (an unknown name, or CUDA without one, is a usage error)."""
    from diagcompile.train import check_device

    try:
        return check_device(text, "--device")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the check's random layers and inputs (default: 0)")
    p.add_argument("--device", type=_device, default="cpu", help="device to check on (default: cpu)")


@command("check", "quick self-check: diagonal layers vs a dense construction, forward and gradients", _check_args)
def _check(args: argparse.Namespace) -> int:
    from diagcompile.selfcheck import run_selfcheck

    return run_selfcheck(seed=args.seed, device=args.device)


# ---- export (owner: export layer) ------------------------------------------------------------------
_EXPORT_FORMATS = ("pt2", "onnx", "onnx-plugin")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="CHECKPOINT_OR_MODEL",
        help="a model file written by training (OUT/model.pt), or package.module:factory where factory() returns "
        "(model, example_args)",
    )
    p.add_argument("--format", choices=_EXPORT_FORMATS, default="pt2", help="artifact to write (default: pt2)")
    p.add_argument("--out", required=True, help="output path (.pt2 or .onnx)")
    p.add_argument(
        "--batch", type=_positive_int, default=None, help="batch size for the check (default: two sizes != example)"
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 20)")
    p.add_argument("--static-batch", action="store_true", help="export the example's batch size as a constant")
    p.add_argument(
        "--dynamic-seq",
        action="store_true",
        help="also make dim 1 of every tensor input (>= 2-D) dynamic, e.g. a GPT's sequence length; its range is "
        "what the model allows (torch.export Dim.AUTO); the check runs other lengths",
    )
    p.add_argument("--bare", action="store_true", help="onnx-plugin: no local function (the bare TensorRT file)")
    p.add_argument("--atol", type=float, default=None, help="check tolerance: absolute part (default by dtype)")
    p.add_argument("--rtol", type=float, default=None, help="check tolerance: relative part (default by dtype)")
    p.add_argument("--no-check", action="store_true", help="skip running the artifact against the source model")


def _resolve_export_source(source: str):
    """``(model, example_args)`` from a checkpoint path or a ``package.module:factory`` reference."""
    import importlib
    import os
    import re
    from pathlib import Path

    if Path(source).is_file():
        from diagcompile.train import load_model

        try:
            return load_model(source)
        except Exception as e:  # noqa: BLE001 - any failure to read the checkpoint is a bad SOURCE
            raise ValueError(f"could not load the checkpoint {source}: {type(e).__name__}: {e}") from e
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", source):
        raise ValueError(f"{source!r} is neither an existing checkpoint file nor a package.module:factory reference")
    module_name, _, attr = source.partition(":")
    if os.getcwd() not in sys.path:  # like `python -m`: let a factory in the current directory be found
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} (from {source!r}): {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{source} is not callable; it must return (model, example_args)")
    result = obj()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError(f"{source}() must return (model, example_args), got {type(result).__name__}")
    return result


@command("export", "export a model to .pt2 / ONNX / TensorRT-plugin ONNX and check it against the model", _export_args)
def _export(args: argparse.Namespace) -> int:
    import os

    from diagcompile._files import check_output_path
    from diagcompile.export import ExportCheckError, check_program, export_program, save

    if args.bare and args.format != "onnx-plugin":
        raise UsageError(f"--bare applies to --format onnx-plugin only, not {args.format}")
    if args.opset is not None and args.format == "pt2":
        raise UsageError("--opset applies to the ONNX formats only, not pt2")
    try:
        # before the (slow) export, not at the final rename
        check_output_path(args.out, "--out", ".pt2" if args.format == "pt2" else ".onnx")
        model, example_args = _resolve_export_source(args.source)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dynamic = not args.static_batch
    dynamic_shapes = None
    if args.dynamic_seq:
        from diagcompile.export.program import flatten_inputs, unflatten_inputs, widen_batch_of_one

        if dynamic:  # torch.export fixes a dim whose example size is 1: trace a batch of 2, as export_program does
            leaves, spec = flatten_inputs(example_args)
            example_args = unflatten_inputs(widen_batch_of_one(leaves), spec)[0]
        dynamic_shapes, dynamic = _seq_dynamic_shapes(example_args, dynamic), None
    try:
        if args.format == "pt2":
            ep = export_program(model, example_args, dynamic_batch=dynamic, dynamic_shapes=dynamic_shapes)
            path = save(ep, args.out)
            from diagcompile.export.program import count_diag_nodes

            n = count_diag_nodes(ep)
        else:
            from diagcompile.export.onnx import DEFAULT_OPSET, count_diag_layers, to_onnx

            mode = "plugin" if args.format == "onnx-plugin" else "portable"
            opset = args.opset if args.opset is not None else DEFAULT_OPSET
            path = to_onnx(
                model,
                example_args,
                args.out,
                mode=mode,
                dynamic_batch=dynamic,
                dynamic_shapes=dynamic_shapes,
                opset=opset,
                local_function=not args.bare,
            )
            n = count_diag_layers(path)  # recorded in the file's metadata (the portable form has no layer node)
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dynamic_seq:
        fixed = _static_seq_inputs(path, args.format, example_args)
        if fixed:
            # Dim.AUTO lets the model decide: a model that uses the length as a constant gets it fixed. Such a
            # file is not what was asked for, so it is not left behind.
            os.unlink(path)
            print(
                f"error: --dynamic-seq: the model fixes dim 1 of {', '.join(fixed)} (it uses that size as a "
                f"constant), so it cannot be dynamic; export without --dynamic-seq",
                file=sys.stderr,
            )
            return 2
    size = os.path.getsize(path) / 1e6
    layers = f", {n} diagonal layer(s)"
    print(f"wrote {path} ({args.format}, {size:.2f} MB{layers})")
    if args.no_check:
        return 0
    sizes = (args.batch,) if args.batch is not None else None
    try:
        if args.format == "pt2":
            result = check_program(
                path, model, example_args, sizes, atol=args.atol, rtol=args.rtol, raise_on_failure=False
            )
        else:
            from diagcompile.export.onnx import check_onnx

            result = check_onnx(
                path, model, example_args, sizes, atol=args.atol, rtol=args.rtol, raise_on_failure=False
            )
    except (ExportCheckError, ValueError) as e:
        print(f"CHECK FAILED: {e}")
        return 1
    print(f"check: {result}")
    if not result.passed:
        print("CHECK FAILED")
        return 1
    return 0


def _seq_dynamic_shapes(example_args, dynamic_batch: bool) -> tuple:
    """torch.export spec: dim 1 of every >= 2-D tensor input dynamic (``Dim.AUTO``), dim 0 a shared batch.

    Shaped like ``example_args``: a list / tuple / dict argument gets a list / tuple / dict of specs.
    """
    import torch
    from torch.export import Dim
    from torch.utils import _pytree as pytree

    args = example_args if isinstance(example_args, tuple) else (example_args,)
    batch = Dim("batch")

    def spec(a):
        if isinstance(a, torch.Tensor) and a.dim() >= 2:
            return {**({0: batch} if dynamic_batch else {}), 1: Dim.AUTO}
        if isinstance(a, torch.Tensor) and a.dim() == 1 and dynamic_batch:
            return {0: batch}
        return None

    return tuple(pytree.tree_map(spec, a) for a in args)


def _static_seq_inputs(path, fmt: str, example_args) -> list[str]:
    """The names (``example_args[1]['ids']``) of the >= 2-D tensor inputs whose dim 1 the artifact at ``path``
    fixed (the same dynamic-dim reading the artifact checks use)."""
    import torch

    from diagcompile.export.program import flatten_inputs, input_names

    leaves, spec = flatten_inputs(example_args)
    if fmt == "pt2":
        from diagcompile.export import load
        from diagcompile.export.program import program_dynamic_dims

        exprs, _ = program_dynamic_dims(load(path), leaves)
    else:
        import onnx

        from diagcompile.export.onnx import input_dynamic_dims, input_shapes

        exprs = input_dynamic_dims(input_shapes(onnx.load(path, load_external_data=False)), leaves)
    names = input_names(spec)
    return [
        names[i] for i, a in enumerate(leaves) if isinstance(a, torch.Tensor) and a.dim() >= 2 and (i, 1) not in exprs
    ]


# ---- end export -------------------------------------------------------------------------------------
# ---- train / sweep (diagcompile/train.py, diagcompile/sweep.py) -------------------------------------
_TASKS = ("digits-vit", "chars-gpt")
# diagcompile.train.METHODS, literal so the CLI does not import the harness to build its parser (a test checks)
_METHODS = ("dense", "dynadiag", "diagheur", "rigl", "srigl", "nm-srste", "nm-mask-decay", "nm-structure-decay")


def _kv(text: str) -> tuple[str, object]:
    """``key=value`` with the value parsed as JSON when it can be (numbers, true/false, null), else a string."""
    import json

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _pool(text: str) -> float | None:
    if text.lower() in ("none", "faithful", "all"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pool takes a number c >= 1 or 'faithful', got {text!r}") from None


def _run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by train and sweep (everything but method/sparsity/seed/out)."""
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="training length in epochs (digits default: 40)")
    length.add_argument("--steps", type=int, help="training length in optimizer steps (chars default: 800)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--batch-size", type=int, help="examples (digits) / blocks (chars) per step (default: 64 / 32)")
    p.add_argument(
        "--lr",
        type=float,
        help="peak learning rate (AdamW; warm-up then cosine). Default: the task's, digits 1e-3 / chars 8e-3; "
        "dynadiag and diagheur 2e-2 / 4e-2 (chars softmax_clamp 8e-2)",
    )
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on weights (default: digits 0.05, chars 0.1)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default: each epoch / 100 steps)")
    p.add_argument("--tune", action="store_true", help="evaluate on a held-out part of train (for tuning)")
    p.add_argument(
        "--dst",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra DSTConfig field (MaskConfig for the mask baselines; repeat)",
    )
    p.add_argument(
        "--model", type=_kv, action="append", default=[], metavar="KEY=VALUE", help="model config override (repeat)"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads per run (default 1: these models are too small to gain from more, and one thread "
        "does not stall on a busy machine; use sweep --jobs for parallelism)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=_TASKS, help="bundled task: digits-vit or chars-gpt")
    p.add_argument("--method", default="dense", choices=_METHODS, help="training method (default: dense)")
    p.add_argument(
        "--sparsity",
        type=float,
        help="target sparsity of the converted layers (default: 0.9; 1 - N/M with --dst nm_n=N --dst nm_m=M)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and DST (default: 0)")
    p.add_argument("--out", required=True, help="folder for checkpoint.pt, model.pt, metrics.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--relaxation", choices=("threshold", "softmax_clamp"), help="dynadiag relaxed top-k")
    p.add_argument("--pool", type=_pool, help="dynadiag candidate pool c (c*k candidates) or 'faithful' (all P)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (default: --eval-every)")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel CPU workers (torch.distributed gloo)")
    p.add_argument("--offsets-from", help="model.pt of an earlier run: start from its diagonals (diagheur)")
    _run_options(p)


def _common_train_kwargs(args: argparse.Namespace) -> dict:
    kw: dict = {}
    for name in ("epochs", "steps", "batch_size", "lr", "weight_decay", "eval_every"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.device != "cpu":
        kw["device"] = args.device
    if args.tune:
        kw["tune"] = True
    if args.dst:
        kw["dst"] = dict(args.dst)
    if args.model:
        kw["model"] = dict(args.model)
    return kw


def _nm_sparsity(given: float | None, dst: dict) -> float | None:
    """The sparsity an N:M fixed with ``--dst nm_n=N --dst nm_m=M`` trains (and so records), ``1 - N/M``, or
    ``None`` without one: it is the default then, and a different ``--sparsity`` is refused. (Invalid N, M are
    left to ``MaskConfig``, which names the field.)"""
    n, m = dst.get("nm_n"), dst.get("nm_m")
    valid = all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) and 1 <= n <= m
    if not valid:
        return None
    implied = 1.0 - n / m
    if given is not None and not math.isclose(given, implied, rel_tol=0.0, abs_tol=1e-6):
        raise UsageError(
            f"--sparsity {given:g} contradicts --dst nm_n={n} --dst nm_m={m}, which train every layer at sparsity "
            f"1 - {n}/{m} = {implied:.6g}: leave --sparsity out (it then follows from N:M), or drop nm_n to let "
            f"--sparsity pick N"
        )
    return implied


@command(
    "train", "train a model on bundled data (digits-vit, chars-gpt) dense or with dynamic sparse training", _train_args
)
def _train(args: argparse.Namespace) -> int:
    import json

    import torch

    from diagcompile.train import (
        METRICS_NAME,
        MODEL_NAME,
        CheckpointReadError,
        Interrupted,
        OutBusyError,
        SetupError,
        TrainConfig,
        check_out,
        result_summary,
        saved_checkpoint,
        train,
    )

    torch.set_num_threads(args.threads)
    kw = _common_train_kwargs(args)
    if args.ckpt_every is not None:
        kw["ckpt_every"] = args.ckpt_every
    if args.nproc != 1:
        kw["nproc"] = args.nproc
    if args.offsets_from:
        kw["offsets_from"] = args.offsets_from
    if args.method == "dense" and args.sparsity is not None:
        raise UsageError("--sparsity applies to the sparse methods, not dense")
    from diagcompile.dst.mask_config import NM_METHODS

    # nm_n / nm_m given to another method are refused by its config, by name.
    implied = _nm_sparsity(args.sparsity, kw.get("dst", {})) if args.method in NM_METHODS else None
    sparsity = implied if implied is not None else 0.9 if args.sparsity is None else args.sparsity
    if os.environ.get("WORLD_SIZE", "1") != "1" and "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun would start that many copies of the whole job, each writing the same --out.
        raise UsageError(
            f"diagcompile train starts its own data-parallel processes: run it once with --nproc "
            f"{os.environ['WORLD_SIZE']} instead of under torchrun"
        )
    # Everything the arguments decide is checked here, before training; an error from training itself is not
    # a usage error and keeps its traceback.
    try:
        cfg = TrainConfig(
            task=args.task,
            method=args.method,
            sparsity=sparsity,
            seed=args.seed,
            out=args.out,
            resume=args.resume,
            quiet=args.quiet,
            relaxation=args.relaxation,
            pool=args.pool,
            **kw,
        )
        out_existed = os.path.isdir(args.out)
        check_out(cfg)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    try:
        m = train(cfg)
    except (SetupError, CheckpointReadError, OutBusyError) as e:
        # The model or the run length rules the arguments out, the checkpoint that --out names cannot be read
        # (found when loading it whole, which check_out's lazy read cannot see), or another run is writing to
        # --out (found once train holds it): still a usage error, as check_out's refusals are.
        if not out_existed:
            with contextlib.suppress(OSError):
                os.rmdir(args.out)  # only if check_out made it and nothing was written
        raise UsageError(str(e)) from None
    except Interrupted as e:
        print(
            f"diagcompile train: stopped at step {e.step}/{e.total}; the checkpoint is saved in {args.out}: "
            "run the same command with --resume to continue",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, in a step, an evaluation or a checkpoint write
        print(f"diagcompile train: stopped at once; {saved_checkpoint(args.out)}", file=sys.stderr)
        return 130
    key = m["metric"]
    params = m["params"]
    summary = {
        "final": m["final"][key],
        "best": m["best"],
        "train_s": round(m["time"]["train_s"], 1),
        # The count to compare across methods: a mask method's final model keeps its pruned weights as zeros of
        # dense matrices, so its total is the dense model's, while a diagonal method's compact layers hold only
        # the weights they keep (there the two agree).
        "final_params_kept": params["final_model_kept"],
        "final_params_total": params["final_model"],
    }
    print(f"{args.task} {args.method}: {result_summary(m)}  {json.dumps(summary)}")
    print(f"wrote {args.out}/{METRICS_NAME}, {args.out}/{MODEL_NAME}")
    return 0


def _csv(kind: Callable[[str], object]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(t.strip()) for t in text.split(",") if t.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=_TASKS, help="bundled task: digits-vit or chars-gpt")
    p.add_argument(
        "--methods",
        type=_csv(str),
        default=("dense", "dynadiag", "dynadiag-softmax", "diagheur"),
        help="comma-separated variants: dense, dynadiag[-softmax][-pool<c>], diagheur; mask baselines: rigl, srigl, "
        "nm-srste, nm-mask-decay, nm-structure-decay",
    )
    p.add_argument(
        "--sparsities",
        type=_csv(float),
        default=(0.5, 0.8, 0.9, 0.95),
        help="comma-separated (default: 0.5,0.8,0.9,0.95)",
    )
    p.add_argument("--seeds", type=_positive_int, default=5, help="number of seeds (0..N-1)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (default: 0)")
    p.add_argument("--out", required=True, help="folder: runs/*.json and the tables/plot")
    p.add_argument("--name", default="results", help="file stem of the tables and plot (default: results)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument(
        "--variant-dst",
        action="append",
        default=[],
        metavar="VARIANT:KEY=VALUE",
        help="DSTConfig field for one variant only (repeat)",
    )
    p.add_argument(
        "--variant-train",
        action="append",
        default=[],
        metavar="VARIANT:KEY=VALUE",
        help="training option (TrainConfig field, e.g. lr) for one variant only (repeat)",
    )
    p.add_argument("--notes", help="markdown file appended to the results table")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild tables/plot from existing runs")
    _run_options(p)


@command("sweep", "run methods x sparsities x seeds, write a results table (CSV, markdown) and a plot", _sweep_args)
def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diagcompile.sweep import SweepConfig, SweepInterrupted, aggregate, check_finished_runs, plan_runs, run_sweep

    per_variant: dict[str, dict[str, dict]] = {"dst": {}, "train": {}}
    for what, items in (("dst", args.variant_dst), ("train", args.variant_train)):
        for item in items:
            variant, sep, kv = item.partition(":")
            if not sep:
                raise UsageError(f"--variant-{what} expects VARIANT:KEY=VALUE, got {item!r}")
            try:
                k, v = _kv(kv)
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"--variant-{what}: {e}") from None
            key = k.replace("-", "_")
            per_variant[what].setdefault(variant, {})[key] = v
    # The grid's every run config is built (validated) here, before any run starts.
    try:
        cfg = SweepConfig(
            task=args.task,
            out=args.out,
            methods=tuple(args.methods),
            sparsities=tuple(args.sparsities),
            seeds=tuple(range(args.seed_start, args.seed_start + args.seeds)),
            name=args.name,
            jobs=args.jobs,
            threads=args.threads,
            train=_common_train_kwargs(args),
            variant_dst=per_variant["dst"],
            variant_train=per_variant["train"],
            quiet=args.quiet,
            notes=Path(args.notes).read_text() if args.notes else "",
        )
        plan_runs(cfg)
    except (TypeError, ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    import torch

    torch.set_num_threads(args.threads)
    from diagcompile.train import SetupError

    try:
        if args.aggregate_only:
            check_finished_runs(cfg)  # tables of runs trained otherwise would be labelled with this command's grid
            files = aggregate(cfg)
            print("\n".join(f"wrote {p}" for p in files.values()))
            return 0
        res = run_sweep(cfg)
    except (SetupError, FileNotFoundError) as e:  # the grid cannot run here, or has no results yet
        raise UsageError(str(e)) from None
    except SweepInterrupted as e:
        print(f"diagcompile {e}", file=sys.stderr)  # "diagcompile sweep interrupted: ..."
        return 130
    print(f"sweep: ran {res['ran']}, skipped {res['skipped']} (done before), {res['seconds']:.0f} s")
    print("\n".join(f"wrote {p}" for p in res["files"].values()))
    return 0


# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diagcompile", description="diagonal-sparse networks: train, run, ship")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add_args, _) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(_command_parser=p)  # for main: a UsageError is reported by its subcommand's parser
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_COMMANDS[args.command][2](args) or 0)
    except KeyboardInterrupt:  # one the command does not handle itself: while starting up, say
        print(f"diagcompile {args.command}: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        args._command_parser.error(str(e))  # prints usage and "diagcompile <command>: error: ...", exits 2
        raise  # unreachable: error() exits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

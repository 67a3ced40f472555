"""The ``diagcompile`` command line. Each subcommand imports its layer lazily, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser"]

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

# name -> (help, add_arguments, run), in the order ``--help`` lists them.
_COMMANDS: dict[str, tuple[str, AddArgs, Run]] = {}


def command(name: str, help: str, add_arguments: AddArgs) -> Callable[[Run], Run]:
    """Register a subcommand: ``run(args) -> exit code``."""

    def deco(run: Run) -> Run:
        _COMMANDS[name] = (help, add_arguments, run)
        return run

    return deco


# ----------------------------------------------------------------------------------------------------
def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device to check on (default: cpu)")


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
        help="a training checkpoint file, or package.module:factory where factory() returns (model, example_args)",
    )
    p.add_argument("--format", choices=_EXPORT_FORMATS, default="pt2", help="artifact to write (default: pt2)")
    p.add_argument("--out", required=True, help="output path (.pt2 or .onnx)")
    p.add_argument("--batch", type=int, default=None, help="batch size for the check (default: two sizes != example)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 20)")
    p.add_argument("--static-batch", action="store_true", help="export the example's batch size as a constant")
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
        try:
            from diagcompile.train import load_model  # type: ignore[import-not-found]
        except ImportError as e:
            raise ValueError(
                f"{source} is a file, but loading a training checkpoint needs diagcompile.train.load_model, which "
                f"this installation does not have ({e}); pass package.module:factory instead"
            ) from None
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

    from diagcompile.export import ExportCheckError, check_program, export_program, save

    try:
        model, example_args = _resolve_export_source(args.source)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dynamic = not args.static_batch
    try:
        if args.format == "pt2":
            ep = export_program(model, example_args, dynamic_batch=dynamic)
            path = save(ep, args.out)
            from diagcompile.export.program import count_diag_nodes

            n = count_diag_nodes(ep)
        else:
            from diagcompile.export.onnx import DEFAULT_OPSET, count_plugin_nodes, to_onnx

            mode = "plugin" if args.format == "onnx-plugin" else "portable"
            opset = args.opset if args.opset is not None else DEFAULT_OPSET
            path = to_onnx(
                model,
                example_args,
                args.out,
                mode=mode,
                dynamic_batch=dynamic,
                opset=opset,
                local_function=not args.bare,
            )
            n = count_plugin_nodes(path) if mode == "plugin" else None
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = os.path.getsize(path) / 1e6
    layers = f", {n} diagonal layer node(s)" if n is not None else ""
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


# ---- end export -------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diagcompile", description="diagonal-sparse networks: train, run, ship")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add_args, _) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(_COMMANDS[args.command][2](args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

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

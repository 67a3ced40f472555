"""CPU: compiled diagonal layers as op calls vs inlined as plain ops (``passes/inline.py``), and the edges of
``ops.dispatch.inline_in_graph``.

    python benchmarks/bench_cpu_inline.py            # -> results/cpu_inline_layers.md, results/cpu_inline_vit.md
    python benchmarks/bench_cpu_inline.py --smoke    # a few shapes, one round: end-to-end check of this script

Layers (1 thread, ``dynamic=False``): one 90%-sparse ``DiagLinear`` compiled three ways, each a separate
``torch.compile`` of the same weights: ``op`` (the backend with ``inline_small=False``: one op call per layer),
``inline`` (``diag_linear_composite`` in the graph, whatever the rule says: what inlining would cost; the
backend also checks the offsets inputs before each call, ~1 us each when unchanged, left out here), and the
dense ``nn.Linear`` of the same shape compiled by Inductor. The ``rule`` column is what the backend picks.

ViT (``--threads``, default 2, as the demo): the demo's digits ViT, 90% sparse by top-k (``sparsify_``),
compiled the demo's way (``diagcompile.compile(fullgraph=True)``, then batches 1, 7 and 64, so later calls
run the dynamic-batch graph) with and without ``inline_small``, against the dense model eager and compiled.

Times: interleaved medians of wall time, best of the rounds (``common.compare_ms``), in microseconds / ms.
"""

from __future__ import annotations

import argparse
import copy
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare_ms, write_results  # noqa: E402

import diagcompile  # noqa: E402
from diagcompile import DiagLinear, DiagSparsityConfig, sparsify_  # noqa: E402
from diagcompile.models import ViTConfig, build_model, sparse_filter  # noqa: E402
from diagcompile.ops import dispatch  # noqa: E402
from diagcompile.ops.diag_linear import diag_linear_composite  # noqa: E402

LAYERS = [(64, 64), (64, 256), (256, 64), (128, 128), (128, 512), (512, 128), (256, 256), (512, 512), (1024, 1024)]
ROWS = (1, 17, 128, 1024)


class _Inlined(nn.Module):
    """The layer as ``diag_linear_composite``: what the backend's inlining puts in the graph."""

    def __init__(self, layer: DiagLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        return diag_linear_composite(x, m.values, m.offsets, m.bias, m.out_features)


def bench_layers(layers: list[tuple[int, int]], rows: tuple[int, ...], rounds: int) -> list[dict]:
    out = []
    for n_in, n_out in layers:
        torch.manual_seed(0)
        layer = DiagLinear(n_in, n_out, sparsity=0.9).eval()
        dense = nn.Linear(n_in, n_out).eval()
        for M in rows:
            torch._dynamo.reset()
            fns = {
                "op": diagcompile.compile(layer, dynamic=False, inline_small=False),
                "inline": torch.compile(_Inlined(layer), dynamic=False),
                "dense": torch.compile(dense, dynamic=False),
            }
            x = torch.randn(M, n_in)
            with torch.no_grad():
                torch.testing.assert_close(fns["inline"](x), fns["op"](x), rtol=1e-4, atol=1e-5)
                us = {
                    k: 1e3 * v for k, v in compare_ms({k: (lambda f=f: f(x)) for k, f in fns.items()}, rounds).items()
                }
            rule = dispatch.inline_in_graph("cpu", torch.float32, M, n_out, n_in)
            out.append(
                {
                    "layer": f"{n_in}->{n_out}",
                    "M": M,
                    "rule": "inline" if rule else "op",
                    "op us": us["op"],
                    "inline us": us["inline"],
                    "dense nn.Linear us": us["dense"],
                    "inline / op": us["inline"] / us["op"],
                }
            )
            print(out[-1], flush=True)
    return out


def _own_frame(model: nn.Module, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` called from a code object of its own. Dynamo keeps its compiled graphs per code object and
    checks a call against every entry in turn: compiled side by side, the models would share
    ``DigitsViT.forward``'s entries, and each call would pay (or, with equal guards, take) the others' first.
    One frame each is what a process that compiles one model sees, as the demo does."""

    def call(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    code = call.__code__.replace(co_name=f"call_{i}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


def bench_vit(batches: tuple[int, ...], rounds: int) -> list[dict]:
    torch.manual_seed(0)
    dense = build_model(ViTConfig()).eval()
    sparse = sparsify_(copy.deepcopy(dense), DiagSparsityConfig(sparsity=0.9), filter_fn=sparse_filter).eval()
    torch._dynamo.reset()
    fns = {
        "dense eager": dense,
        "dense compiled": torch.compile(_own_frame(copy.deepcopy(dense), 0), fullgraph=True),
        "sparse compiled, op calls": diagcompile.compile(
            _own_frame(copy.deepcopy(sparse), 1), fullgraph=True, inline_small=False
        ),
        "sparse compiled, inlined": diagcompile.compile(_own_frame(copy.deepcopy(sparse), 2), fullgraph=True),
    }
    shape = dense.example_input(1)[0].shape[1:]
    with torch.no_grad():
        for b in (1, 7, 64):  # the demo's check batches: the later calls run the dynamic-batch graphs
            x = torch.randn(b, *shape)
            ref = sparse(x)
            for name, f in fns.items():
                if name.startswith("sparse"):
                    torch.testing.assert_close(f(x), ref, rtol=1e-4, atol=1e-5)
        out = []
        for b in batches:
            x = torch.randn(b, *shape)
            ms = compare_ms({k: (lambda f=f: f(x)) for k, f in fns.items()}, rounds)
            row = {"batch": b, **{f"{k} ms": v for k, v in ms.items()}}
            row["inlined vs dense eager"] = ms["dense eager"] / ms["sparse compiled, inlined"]
            row["op calls vs dense eager"] = ms["dense eager"] / ms["sparse compiled, op calls"]
            out.append(row)
            print(row, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few shapes, one round")
    ap.add_argument("--threads", type=int, default=2, help="threads of the ViT part (the layers run on 1)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds, the best counts (default: 5)")
    ap.add_argument("--part", choices=("all", "layers", "vit"), default="all", help="which part to run")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    args = ap.parse_args()
    rounds = 1 if args.smoke else args.rounds
    if args.part in ("all", "layers"):
        torch.set_num_threads(1)
        layers = bench_layers(LAYERS[:2] if args.smoke else LAYERS, (1, 128) if args.smoke else ROWS, rounds)
        edges = (
            f"Rule (ops/dispatch.py): inline when N_out*N_in <= {dispatch.INLINE_MAX_WEIGHT} and "
            f"M*N_out*N_in <= {dispatch.INLINE_MAX_WORK}; with a dynamic M, when N_out*N_in <= "
            f"{dispatch.INLINE_MAX_WEIGHT_DYNAMIC}. 90% sparse, float32, 1 thread, dynamic=False, microseconds."
        )
        title = "Compiled diagonal layers: op call vs inlined"
        print(write_results("cpu_inline_layers", layers, title, edges, args.out))
    if args.part == "layers":
        return
    torch.set_num_threads(args.threads)
    vit = bench_vit((1, 16) if args.smoke else (1, 16, 256), rounds)
    note = (
        f"The demo's digits ViT (width 64, 17 tokens), 90% sparse (top-k), {args.threads} threads, "
        "compiled as the demo does (batches 1, 7, 64 first). Speedups: dense eager time / sparse time."
    )
    print(write_results("cpu_inline_vit", vit, "Digits ViT compiled: op calls vs inlined small layers", note, args.out))


if __name__ == "__main__":
    main()

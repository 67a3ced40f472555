"""Per-call cost of small diagonal layers on the CPU: the Python layers around the kernel.

    python benchmarks/bench_call_cost.py --label HEAD              # one line per measurement, 1 thread

Small layers at small batch are where the call path (validation, routing, dispatch) rather than the kernel
decides the time, so a change to that path is measured here: run it on two trees in the same session,
interleaved (the machine is shared), and compare. Measured, for 90%-sparse square layers:

* ``DiagLinear`` in eager mode (its direct path around the dispatcher);
* the raw op ``torch.ops.diagcompile.diag_linear`` (what compiled graphs and ``.pt2`` programs call), no grad;
* the demo's digits ViT at batch 1, sparsified, compiled with the ``diagcompile`` backend, and as a ``.pt2``
  program's module: twelve diagonal layers a call.

Reported: the best of 7 repeats of the mean over many calls, in microseconds of this process's CPU time
(``--clock wall`` for wall time): with one thread that is the call's cost, and other work on a shared machine
inflates it much less than wall time.
"""

from __future__ import annotations

import argparse
import time

import torch

from diagcompile import DiagLinear

_clock = time.process_time  # --clock

SHAPES = ((64, 1), (128, 16), (128, 128))  # (width, batch): the demo ViT at batch 1, the chars GPT


def measure(width: int, batch: int, repeats: int = 7) -> tuple[float, float]:
    """``(forward us, forward + backward us)`` per call of a 90%-sparse ``width x width`` layer."""
    layer = DiagLinear(width, width, sparsity=0.9)
    x = torch.randn(batch, width)
    xg = x.clone().requires_grad_()
    for _ in range(300):
        layer(x)
    fwd = both = float("inf")
    for _ in range(repeats):
        t = _clock()
        for _ in range(2000):
            layer(x)
        fwd = min(fwd, (_clock() - t) / 2000 * 1e6)
        t = _clock()
        for _ in range(300):
            layer(xg).sum().backward()
        both = min(both, (_clock() - t) / 300 * 1e6)
    return fwd, both


def measure_op(width: int, batch: int, repeats: int = 7) -> float:
    """Microseconds per no-grad call of the raw op on a 90%-sparse ``width x width`` layer."""
    layer = DiagLinear(width, width, sparsity=0.9)
    x = torch.randn(batch, width)
    args = (x, layer.values.detach(), layer.offsets, layer.bias.detach(), width)
    op = torch.ops.diagcompile.diag_linear.default
    with torch.no_grad():
        return _best(lambda: op(*args), 2000, repeats)


def measure_vit(repeats: int = 7) -> tuple[float, float]:
    """``(compiled us, .pt2 module us)`` per batch-1 call of the demo's ViT, sparsified to 90%."""
    import diagcompile
    from diagcompile import DiagSparsityConfig, sparsify_
    from diagcompile.export import export_program
    from diagcompile.models import DigitsViT, ViTConfig, sparse_filter

    model = sparsify_(DigitsViT(ViTConfig()).eval(), DiagSparsityConfig(sparsity=0.9), filter_fn=sparse_filter)
    (x,) = model.example_input(batch=1)
    with torch.no_grad():
        compiled = diagcompile.compile(model)
        compiled(x)
        program = export_program(model, (x,)).module()
        return _best(lambda: compiled(x), 500, repeats), _best(lambda: program(x), 500, repeats)


def _best(fn, calls: int, repeats: int) -> float:
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = _clock()
        for _ in range(calls):
            fn()
        best = min(best, (_clock() - t) / calls * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="this tree")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args()
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for width, batch in SHAPES:
        fwd, both = measure(width, batch)
        op = measure_op(width, batch)
        print(
            f"{args.label} {width}x{width} M={batch}: DiagLinear fwd {fwd:.1f} us, fwd+bwd {both:.1f} us; "
            f"raw op (no grad) {op:.1f} us",
            flush=True,
        )
    compiled, program = measure_vit()
    print(f"{args.label} digits ViT batch 1: compiled {compiled:.1f} us, .pt2 module {program:.1f} us", flush=True)


if __name__ == "__main__":
    main()

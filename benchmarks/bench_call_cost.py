"""Per-call cost of a small ``DiagLinear`` in eager mode on the CPU: the Python layers around the kernel.

    python benchmarks/bench_call_cost.py --label HEAD              # one line per shape, wall time, 1 thread

Small layers at small batch are where the eager call path (validation, routing, dispatch) rather than the
kernel decides the time, so a change to that path is measured here: run it on two trees in the same session,
interleaved (the machine is shared), and compare. Reported: the best of 7 repeats of the mean over 2000
forward calls, and of 300 forward + backward calls, in microseconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from diagcompile import DiagLinear

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
        t = time.perf_counter()
        for _ in range(2000):
            layer(x)
        fwd = min(fwd, (time.perf_counter() - t) / 2000 * 1e6)
        t = time.perf_counter()
        for _ in range(300):
            layer(xg).sum().backward()
        both = min(both, (time.perf_counter() - t) / 300 * 1e6)
    return fwd, both


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="this tree")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for width, batch in SHAPES:
        fwd, both = measure(width, batch)
        print(f"{args.label} {width}x{width} M={batch}: fwd {fwd:.1f} us, fwd+bwd {both:.1f} us", flush=True)


if __name__ == "__main__":
    main()

"""The CPU masked gather, both kernels: output-tiled vs diagonal-major (ops/cpu_kernels.py), float32, 90%.

    python benchmarks/bench_cpu_masked_gather.py     # -> benchmarks/results/cpu_masked_gather.{csv,md} (~2 min)

The masked gather is the forward of a tall layer and the input gradient of a wide one. ``ops/cpu_kernels.py``
runs it diagonal-major (``_masked_scatter_kernel``) on narrow or clearly rectangular layers up to
``_SCATTER_MAX_L`` outputs and output-tiled (``_masked_gather_kernel``) elsewhere (``_masked_gather_plan``);
this script is the measurement behind that choice. Each kernel is
called directly with its own tiling (``_masked_gather_plan``'s two branches), at 1 thread (timed by the
thread's CPU time, immune to descheduling) and at 2 threads (wall clock) where the op would use 2.
Weights are hot: this compares the two loop structures, not the memory system. ``bit_identical``: the
two outputs are equal bit for bit.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import median_cpu_ms  # noqa: E402
from common import median_time_ms, write_results  # noqa: E402

from diagcompile.ops import cpu_kernels as K  # noqa: E402
from diagcompile.testing import random_offsets  # noqa: E402

#: (D, L): the bundled models' narrow layers, ViT-B's, a Llama MLP's (L = 14336), and square ones.
SHAPES = [(64, 192), (64, 256), (128, 512), (256, 1024), (768, 3072), (4096, 14336)]
SHAPES += [(64, 64), (128, 128), (256, 256), (768, 768), (1024, 1024)]
MS = (1, 16, 128, 1024, 4096)


def _median_ms(fn, threads: int, reps: int) -> float:
    # 1 thread: the thread's CPU time (immune to descheduling); 2 threads: wall clock.
    if threads == 1:
        return median_cpu_ms(fn, warmup=2, reps=reps)
    return median_time_ms(fn, warmup=2, reps=reps, min_time_s=0.0)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rows = []
    for D, L in SHAPES:
        k = math.ceil(0.1 * L)
        off = random_offsets(L, D, k, g).numpy().astype(np.int32)
        v = torch.randn(k, D, generator=g).numpy()
        bias = torch.randn(L, generator=g).numpy()
        for M in MS if L <= 4096 else MS[:2]:
            a = torch.randn(M, D, generator=g).numpy()
            for threads in (1, 2):
                if threads > 1 and M * k * D // K._MIN_PARALLEL_WORK < 2:
                    continue  # the op runs a call this small on one thread (K._num_threads)
                outs = {}
                times = {}
                tilings = {"tiled": K._gather_tiling(M, L, threads), "diagonal_major": K._scatter_tiling(M, L, threads)}
                kernels = {"tiled": K._masked_gather_kernel, "diagonal_major": K._masked_scatter_kernel}
                for name in ("tiled", "diagonal_major", "tiled", "diagonal_major"):  # interleaved, best of two
                    tb, mb, n = tilings[name]
                    out = outs.setdefault(name, np.empty((M, L), np.float32))

                    def call(kernel=kernels[name], out=out, tb=tb, mb=mb, n=n):
                        K._run(kernel, (a, v, off, bias, out, tb, mb), n, threads)

                    reps = 30 if M * k * D < 50_000_000 else 5
                    times[name] = min(times.get(name, math.inf), _median_ms(call, threads, reps))
                chosen = K._masked_gather_plan(M, L, D, threads)[0]
                rows.append(
                    {
                        "D": D,
                        "L": L,
                        "k": k,
                        "M": M,
                        "threads": threads,
                        "tiled_ms": times["tiled"],
                        "diagonal_major_ms": times["diagonal_major"],
                        "diagonal_major_x": times["tiled"] / times["diagonal_major"],
                        "bit_identical": bool(np.array_equal(outs["tiled"], outs["diagonal_major"])),
                        "chosen": "diagonal_major" if chosen is K._masked_scatter_kernel else "tiled",
                    }
                )
                print(rows[-1], flush=True)
    md = write_results(
        "cpu_masked_gather",
        rows,
        "CPU masked gather: output-tiled vs diagonal-major kernel, float32, 90% sparsity",
        notes="`diagonal_major_x` = tiled time / diagonal-major time (above 1: diagonal-major faster). "
        "`chosen` = what `_masked_gather_plan` runs for this (M, L). 1 thread: the thread's CPU time; "
        "2 threads: wall clock, only where the op would use 2 (`_MIN_PARALLEL_WORK`). Hot weights.",
    )
    print(f"wrote {md}")


if __name__ == "__main__":
    main()

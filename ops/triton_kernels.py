"""Triton kernels for the diagonal-sparse op: the CUDA kernel provider of ``ops/dispatch.py``.

Imported lazily (only when a CUDA tensor reaches a ``kernel`` path, or by tests that run the kernels on CPU
tensors under ``TRITON_INTERPRET=1``). The public surface is the provider interface that dispatch calls,

* ``supports(dtype)``                                            float32 / float16 / bfloat16
* ``forward(x2, values, offsets, bias, out_features)``          ``(M, N_in) -> (M, N_out)``
* ``input_grad(dy2, values, offsets, in_features)``             ``(M, N_out) -> (M, N_in)``
* ``values_grad(dy2, x2, offsets)``                             ``-> (k, D)``

plus the dense-path helpers ``to_dense`` / ``extract_diagonals`` (one launch each, used by the ``dense`` path
of ``ops/diag_linear.py`` on CUDA) and ``aot_forward_spec`` (what the TensorRT plugin compiles ahead of time).
Outputs are fresh tensors in the input dtype; products accumulate in float32.

Design note (reasoned from the roofline and read off the sm_90 SASS; nothing here was timed on a GPU)
=======================================================================================================
Notation: ``L = P = max(N_out, N_in)`` (long side, wraps), ``D = min(N_out, N_in)``, ``k`` diagonals,
``M`` rows. Useful work is ``2·M·k·D`` FLOPs for each of forward, dx and dV. Three primitives
(``ops/reference.py``) cover all six products, so there are three main kernels:

=============  =====================================================  ===============================
kernel         computes                                               used for
=============  =====================================================  ===============================
``_gather``    ``out[m,t] = b[t] + Σ_j V[j,t]·a[m,(t+o_j) mod L]``    wide fwd (a=x), tall dx (a=dy)
``_mgather``   ``out[m,r] = b[r] + Σ_j [c<D]·V[j,c]·a[m,c]``,         tall fwd (a=x), wide dx (a=dy)
               ``c = (r-o_j) mod L``
``_sddmm``     ``dV[j,t] = Σ_m a[m,t]·b[m,(t+o_j) mod L]``            dV, both orientations
=============  =====================================================  ===============================

All are *output-stationary*: each output element is owned by one program (or one split of it, reduced in
a fixed order by ``_split_reduce``), so results are deterministic; no atomics anywhere.

H100 SXM budget: ~3.35 TB/s HBM, 132 SMs x 4 warp-instructions/clock x ~1.75 GHz ≈ 30e12 thread-
instructions/s. With scattered offsets there is no tensor-core formulation of the diagonal product (each
output is a sum of *shifted* elementwise products), so the kernels run on the FMA pipes, and every FMA
needs one gathered element of ``a``: the cost is instructions per FMA (``benchmarks/kernel_sass.py``
measures it in the compiled hot loop, ``benchmarks/results/kernel_sass.md``).

Structure (each choice was checked in the SASS; the first straightforward version spent ~16
instructions per FMA and laid its lanes across diagonals, i.e. uncoalesced):

* **Lanes and warps along the output columns**, so each thread owns *every* row (``BLOCK_M``) and
  diagonal (``BLOCK_J``) of its columns: the per-(diagonal, column) address and values work is shared by
  its rows, and the per-chunk reductions (``max`` of the chunk's offsets) stay inside a thread.
* **Compile-time row strides** (``STRIDE_AM`` constexpr): the ``BLOCK_M`` loads of one column share one
  address and use immediate offsets; column arithmetic in int64 so constant parts fold the same way.
* **Unmasked hot path, two-segment slow path.** A chunk whose windows do not wrap past ``L`` (almost
  all of them), with full rows and diagonals, loads with no mask and no modulo. Otherwise two masked,
  still contiguous segments: columns ``o + t < L`` and ``o + t - L`` (one compare, never ``%``: Triton's
  integer ``%`` is C-style and costs ~20 instructions). Row tails use an overlapping last row tile
  (recomputed bit-identically) instead of masks whenever ``M >= BLOCK_M``.
* ``_mgather`` (tall forward) skips a whole chunk with one uniform branch when no diagonal of it reaches
  the output tile (only ``≈ D/L`` of (row, diagonal) pairs are valid); split-K takes chunks interleaved
  so every split sees the same mix of hitting and skipped chunks.

Result, hot loop, bf16 (``kernel_sass.md``): ``_gather`` 3.7 (M >= 32) / 4.4-4.9 (M = 16), ``_mgather``
4.0-4.2 / 5.1-5.4, ``_sddmm`` 4.4 instructions per FMA, no spills; decode (M = 1) 8-10, 16 on the ViT
shapes (DRAM- or launch-bound there, see below).

Regimes and predictions (bf16, 90% sparse unless stated; ``dense`` = cuBLAS ``F.linear``; UNVERIFIED):

1. **Decode, M <= 8: bound by the bytes of ``values``** (1/10 of dense at 90%). 4096 <-> 14336: 11.7 MB
   -> ≈ 3.9 µs at ~3 TB/s; issue ≈ 5.9e6 FMAs x 9 / 30e12 ≈ 1.8 µs, hidden. The output (4096 or 14336
   columns) is far too narrow to fill 132 SMs, so **split-K** over diagonals (fp32 partials, at most 1/8 of
   the values bytes) and ``_split_reduce`` (partials read 4 splits at a time, bias, cast). Predicted
   ≈ 5-6 µs including the second launch vs dense ≈ 37-40 µs: **≈ 6.5-7.5x** (target 7x: borderline).
2. **Mid M (16 ... few hundred): issue-bound on the gathers.** M = 16 on 4096 <-> 14336: 94e6 FMAs x
   4.4-5.2 / 30e12 ≈ 14-16 µs vs dense ≈ 40 µs: **≈ 2.5-3x (target 6x: not expected)**. ViT-B fc1/fc2
   at M = 197: 47e6 FMAs x 3.8-4.1 ≈ 6-6.5 µs vs dense ≈ 5-8 µs: ≈ 1x, so dispatch prefers dense there
   (**target 1.8x: not expected**). Closing these gaps needs fewer instructions per FMA than one load +
   one convert + one FMA allows (see next steps).
3. **Large M at 90%: dense tensor cores win** (≈ 600 TFLOP/s on 10x the FLOPs beats ≈ 15-30 TFLOP/s
   effective). The ``dense`` path materializes ``W`` with ``to_dense`` (one launch, ``W`` written once,
   ≈ 5% of the GEMM at M = 4096 for 4096 x 14336, more for the small ViT layers) and calls cuBLAS; dV is
   cuBLAS ``dY^T X`` + ``extract_diagonals`` (one launch). Predicted 0.85-0.95x at M = 4096 (ViT layers
   at the low end: materializing per call costs ~10% there), ≈ 0.99x at M = 50432 (target 0.95x).
4. **99% sparse: the kernel wins at every M.** 3072 -> 768 at M = 50432: 2.4e9 FLOPs at ≈ 3.7 instr/FMA
   ≈ 40 µs of issue, 310 MB of ``x`` streamed ≈ 100 µs vs dense ≈ 350-450 µs: **≈ 3.5-4.5x** (target 4x).

Other choices: int64 row offsets everywhere (``M·stride`` exceeds 2^31 for large batches); block sizes from
a fixed table of shapes (``gather_config`` / ``sddmm_config``), never run-time autotuning, so the path and
the summation order are functions of the shapes; the split factor is a run-time argument (a new split
count does not compile a new kernel). The forward kernels take (inputs, int scalars, output, constexprs)
so the same ``@triton.jit`` function compiles ahead of time for a TensorRT plugin (``aot_forward_spec``).

Next steps worth measuring (not done: no GPU to measure them here):
* Fused diagonal->dense tiles + ``tl.dot`` for M ≈ 64-1024: build each ``W`` tile on chip from ``values``
  (≈ 6-8 instructions per ``W`` element per 128-row tile instead of ≈ 4 per FMA x M x density), then
  wgmma; predicted ViT fc1/fc2 at M = 197 ≈ 3 µs (≈ 2x). Needs an offset -> diagonal lookup per tile
  (sorted offsets + binary search, or an inverse table from an extra launch).
* 4-byte bf16-pair loads with a funnel shift for odd offsets (≈ 1.5x fewer instructions per FMA).
* A single-launch split-K (the last-arriving program of a tile reduces, with a per-tile semaphore) to
  drop the reduce launch in decode; a persistent grid; CUDA graphs for the host launch cost.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "supports",
    "forward",
    "input_grad",
    "values_grad",
    "to_dense",
    "extract_diagonals",
    "KernelConfig",
    "gather_config",
    "sddmm_config",
    "AOTSpec",
    "aot_forward_spec",
    "cross_compile",
]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_I32_MAX = 2**31 - 1
#: SM count assumed when no CUDA device is at hand (interpreter runs): an H100 SXM.
_DEFAULT_SMS = 132
#: Largest split-K / split-M factor (the reduce kernel unrolls over it).
_MAX_SPLIT = 64


def supports(dtype: torch.dtype) -> bool:
    """Whether the Triton kernels handle ``dtype`` (float32, float16, bfloat16)."""
    return dtype in _SUPPORTED


# ====================================================================================================
# Kernels
# ====================================================================================================
@triton.jit
def _row_tile(a_ptr, pid_m, M, BLOCK_M: tl.constexpr, STRIDE_AM: tl.constexpr):
    """The rows of one output tile: ``(full_m, rm, m_mask, a_tile, row_off)``.

    With ``M >= BLOCK_M`` the last tile is shifted back to overlap its neighbour (its rows are computed twice,
    bit-identically) so that every row load is in bounds and unmasked (``full_m``). The row stride is a
    compile-time constant: the BLOCK_M row loads of one column share one address (immediate offsets).
    """
    full_m = M >= BLOCK_M
    m0 = pid_m * BLOCK_M
    m0 = tl.where(full_m, tl.minimum(m0, M - BLOCK_M), m0)
    rm = m0 + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    a_tile = a_ptr + m0.to(tl.int64) * STRIDE_AM
    row_off = tl.arange(0, BLOCK_M).to(tl.int64) * STRIDE_AM
    return full_m, rm, m_mask, a_tile, row_off


@triton.jit
def _store_tile(
    acc, out_ptr, bias_ptr, pid_s, M, C, rm, m_mask, rc, c_mask, PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """Reduce ``acc`` [BLOCK_M, BLOCK_J, BLOCK_N] over the diagonals and store it into the (M, C) output tile:
    with the bias, in the output dtype, or (``PARTIAL``) as split ``pid_s``'s fp32 partial of (SPLIT, M, C)."""
    out = tl.sum(acc, axis=1)
    o_ptrs = out_ptr + (pid_s.to(tl.int64) * M + rm.to(tl.int64))[:, None] * C + rc[None, :]
    if not PARTIAL:
        if HAS_BIAS:
            out += tl.load(bias_ptr + rc, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])


@triton.jit
def _gather_kernel(
    # inputs
    a_ptr,  # (M, L) the long-side operand: x (wide forward) or dy (tall dx); unit column stride
    v_ptr,  # (k, D) values; unit column stride, row stride STRIDE_VK
    off_ptr,  # (k,) int32 offsets in [0, L)
    bias_ptr,  # (D,) bias, read only if HAS_BIAS
    # int scalars
    M,
    L,
    D,
    K,
    SPLIT,  # programs along grid axis 1 sharing each output tile (split-K); 1 = none
    # output: (M, D) contiguous in the output dtype, or, when PARTIAL, fp32 partials (SPLIT, M, D)
    out_ptr,
    # constexprs
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STRIDE_AM: tl.constexpr,
    STRIDE_VK: tl.constexpr,
):
    """``out[m, t] = bias[t] + sum_j V[j, t] * a[m, (t + o_j) mod L]`` for one [BLOCK_M, BLOCK_N] tile."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_n = pid % num_n  # consecutive programs sweep the columns of one row block: its rows of `a` stay in L2
    pid_m = pid // num_n

    full_m, rm, m_mask, a_tile, row_off = _row_tile(a_ptr, pid_m, M, BLOCK_M, STRIDE_AM)
    n0 = pid_n * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    rn64 = n0.to(tl.int64) + tl.arange(0, BLOCK_N).to(tl.int64)  # int64 so constant parts fold into immediates
    n_mask = rn < D

    # Split s takes the chunks s, s + SPLIT, s + 2*SPLIT, ... of BLOCK_J diagonals: interleaved, so that with
    # sorted offsets every split sees the same mix of diagonals that reach the tile and that skip it.

    acc = tl.zeros([BLOCK_M, BLOCK_J, BLOCK_N], dtype=tl.float32)
    for j0 in range(pid_s * BLOCK_J, K, SPLIT * BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        j_mask = rj < K
        o = tl.load(off_ptr + rj, mask=j_mask, other=0)
        jn_mask = j_mask[:, None] & n_mask[None, :]
        v = tl.load(v_ptr + rj.to(tl.int64)[:, None] * STRIDE_VK + rn[None, :], mask=jn_mask, other=0.0)
        # The window of diagonal j is a[:, o_j + n0 : o_j + n0 + BLOCK_N]: contiguous, unless it wraps past L.
        ptr = (a_tile + o.to(tl.int64))[None, :, None] + row_off[:, None, None] + rn64[None, None, :]
        wraps = tl.max(o, axis=0) + n0 + BLOCK_N > L
        if full_m & (j0 + BLOCK_J <= K) & (not wraps):
            a = tl.load(ptr).to(tl.float32)  # the hot path: no masks, no modulo
        else:
            # Two contiguous segments: columns o + t < L as they are, columns o + t >= L shifted back by L.
            c = o[:, None] + rn[None, :]
            mask = m_mask[:, None, None] & jn_mask[None, :, :]
            a = tl.load(ptr, mask=mask & (c < L)[None, :, :], other=0.0).to(tl.float32)
            if wraps:
                a += tl.load(ptr - L, mask=mask & (c >= L)[None, :, :], other=0.0).to(tl.float32)
        acc += a * v.to(tl.float32)[None, :, :]

    _store_tile(acc, out_ptr, bias_ptr, pid_s, M, D, rm, m_mask, rn, n_mask, PARTIAL, HAS_BIAS)


@triton.jit
def _mgather_kernel(
    # inputs
    a_ptr,  # (M, D) the short-side operand: x (tall forward) or dy (wide dx); unit column stride
    v_ptr,  # (k, D) values; unit column stride, row stride STRIDE_VK
    off_ptr,  # (k,) int32 offsets in [0, L)
    bias_ptr,  # (L,) bias, read only if HAS_BIAS
    # int scalars
    M,
    L,
    D,
    K,
    SPLIT,  # programs along grid axis 1 sharing each output tile (split-K); 1 = none
    # output: (M, L) contiguous, or fp32 partials (SPLIT, M, L) when PARTIAL
    out_ptr,
    # constexprs
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STRIDE_AM: tl.constexpr,
    STRIDE_VK: tl.constexpr,
):
    """``out[m, r] = bias[r] + sum_j [c < D] V[j, c] * a[m, c]``, ``c = (r - o_j) mod L``, one tile."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_n = tl.cdiv(L, BLOCK_N)
    pid_n = pid % num_n
    pid_m = pid // num_n

    full_m, rm, m_mask, a_tile, row_off = _row_tile(a_ptr, pid_m, M, BLOCK_M, STRIDE_AM)
    r0 = pid_n * BLOCK_N
    rr = r0 + tl.arange(0, BLOCK_N)
    rr64 = r0.to(tl.int64) + tl.arange(0, BLOCK_N).to(tl.int64)
    r_mask = rr < L
    n_rows = tl.minimum(BLOCK_N, L - r0)  # rows of this tile inside [0, L)

    # Split s takes the chunks s, s + SPLIT, s + 2*SPLIT, ... of BLOCK_J diagonals: interleaved, so that with
    # sorted offsets every split sees the same mix of diagonals that reach the tile and that skip it.

    acc = tl.zeros([BLOCK_M, BLOCK_J, BLOCK_N], dtype=tl.float32)
    for j0 in range(pid_s * BLOCK_J, K, SPLIT * BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        j_mask = rj < K
        o = tl.load(off_ptr + rj, mask=j_mask, other=0)
        # Diagonal j meets rows [r0, r0 + n_rows) at columns c = r - o_j: the window [c0, c0 + n_rows) with
        # c0 = r0 - o_j in (-L, L) (segment 1), and, where c < 0, the same window shifted by +L (segment 2).
        c0 = r0 - o
        seg1 = (c0 < D) & (c0 + n_rows > 0)
        seg2 = c0 < D - L
        hit = j_mask & (seg1 | seg2)
        if tl.max(hit.to(tl.int32), axis=0) > 0:  # one uniform branch skips a whole chunk (≈ 1 - D/L of them)
            # Pointers to column c0 + i of row j (values) and of every row (a): contiguous in r.
            o64 = o.to(tl.int64)
            v_ptrs = (v_ptr + rj.to(tl.int64) * STRIDE_VK - o64)[:, None] + rr64[None, :]
            a_ptrs = (a_tile - o64)[None, :, None] + row_off[:, None, None] + rr64[None, None, :]
            inside = (tl.min(c0, axis=0) >= 0) & (tl.max(c0, axis=0) + BLOCK_N <= D)
            if full_m & (j0 + BLOCK_J <= K) & inside:
                v = tl.load(v_ptrs).to(tl.float32)  # the hot path: every column in [0, D), no masks
                a = tl.load(a_ptrs).to(tl.float32)
                acc += a * v[None, :, :]
            else:
                c = rr[None, :] - o[:, None]
                jr_mask = j_mask[:, None] & r_mask[None, :]
                ok1 = jr_mask & (c >= 0) & (c < D)
                v = tl.load(v_ptrs, mask=ok1, other=0.0).to(tl.float32)
                a = tl.load(a_ptrs, mask=m_mask[:, None, None] & ok1[None, :, :], other=0.0).to(tl.float32)
                acc += a * v[None, :, :]
                if tl.max(seg2.to(tl.int32), axis=0) > 0:
                    ok2 = jr_mask & (c < D - L)
                    v = tl.load(v_ptrs + L, mask=ok2, other=0.0).to(tl.float32)
                    a = tl.load(a_ptrs + L, mask=m_mask[:, None, None] & ok2[None, :, :], other=0.0).to(tl.float32)
                    acc += a * v[None, :, :]

    _store_tile(acc, out_ptr, bias_ptr, pid_s, M, L, rm, m_mask, rr, r_mask, PARTIAL, HAS_BIAS)


@triton.jit
def _sddmm_kernel(
    a_ptr,  # (M, D): dy (wide) or x (tall); unit column stride, row stride STRIDE_AM
    b_ptr,  # (M, L): x (wide) or dy (tall); unit column stride, row stride STRIDE_BM
    off_ptr,  # (k,) int32
    M,
    L,
    D,
    K,
    SPLIT,  # programs along grid axis 1 sharing each dV tile (split-M); 1 = none
    out_ptr,  # (k, D) contiguous in the output dtype, or fp32 partials (SPLIT, k, D) when SPLIT > 1
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STRIDE_AM: tl.constexpr,
    STRIDE_BM: tl.constexpr,
):
    """``dV[j, t] = sum_m a[m, t] * b[m, (t + o_j) mod L]`` for one [BLOCK_J, BLOCK_N] tile of dV."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_n = pid % num_n
    pid_j = pid // num_n

    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    n0 = pid_n * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    rn64 = n0.to(tl.int64) + tl.arange(0, BLOCK_N).to(tl.int64)
    j_mask = rj < K
    n_mask = rn < D
    jn_mask = j_mask[:, None] & n_mask[None, :]
    o = tl.load(off_ptr + rj, mask=j_mask, other=0)
    c = o[:, None] + rn[None, :]  # < 2L; fixed for the whole program
    wraps = tl.max(o, axis=0) + n0 + BLOCK_N > L
    edge = (n0 + BLOCK_N > D) | (pid_j * BLOCK_J + BLOCK_J > K)
    row_a = tl.arange(0, BLOCK_M).to(tl.int64) * STRIDE_AM
    row_b = tl.arange(0, BLOCK_M).to(tl.int64) * STRIDE_BM
    b_cols = o.to(tl.int64)[:, None] + rn64[None, :]  # [BJ, BN] column of b, before the wrap

    # This split's rows: [m_lo, m_hi); full BLOCK_M chunks run unmasked, one masked chunk finishes.
    m_per_split = tl.cdiv(tl.cdiv(M, SPLIT), BLOCK_M) * BLOCK_M
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(M, m_lo + m_per_split)
    m_full = m_lo + tl.maximum(m_hi - m_lo, 0) // BLOCK_M * BLOCK_M

    acc = tl.zeros([BLOCK_M, BLOCK_J, BLOCK_N], dtype=tl.float32)
    if wraps | edge:
        for m0 in range(m_lo, m_full, BLOCK_M):
            a_t = a_ptr + tl.cast(m0, tl.int64) * STRIDE_AM
            b_t = b_ptr + tl.cast(m0, tl.int64) * STRIDE_BM
            a = tl.load(a_t + row_a[:, None] + rn64[None, :], mask=n_mask[None, :], other=0.0).to(tl.float32)
            b_ptrs = b_t + row_b[:, None, None] + b_cols[None, :, :]
            b = tl.load(b_ptrs, mask=(jn_mask & (c < L))[None, :, :], other=0.0).to(tl.float32)
            b += tl.load(b_ptrs - L, mask=(jn_mask & (c >= L))[None, :, :], other=0.0).to(tl.float32)
            acc += a[:, None, :] * b
    else:
        for m0 in range(m_lo, m_full, BLOCK_M):  # the hot path: no masks, immediate row offsets
            a_t = a_ptr + tl.cast(m0, tl.int64) * STRIDE_AM
            b_t = b_ptr + tl.cast(m0, tl.int64) * STRIDE_BM
            a = tl.load(a_t + row_a[:, None] + rn64[None, :]).to(tl.float32)
            b = tl.load(b_t + row_b[:, None, None] + b_cols[None, :, :]).to(tl.float32)
            acc += a[:, None, :] * b
    if m_full < m_hi:
        rm = m_full + tl.arange(0, BLOCK_M)
        m_mask = rm < m_hi
        a_t = a_ptr + m_full.to(tl.int64) * STRIDE_AM
        b_t = b_ptr + m_full.to(tl.int64) * STRIDE_BM
        a = tl.load(a_t + row_a[:, None] + rn64[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        b_ptrs = b_t + row_b[:, None, None] + b_cols[None, :, :]
        mask = m_mask[:, None, None] & jn_mask[None, :, :]
        b = tl.load(b_ptrs, mask=mask & (c < L)[None, :, :], other=0.0).to(tl.float32)
        b += tl.load(b_ptrs - L, mask=mask & (c >= L)[None, :, :], other=0.0).to(tl.float32)
        acc += a.to(tl.float32)[:, None, :] * b

    out = tl.sum(acc, axis=0)
    o_ptrs = out_ptr + (pid_s.to(tl.int64) * K + rj.to(tl.int64))[:, None] * D + rn[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=jn_mask)


@triton.jit
def _split_reduce_kernel(
    ws_ptr,  # (SPLIT, R, C) fp32 partials, contiguous
    bias_ptr,  # (C,), read only if HAS_BIAS
    R,
    C,
    SPLIT,
    stride_or,
    out_ptr,  # (R, C) with row stride stride_or
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out = cast(sum_s ws[s] + bias)``, summed in the fixed order s = 0, 1, ...: deterministic."""
    num_c = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    rr = (pid // num_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = (pid % num_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rr < R)[:, None] & (rc < C)[None, :]
    idx = (rr.to(tl.int64) * C)[:, None] + rc[None, :]
    plane = tl.cast(R, tl.int64) * C  # tl.cast: R may arrive as the constant 1 (JIT specialization)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    # Unrolled by 4: the 4 partial loads of a step are independent and in flight together (a plain run-time
    # loop would wait one memory latency per split). The adds stay in the fixed order s = 0, 1, 2, ...
    for s0 in range(0, SPLIT, 4):
        base = ws_ptr + s0 * plane + idx
        # The split index as a block-shaped tensor: a scalar comparison folded into the mask is a plain bool
        # under newer Triton interpreters, which refuse it as a load mask ("mask has unsupported dtype").
        s_blk = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32) + s0
        p0 = tl.load(base, mask=mask, other=0.0)
        p1 = tl.load(base + plane, mask=mask & (s_blk + 1 < SPLIT), other=0.0)
        p2 = tl.load(base + 2 * plane, mask=mask & (s_blk + 2 < SPLIT), other=0.0)
        p3 = tl.load(base + 3 * plane, mask=mask & (s_blk + 3 < SPLIT), other=0.0)
        acc = (((acc + p0) + p1) + p2) + p3
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rc, mask=rc < C, other=0.0).to(tl.float32)[None, :]
    o_ptrs = out_ptr + (rr.to(tl.int64) * stride_or)[:, None] + rc[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _to_dense_kernel(
    v_ptr,  # (k, D) values, unit column stride, row stride stride_vk
    off_ptr,  # (k,) int32
    N_OUT,
    N_IN,
    K,
    stride_vk,
    w_ptr,  # (N_out, N_in) contiguous: every element written by exactly one program
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Materialize ``W`` in one launch. Each program owns rows [r0, r0 + BLOCK_R) of ``W``: it writes their
    zeros (coalesced), synchronizes its threads, then writes the k diagonal entries of those rows. Both
    passes hit the same few KB, which stay in L2, so DRAM sees ``W`` about once; no inverse table needed."""
    pid = tl.program_id(0)
    rr = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rr < N_OUT
    row_ptrs = w_ptr + rr.to(tl.int64) * N_IN
    zeros = tl.zeros([BLOCK_R, BLOCK_C], dtype=w_ptr.dtype.element_ty)
    for c0 in range(0, N_IN, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        tl.store(row_ptrs[:, None] + rc[None, :], zeros, mask=r_mask[:, None] & (rc < N_IN)[None, :])
    # Order the zeros before the values: the same addresses are written by different threads of this CTA.
    tl.debug_barrier()
    for j0 in range(0, K, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        j_mask = rj < K
        o = tl.load(off_ptr + rj, mask=j_mask, other=0)
        if N_OUT <= N_IN:  # wide: row t holds diagonal j at column (t + o_j) mod N_in, value V[j, t]
            c = rr[None, :] + o[:, None]
            c = tl.where(c >= N_IN, c - N_IN, c)
            t = rr[None, :] + 0 * o[:, None]
            ok = j_mask[:, None] & r_mask[None, :]
        else:  # tall: row r holds diagonal j at column t = (r - o_j) mod N_out if t < N_in, value V[j, t]
            c = rr[None, :] - o[:, None]
            c = tl.where(c < 0, c + N_OUT, c)
            t = c
            ok = j_mask[:, None] & r_mask[None, :] & (c < N_IN)
        val = tl.load(v_ptr + rj.to(tl.int64)[:, None] * stride_vk + t, mask=ok, other=0.0)
        tl.store(row_ptrs[None, :] + c, val.to(w_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _extract_kernel(
    g_ptr,  # (N_out, N_in) dense, row stride stride_gr, column stride stride_gc
    off_ptr,  # (k,) int32
    K,
    D,
    L,
    stride_gr,
    stride_gc,
    out_ptr,  # (k, D) contiguous
    TALL: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out[j, t] = G[row(j, t), col(j, t)]``: read the chosen diagonals out of a dense matrix."""
    num_n = tl.cdiv(D, BLOCK_N)
    pid = tl.program_id(0)
    rj = (pid // num_n) * BLOCK_J + tl.arange(0, BLOCK_J)
    rn = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rj < K)[:, None] & (rn < D)[None, :]
    o = tl.load(off_ptr + rj, mask=rj < K, other=0)
    w = rn[None, :] + o[:, None]
    w = tl.where(w >= L, w - L, w)  # the wrapped (long-side) index
    t = rn[None, :] + 0 * o[:, None]
    if TALL:
        ptrs = g_ptr + w.to(tl.int64) * stride_gr + t.to(tl.int64) * stride_gc
    else:
        ptrs = g_ptr + t.to(tl.int64) * stride_gr + w.to(tl.int64) * stride_gc
    g = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(out_ptr + (rj.to(tl.int64) * D)[:, None] + rn[None, :], g.to(out_ptr.dtype.element_ty), mask=mask)


# ====================================================================================================
# Configuration: a fixed table of shapes (no run-time autotuning; see the design note)
# ====================================================================================================
@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch parameters of one kernel call."""

    BLOCK_M: int
    BLOCK_J: int
    BLOCK_N: int
    SPLIT: int
    num_warps: int
    num_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("BLOCK_M", "BLOCK_J", "BLOCK_N"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two")
        if not 1 <= self.SPLIT <= _MAX_SPLIT:
            raise ValueError(f"SPLIT={self.SPLIT} must be in [1, {_MAX_SPLIT}]")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} must be a power of two <= 16")


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms_of(t: Tensor) -> int:
    return _num_sms(t.device.index if t.device.type == "cuda" else None)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


#: Programs wanted per SM before split-K/split-M stops adding splits (enough co-resident loads in flight).
_PROGRAMS_PER_SM = 4
#: Split-K partials may cost at most 1/_WS_FRACTION of the values bytes (they are written and read once).
_WS_FRACTION = 8


def gather_config(
    M: int, n_cols: int, k: int, D: int, *, masked: bool, elem_size: int = 2, num_sms: int = _DEFAULT_SMS
) -> KernelConfig:
    """Blocks for ``_gather`` (``masked=False``) / ``_mgather`` (``masked=True``).

    ``M`` rows, ``n_cols`` output columns (``D`` for the gather, ``L`` for the masked gather), ``k``
    diagonals of length ``D``. Always 4 warps, all along the output columns (``BLOCK_N`` = 128 x reps), so
    each thread owns *every* row and diagonal of its columns: the per-(diagonal, column) address and
    values work is shared by its ``BLOCK_M`` rows, and the row loads use immediate offsets. The tile
    holds 16-32 elements per thread (enough independent loads in flight, no spills):

    =========  =======  ===========  =============  ============================================
    M          BLOCK_M  BLOCK_J      BLOCK_N        regime
    =========  =======  ===========  =============  ============================================
    1          1        4 .. 16      1024 .. 256    values-bandwidth bound; split-K to fill the GPU
    2          2        4 .. 8       512 .. 256
    3, 4       4        2 .. 4       512 .. 256
    5 .. 15    8        1 .. 2       512 .. 256
    16 .. 31   16       1            128            gather-issue bound (≈ 4.3 instructions / FMA)
    >= 32      32       1            128            gather-issue bound (≈ 3.6 instructions / FMA)
    =========  =======  ===========  =============  ============================================

    ``BLOCK_N`` shrinks for narrow outputs (and for the masked gather, where a wide tile straddles the
    edge of the diagonal band more often), with ``BLOCK_J`` growing to keep the per-thread tile.
    Split-K until ~4 programs per SM, bounded so each split keeps >= 2 chunks and the fp32 partials stay
    under 1/8 of the values bytes.
    """
    if M <= 1:
        bm, per_thread = 1, 32
    elif M == 2:
        bm, per_thread = 2, 32
    elif M <= 4:
        bm, per_thread = 4, 32
    elif M < 16:
        bm, per_thread = 8, 16
    elif M < 32:
        bm, per_thread = 16, 16
    else:
        bm, per_thread = 32, 32
    warps = 4
    if bm >= 16:
        bn = 32 * warps
    else:
        bn = 1024 if bm == 1 else 512
        if masked:
            bn = min(bn, 512)
        # Narrow outputs: at least ~8 column tiles before split-K, never below one column per lane.
        while bn > 32 * warps and (n_cols < 8 * bn or (masked and 4 * bn > D)):
            bn //= 2
    bj = max(1, min(16, per_thread * 32 * warps // (bm * bn)))
    bj = min(bj, _pow2_at_least(k))
    base = triton.cdiv(max(M, 1), bm) * triton.cdiv(n_cols, bn)
    want = _PROGRAMS_PER_SM * num_sms
    split = 1
    if base < want:
        ws_cap = (k * D * elem_size) // (_WS_FRACTION * max(M, 1) * n_cols * 4)
        split = max(1, min(triton.cdiv(want, base), k // (2 * bj), ws_cap, _MAX_SPLIT))
    return KernelConfig(BLOCK_M=bm, BLOCK_J=bj, BLOCK_N=bn, SPLIT=split, num_warps=warps)


def sddmm_config(M: int, k: int, D: int, *, elem_size: int = 2, num_sms: int = _DEFAULT_SMS) -> KernelConfig:
    """Blocks for ``_sddmm`` (dV): a [BLOCK_J, BLOCK_N] tile of dV per program, looping over ``M``.

    4 warps along the ``BLOCK_N = 128`` columns; each thread owns ``BLOCK_M = 4`` rows x ``BLOCK_J = 8``
    diagonals of one column per iteration (32 gathers in flight, the ``a`` row value reused by the 8
    diagonals). Split-M (fp32 partials + the deterministic reduce) until ~4 programs per SM, with at
    least 4 row chunks per split.
    """
    bj = min(8, _pow2_at_least(k))
    bn = 128
    bm = min(4, _pow2_at_least(M))
    base = triton.cdiv(k, bj) * triton.cdiv(D, bn)
    want = _PROGRAMS_PER_SM * num_sms
    split = 1
    if base < want:
        split = max(1, min(triton.cdiv(want, base), M // (4 * bm), _MAX_SPLIT))
    return KernelConfig(BLOCK_M=bm, BLOCK_J=bj, BLOCK_N=bn, SPLIT=split, num_warps=4)


# ====================================================================================================
# Launchers
# ====================================================================================================
def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels support float32, float16, bfloat16")


def _check_2d(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def _prep_offsets(offsets: Tensor, k: int) -> Tensor:
    if offsets.dim() != 1 or offsets.shape[0] != k:
        raise ValueError(f"offsets must have shape ({k},), got {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be int32 (or int64), got {offsets.dtype}")
    return offsets.to(torch.int32).contiguous()


def _unit_cols(t: Tensor) -> Tensor:
    """``t`` with a unit column stride (a copy only if needed): the kernels index columns directly."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _row_stride(t: Tensor) -> int:
    """The row stride the kernel is compiled for. A single row's stride is arbitrary in torch: use the
    row length, so that (M=1) calls do not compile a kernel per stray stride value."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _same_device(*named: tuple[str, Tensor]) -> None:
    dev = named[0][1].device
    for name, t in named[1:]:
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {named[0][0]} is on {dev}")


def _reduce_splits(ws: Tensor, bias: Tensor | None, out: Tensor) -> None:
    split, R, C = ws.shape
    br, bc = min(16, _pow2_at_least(R)), 128  # M = 1 (decode): one row per program, 128 columns
    grid = (triton.cdiv(R, br) * triton.cdiv(C, bc),)
    has_bias = bias is not None
    _split_reduce_kernel[grid](
        ws,
        bias if has_bias else ws,
        R,
        C,
        split,
        out.stride(0),
        out,
        HAS_BIAS=has_bias,
        BLOCK_R=br,
        BLOCK_C=bc,
        num_warps=4,
    )


def _launch_gather_family(
    masked: bool,
    a: Tensor,
    values: Tensor,
    offsets: Tensor,
    bias: Tensor | None,
    L: int,
    D: int,
    config: KernelConfig | None,
) -> Tensor:
    """``_gather`` (``masked=False``: (M, L) -> (M, D)) or ``_mgather`` ((M, D) -> (M, L)), split-K if it pays."""
    M = a.shape[0]
    k = values.shape[0]
    n_cols = L if masked else D
    out = torch.empty((M, n_cols), device=a.device, dtype=a.dtype)
    if M == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(M, n_cols)) if bias is not None else out.zero_()
    a, values = _unit_cols(a), _unit_cols(values)
    cfg = config or gather_config(M, n_cols, k, D, masked=masked, elem_size=values.element_size(), num_sms=_sms_of(a))
    has_bias = bias is not None
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(n_cols, cfg.BLOCK_N), cfg.SPLIT)
    target = out if cfg.SPLIT == 1 else torch.empty((cfg.SPLIT, M, n_cols), device=a.device, dtype=torch.float32)
    kernel = _mgather_kernel if masked else _gather_kernel
    kernel[grid](
        a,
        values,
        offsets,
        bias if has_bias else values,
        M,
        L,
        D,
        k,
        cfg.SPLIT,
        target,
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_J=cfg.BLOCK_J,
        BLOCK_N=cfg.BLOCK_N,
        PARTIAL=cfg.SPLIT > 1,
        HAS_BIAS=has_bias,
        STRIDE_AM=_row_stride(a),
        STRIDE_VK=_row_stride(values),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if cfg.SPLIT > 1:
        _reduce_splits(target, bias, out)
    return out


def forward(
    x2: Tensor,
    values: Tensor,
    offsets: Tensor,
    bias: Tensor,
    out_features: int,
    *,
    config: KernelConfig | None = None,
) -> Tensor:
    """``y = x2 @ W.T + bias``.

    Args:
        x2: ``(M, N_in)``, any strides (a copy is made only if the column stride is not 1).
        values: ``(k, D)``.
        offsets: ``(k,)`` int32 (int64 is converted), distinct, in ``[0, P)``.
        bias: ``(N_out,)``, or an empty tensor for no bias.
        out_features: ``N_out``.
        config: blocks to use instead of ``gather_config``'s choice (tests, tuning).

    Returns:
        ``(M, N_out)`` in ``x2.dtype``, fresh.
    """
    _check_2d("x2", x2)
    _check_2d("values", values)
    _check_float("x2", x2)
    _check_float("values", values)
    n_in = x2.shape[1]
    L, D = max(out_features, n_in), min(out_features, n_in)
    if values.shape[1] != D:
        raise ValueError(f"values has {values.shape[1]} columns, expected D=min({out_features}, {n_in})={D}")
    has_bias = bias is not None and bias.numel() > 0
    if has_bias and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    _same_device(("x2", x2), ("values", values), ("offsets", offsets), *((("bias", bias),) if has_bias else ()))
    offsets = _prep_offsets(offsets, values.shape[0])
    b = bias.contiguous() if has_bias else None
    # Tall layers (N_out > N_in) wrap their rows: the output side is the long one -> masked gather.
    return _launch_gather_family(out_features > n_in, x2, values, offsets, b, L, D, config)


def input_grad(
    dy2: Tensor, values: Tensor, offsets: Tensor, in_features: int, *, config: KernelConfig | None = None
) -> Tensor:
    """``dx = dy2 @ W``: ``(M, N_out) -> (M, N_in)`` in ``dy2.dtype``, fresh."""
    _check_2d("dy2", dy2)
    _check_2d("values", values)
    _check_float("dy2", dy2)
    _check_float("values", values)
    n_out = dy2.shape[1]
    L, D = max(n_out, in_features), min(n_out, in_features)
    if values.shape[1] != D:
        raise ValueError(f"values has {values.shape[1]} columns, expected D=min({n_out}, {in_features})={D}")
    _same_device(("dy2", dy2), ("values", values), ("offsets", offsets))
    offsets = _prep_offsets(offsets, values.shape[0])
    # dx = dy W is the transposed product: a plain gather of dy for tall layers, a masked one for wide.
    return _launch_gather_family(not n_out > in_features, dy2, values, offsets, None, L, D, config)


def values_grad(dy2: Tensor, x2: Tensor, offsets: Tensor, *, config: KernelConfig | None = None) -> Tensor:
    """``dV[j, t] = sum_m dy2[m, row(j, t)] * x2[m, col(j, t)]``: ``(k, D)`` in ``x2.dtype``, fresh.

    Deterministic: split-M partial sums go through a fixed-order second reduction, never atomics.
    """
    _check_2d("dy2", dy2)
    _check_2d("x2", x2)
    _check_float("dy2", dy2)
    _check_float("x2", x2)
    if dy2.shape[0] != x2.shape[0]:
        raise ValueError(f"dy2 has {dy2.shape[0]} rows but x2 has {x2.shape[0]}")
    _same_device(("x2", x2), ("dy2", dy2), ("offsets", offsets))
    n_out, n_in = dy2.shape[1], x2.shape[1]
    L, D = max(n_out, n_in), min(n_out, n_in)
    k = offsets.shape[0]
    offsets = _prep_offsets(offsets, k)
    a, b = (x2, dy2) if n_out > n_in else (dy2, x2)  # a: the short side (M, D), b: the long side (M, L)
    a, b = _unit_cols(a), _unit_cols(b)
    M = a.shape[0]
    out = torch.empty((k, D), device=x2.device, dtype=x2.dtype)
    if k == 0:
        return out
    if M == 0:
        return out.zero_()
    cfg = config or sddmm_config(M, k, D, elem_size=x2.element_size(), num_sms=_sms_of(x2))
    target = out if cfg.SPLIT == 1 else torch.empty((cfg.SPLIT, k, D), device=x2.device, dtype=torch.float32)
    grid = (triton.cdiv(k, cfg.BLOCK_J) * triton.cdiv(D, cfg.BLOCK_N), cfg.SPLIT)
    _sddmm_kernel[grid](
        a,
        b,
        offsets,
        M,
        L,
        D,
        k,
        cfg.SPLIT,
        target,
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_J=cfg.BLOCK_J,
        BLOCK_N=cfg.BLOCK_N,
        STRIDE_AM=_row_stride(a),
        STRIDE_BM=_row_stride(b),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if cfg.SPLIT > 1:
        _reduce_splits(target, None, out)
    return out


def to_dense(values: Tensor, offsets: Tensor, out_features: int, in_features: int) -> Tensor:
    """The dense ``(N_out, N_in)`` weight in ``values.dtype``, in one launch, every element written once.

    Same result as ``reference.to_dense`` (bit-exact: entries are copies), for the ``dense`` dispatch path.
    """
    _check_2d("values", values)
    _check_float("values", values)
    D = min(out_features, in_features)
    if values.shape[1] != D:
        raise ValueError(f"values has {values.shape[1]} columns, expected D={D}")
    _same_device(("values", values), ("offsets", offsets))
    k = values.shape[0]
    offsets = _prep_offsets(offsets, k)
    values = _unit_cols(values)
    w = torch.empty((out_features, in_features), device=values.device, dtype=values.dtype)
    if w.numel() == 0:
        return w
    # ~16 KB of W per program (a few programs per SM at once), at most 64 rows.
    br = max(1, min(64, (16384 // (in_features * w.element_size())) or 1))
    br = 1 << (br.bit_length() - 1)
    grid = (triton.cdiv(out_features, br),)
    _to_dense_kernel[grid](
        values,
        offsets,
        out_features,
        in_features,
        k,
        _row_stride(values),
        w,
        BLOCK_R=br,
        BLOCK_C=max(128, 2048 // br),
        BLOCK_J=max(1, min(32, 2048 // (br * 32))),
        num_warps=4,
    )
    return w


def extract_diagonals(weight: Tensor, offsets: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """Read the chosen diagonals of a dense ``(N_out, N_in)`` matrix: ``(k, D)``, one launch.

    Same result as ``reference.extract_diagonals`` (a cast to ``out_dtype`` aside).
    """
    _check_2d("weight", weight)
    _check_float("weight", weight)
    _same_device(("weight", weight), ("offsets", offsets))
    n_out, n_in = weight.shape
    L, D = max(n_out, n_in), min(n_out, n_in)
    k = offsets.shape[0]
    offsets = _prep_offsets(offsets, k)
    out = torch.empty((k, D), device=weight.device, dtype=out_dtype or weight.dtype)
    if k == 0 or D == 0:
        return out
    bj, bn = 8, 128
    grid = (triton.cdiv(k, bj) * triton.cdiv(D, bn),)
    _extract_kernel[grid](
        weight,
        offsets,
        k,
        D,
        L,
        weight.stride(0),
        weight.stride(1),
        out,
        TALL=n_out > n_in,
        BLOCK_J=bj,
        BLOCK_N=bn,
        num_warps=4,
    )
    return out


# ====================================================================================================
# Ahead-of-time compilation spec (TensorRT Quick Deploy Plugin)
# ====================================================================================================
#: The forward kernels' int scalar parameters, in order: rows, long side, short side, diagonals.
_AOT_SCALARS: tuple[str, ...] = ("M", "L", "D", "K")


def _aot_scalar_exprs(out_features: int, in_features: int) -> tuple[str, ...]:
    """Each scalar of ``_AOT_SCALARS`` as an expression of ``M, N_out, N_in, k`` for this orientation.

    Plain names, so any evaluator of size expressions (TensorRT's symbolic sizes included) handles them.
    """
    long_side, short_side = ("N_out", "N_in") if out_features > in_features else ("N_in", "N_out")
    return ("M", long_side, short_side, "k")


def _eval_scalar(expr: str, M: int, n_out: int, n_in: int, k: int) -> int:
    return {"M": M, "N_out": n_out, "N_in": n_in, "k": k}[expr]


@dataclass(frozen=True)
class AOTSpec:
    """Everything needed to compile the forward kernel of one layer shape ahead of time.

    Kernel parameters once Triton drops the constexprs: ``x, values, offsets, bias`` (pointers), then the
    int32 scalars ``scalar_names`` = ``(M, L, D, K)`` (rows, long side, short side, diagonals), then the
    output pointer: TensorRT's AOT order (inputs, extra scalars, outputs). ``scalar_args`` gives the same
    scalars, in the same order, as expressions of ``M, N_out, N_in, k`` (``("M", "N_out", "N_in", "k")`` for a
    tall layer, ``("M", "N_in", "N_out", "k")`` for a wide one), ready for a size-expression evaluator.
    ``x`` (M, N_in), ``values`` (k, D) and the output (M, N_out) must be contiguous; ``bias`` must be a
    valid pointer even when ``constexprs["HAS_BIAS"]`` is false (it is never read then). Triton 3.6
    appends two hidden pointer parameters (global and profile scratch) after the output; this kernel uses
    neither (``compiled.metadata.global_scratch_size == 0``), so they may be passed as null.

    Compile with::

        spec = aot_forward_spec(torch.bfloat16, out_features=3072, in_features=768)
        compiled = triton.compile(spec.ast_source(), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        ptx, name = compiled.asm["ptx"], compiled.metadata.name
        # launch: grid spec.grid(M), block (32 * spec.num_warps, 1, 1), dynamic shared memory
        # compiled.metadata.shared, scalars spec.scalar_values(M, k)
    """

    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, int | bool]
    num_warps: int
    num_stages: int
    scalar_args: tuple[str, ...]
    scalar_names: tuple[str, ...]
    out_features: int
    in_features: int
    block_m: int
    block_n: int
    attrs: dict[tuple[int, ...], list] = field(default_factory=dict)

    def grid(self, M: Any) -> tuple[Any, int, int]:
        """Launch grid for ``M`` rows: one program per ``[block_m, block_n]`` tile of the ``(M, N_out)`` output.

        ``M`` may be an int or a symbolic size (only ``+``, ``//`` and ``*`` with the symbol on the left).
        """
        if isinstance(M, int) and M < 0:
            raise ValueError(f"M must be >= 0, got {M}")
        return ((M + (self.block_m - 1)) // self.block_m * triton.cdiv(self.out_features, self.block_n), 1, 1)

    def scalar_values(self, M: int, k: int) -> tuple[int, ...]:
        """The int scalars of one launch, in parameter order."""
        return tuple(_eval_scalar(e, M, self.out_features, self.in_features, k) for e in self.scalar_args)

    def runner_args(
        self, x: Any, values: Any, offsets: Any, bias: Any, out: Any, M: int, k: int | None = None
    ) -> list[Any]:
        """Every parameter in kernel order, for Triton's own launcher: ``compiled[spec.grid(M)](*args)``.

        Triton 3.6's ``CompiledKernel`` launcher takes all parameters, constexpr positions included (their
        values are ignored there); the PTX entry itself has only the non-constexpr ones (see the class doc).
        """
        vals = {"a_ptr": x, "v_ptr": values, "off_ptr": offsets, "bias_ptr": bias, "out_ptr": out}
        vals.update(zip(self.scalar_names, self.scalar_values(M, values.shape[0] if k is None else k)))
        return [vals[n] if n in vals else self.constexprs[n] for n in self.fn.arg_names]

    def ast_source(self) -> Any:
        """A ``triton.compiler.ASTSource`` for ``triton.compile``."""
        from triton.compiler import ASTSource

        return ASTSource(fn=self.fn, signature=self.signature, constexprs=self.constexprs, attrs=self.attrs)


def aot_forward_spec(
    dtype: torch.dtype, out_features: int, in_features: int, *, has_bias: bool = True, batch_hint: int = 16
) -> AOTSpec:
    """The forward kernel of an ``out_features x in_features`` layer, ready for ``triton.compile``.

    The blocks are ``gather_config``'s for ``M = batch_hint`` rows without split-K (a plugin launches one
    kernel); any ``M`` runs correctly with them. Pointers are declared 16-byte aligned (TensorRT buffers
    are) and the shape scalars that are multiples of 16 are declared so, as the JIT path would see them.
    ``M`` stays a run-time scalar (dynamic batch).
    """
    if dtype not in _SUPPORTED:
        raise TypeError(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
    if out_features < 1 or in_features < 1:
        raise ValueError(f"layer shape must be positive, got {out_features}x{in_features}")
    if batch_hint < 1:
        raise ValueError(f"batch_hint must be >= 1, got {batch_hint}")
    tall = out_features > in_features
    L, D = max(out_features, in_features), min(out_features, in_features)
    fn = _mgather_kernel if tall else _gather_kernel
    cfg = gather_config(batch_hint, out_features, L, D, masked=tall, elem_size=torch.finfo(dtype).bits // 8)
    t = _TL_NAME[dtype]
    types = {"a_ptr": f"*{t}", "v_ptr": f"*{t}", "off_ptr": "*i32", "bias_ptr": f"*{t}", "out_ptr": f"*{t}"}
    constexprs: dict[str, int | bool] = {
        "BLOCK_M": cfg.BLOCK_M,
        "BLOCK_J": cfg.BLOCK_J,
        "BLOCK_N": cfg.BLOCK_N,
        "SPLIT": 1,  # a run-time int of the kernel, bound here: no split-K, so not a plugin argument
        "PARTIAL": False,
        "HAS_BIAS": bool(has_bias),
        "STRIDE_AM": in_features,
        "STRIDE_VK": D,
    }
    # Triton reads the signature positionally: keep the kernel's parameter order.
    signature = {n: types.get(n, "constexpr" if n in constexprs else "i32") for n in fn.arg_names}
    scalars = tuple(n for n in fn.arg_names if signature[n] == "i32")
    if scalars != tuple(_AOT_SCALARS):  # the kernel and this table must agree
        raise AssertionError(f"kernel scalars {scalars} != {tuple(_AOT_SCALARS)}")
    attrs: dict[tuple[int, ...], list] = {}
    sizes = {"L": max(out_features, in_features), "D": min(out_features, in_features)}
    for i, name in enumerate(fn.arg_names):
        if signature[name].startswith("*") or (name in sizes and sizes[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return AOTSpec(
        fn=fn,
        signature=signature,
        constexprs=constexprs,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        scalar_args=_aot_scalar_exprs(out_features, in_features),
        scalar_names=scalars,
        out_features=out_features,
        in_features=in_features,
        block_m=cfg.BLOCK_M,
        block_n=cfg.BLOCK_N,
        attrs=attrs,
    )


def cross_compile(
    fn: Any,
    args: dict[str, Any],
    constexprs: dict[str, Any],
    *,
    num_warps: int,
    num_stages: int = 1,
    arch: int = 90,
) -> Any:
    """Compile a kernel for ``sm_<arch>`` the way the JIT would specialize these argument values.

    Needs no GPU (Triton ships ``ptxas``). ``args`` maps each run-time parameter to a pointer type string
    (``"*bf16"``; declared 16-byte aligned, as fresh torch allocations are) or to an int value, which gets
    the JIT's specializations: ``1`` becomes a compile-time constant and multiples of 16 are declared so.
    Used by the tests (every kernel must compile at the edge values) and ``benchmarks/kernel_sass.py``.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], consts[name] = "constexpr", constexprs[name]
            continue
        a = args[name]
        if isinstance(a, str):
            sig[name] = a
            attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        ty, spec = native_specialize_impl(BaseBackend, a, False, True, True)
        if ty == "constexpr":
            sig[name], consts[name] = "constexpr", a
        else:
            sig[name] = ty
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, consts, attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )

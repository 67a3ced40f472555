"""Native CPU kernels for the diagonal op (numba), the ``kernel`` path of ``ops/dispatch.py`` on ``cpu``.

Dispatch imports this module lazily (``import diagcompile`` never imports numba) and calls these functions:

* ``supports(dtype)``                                   float32 and float64
* ``forward(x2, values, offsets, bias, out_features)``  ``(M, N_in) -> (M, N_out)``, bias fused
* ``input_grad(dy2, values, offsets, in_features)``     ``(M, N_out) -> (M, N_in)``
* ``values_grad(dy2, x2, offsets)``                     ``-> (k, D)``

and, for the ``dense`` path, ``to_dense`` / ``extract_diagonals`` (plain copies, bit-identical to the
reference's). The three products map onto the three primitives of ``ops/reference.py`` exactly as its table
says (wide forward = gather, tall forward = masked gather, and so on). Inputs may be non-contiguous;
outputs are fresh tensors in the input dtype (float32 accumulates in float32, float64 in float64).

Design
------
* **Output-stationary.** Every kernel owns a tile of its output and writes nothing else, so threads never
  write the same memory: no atomics. In the gather ``x[(t + o_j) mod L]`` is at most two contiguous runs
  per diagonal and tile; in the masked gather ``c = (r - o_j) mod L`` likewise. Inner loops run over
  contiguous 1-D slices so LLVM vectorizes them (AVX2/AVX-512); indexing with a possibly negative index
  does not vectorize (numba's wraparound check), hence the slices.
* **The masked gather, two ways.** Tiled (``_masked_gather_kernel``): four diagonals per pass over pieces
  of the tile cut wherever one starts, ends or wraps; on a narrow layer that leaves runs of a dozen
  elements. Diagonal-major (``_masked_scatter_kernel``): each diagonal adds its whole run (D long, split
  once at the wrap) into whole output rows held in L1; it is faster on narrow and on clearly
  rectangular layers up to L = 4096 and takes those (``_masked_gather_plan``). Both sum in the same order,
  so their bits are identical.
* **Four terms per pass.** The gather's inner loop adds four diagonals (the values gradient four rows of
  ``M``) per load/store of the accumulator: ``y = (((y + v0 x0) + v1 x1) + v2 x2) + v3 x3``. That is the same
  sequence of float operations as four separate passes (numba compiles without fast-math: no
  reassociation, no FMA contraction), with a quarter of the accumulator traffic.
* **Deterministic, independent of the thread count.** Each output element is reduced in a fixed order
  (diagonals ascending for the gathers, rows ascending for the values gradient), whatever the tiling and
  the thread count. The kernels' outputs are therefore bit-identical run to run and with
  any number of threads, which dynamic sparse training needs for bit-identical resume. (A layer call's are
  not across thread counts: dispatch picks its path per thread-count bucket, and the dense and kernel paths
  round differently. Resume with the thread count of the run.)
* **Threads.** The kernels are serial ``nogil`` functions over a range of work items; a small thread pool
  owned by this module runs ``torch.get_num_threads()`` contiguous ranges of the items, one of them on the
  calling thread. We deliberately do not use ``parallel=True``: numba's threading layers are each unsafe
  somewhere we run (``workqueue`` aborts the process when two Python threads launch kernels concurrently;
  ``omp`` on Linux is GNU OpenMP, which numba refuses to use in a child forked after use, as DataLoader and
  ``multiprocessing`` do; ``tbb`` is an extra dependency), and selecting one is a process-global setting
  that a library should not take from its user. Plain Python threads around ``nogil`` code are thread-safe,
  fork-safe (the pool is rebuilt in a forked child; a fork waits for a compile running in another thread to
  end, whose lock the child would otherwise inherit held, hanging at its first compile) and never touch torch's
  OpenMP runtime.
* **Compile once.** Kernels are compiled lazily (only the dtypes used) with ``cache=True``: numba stores the
  machine code next to this file when that is writable, else in ``$NUMBA_CACHE_DIR`` or the user cache
  directory (``~/.cache/numba``), so only the very first process pays the compile. Where no cache location
  is writable the kernels still work, compiled per process.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from numba.core import cgutils
from numba.core.compiler_lock import global_compiler_lock
from numba.extending import intrinsic
from torch import Tensor

__all__ = [
    "SUPPORTED_DTYPES",
    "check_offsets",
    "extract_diagonals",
    "forward",
    "input_grad",
    "supports",
    "to_dense",
    "values_grad",
    "warmup",
]

#: dtypes with a native kernel. bf16/fp16 are left to dispatch's other paths: numpy has no bfloat16 and
#: numba does no float16 arithmetic, so a kernel would have to upcast whole operands and lose the win.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

# A call below this many multiply-adds runs on the calling thread alone: waking a pool thread costs tens
# of microseconds, more than such a call takes.
_MIN_PARALLEL_WORK = 1 << 20


# ----------------------------------------------------------------------------------------------------
# JIT settings
# ----------------------------------------------------------------------------------------------------
def _jit(fn: Callable) -> Callable:
    """``njit`` with the GIL released, numpy error model, no fast-math (see the module docstring).

    ``cache=True`` needs a writable cache location; numba raises at decoration time when it finds none
    (read-only install, no writable home), in which case we compile per process instead of failing.
    """
    opts = {"nogil": True, "error_model": "numpy", "boundscheck": False, "fastmath": False}
    try:
        return numba.njit(cache=True, **opts)(fn)
    except RuntimeError:
        return numba.njit(cache=False, **opts)(fn)


# ----------------------------------------------------------------------------------------------------
# Inner loops: y[yr, yc + i] += sum_q A[ar_q, ac_q + i] * B[br_q, bc_q + i], q in order, i in [0, n)
#
# Every index is uint64: numba wraps negative signed indices around (``a[-1]``), and that per-element check
# stops LLVM from vectorizing; unsigned indices have no such check, and inlined into the caller (no array
# slices built per call) the loops vectorize to full-width SIMD with a single runtime alias check per
# operand array. Callers guarantee every index is in bounds.
# ----------------------------------------------------------------------------------------------------
_U = np.uint64


def _inline(fn: Callable) -> Callable:
    return numba.njit(inline="always", nogil=True, error_model="numpy", boundscheck=False, fastmath=False)(fn)


@_inline
def _fma1(y, yr, yc, A, ar0, ac0, B, br0, bc0, n):
    for i in range(n):
        y[yr, yc + i] += A[ar0, ac0 + i] * B[br0, bc0 + i]


@_inline
def _fma2(y, yr, yc, A, ar0, ac0, ar1, ac1, B, br0, bc0, br1, bc1, n):
    for i in range(n):
        y[yr, yc + i] = (y[yr, yc + i] + A[ar0, ac0 + i] * B[br0, bc0 + i]) + A[ar1, ac1 + i] * B[br1, bc1 + i]


@_inline
def _fma3(y, yr, yc, A, ar0, ac0, ar1, ac1, ar2, ac2, B, br0, bc0, br1, bc1, br2, bc2, n):
    for i in range(n):
        y[yr, yc + i] = ((y[yr, yc + i] + A[ar0, ac0 + i] * B[br0, bc0 + i]) + A[ar1, ac1 + i] * B[br1, bc1 + i]) + A[
            ar2, ac2 + i
        ] * B[br2, bc2 + i]


@_inline
def _fma4(y, yr, yc, A, ar0, ac0, ar1, ac1, ar2, ac2, ar3, ac3, B, br0, bc0, br1, bc1, br2, bc2, br3, bc3, n):
    for i in range(n):
        y[yr, yc + i] = (
            ((y[yr, yc + i] + A[ar0, ac0 + i] * B[br0, bc0 + i]) + A[ar1, ac1 + i] * B[br1, bc1 + i])
            + A[ar2, ac2 + i] * B[br2, bc2 + i]
        ) + A[ar3, ac3 + i] * B[br3, bc3 + i]


@_inline
def _add_row(y, yr, yc, b, n):
    for i in range(n):
        y[yr, yc + i] += b[yc + i]


@_inline
def _zero_row(y, yr, yc, n):
    for i in range(n):
        y[yr, yc + i] = 0


@_inline
def _item_block(item, n_mb, mb, M, tb, n_cols):
    """Work item -> its rows ``[m0, m1)`` and output columns ``[c0, c1)``: items are (column tile of
    ``tb``) x (block of ``mb`` rows), tile-major."""
    tile = item // n_mb
    m0 = (item - tile * n_mb) * mb
    c0 = tile * tb
    return m0, min(m0 + mb, M), c0, min(c0 + tb, n_cols)


@_inline
def _zero_block(y, m0, m1, c0, c1):
    for m in range(m0, m1):
        _zero_row(y, _U(m), _U(c0), _U(c1 - c0))


@_inline
def _add_bias_block(y, bias, m0, m1, c0, c1):
    if bias.shape[0] > 0:
        for m in range(m0, m1):
            _add_row(y, _U(m), _U(c0), bias, _U(c1 - c0))


# ----------------------------------------------------------------------------------------------------
# The three primitives. Each processes work items [item0, item1) of a fixed tiling of its output.
# Outer-loop arithmetic is int64; values cross into the uint64 inner loops only once known non-negative.
# ----------------------------------------------------------------------------------------------------
@_jit
def _gather_kernel(a, v, off, bias, out, tb, mb, item0, item1):
    """out[m, t] = bias[t] + sum_j v[j, t] * a[m, (t + off[j]) mod L].   a (M, L), v (k, D), out (M, D).

    Items are (column tile of width tb) x (block of mb rows), tile-major.
    """
    M, L = a.shape
    k, D = v.shape
    n_mb = (M + mb - 1) // mb
    for item in range(item0, item1):
        m0, m1, t0, t1 = _item_block(item, n_mb, mb, M, tb, D)
        _zero_block(out, m0, m1, t0, t1)
        j = 0
        while j + 4 <= k:
            o0 = np.int64(off[j])
            o1 = np.int64(off[j + 1])
            o2 = np.int64(off[j + 2])
            o3 = np.int64(off[j + 3])
            s = t0
            while s < t1:
                # Cut [s, t1) at the next wrap point L - o of any of the four: inside each piece every
                # diagonal reads a at a constant shift (o before its wrap point, o - L after it).
                e = t1
                for w in (L - o0, L - o1, L - o2, L - o3):
                    if s < w < e:
                        e = w
                c0 = s + o0 if s < L - o0 else s + o0 - L
                c1 = s + o1 if s < L - o1 else s + o1 - L
                c2 = s + o2 if s < L - o2 else s + o2 - L
                c3 = s + o3 if s < L - o3 else s + o3 - L
                uj, us, un = _U(j), _U(s), _U(e - s)
                for m in range(m0, m1):
                    um = _U(m)
                    _fma4(
                        out, um, us,
                        v, uj, us, uj + _U(1), us, uj + _U(2), us, uj + _U(3), us,
                        a, um, _U(c0), um, _U(c1), um, _U(c2), um, _U(c3),
                        un,
                    )  # fmt: skip
                s = e
            j += 4
        while j < k:
            o = np.int64(off[j])
            w = min(max(L - o, t0), t1)  # columns [t0, w) read a[t + o], [w, t1) read a[t + o - L]
            uj = _U(j)
            for m in range(m0, m1):
                um = _U(m)
                if w > t0:
                    _fma1(out, um, _U(t0), v, uj, _U(t0), a, um, _U(t0 + o), _U(w - t0))
                if t1 > w:
                    _fma1(out, um, _U(w), v, uj, _U(w), a, um, _U(w + o - L), _U(t1 - w))
            j += 1
        _add_bias_block(out, bias, m0, m1, t0, t1)


@_jit
def _masked_gather_kernel(a, v, off, bias, out, tb, mb, item0, item1):
    """out[m, r] = bias[r] + sum_j [c < D] v[j, c] * a[m, c], c = (r - off[j]) mod L.   a (M, D), out (M, L).

    Diagonal j covers rows [o, o + D) with c = r - o and, when o + D > L, rows [0, o + D - L) with
    c = r - o + L. Items are (row tile of width tb) x (block of mb rows of a), tile-major.
    """
    M, D = a.shape
    k = v.shape[0]
    L = out.shape[1]
    n_mb = (M + mb - 1) // mb
    act_j = np.empty(4, np.uint64)
    act_c = np.empty(4, np.uint64)
    for item in range(item0, item1):
        m0, m1, r0, r1 = _item_block(item, n_mb, mb, M, tb, L)
        _zero_block(out, m0, m1, r0, r1)
        j = 0
        while j < k:
            g = min(4, k - j)
            s = r0
            while s < r1:
                # Cut [s, r1) where any of the g diagonals starts, ends or wraps; inside a piece each is
                # either absent or reads v and a at the constant column c = r - o (mod L).
                e = r1
                for q in range(g):
                    o = np.int64(off[j + q])
                    for cut in (o, o + D, o + D - L):
                        if s < cut < e:
                            e = cut
                n = 0
                for q in range(g):  # the diagonals present on [s, e), in ascending j
                    o = np.int64(off[j + q])
                    c = s - o if s >= o else s - o + L
                    if c < D:
                        act_j[n] = j + q
                        act_c[n] = c
                        n += 1
                us, un = _U(s), _U(e - s)
                if n == 4:
                    j0, j1, j2, j3 = act_j[0], act_j[1], act_j[2], act_j[3]
                    c0, c1, c2, c3 = act_c[0], act_c[1], act_c[2], act_c[3]
                    for m in range(m0, m1):
                        um = _U(m)
                        _fma4(
                            out, um, us,
                            v, j0, c0, j1, c1, j2, c2, j3, c3,
                            a, um, c0, um, c1, um, c2, um, c3,
                            un,
                        )  # fmt: skip
                elif n == 3:
                    j0, j1, j2 = act_j[0], act_j[1], act_j[2]
                    c0, c1, c2 = act_c[0], act_c[1], act_c[2]
                    for m in range(m0, m1):
                        um = _U(m)
                        _fma3(out, um, us, v, j0, c0, j1, c1, j2, c2, a, um, c0, um, c1, um, c2, un)
                elif n == 2:
                    j0, j1 = act_j[0], act_j[1]
                    c0, c1 = act_c[0], act_c[1]
                    for m in range(m0, m1):
                        um = _U(m)
                        _fma2(out, um, us, v, j0, c0, j1, c1, a, um, c0, um, c1, un)
                elif n == 1:
                    j0, c0 = act_j[0], act_c[0]
                    for m in range(m0, m1):
                        um = _U(m)
                        _fma1(out, um, us, v, j0, c0, a, um, c0, un)
                s = e
            j += g
        _add_bias_block(out, bias, m0, m1, r0, r1)


@_jit
def _masked_scatter_kernel(a, v, off, bias, out, tb, mb, item0, item1):
    """The masked gather, diagonal-major: same contract and bits as ``_masked_gather_kernel``, any tiling.

    Diagonal j adds ``v[j, c] * a[m, c]`` to output rows ``r = (o + c) mod L``: the contiguous runs
    ``[o, o + n1)`` (c from 0) and, where it wraps past L, ``[0, D - n1)`` (c from n1), each clipped to the
    item's tile ``[r0, r1)``. Every run is as long as the diagonal allows, where cutting the tile at the
    starts, ends and wraps of 4 diagonals at a time leaves runs of ~tb/12 elements on narrow layers. Each
    output element still sums its diagonals in ascending j before the bias, so the bits do not change.
    """
    M, D = a.shape
    k = v.shape[0]
    L = out.shape[1]
    n_mb = (M + mb - 1) // mb
    for item in range(item0, item1):
        m0, m1, r0, r1 = _item_block(item, n_mb, mb, M, tb, L)
        _zero_block(out, m0, m1, r0, r1)
        for j in range(k):
            o = np.int64(off[j])
            n1 = min(D, L - o)
            # run 1: rows [o, o + n1) <- columns [0, n1); run 2: rows [0, D - n1) <- columns [n1, D)
            s1, e1 = max(o, r0), min(o + n1, r1)
            s2, e2 = r0, min(D - n1, r1)
            uj = _U(j)
            for m in range(m0, m1):
                um = _U(m)
                if s1 < e1:
                    _fma1(out, um, _U(s1), v, uj, _U(s1 - o), a, um, _U(s1 - o), _U(e1 - s1))
                if s2 < e2:
                    _fma1(out, um, _U(s2), v, uj, _U(s2 - o + L), a, um, _U(s2 - o + L), _U(e2 - s2))
        _add_bias_block(out, bias, m0, m1, r0, r1)


@_jit
def _sddmm_kernel(a, b, off, out, jc, tb, item0, item1):
    """out[j, t] = sum_m a[m, t] * b[m, (t + off[j]) mod L], rows m ascending.   a (M, D), b (M, L).

    Items are (block of jc diagonals) x (column tile of width tb), diagonal-block-major.
    """
    M, D = a.shape
    L = b.shape[1]
    k = off.shape[0]
    n_tt = (D + tb - 1) // tb
    for item in range(item0, item1):
        jb = item // n_tt
        t0 = (item - jb * n_tt) * tb
        t1 = min(t0 + tb, D)
        j0 = jb * jc
        j1 = min(j0 + jc, k)
        for j in range(j0, j1):
            _zero_row(out, _U(j), _U(t0), _U(t1 - t0))
        m = 0
        while m < M:
            g = min(4, M - m)
            # g rows of a and b stay in cache while every diagonal of the block consumes them.
            um0 = _U(m)
            um1, um2, um3 = um0 + _U(1), um0 + _U(2), um0 + _U(3)
            for j in range(j0, j1):
                o = np.int64(off[j])
                w = min(max(L - o, t0), t1)  # columns [t0, w) read b[t + o], [w, t1) read b[t + o - L]
                for ys, ye, h in ((t0, w, o), (w, t1, o - L)):
                    if ye > ys:
                        uj, uy, un, ub = _U(j), _U(ys), _U(ye - ys), _U(ys + h)
                        if g == 4:
                            _fma4(
                                out, uj, uy,
                                a, um0, uy, um1, uy, um2, uy, um3, uy,
                                b, um0, ub, um1, ub, um2, ub, um3, ub,
                                un,
                            )  # fmt: skip
                        elif g == 3:
                            _fma3(out, uj, uy, a, um0, uy, um1, uy, um2, uy, b, um0, ub, um1, ub, um2, ub, un)
                        elif g == 2:
                            _fma2(out, uj, uy, a, um0, uy, um1, uy, b, um0, ub, um1, ub, un)
                        else:
                            _fma1(out, uj, uy, a, um0, uy, b, um0, ub, un)
            m += g


@_jit
def _offsets_problem(off, L):
    """0 if the offsets are distinct and in ``[0, L)``; 1 for one out of range, 2 for a duplicate."""
    seen = np.zeros(L, np.bool_)
    for j in range(off.shape[0]):
        o = off[j]
        if o < 0 or o >= L:
            return 1
        if seen[o]:
            return 2
        seen[o] = True
    return 0


# Plain copies between the (k, D) diagonals and a dense (N_out, N_in) matrix, for the ``dense`` path: the
# reference builds two (k, D) int64 index tensors per call (arange, add, remainder, expand, index_put), ~60 us
# of small torch ops even for a 64 x 64 layer, paid twice a training step (forward and input gradient).
@_jit
def _to_dense_kernel(v, off, w, tall):
    """w[row(j, t), col(j, t)] = v[j, t] for every stored entry; the rest of ``w`` is left as it is."""
    k, D = v.shape
    if tall:  # w[(t + o) mod L, t]: per diagonal, t walks rows and columns together
        L = w.shape[0]
        for j in range(k):
            o = np.int64(off[j])
            for t in range(D):
                r = t + o
                w[r - L if r >= L else r, t] = v[j, t]
    else:  # w[t, (t + o) mod L]: per row t, its k entries
        L = w.shape[1]
        for t in range(D):
            for j in range(k):
                c = t + np.int64(off[j])
                w[t, c - L if c >= L else c] = v[j, t]


@_jit
def _extract_kernel(w, off, out, tall):
    """out[j, t] = w[row(j, t), col(j, t)]: the inverse of ``_to_dense_kernel``."""
    k, D = out.shape
    L = w.shape[0] if tall else w.shape[1]
    for j in range(k):
        o = np.int64(off[j])
        for t in range(D):
            c = t + o
            c = c - L if c >= L else c
            out[j, t] = w[c, t] if tall else w[t, c]


# ----------------------------------------------------------------------------------------------------
# Entry points: addresses in, arrays inside.
#
# The Python side passes each tensor's address and shape; these view the memory as arrays (numba.carray) and
# call the kernels above. ``Tensor.numpy()`` would do the same at ~1.2 us a tensor plus numba's typing of each
# array (together ~7 us of a 64-wide layer's ~12 us kernel call, measured), and it marks the tensor's storage
# as never resizable again, which breaks FSDP2: it frees and re-allocates the unsharded parameters' storage
# around every forward. Callers pass tensors from ``_c`` and hold them until the call has returned (and ``_run``'s
# pool threads until their range has run).
# ``like`` is an empty array of the kernel's float dtype: it picks the specialization.
# ----------------------------------------------------------------------------------------------------
@intrinsic
def _voidptr(typingctx, addr):
    """The integer ``addr`` as a ``void*``, for ``numba.carray``."""
    if not isinstance(addr, numba.types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return numba.types.voidptr(addr), codegen


@_inline
def _view(addr, rows, cols, like):
    return numba.carray(_voidptr(addr), (rows, cols), like.dtype)


@_inline
def _offsets_view(addr, k):
    return numba.carray(_voidptr(addr), (k,), np.int32)


#: ``_rows_at``'s kernel numbers.
_ROW_KERNELS: dict[Callable, int] = {_gather_kernel: 0, _masked_gather_kernel: 1, _masked_scatter_kernel: 2}


@_jit
def _rows_at(which, pa, M, na, pv, k, D, poff, pb, nb, pout, n_out, tb, mb, like, item0, item1):
    """``(_gather_kernel, _masked_gather_kernel, _masked_scatter_kernel)[which]`` on ``a (M, na)``,
    ``v (k, D)``, ``off (k,)``, ``bias (nb,)``, ``out (M, n_out)``."""
    a, v, off = _view(pa, M, na, like), _view(pv, k, D, like), _offsets_view(poff, k)
    bias = numba.carray(_voidptr(pb), (nb,), like.dtype)
    out = _view(pout, M, n_out, like)
    if which == 0:
        _gather_kernel(a, v, off, bias, out, tb, mb, item0, item1)
    elif which == 1:
        _masked_gather_kernel(a, v, off, bias, out, tb, mb, item0, item1)
    else:
        _masked_scatter_kernel(a, v, off, bias, out, tb, mb, item0, item1)


@_jit
def _sddmm_at(pa, M, D, pb, L, poff, k, pout, jc, tb, like, item0, item1):
    """``_sddmm_kernel`` on ``a (M, D)``, ``b (M, L)``, ``off (k,)``, ``out (k, D)``."""
    a, b, off, out = _view(pa, M, D, like), _view(pb, M, L, like), _offsets_view(poff, k), _view(pout, k, D, like)
    _sddmm_kernel(a, b, off, out, jc, tb, item0, item1)


@_jit
def _offsets_problem_at(poff, k, L):
    return _offsets_problem(_offsets_view(poff, k), L)


@_jit
def _to_dense_at(pv, k, D, poff, pw, n_out, n_in, like):
    _to_dense_kernel(_view(pv, k, D, like), _offsets_view(poff, k), _view(pw, n_out, n_in, like), n_out > n_in)


@_jit
def _extract_at(pw, n_out, n_in, poff, pout, k, D, like):
    _extract_kernel(_view(pw, n_out, n_in, like), _offsets_view(poff, k), _view(pout, k, D, like), n_out > n_in)


# ----------------------------------------------------------------------------------------------------
# Tiling. Results never depend on it: every output element is reduced in the same order whatever the
# tiles (see the module docstring), so tiles may be sized for the thread count.
# ----------------------------------------------------------------------------------------------------
def _round_up(n: int, q: int) -> int:
    return (n + q - 1) // q * q


@functools.lru_cache(maxsize=4096)  # pure in its ints; ~1 us of Python per call saved
def _gather_tiling(M: int, n_cols: int, threads: int) -> tuple[int, int, int]:
    """``(tb, mb, n_items)`` for the two gathers: column tiles of ``tb`` x blocks of ``mb`` rows.

    The ``mb x tb`` accumulator block (<= 32 KiB in float32) stays in L1 while ``values[j, tile]`` is reused
    by the ``mb`` rows. At small ``M`` the kernel streams the values from DRAM, and long contiguous runs of
    ``values[j]`` stream best (measured: 512-wide tiles reach ~60% of the bandwidth of 2048-wide ones), so
    the tiles are as wide as possible while giving every thread the same number of them.
    """
    mb = min(M, 8)
    tb_max = max(256, min(4096, 8192 // mb))
    n_mb = math.ceil(M / mb)
    n_tiles = math.ceil(n_cols / tb_max)
    if n_mb < 4 * threads:
        n_tiles = threads * math.ceil(n_cols / (threads * tb_max))
    tb = _round_up(math.ceil(n_cols / n_tiles), 16)  # equal tiles with 64-byte aligned starts
    return tb, mb, math.ceil(n_cols / tb) * n_mb


@functools.lru_cache(maxsize=4096)  # pure in its ints; ~1 us of Python per call saved
def _scatter_tiling(M: int, L: int, threads: int) -> tuple[int, int, int]:
    """``(tb, mb, n_items)`` for the diagonal-major masked gather: whole output rows where possible.

    A block of ``mb`` rows of ``L`` outputs (<= 32 KiB in float32) stays in L1 while each diagonal's values
    are reused by its ``mb`` rows, so the per-diagonal overhead is paid once per ``mb`` rows. Columns are
    split only when there are too few row blocks to keep every thread busy.
    """
    mb = max(1, min(M, 8192 // L))
    n_mb = math.ceil(M / mb)
    n_tiles = 1 if n_mb >= 4 * threads else threads
    tb = _round_up(math.ceil(L / n_tiles), 16)
    return tb, mb, math.ceil(L / tb) * n_mb


#: The masked gather runs diagonal-major (``_masked_scatter_kernel``) up to this output length L, on layers with
#: short diagonals (D <= 128) or a long side at least twice the short one. Measured (benchmarks/
#: bench_cpu_masked_gather.py -> results/cpu_masked_gather.md): 1.0-2.2x the speed of the output-tiled kernel
#: on such layers from L = 64 to 3072, at M = 1-4096, 1 and 2 threads. Near-square layers with longer
#: diagonals keep the tiled kernel (diagonal-major: 256 x 256 0.92-1.2x, 768 x 768 0.73-0.85x): each of its
#: 4-diagonal pieces spans most of a tile there, so it loses little to cutting and keeps its 4x lower
#: accumulator traffic. So does L = 14336 (0.43-0.85x: a block of output rows no longer fits in L1).
_SCATTER_MAX_L = 4096
_SCATTER_MAX_SQUARE_D = 128


def _masked_gather_plan(M: int, L: int, D: int, threads: int) -> tuple[Callable, tuple[int, int, int]]:
    """The masked-gather kernel for an ``(M, L)`` output from ``(M, D)`` inputs, and its ``(tb, mb, n_items)``."""
    if L <= _SCATTER_MAX_L and (D <= _SCATTER_MAX_SQUARE_D or L >= 2 * D):
        return _masked_scatter_kernel, _scatter_tiling(M, L, threads)
    return _masked_gather_kernel, _gather_tiling(M, L, threads)


@functools.lru_cache(maxsize=4096)  # pure in its ints; ~1 us of Python per call saved
def _sddmm_tiling(k: int, D: int, threads: int) -> tuple[int, int, int]:
    """``(jc, tb, n_items)``: blocks of ``jc`` diagonals x column tiles of ``tb`` (a block is <= 64 KiB)."""
    n_tiles = math.ceil(D / 512)
    tb = _round_up(math.ceil(D / n_tiles), 16)
    n_tiles = math.ceil(D / tb)
    jc = max(1, min(k, 16384 // tb))
    while jc > 1 and math.ceil(k / jc) * n_tiles < 4 * threads:
        jc //= 2
    return jc, tb, math.ceil(k / jc) * n_tiles


# ----------------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------------
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def _get_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of at least ``workers`` threads. A smaller one is replaced, never shut down: another thread may
    have just got it and still be submitting its ranges (a shut-down pool refuses them). Once no caller holds
    it any more it is garbage-collected, and its threads exit after the work already queued."""
    global _pool, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_workers < workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diagcompile-cpu")
            _pool_workers = workers
        return _pool


def _reset_pool_after_fork() -> None:
    # A forked child inherits the executor object but not its threads: submitting to it would hang.
    global _pool, _pool_workers, _pool_lock
    _pool, _pool_workers, _pool_lock = None, 0, threading.Lock()


#: Whether this thread's fork holds numba's compiler lock (its wait may have been interrupted: a Ctrl-C then
#: only prints, as CPython reports an at-fork handler's exception, and the fork goes ahead without the lock).
_fork_holds = threading.local()


def _hold_compiler_lock() -> None:
    # A child forked while another thread compiles would inherit numba's compiler lock held by a thread it does
    # not have, and hang at its first compile; a child forked in the middle of a compile could not trust numba's
    # caches either. So a fork waits for a running compile to end (as glibc's fork holds malloc's locks).
    _fork_holds.lock = False
    global_compiler_lock.acquire()
    _fork_holds.lock = True


def _release_compiler_lock() -> None:
    if getattr(_fork_holds, "lock", False):  # not if the wait failed, or the handlers came in during a fork
        _fork_holds.lock = False
        global_compiler_lock.release()


def _after_fork_in_child() -> None:
    _reset_pool_after_fork()  # first: whatever happened to the lock, the parent's pool threads are not here
    _release_compiler_lock()  # held by the forking thread, the child's only thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_hold_compiler_lock, after_in_parent=_release_compiler_lock, after_in_child=_after_fork_in_child
    )


def _num_threads(work: int) -> int:
    """Threads for a call of ``work`` multiply-adds: ``torch.get_num_threads()``, fewer for small calls."""
    return max(1, min(torch.get_num_threads(), work // _MIN_PARALLEL_WORK))


def _run(kernel: Callable, args: tuple, n_items: int, threads: int, tensors: tuple[Tensor, ...] = ()) -> None:
    """Run ``kernel(*args, i0, i1)`` over ``[0, n_items)`` in ``threads`` contiguous, equal ranges.

    Ranges are disjoint sets of output tiles, so the threads never write the same memory. ``tensors``: those whose
    addresses ``args`` holds, inputs and output (none where ``args`` holds arrays, as the benchmarks pass).
    """
    n = max(1, min(threads, n_items))
    if n == 1:
        kernel(*args, 0, n_items)
        return
    bounds = [n_items * i // n for i in range(n + 1)]
    pool = _get_pool(n - 1)
    # Each range holds the tensors until it has run: an exception raised in this thread while it waits below (Ctrl-C,
    # a signal-based timeout) or a failed submit leaves the caller, which frees its tensors, while a pool thread may
    # still read and write them by address.
    futures = [pool.submit(_run_range, kernel, args, tensors, bounds[i], bounds[i + 1]) for i in range(1, n)]
    try:
        kernel(*args, bounds[0], bounds[1])
    finally:
        # Wait for every range even if ours raised: they write into the output we are about to return.
        errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err


def _run_range(kernel: Callable, args: tuple, tensors: tuple[Tensor, ...], item0: int, item1: int) -> None:
    """``kernel(*args, item0, item1)`` on a pool thread; ``tensors`` (unused) stay alive while it runs."""
    kernel(*args, item0, item1)


# ----------------------------------------------------------------------------------------------------
# Public functions (the provider interface of ops/dispatch.py)
# ----------------------------------------------------------------------------------------------------
def supports(dtype: torch.dtype) -> bool:
    """Whether a native kernel exists for ``dtype`` (float32, float64)."""
    return dtype in SUPPORTED_DTYPES


def _check_dtype(dtype: torch.dtype) -> None:
    if not supports(dtype):
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"the CPU diagonal kernel supports {names}, got {dtype}; use the reference or dense path")


_is_functorch_wrapped: Callable[[Tensor], bool] = torch._C._functorch.is_functorch_wrapped_tensor

#: An empty array per kernel dtype, the ``like`` argument of the entry points.
_LIKE: dict[torch.dtype, np.ndarray] = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def _c(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as a C-contiguous CPU tensor in ``dtype``: ``t`` itself where it already is one, else a copy.

    The entry points read ``data_ptr()``: hold the result until the kernel has returned.
    """
    if not t.is_cpu:
        raise ValueError(f"the CPU diagonal kernel got a tensor on {t.device}")
    if t._is_zerotensor():  # torch's efficient zeros (torch.sgn's gradient, ...) have no memory: data_ptr() is 0
        return torch.zeros(t.shape, dtype=dtype)
    if _is_functorch_wrapped(t):
        # A wrapper of a torch.func level that has exited (the saved tensors torch.func.vjp's function reads) has no
        # memory of its own; detach() gives the plain tensor under it.
        t = t.detach()
    if t.dtype != dtype:
        t = t.detach().to(dtype)
    if not t.is_contiguous():
        t = t.detach().contiguous()
    if t.is_neg():  # a lazily negated view (torch._neg_view): its memory holds -t
        t = t.resolve_neg()
    if t.data_ptr() % t.element_size():
        # numba.carray's views are typed aligned; a tensor over a byte buffer at an odd offset (torch.frombuffer) is
        # not. x86 reads it anyway, but the compiled code may assume otherwise: an aligned copy.
        t = t.clone()
    return t


def _c_offsets(offsets: Tensor, L: int) -> Tensor:
    """``offsets`` as a C-contiguous int32 tensor (``_c``), validated: distinct and in ``[0, L)``."""
    if offsets.dim() != 1:
        raise ValueError(f"offsets must be 1-D (k,), got shape {tuple(offsets.shape)}")
    if offsets.dtype != torch.int32:
        if offsets.dtype != torch.int64:
            raise TypeError(f"offsets must be int32 (or int64), got {offsets.dtype}")
        # Range-check before the int32 cast, which would wrap 2**32 + 1 to 1 (the reference takes it mod P).
        if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) >= L):
            raise ValueError(f"offsets must lie in [0, P={L}); got min {int(offsets.min())}, max {int(offsets.max())}")
    off = _c(offsets, torch.int32)
    # One pass over k integers, and the kernels index without bounds checks: never trust them blindly. A
    # duplicate would be summed by the kernels but written once by a dense scatter: refused on every path.
    problem = _offsets_problem_at(off.data_ptr(), off.shape[0], L)
    if problem == 1:
        raise ValueError(f"offsets must lie in [0, P={L}); got min {int(off.min())}, max {int(off.max())}")
    if problem == 2:
        uniq, counts = torch.unique(off, return_counts=True)
        raise ValueError(f"offsets must be distinct; {uniq[counts > 1][:5].tolist()} appear more than once")
    return off


def check_offsets(offsets: Tensor, L: int) -> None:
    """Raise ``ValueError`` unless the CPU ``offsets`` are 1-D, distinct and in ``[0, L)`` (``L = P``)."""
    _c_offsets(offsets, L)


def _check_values(values: Tensor, offsets: Tensor, D: int) -> None:
    if values.dim() != 2 or values.shape[1] != D or values.shape[0] != offsets.shape[0]:
        raise ValueError(f"values must be (k, D) = ({offsets.shape[0]}, {D}) for this layer, got {tuple(values.shape)}")


def _check_2d(t: Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (M, features), got shape {tuple(t.shape)}")


def forward(x2: Tensor, values: Tensor, offsets: Tensor, bias: Tensor, out_features: int) -> Tensor:
    """``y = x2 @ W.T + bias`` (wide: gather, tall: masked gather; bias fused).

    Args:
        x2: ``(M, N_in)``.
        values: ``(k, D)``.
        offsets: ``(k,)`` int32 in ``[0, P)``.
        bias: ``(N_out,)``, or empty ``(0,)`` for no bias.
        out_features: ``N_out``.

    Returns:
        ``(M, N_out)`` in ``x2.dtype``.
    """
    dtype = x2.dtype
    _check_dtype(dtype)
    _check_2d(x2, "x2")
    M, n_in = x2.shape
    P, D = max(out_features, n_in), min(out_features, n_in)
    _check_values(values, offsets, D)
    if bias.numel() not in (0, out_features):
        raise ValueError(f"bias must have out_features={out_features} entries or none, got {bias.numel()}")
    off = _c_offsets(offsets, P)  # also for M == 0: every path refuses bad offsets alike
    out = torch.empty(M, out_features, dtype=dtype)
    if M == 0:
        return out
    a, v, b = _c(x2, dtype), _c(values, dtype), _c(bias if bias.dim() == 1 else bias.reshape(-1), dtype)
    k = off.shape[0]
    n = _num_threads(M * k * D)
    if out_features > n_in:
        kernel, (tb, mb, n_items) = _masked_gather_plan(M, out_features, n_in, n)
    else:
        kernel, (tb, mb, n_items) = _gather_kernel, _gather_tiling(M, out_features, n)
    args = (_ROW_KERNELS[kernel], a.data_ptr(), M, n_in, v.data_ptr(), k, D, off.data_ptr())
    args += (b.data_ptr(), b.shape[0], out.data_ptr(), out_features, tb, mb, _LIKE[dtype])
    _run(_rows_at, args, n_items, n, (a, v, off, b, out))
    return out


def input_grad(dy2: Tensor, values: Tensor, offsets: Tensor, in_features: int) -> Tensor:
    """``dx = dy2 @ W`` (tall: gather, wide: masked gather).

    Args:
        dy2: ``(M, N_out)``.
        values: ``(k, D)``.
        offsets: ``(k,)`` int32 in ``[0, P)``.
        in_features: ``N_in``.

    Returns:
        ``(M, N_in)`` in ``dy2.dtype``.
    """
    dtype = dy2.dtype
    _check_dtype(dtype)
    _check_2d(dy2, "dy2")
    M, n_out = dy2.shape
    P, D = max(n_out, in_features), min(n_out, in_features)
    _check_values(values, offsets, D)
    off = _c_offsets(offsets, P)
    out = torch.empty(M, in_features, dtype=dtype)
    if M == 0:
        return out
    a, v = _c(dy2, dtype), _c(values, dtype)
    k = off.shape[0]
    n = _num_threads(M * k * D)
    # W^T is diagonal with the same offsets in the other orientation: tall dx is a gather, wide a masked one.
    if n_out > in_features:
        kernel, (tb, mb, n_items) = _gather_kernel, _gather_tiling(M, in_features, n)
    else:
        kernel, (tb, mb, n_items) = _masked_gather_plan(M, in_features, n_out, n)
    args = (_ROW_KERNELS[kernel], a.data_ptr(), M, n_out, v.data_ptr(), k, D, off.data_ptr())
    args += (0, 0, out.data_ptr(), in_features, tb, mb, _LIKE[dtype])  # no bias: address 0, length 0
    _run(_rows_at, args, n_items, n, (a, v, off, out))
    return out


def values_grad(dy2: Tensor, x2: Tensor, offsets: Tensor) -> Tensor:
    """``dV[j, t] = sum_m dy2[m, row(j, t)] * x2[m, col(j, t)]`` (sddmm), rows summed in order.

    Args:
        dy2: ``(M, N_out)``.
        x2: ``(M, N_in)``.
        offsets: ``(k,)`` int32 in ``[0, P)``.

    Returns:
        ``(k, D)`` in ``x2.dtype``.
    """
    dtype = x2.dtype
    _check_dtype(dtype)
    _check_2d(dy2, "dy2")
    _check_2d(x2, "x2")
    if dy2.shape[0] != x2.shape[0]:
        raise ValueError(f"dy2 and x2 disagree on M: {dy2.shape[0]} vs {x2.shape[0]}")
    M, n_out = dy2.shape
    n_in = x2.shape[1]
    P, D = max(n_out, n_in), min(n_out, n_in)
    k = offsets.shape[0]
    off = _c_offsets(offsets, P)
    out = torch.empty(k, D, dtype=dtype)
    if M == 0 or k == 0:
        return out.zero_()
    # The short side is the "a" operand, the long (wrapping) side "b".
    a, b = (_c(x2, dtype), _c(dy2, dtype)) if n_out > n_in else (_c(dy2, dtype), _c(x2, dtype))
    n = _num_threads(M * k * D)
    jc, tb, n_items = _sddmm_tiling(k, D, n)
    args = (a.data_ptr(), M, D, b.data_ptr(), P, off.data_ptr(), k, out.data_ptr(), jc, tb, _LIKE[dtype])
    _run(_sddmm_at, args, n_items, n, (a, b, off, out))
    return out


def to_dense(values: Tensor, offsets: Tensor, out_features: int, in_features: int) -> Tensor:
    """The dense ``(N_out, N_in)`` weight in ``values.dtype``; bit-identical to ``reference.to_dense``.

    Args:
        values: ``(k, D)``.
        offsets: ``(k,)`` distinct, in ``[0, P)``.
    """
    dtype = values.dtype
    _check_dtype(dtype)
    P, D = max(out_features, in_features), min(out_features, in_features)
    _check_values(values, offsets, D)
    w = torch.zeros(out_features, in_features, dtype=dtype)
    v, off = _c(values, dtype), _c_offsets(offsets, P)
    _to_dense_at(v.data_ptr(), off.shape[0], D, off.data_ptr(), w.data_ptr(), out_features, in_features, _LIKE[dtype])
    return w


def extract_diagonals(weight: Tensor, offsets: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """The chosen diagonals of a dense ``(N_out, N_in)`` matrix, ``(k, D)``; ``reference.extract_diagonals``
    followed by a cast to ``out_dtype`` (default: ``weight.dtype``), bit for bit."""
    dtype = weight.dtype
    _check_dtype(dtype)
    _check_2d(weight, "weight")
    n_out, n_in = weight.shape
    D = min(n_out, n_in)
    w, off = _c(weight, dtype), _c_offsets(offsets, max(n_out, n_in))
    out = torch.empty(off.shape[0], D, dtype=dtype)
    _extract_at(w.data_ptr(), n_out, n_in, off.data_ptr(), out.data_ptr(), off.shape[0], D, _LIKE[dtype])
    return out if out_dtype is None or out_dtype == dtype else out.to(out_dtype)


def warmup(dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> None:
    """Compile (or load from numba's cache) every kernel for ``dtypes`` now, instead of on first use."""
    for dtype in dtypes:
        x = torch.randn(5, 3, dtype=dtype)
        offsets = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
        values = torch.randn(5, 3, dtype=dtype)
        for n_out, n_in in ((3, 5), (5, 3)):
            xi = torch.randn(5, n_in, dtype=dtype)
            forward(xi, values, offsets, torch.randn(n_out, dtype=dtype), n_out)
            input_grad(torch.randn(5, n_out, dtype=dtype), values, offsets, n_in)
        values_grad(x, torch.randn(5, 5, dtype=dtype), offsets)
        for n_out, n_in in ((3, 5), (5, 3)):
            extract_diagonals(to_dense(values, offsets, n_out, n_in), offsets)

"""The diagonal-sparse representation and its reference math. This file is the spec.

Representation (the DynaDiag convention)
---------------------------------------
A weight ``W`` of shape ``(N_out, N_in)`` (``nn.Linear`` layout, ``y = x @ W.T + b``) is covered by
``P = max(N_out, N_in)`` candidate diagonals, each of length ``D = min(N_out, N_in)``. Diagonal ``p``,
entry ``t`` in ``[0, D)`` sits at::

    wide or square (N_out <= N_in):  W[t, (t + p) mod N_in]
    tall           (N_out >  N_in):  W[(t + p) mod N_out, t]

Only the longer side wraps. The ``P`` candidates tile ``W`` exactly once (``P * D == N_out * N_in``), so
choosing ``k`` distinct offsets selects exactly ``k * D`` weights. A layer stores

* ``values``  ``(k, D)``: the weights on the chosen diagonals,
* ``offsets`` ``(k,)`` int32: the chosen diagonals, distinct, sorted, in ``[0, P)``.

Density is ``k / P``; from a target sparsity ``s``: ``k = max(1, ceil(floor((1 - s) * N_out * N_in) / D))``.
The largest reachable sparsity is therefore ``1 - 1/P``.

Three primitives
----------------
Let ``L = P`` (the long side) and ``D`` the short side. Every product the layer needs is one of:

* ``gather``        ``out[m, t] = sum_j V[j, t] * a[m, (t + o_j) mod L]``          a: (M, L) -> out: (M, D)
* ``masked_gather`` ``out[m, r] = sum_j [c < D] V[j, c] * a[m, c], c = (r - o_j) mod L``   a: (M, D) -> out: (M, L)
* ``sddmm``         ``dV[j, t]  = sum_m a[m, t] * b[m, (t + o_j) mod L]``          a: (M, D), b: (M, L) -> (k, D)

and the layer maps onto them as

============  ========================  ========================  ==========================
orientation   forward ``y = x W^T``     input grad ``dx = dy W``  values grad ``dV``
============  ========================  ========================  ==========================
wide/square   gather(x)                 masked_gather(dy)         sddmm(a=dy, b=x)
tall          masked_gather(x)          gather(dy)                sddmm(a=x,  b=dy)
============  ========================  ========================  ==========================

because the transpose of a diagonal matrix is a diagonal matrix with the same offsets in the other
orientation. Everything here is plain, vectorized torch: it is the CPU fallback on any device and the
oracle that kernels are tested against. Products accumulate in float32 (float64 stays float64) and
return the input dtype.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "OFFSET_DTYPE",
    "diag_shape",
    "is_tall",
    "k_from_sparsity",
    "kept_entries",
    "max_sparsity",
    "diagonal_indices",
    "to_dense",
    "extract_diagonals",
    "diagonal_norms",
    "topk_offsets",
    "evenly_spaced_offsets",
    "gather_ref",
    "masked_gather_ref",
    "sddmm_ref",
    "diag_linear_ref",
    "diag_linear_dx_ref",
    "diag_linear_dv_ref",
]

#: The one dtype of ``offsets`` inside ops and kernels. int32 because TensorRT plugins and ONNX
#: initializers handle it natively and ``k <= P < 2**31`` always; public functions convert at the boundary.
OFFSET_DTYPE = torch.int32

# Upper bound on the elements of one gathered chunk (M * chunk * D) in the reference, to bound memory.
_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------------
# Shapes and counting
# ----------------------------------------------------------------------------------------------------
def diag_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Return ``(P, D)``: the number of candidate diagonals and the length of each."""
    return max(out_features, in_features), min(out_features, in_features)


def is_tall(out_features: int, in_features: int) -> bool:
    """True when ``N_out > N_in``: the rows (outputs) wrap; otherwise the columns (inputs) wrap."""
    return out_features > in_features


def max_sparsity(out_features: int, in_features: int) -> float:
    """Largest sparsity a layer can reach: one diagonal kept, ``1 - 1/P``."""
    return 1.0 - 1.0 / max(out_features, in_features)


def kept_entries(n_entries: int, sparsity: float) -> int:
    """``floor((1 - s) * n_entries)``, the weights a sparsity ``s`` keeps, exact for decimal ``s``.

    In binary floating point ``1 - 0.8`` is ``0.19999999999999996``, so the plain product lands a hair under
    an integer (``10 * (1 - 0.8) -> 1.9999999999999996``) and the floor drops a whole weight: snap to the
    integer within a relative ``1e-12``, far above the few ulps of rounding and far below one weight.
    """
    x = (1.0 - sparsity) * n_entries
    return math.floor(x + 1e-12 * max(1.0, x))


def k_from_sparsity(out_features: int, in_features: int, sparsity: float) -> int:
    """Number of diagonals ``k`` for a target sparsity ``s`` in ``[0, 1 - 1/P]``.

    ``k = max(1, ceil(floor((1 - s) * N_out * N_in) / D))``: the realised density ``k / P`` is the
    smallest one at or above ``1 - s``.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a float, got {type(sparsity).__name__}")
    sparsity = float(sparsity)  # numpy scalars too
    if out_features < 1 or in_features < 1:
        raise ValueError(f"layer shape must be positive, got out_features={out_features}, in_features={in_features}")
    P, D = diag_shape(out_features, in_features)
    top = max_sparsity(out_features, in_features)
    # A tolerance of float32 rounding: 1 - 1/P computed by the user may differ in the last bit, and a float32
    # 0.99 (numpy, or a tensor's .item()) is 0.9900000095. k is 1 either way.
    if not (0.0 <= sparsity <= top + 1e-7) or math.isnan(sparsity):
        raise ValueError(
            f"sparsity={sparsity} is outside [0, {top:.6g}] for a {out_features}x{in_features} layer "
            f"(at most 1 - 1/P with P={P} candidate diagonals: one diagonal kept)"
        )
    req = kept_entries(out_features * in_features, sparsity)
    return min(P, max(1, math.ceil(req / D)))


# ----------------------------------------------------------------------------------------------------
# Dense <-> diagonal
# ----------------------------------------------------------------------------------------------------
def diagonal_indices(out_features: int, in_features: int, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column of every stored entry.

    Args:
        offsets: ``(k,)`` integer tensor.

    Returns:
        ``(rows, cols)``, each ``(k, D)`` int64 on ``offsets.device``: ``values[j, t]`` is
        ``W[rows[j, t], cols[j, t]]``.
    """
    P, D = diag_shape(out_features, in_features)
    t = torch.arange(D, device=offsets.device, dtype=torch.int64)
    wrapped = (t[None, :] + offsets.to(torch.int64)[:, None]) % P
    fixed = t[None, :].expand_as(wrapped)
    if is_tall(out_features, in_features):
        return wrapped, fixed
    return fixed, wrapped


def to_dense(values: Tensor, offsets: Tensor, out_features: int, in_features: int) -> Tensor:
    """Materialize the dense ``(N_out, N_in)`` weight; entries off the chosen diagonals are zero.

    Args:
        values: ``(k, D)``.
        offsets: ``(k,)`` distinct offsets in ``[0, P)``.
    """
    rows, cols = diagonal_indices(out_features, in_features, offsets)
    W = values.new_zeros(out_features, in_features)
    # Distinct offsets never collide, so a plain index_put (no accumulate) is exact.
    W[rows, cols] = values
    return W


def extract_diagonals(weight: Tensor, offsets: Tensor) -> Tensor:
    """Read the chosen diagonals out of a dense ``(N_out, N_in)`` weight: the inverse of ``to_dense``.

    Returns:
        ``(k, D)`` values, bit-exact copies of the entries of ``weight``.
    """
    rows, cols = diagonal_indices(weight.shape[0], weight.shape[1], offsets)
    return weight[rows, cols]


def diagonal_norms(weight: Tensor) -> Tensor:
    """L2 norm of each of the ``P`` candidate diagonals of a dense weight: ``(P,)`` float32 (float64 stays)."""
    P, _ = diag_shape(weight.shape[0], weight.shape[1])
    all_offsets = torch.arange(P, device=weight.device)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return extract_diagonals(weight.detach().to(acc), all_offsets).norm(dim=1)


def topk_offsets(weight: Tensor, k: int) -> Tensor:
    """The ``k`` diagonals of largest L2 norm, sorted ascending, as int32.

    Ties go to the smaller offset, so the choice is deterministic.
    """
    P, _ = diag_shape(weight.shape[0], weight.shape[1])
    if not 1 <= k <= P:
        raise ValueError(f"k={k} must be in [1, P={P}]")
    norms = diagonal_norms(weight)
    # Stable sort on -norm keeps the smaller offset first among equal norms.
    order = torch.sort(-norms, stable=True).indices[:k]
    return torch.sort(order).values.to(OFFSET_DTYPE)


def evenly_spaced_offsets(
    out_features: int, in_features: int, k: int, device: torch.device | str | None = None
) -> Tensor:
    """``k`` offsets spread evenly over ``[0, P)``: ``floor(i * P / k)``. Distinct and sorted, int32.

    With ``k >= ceil(P / D)`` evenly spaced diagonals reach every unit of the longer side (no dead units),
    which random offsets do not guarantee at extreme sparsity.
    """
    P, _ = diag_shape(out_features, in_features)
    if not 1 <= k <= P:
        raise ValueError(f"k={k} must be in [1, P={P}]")
    i = torch.arange(k, device=device, dtype=torch.int64)
    return ((i * P) // k).to(OFFSET_DTYPE)


# ----------------------------------------------------------------------------------------------------
# The three primitives
# ----------------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk(M: int, D: int, k: int) -> int:
    return max(1, min(k, _CHUNK_ELEMENTS // max(1, M * D)))


def gather_ref(a: Tensor, values: Tensor, offsets: Tensor) -> Tensor:
    """``out[m, t] = sum_j values[j, t] * a[m, (t + offsets[j]) mod L]``.

    Args:
        a: ``(M, L)``, the long-side operand.
        values: ``(k, D)`` with ``D <= L``.
        offsets: ``(k,)`` in ``[0, L)``.

    Returns:
        ``(M, D)`` in ``a.dtype``, accumulated in float32.
    """
    M, L = a.shape
    k, D = values.shape
    acc = _acc_dtype(a.dtype)
    out = torch.zeros(M, D, device=a.device, dtype=acc)
    t = torch.arange(D, device=a.device)
    a32, v32, off = a.to(acc), values.to(acc), offsets.to(torch.int64)
    step = _chunk(M, D, k)
    for j0 in range(0, k, step):
        idx = (t[None, :] + off[j0 : j0 + step, None]) % L  # (c, D)
        out += (a32[:, idx] * v32[j0 : j0 + step]).sum(1)
    return out.to(a.dtype)


def masked_gather_ref(a: Tensor, values: Tensor, offsets: Tensor, L: int) -> Tensor:
    """``out[m, r] = sum_j [c < D] values[j, c] * a[m, c]`` with ``c = (r - offsets[j]) mod L``.

    Equivalently a scatter: each ``a[m, t] * values[j, t]`` lands in row ``(t + offsets[j]) mod L``.

    Args:
        a: ``(M, D)``, the short-side operand.
        values: ``(k, D)``.
        offsets: ``(k,)`` in ``[0, L)``.
        L: the long side, ``>= D``.

    Returns:
        ``(M, L)`` in ``a.dtype``, accumulated in float32.
    """
    M, D = a.shape
    k = values.shape[0]
    acc = _acc_dtype(a.dtype)
    out = torch.zeros(M, L, device=a.device, dtype=acc)
    t = torch.arange(D, device=a.device)
    a32, v32, off = a.to(acc), values.to(acc), offsets.to(torch.int64)
    step = _chunk(M, D, k)
    for j0 in range(0, k, step):
        rows = (t[None, :] + off[j0 : j0 + step, None]) % L  # (c, D)
        contrib = a32[:, None, :] * v32[None, j0 : j0 + step]  # (M, c, D)
        out.index_add_(1, rows.reshape(-1), contrib.reshape(M, rows.numel()))
    return out.to(a.dtype)


def sddmm_ref(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """``dV[j, t] = sum_m a[m, t] * b[m, (t + offsets[j]) mod L]``: a product restricted to the diagonals.

    Args:
        a: ``(M, D)``.
        b: ``(M, L)``.
        offsets: ``(k,)`` in ``[0, L)``.

    Returns:
        ``(k, D)`` in ``a.dtype``, accumulated in float32.
    """
    M, D = a.shape
    L = b.shape[1]
    k = offsets.shape[0]
    acc = _acc_dtype(a.dtype)
    out = torch.empty(k, D, device=a.device, dtype=acc)
    t = torch.arange(D, device=a.device)
    a32, b32, off = a.to(acc), b.to(acc), offsets.to(torch.int64)
    step = _chunk(M, D, k)
    for j0 in range(0, k, step):
        idx = (t[None, :] + off[j0 : j0 + step, None]) % L
        out[j0 : j0 + step] = (a32[:, None, :] * b32[:, idx]).sum(0)
    return out.to(a.dtype)


# ----------------------------------------------------------------------------------------------------
# The layer: forward and the two gradients
# ----------------------------------------------------------------------------------------------------
def diag_linear_ref(x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """``y = x @ W.T + b`` with ``W = to_dense(values, offsets, out_features, N_in)``.

    Args:
        x: ``(..., N_in)``.
        values: ``(k, D)``.
        offsets: ``(k,)``.
        bias: ``(N_out,)``, or ``None`` / an empty tensor for no bias.
        out_features: ``N_out``.

    Returns:
        ``(..., N_out)`` in ``x.dtype``.
    """
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in)
    has_bias = bias is not None and bias.numel() > 0
    acc = _acc_dtype(x.dtype)
    if has_bias and acc != x.dtype:
        # Add the bias to the float32 sum and round once, as the kernels do: rounding the product to
        # bf16/fp16 first and again after the bias is off by many ulps where the two nearly cancel. (The
        # products of bf16/fp16 numbers are exact in float32, so upcasting first changes nothing else.)
        x2, values = x2.to(acc), values.to(acc)
    if is_tall(out_features, n_in):
        y = masked_gather_ref(x2, values, offsets, out_features)
    else:
        y = gather_ref(x2, values, offsets)
    if has_bias:
        y = (y + bias.to(acc)).to(x.dtype)
    return y.reshape(*x.shape[:-1], out_features)


def diag_linear_dx_ref(dy: Tensor, values: Tensor, offsets: Tensor, in_features: int) -> Tensor:
    """``dx = dy @ W``: ``(..., N_out) -> (..., N_in)``."""
    n_out = dy.shape[-1]
    dy2 = dy.reshape(-1, n_out)
    if is_tall(n_out, in_features):
        dx = gather_ref(dy2, values, offsets)
    else:
        dx = masked_gather_ref(dy2, values, offsets, in_features)
    return dx.reshape(*dy.shape[:-1], in_features)


def diag_linear_dv_ref(dy: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
    """``dV[j, t] = sum_m dy[m, row(j, t)] * x[m, col(j, t)]``: ``(k, D)``."""
    n_out, n_in = dy.shape[-1], x.shape[-1]
    dy2, x2 = dy.reshape(-1, n_out), x.reshape(-1, n_in)
    if is_tall(n_out, n_in):
        return sddmm_ref(x2, dy2, offsets)
    return sddmm_ref(dy2, x2, offsets)

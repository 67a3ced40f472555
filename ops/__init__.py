"""diagcompile.ops: the diagonal-sparse op contract, its reference math, kernels and dispatch.

Importing this package registers ``torch.ops.diagcompile.diag_linear`` / ``diag_linear_dx`` /
``diag_linear_dv``. Kernel modules (Triton, numba) are imported lazily on first use, never here.
"""

from diagcompile.ops.diag_linear import call_diag_linear, diag_linear_dv_op, diag_linear_dx_op, diag_linear_op
from diagcompile.ops.dispatch import force_path
from diagcompile.ops.reference import (
    OFFSET_DTYPE,
    diag_shape,
    diagonal_norms,
    evenly_spaced_offsets,
    extract_diagonals,
    is_tall,
    k_from_sparsity,
    kept_entries,
    max_sparsity,
    to_dense,
    topk_offsets,
)

__all__ = [
    "OFFSET_DTYPE",
    "call_diag_linear",
    "diag_linear_op",
    "diag_linear_dx_op",
    "diag_linear_dv_op",
    "diag_shape",
    "diagonal_norms",
    "evenly_spaced_offsets",
    "extract_diagonals",
    "force_path",
    "is_tall",
    "k_from_sparsity",
    "kept_entries",
    "max_sparsity",
    "to_dense",
    "topk_offsets",
]

"""diagcompile: diagonal-sparse neural networks that train, run fast and ship.

A weight ``W`` (``N_out x N_in``) keeps ``k`` of its ``P = max(N_out, N_in)`` wrapped diagonals:
``W[t, (t + p) mod N_in]`` (wide/square) or ``W[(t + p) mod N_out, t]`` (tall), ``t < min(N_out, N_in)``.

Importing this package registers the ``torch.ops.diagcompile.*`` ops. It does not import triton, numba or
the compiler/export/DST layers, and does not initialize CUDA.
"""

from typing import Any

from diagcompile import ops as ops  # registers torch.ops.diagcompile.*
from diagcompile.api import sparsify_
from diagcompile.config import DiagSparsityConfig
from diagcompile.functional import diag_linear
from diagcompile.marking import SparseMark, get_sparse_mark, is_sparse_marked, mark_sparse, unmark_sparse
from diagcompile.modules import DiagLinear

__version__ = "0.1.0"


# --- passes: diagcompile.compile (a thin lazy wrapper: `import diagcompile` must not import the compiler layer).
def compile(model: Any, **kwargs: Any) -> Any:  # noqa: A001 - mirrors torch.compile
    """``torch.compile(model, backend="diagcompile", **kwargs)``: sparse-marked linears become diagonal ops.

    ``sparsify=True`` first swaps marked linears for ``DiagLinear`` (compact trainable state; build the
    optimizer after this call). ``on_rewrite=fn`` receives each graph's ``RewriteReport``. Everything else
    (``fullgraph``, ``dynamic``, ``mode``, ``options``) goes to ``torch.compile``. See
    ``diagcompile.passes.backend.compile``.
    """
    from diagcompile.passes.backend import compile as _compile

    return _compile(model, **kwargs)


__all__ = [
    "DiagLinear",
    "DiagSparsityConfig",
    "SparseMark",
    "compile",
    "diag_linear",
    "get_sparse_mark",
    "is_sparse_marked",
    "mark_sparse",
    "sparsify_",
    "unmark_sparse",
]

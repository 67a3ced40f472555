"""diagcompile.dst: dynamic sparse training of diagonal-sparse layers (DynaDiag, DiagHeur) and the baselines.

``DiagSparsifier(model, optimizer, DSTConfig(...))`` converts linears in place, ``step()`` after every
``optimizer.step()``, ``finalize()`` for compact ``DiagLinear`` layers. See ``diagcompile.dst.sparsifier``.

The baselines (RigL, SRigL, N:M SR-STE / mask decay / structure decay) train element masks behind the same
contract: ``MaskSparsifier(model, optimizer, MaskConfig(...))`` (``diagcompile.dst.baselines``).
``make_sparsifier(model, optimizer, method, sparsity, total_steps, filter_fn, **options)`` builds either.
"""

from diagcompile.dst.config import DSTConfig
from diagcompile.dst.layers import DynaDiagLinear
from diagcompile.dst.memory import memory_report
from diagcompile.dst.sparsifier import DiagSparsifier

# isort: split
# --- mask-based baselines (dst-baselines) ---
from diagcompile.dst.baselines import (
    SPARSIFIER_METHODS,
    MaskedLinear,
    MaskSparsifier,
    config_class,
    make_config,
    make_sparsifier,
)
from diagcompile.dst.mask_config import MaskConfig

__all__ = [
    "DSTConfig",
    "DiagSparsifier",
    "DynaDiagLinear",
    "memory_report",
    # mask-based baselines
    "MaskConfig",
    "MaskSparsifier",
    "MaskedLinear",
    "make_sparsifier",
    "make_config",
    "config_class",
    "SPARSIFIER_METHODS",
]

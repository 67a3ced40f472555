"""diagcompile.dst: dynamic sparse training of diagonal-sparse layers (DynaDiag, DiagHeur).

``DiagSparsifier(model, optimizer, DSTConfig(...))`` converts linears in place, ``step()`` after every
``optimizer.step()``, ``finalize()`` for compact ``DiagLinear`` layers. See ``diagcompile.dst.sparsifier``.
"""

from diagcompile.dst.config import DSTConfig
from diagcompile.dst.layers import DynaDiagLinear
from diagcompile.dst.memory import memory_report
from diagcompile.dst.sparsifier import DiagSparsifier

__all__ = ["DSTConfig", "DiagSparsifier", "DynaDiagLinear", "memory_report"]

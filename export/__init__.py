"""diagcompile.export: torch.export (.pt2), ONNX and TensorRT for diagonal-sparse models.

* ``export_program`` / ``save`` / ``load`` / ``check_program``: ``torch.export`` with one
  ``diagcompile::diag_linear`` node per diagonal layer (``diagcompile.export.program``).
* ``to_onnx`` / ``check_onnx``: ONNX in a portable form (standard ops) or a TensorRT-plugin form, both checked
  in onnxruntime (``diagcompile.export.onnx``; imports onnx/onnxscript on first use).
* ``diagcompile.export.tensorrt``: the TensorRT plugin, torch-TensorRT converter and ``build_engine``
  (needs TensorRT; UNVERIFIED, see that module).

Sparse-marked ``nn.Linear`` layers (marked on the module or on its weight) are converted to ``DiagLinear`` on a
copy on the way; ``F.linear`` calls on a sparse-marked bare parameter become diagonal layers in the exported
graph (``diagcompile.passes.rewrite_exported_program``), as the ``diagcompile`` compile backend does.
"""

from typing import Any

from diagcompile.export.program import (
    CheckResult,
    ExportCheckError,
    NoDiagonalLayersWarning,
    check_program,
    export_program,
    load,
    save,
)

__all__ = [
    "CheckResult",
    "ExportCheckError",
    "NoDiagonalLayersWarning",
    "check_onnx",
    "check_program",
    "export_program",
    "load",
    "save",
    "to_onnx",
]

_LAZY = {"to_onnx": "diagcompile.export.onnx", "check_onnx": "diagcompile.export.onnx"}


def __getattr__(name: str) -> Any:
    # ONNX pulls in onnx + onnxscript (seconds to import): only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diagcompile.export' has no attribute {name!r}")

"""diagcompile.passes: graph rewrites of sparse-marked linears and the ``diagcompile`` torch.compile backend.

One pass per IR (``passes/README.md`` states each one's target and invariants):

* ``rewrite_traced(gm)``: ``torch.fx.symbolic_trace`` graphs (``call_module`` / ``F.linear`` on attributes);
* ``rewrite_dynamo(gm, example_inputs)``: Dynamo graphs (``F.linear`` on lifted parameter placeholders);
  the result takes each marked weight's diagonal state as extra inputs, ``diag_inputs(gm)(args)``;
* ``rewrite_exported(ep.module())`` / ``rewrite_exported_program(ep)``: ``torch.export`` graphs
  (``aten.linear``);
* ``inline_small_layers(gm)``: after ``rewrite_dynamo``, small CPU layers as plain ops (the backend's);
* ``diagcompile_backend`` (``torch.compile(model, backend="diagcompile")``) and ``compile(model)``.

Each pass returns ``(graph_module, report)``; ``report.count`` is the number of rewritten sites.
"""

from diagcompile.passes._core import (
    PassResult,
    RewriteReport,
    RewriteSite,
    SparseRewriteError,
    pin_marks_,
)
from diagcompile.passes.backend import compile, diagcompile_backend, inductor_config
from diagcompile.passes.inline import inline_small_layers
from diagcompile.passes.rewrite_dynamo import DiagInputs, diag_inputs, rewrite_dynamo
from diagcompile.passes.rewrite_exported import ExportRewriteResult, rewrite_exported, rewrite_exported_program
from diagcompile.passes.rewrite_traced import rewrite_traced

__all__ = [
    "DiagInputs",
    "ExportRewriteResult",
    "PassResult",
    "RewriteReport",
    "RewriteSite",
    "SparseRewriteError",
    "compile",
    "diag_inputs",
    "diagcompile_backend",
    "inductor_config",
    "inline_small_layers",
    "pin_marks_",
    "rewrite_dynamo",
    "rewrite_exported",
    "rewrite_exported_program",
    "rewrite_traced",
]

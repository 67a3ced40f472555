"""Pass for Dynamo graphs (what a ``torch.compile`` backend receives).

Targets: ``F.linear`` (``torch._C._nn.linear``) whose weight is a placeholder or ``get_attr`` holding a
marked tensor, and ``call_module`` of a marked ``nn.Linear`` in graphs built that way. Dynamo inlines
``nn.Module`` calls and lifts parameters to graph inputs, so a weight's mark is read from the matching entry
of ``example_inputs``: the user's real ``Parameter``.

The graph's inputs are fixed by Dynamo, so the dense weight stays an input; how the values are computed
depends on whether the graph will be differentiated with respect to the weight:

* **inference** (grad disabled, or the weight does not require grad): the values are extracted **once**,
  at compile time, into buffers of the graph module; the dense input goes unused. Later in-place changes
  to the dense weight (``load_state_dict``, an optimizer step) are *not* seen by this compiled graph:
  call ``torch._dynamo.reset()`` (or compile again) after changing weights.
* **training** (grad enabled and the weight requires grad): the values are gathered from the live dense
  weight inside the graph at every call (``torch.take`` with a precomputed flat index), then go through
  ``diag_linear`` and its backward ops. The gradient reaches the dense weight on the kept diagonals only
  (exactly zero elsewhere), so the optimizer trains exactly the kept entries, and the forward never reads
  the others: the model trains as the diagonal model would, while parameter, gradient and optimizer state
  stay dense in memory. For compact training state, swap the modules first
  (``diagcompile.compile(model, sparsify=True)`` or ``sparsify_``).

Top-k marks are resolved when a weight is first compiled and pinned on the weight's mark (see
``resolve_and_pin``), so recompiles and later conversions keep the same diagonals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, fx

from diagcompile.passes._core import PassResult, StateMode, resolve_and_pin, resolve_mark, rewrite_marked_linears

__all__ = ["rewrite_dynamo"]


def rewrite_dynamo(
    gm: fx.GraphModule,
    example_inputs: Sequence[object],
    *,
    training: bool | None = None,
    pin: bool = True,
) -> PassResult:
    """Rewrite the sparse-marked linears of a Dynamo graph into ``diagcompile::diag_linear``.

    Args:
        gm: the graph module a ``torch.compile`` backend receives.
        example_inputs: the backend's ``example_inputs`` (one per placeholder, in order).
        training: ``None`` (default) decides per weight from ``torch.is_grad_enabled()`` and
            ``weight.requires_grad``, which is what AOTAutograd will do; ``True`` / ``False`` forces the
            training (values gathered from the dense weight every call) or inference (converted once)
            treatment for weights that require grad. A weight without ``requires_grad`` is always converted
            once.
        pin: pin top-k marks to the offsets chosen now (recommended; see the module docstring).

    Returns:
        ``(graph_module, report)``. The graph module is a re-wrapped copy when anything was rewritten
        (Dynamo's own cannot take new buffers), ``gm`` itself otherwise. Its placeholders are unchanged,
        so it is called with the same inputs.

    Raises:
        SparseRewriteError: a marked weight is used other than as a linear's weight, or tied across
            linears marked differently.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"rewrite_dynamo expects a torch.fx.GraphModule, got {type(gm).__name__}")
    grad = torch.is_grad_enabled() if training is None else training

    def mode(weight: Tensor) -> StateMode:
        return "extract" if grad and weight.requires_grad else "constant"

    return rewrite_marked_linears(
        gm,
        ir="dynamo",
        state_mode=mode,
        placeholder_tensors=list(example_inputs),
        resolve=resolve_and_pin if pin else resolve_mark,
        rewrap=True,
    )

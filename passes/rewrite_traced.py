"""Pass for ``torch.fx.symbolic_trace`` graphs.

Targets: ``call_module`` nodes of sparse-marked ``nn.Linear`` (and subclasses that ``symbolic_trace``
keeps as leaves), and ``call_function`` ``F.linear`` nodes whose weight is a marked ``get_attr`` (a bare
marked ``nn.Parameter`` used with ``F.linear``, or a user subclass of ``nn.Linear`` that the tracer traced
through).

Each marked weight is converted once, into ``values`` (a new ``(k, D)`` ``nn.Parameter``) and ``offsets``
(an int32 buffer) stored where the dense weight lived, so the graph module's ``state_dict`` has the same
keys as ``sparsify_(model)``. The dense weight is removed from the graph module.
"""

from __future__ import annotations

from torch import fx

from diagcompile.passes._core import PassResult, rewrite_marked_linears

__all__ = ["rewrite_traced"]


def rewrite_traced(gm: fx.GraphModule) -> PassResult:
    """Rewrite every sparse-marked linear of a ``symbolic_trace`` graph into ``diagcompile::diag_linear``.

    Args:
        gm: ``torch.fx.symbolic_trace(model)`` (or any ``GraphModule`` whose weights are module attributes).
            Edited in place. The traced model itself is never modified: modules on an edited path are
            copied first. As with ``symbolic_trace``, everything the pass does not replace (other layers,
            the biases of rewritten layers) stays shared with the model.

    Returns:
        ``(gm, report)``. For a linear at ``path`` (or a weight at ``path.weight``) ``gm`` holds
        ``path.values`` ``(k, D)`` (trainable, ``requires_grad`` copied from the dense weight) and
        ``path.offsets`` ``(k,)`` int32 next to ``path.bias``; the ``k`` diagonals are the mark's offsets or
        the ``k`` of largest L2 norm of the dense weight. ``report.count == 0`` and ``gm`` untouched when
        nothing is marked.

    Raises:
        TypeError: ``gm`` is not a ``torch.fx.GraphModule``.
        SparseRewriteError: a marked weight is used other than as a linear's weight, hides inside a leaf
            module, or is tied across linears marked differently.

    Example::

        mark_sparse(model.mlp.fc1, sparsity=0.9)
        gm, report = rewrite_traced(torch.fx.symbolic_trace(model))
        assert report.count == 1
        sparsify_(model, DiagSparsityConfig(only_marked=True))
        model.load_state_dict(gm.state_dict())  # same keys: values, offsets, bias
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            f"rewrite_traced expects a torch.fx.GraphModule (e.g. torch.fx.symbolic_trace(model)), "
            f"got {type(gm).__name__}"
        )
    return rewrite_marked_linears(gm, ir="fx", state_mode="parameter")

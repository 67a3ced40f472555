"""Pass for ``torch.export`` graphs.

Targets: ``aten.linear.default`` whose weight is a marked ``get_attr``, in the *unlifted* module of an
exported program (``ep.module()``). There parameters are ordinary module attributes, so the rewrite needs
only public ``torch.fx`` APIs; editing ``ep.graph`` in place would also mean editing its graph signature.
``rewrite_exported_program`` rewrites ``ep.module()`` and exports it again, which lifts the new
``values`` / ``offsets`` as the program's parameters and buffers (``p_<path>_values``, ``b_<path>_offsets``).

Run it on the program ``torch.export.export`` returns, before ``run_decompositions()``: decompositions turn
``aten.linear`` into ``permute`` + ``addmm``, which this pass does not match. The ``diag_linear`` op it
emits survives ``run_decompositions()`` unchanged.

``ep.module()`` shares its parameters with the exported model, so marks set on the model are visible. For
a program loaded from disk, mark its weights through ``ep.module()`` (for instance
``mark_sparse(ep.module().get_parameter("fc.weight"))``; the parameters are the program's own tensors).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import fx

from diagcompile.passes._core import PassResult, RewriteReport, rewrite_marked_linears

__all__ = ["rewrite_exported", "rewrite_exported_program", "ExportRewriteResult"]


class ExportRewriteResult(NamedTuple):
    """``rewrite_exported_program``'s result: the new program and the report. Unpacks as a pair."""

    exported_program: torch.export.ExportedProgram
    report: RewriteReport


def rewrite_exported(gm: fx.GraphModule) -> PassResult:
    """Rewrite marked ``aten.linear`` calls of an unlifted exported module (``ep.module()``), in place.

    The state is placed like ``rewrite_traced`` does: ``<path>.values`` (trainable ``(k, D)`` parameter) and
    ``<path>.offsets`` (int32) next to ``<path>.bias``; the dense ``<path>.weight`` is removed.

    Returns:
        ``(gm, report)``; ``gm`` untouched and ``report.count == 0`` when nothing is marked.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            f"rewrite_exported expects the GraphModule of ep.module() (an unlifted exported program), "
            f"got {type(gm).__name__}"
        )
    return rewrite_marked_linears(gm, ir="export", state_mode="parameter")


def _dynamic_shapes_of(ep: torch.export.ExportedProgram) -> object:
    """The original program's dynamic dims, as a ``ShapesCollection`` over its example inputs.

    Each symbolic dim of a user input becomes a ``Dim`` with the program's range for that symbol (dims that
    share a symbol share the ``Dim``). A dim whose size is an expression of symbols (``2 * s0``) gets
    ``Dim.AUTO``, which lets export rediscover the relation.
    """
    from torch.export import Dim, ShapesCollection
    from torch.utils._pytree import tree_leaves

    user_inputs = set(ep.graph_signature.user_inputs)
    nodes = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    leaves = tree_leaves(ep.example_inputs)
    if len(leaves) != len(nodes):
        raise ValueError(
            f"rewrite_exported_program: {len(leaves)} example inputs for {len(nodes)} user inputs; "
            f"pass dynamic_shapes explicitly"
        )
    dims: dict[object, object] = {}
    shapes = ShapesCollection()
    for leaf, node in zip(leaves, nodes):
        val = node.meta.get("val")
        if not isinstance(leaf, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        spec = {}
        for i, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if expr not in ep.range_constraints:
                spec[i] = Dim.AUTO
                continue
            if expr not in dims:
                vr = ep.range_constraints[expr]
                hi = int(vr.upper) if getattr(vr.upper, "is_Integer", False) else None
                dims[expr] = Dim(f"d{len(dims)}", min=int(vr.lower), max=hi)
            spec[i] = dims[expr]
        if spec:
            shapes[leaf] = spec
    return shapes


def rewrite_exported_program(
    ep: torch.export.ExportedProgram,
    *,
    dynamic_shapes: object = None,
    strict: bool = False,
) -> ExportRewriteResult:
    """Rewrite the marked linears of an exported program and export it again.

    Args:
        ep: a program from ``torch.export.export`` (not yet decomposed).
        dynamic_shapes: for the re-export; default: the dynamic dims of ``ep`` itself, with their ranges.
        strict: passed to ``torch.export.export``.

    Returns:
        ``(new_program, report)``; ``ep`` itself when nothing is marked. The new program calls
        ``torch.ops.diagcompile.diag_linear`` once per rewritten site and no longer holds the dense weights.
    """
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"rewrite_exported_program expects a torch.export.ExportedProgram, got {type(ep).__name__}")
    gm, report = rewrite_exported(ep.module())
    if report.count == 0:
        return ExportRewriteResult(ep, report)
    if ep.example_inputs is None:
        raise ValueError(
            "rewrite_exported_program: the program carries no example inputs to export again with; "
            "call rewrite_exported(ep.module()) and torch.export.export the result yourself"
        )
    args, kwargs = ep.example_inputs
    if dynamic_shapes is None:
        dynamic_shapes = _dynamic_shapes_of(ep)
        if hasattr(dynamic_shapes, "dynamic_shapes"):
            dynamic_shapes = dynamic_shapes.dynamic_shapes(gm, args, kwargs)
    new = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    return ExportRewriteResult(new, report)

"""Inline small diagonal layers of a Dynamo graph as plain ops, for Inductor to compile with the rest.

The ``diagcompile`` backend runs this after ``rewrite_dynamo``. A ``diagcompile::diag_linear`` call is opaque to
Inductor: every call goes back to Python (~35 us on the CPU before any arithmetic), which is most of the cost of
a 64-wide layer at a few rows. Where ``ops.dispatch.inline_in_graph`` says so for the call's shapes, the node is
replaced by ``diag_linear_composite`` (the dense weight built from ``values`` and ``offsets`` in the graph, then
``F.linear``), which AOTAutograd differentiates and Inductor compiles like any dense layer. The offsets stay
graph inputs, so a topology update (DiagHeur) or a new checkpoint needs no recompile, as before.

Only the backend inlines: ``torch.export`` programs and ONNX files keep one op node per layer (their contract).
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from diagcompile.ops.diag_linear import diag_linear_composite
from diagcompile.ops.dispatch import inline_in_graph
from diagcompile.passes.rewrite_dynamo import copy_dynamo_graph_module

__all__ = ["inline_small_layers"]

_TARGETS = (torch.ops.diagcompile.diag_linear, torch.ops.diagcompile.diag_linear.default)


def _static(d: object) -> int | None:
    """A size as an int, or ``None`` when it is symbolic (a dynamic input's SymInt may hold a constant)."""
    return int(d) if is_concrete_int(d) else None


def _rows(x: torch.Tensor) -> int | None:
    """The op's ``M`` (rows of ``x`` flattened to 2-D), or ``None`` when a leading dim is symbolic."""
    dims = [_static(d) for d in x.shape[:-1]]
    return None if None in dims else math.prod(dims)


def inline_small_layers(gm: fx.GraphModule) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """Replace the forward op calls of ``gm`` (a Dynamo graph) that ``inline_in_graph`` picks.

    Returns:
        ``(graph_module, names)``: ``gm`` itself when nothing is inlined, else a copy (Dynamo keeps using its
        own graph, see ``copy_dynamo_graph_module``) in which the nodes ``names`` (graph order) are replaced.
        Nothing is inlined in a graph that may run under autocast: ``F.linear`` would follow autocast's dtype
        where the op does not.
    """
    picked = [n.name for n in gm.graph.nodes if _inlinable(n)]
    if not picked or _autocast_possible(gm):
        return gm, ()
    gm = copy_dynamo_graph_module(gm)
    names = set(picked)
    for node in [n for n in gm.graph.nodes if n.name in names]:
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(diag_linear_composite, node.args, node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, tuple(picked)


def _autocast_possible(gm: fx.GraphModule) -> bool:
    """Autocast is on now (Dynamo calls the backend inside the user's region) or the graph enters it."""
    if torch.is_autocast_enabled("cpu"):
        return True
    return any(n.op == "call_function" and "enter_autocast" in str(n.target) for n in gm.graph.nodes)


def _inlinable(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _TARGETS:
        return False
    x, values = (a.meta.get("example_value") if isinstance(a, fx.Node) else None for a in node.args[:2])
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return False
    # rewrite_dynamo's own values inputs carry no example value; it emits them in x's dtype.
    if isinstance(values, torch.Tensor) and values.dtype != x.dtype:
        return False
    n_out = _static(node.args[4] if len(node.args) > 4 else node.kwargs.get("out_features"))
    n_in = _static(x.shape[-1])
    if n_out is None or n_in is None:
        return False
    return inline_in_graph(x.device.type, x.dtype, _rows(x), n_out, n_in)

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
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from diagcompile.modules import _seen_key
from diagcompile.ops.diag_linear import diag_linear_composite
from diagcompile.ops.dispatch import inline_in_graph
from diagcompile.passes.rewrite_dynamo import copy_dynamo_graph_module

__all__ = ["OffsetsCheck", "inline_small_layers"]

_TARGETS = (torch.ops.diagcompile.diag_linear, torch.ops.diagcompile.diag_linear.default)


_ARGS = ("x", "values", "offsets", "bias", "out_features")  # the op's schema, in order


def _arg(node: fx.Node, i: int) -> object:
    """The op call's ``i``-th argument, passed by position or by name."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(_ARGS[i])


def _example(a: object) -> object:
    return a.meta.get("example_value") if isinstance(a, fx.Node) else None


def _static(d: object) -> int | None:
    """A size as an int, or ``None`` when it is symbolic: a SymInt (it may hold a constant), or a graph node
    (``out_features`` as an input of its own, as Dynamo makes an int argument that changed between calls)."""
    if isinstance(d, fx.Node):
        d = _example(d)
    return int(d) if isinstance(d, (int, torch.SymInt)) and is_concrete_int(d) else None


def _rows(x: torch.Tensor) -> int | None:
    """The op's ``M`` (rows of ``x`` flattened to 2-D), or ``None`` when a leading dim is symbolic."""
    dims = [_static(d) for d in x.shape[:-1]]
    return None if None in dims else math.prod(dims)


def inline_small_layers(gm: fx.GraphModule) -> tuple[fx.GraphModule, tuple[str, ...], OffsetsCheck | None]:
    """Replace the forward op calls of ``gm`` (a Dynamo graph) that ``inline_in_graph`` picks.

    Returns:
        ``(graph_module, names, check)``: ``gm`` itself when nothing is inlined, else a copy (Dynamo keeps using
        its own graph, see ``copy_dynamo_graph_module``) in which the nodes ``names`` (graph order) are replaced;
        ``check``, when not ``None``, must see every call's inputs before the compiled graph does (it validates
        the inlined layers' offsets inputs, which ``to_dense`` would wrap or overwrite silently). Nothing is
        inlined in a graph that may run under autocast: ``F.linear`` would follow autocast's dtype where the op
        does not.
    """
    picked = {n.name: P for n in gm.graph.nodes if (P := _inline_p(n)) is not None}  # name -> the layer's P
    if not picked or _autocast_possible(gm):
        return gm, (), None
    gm = copy_dynamo_graph_module(gm)
    position = {p: i for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))}
    checks: dict[int, int] = {}
    for node in [n for n in gm.graph.nodes if n.name in picked]:
        offsets, P = _arg(node, 2), picked[node.name]
        # The op checks its offsets on every CPU call. An input's are checked before each call, validated
        # once per tensor version (~1 us per input when unchanged); in-graph reductions cost 10-25 us per layer
        # on the demo ViT (measured), a fifth of what inlining saves.
        in_graph = offsets not in position
        if not in_graph:
            checks[position[offsets]] = P
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(diag_linear_composite, node.args, {**node.kwargs, "check_offsets": in_graph})
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, tuple(picked), OffsetsCheck(tuple(checks.items())) if checks else None


class OffsetsCheck:
    """Validates the offsets inputs of a compiled graph's inlined layers as the op would (distinct, in
    ``[0, P)``), re-checking an input only when it is another tensor or has changed (version, storage)."""

    __slots__ = ("checks", "seen")

    def __init__(self, checks: tuple[tuple[int, int], ...]) -> None:
        self.checks = checks  # (input position, P)
        # The last tensor checked at each position, by weak reference: Dynamo keeps a compiled graph (and this)
        # after the model is gone, which must not keep its buffers alive. A dead reference cannot match a new
        # tensor, so its address (in the key) is not reused by mistake either.
        self.seen: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}

    def __call__(self, inputs: Sequence[object]) -> None:
        for i, P in self.checks:
            t = inputs[i]
            key = _seen_key(t)
            seen = self.seen.get(i)
            if seen is None or seen[0]() is not t or seen[1] != key:
                from diagcompile.ops.cpu_kernels import check_offsets  # numba: imported on first use only

                check_offsets(t, P)
                self.seen[i] = (weakref.ref(t), key)

    def wrap(self, compiled: Callable[..., Any]) -> Callable[..., Any]:
        """``compiled``, checking its inputs first."""

        def run(*inputs: object) -> Any:
            self(inputs)
            return compiled(*inputs)

        return run


def _autocast_possible(gm: fx.GraphModule) -> bool:
    """Autocast is on now (Dynamo calls the backend inside the user's region) or the graph enters it."""
    if torch.is_autocast_enabled("cpu"):
        return True
    return any(n.op == "call_function" and "enter_autocast" in str(n.target) for n in gm.graph.nodes)


def _inline_p(node: fx.Node) -> int | None:
    """``P = max(N_out, N_in)`` of a forward op call that ``inline_in_graph`` picks, else ``None``."""
    if node.op != "call_function" or node.target not in _TARGETS:
        return None
    x, values = (_example(_arg(node, i)) for i in (0, 1))
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return None
    # rewrite_dynamo's own values inputs carry no example value; it emits them in x's dtype.
    if isinstance(values, torch.Tensor) and values.dtype != x.dtype:
        return None
    n_out = _static(_arg(node, 4))
    n_in = _static(x.shape[-1])
    if n_out is None or n_in is None or not inline_in_graph(x.device.type, x.dtype, _rows(x), n_out, n_in):
        return None
    return max(n_out, n_in)

"""The ``diagcompile`` ``torch.compile`` backend: rewrite sparse-marked linears, then Inductor.

Registered through the ``torch_dynamo_backends`` entry point, so after installing diagcompile::

    torch.compile(model, backend="diagcompile")                     # no import of diagcompile needed
    torch.compile(model, backend="diagcompile", mode="reduce-overhead")
    diagcompile.compile(model, fullgraph=True)                       # the same, plus conveniences

``mode`` and ``options`` are translated exactly as for ``backend="inductor"``
(``torch._inductor.list_mode_options`` + Inductor config patches). See ``rewrite_dynamo`` for what happens
to a marked dense weight (inference: converted once per weight version; training: diagonals gathered from
the live weight, gradient on the kept diagonals only).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from diagcompile.marking import get_sparse_mark, sync_marks
from diagcompile.modules import DiagLinear
from diagcompile.passes._core import RewriteReport, SparseRewriteError, linear_weight_inputs
from diagcompile.passes.rewrite_dynamo import diag_inputs, rewrite_dynamo

__all__ = ["diagcompile_backend", "compile", "inductor_config"]


def inductor_config(mode: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Inductor config patches for a ``torch.compile`` ``mode`` and ``options``, as ``backend="inductor"``
    computes them. Unknown modes or options raise ``ValueError`` naming them."""
    from torch._inductor import config, list_mode_options

    patches: dict[str, Any] = {}
    if mode and mode != "default":
        try:
            patches.update(list_mode_options(mode))
        except RuntimeError as e:
            raise ValueError(f"diagcompile backend: {e}") from None
    if options:
        if not isinstance(options, dict):
            raise TypeError(f"options must be a dict of Inductor config values, got {type(options).__name__}")
        known = config.get_config_copy()
        for key, value in options.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(
                    f"diagcompile backend: unknown Inductor option {key!r} (torch._inductor.list_options() lists them)"
                )
            patches[name] = value
    return patches


def diagcompile_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[object],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    on_rewrite: Callable[[RewriteReport], None] | None = None,
    warn_if_dense: bool = True,
) -> Callable[..., Any]:
    """A ``torch.compile`` backend: ``rewrite_dynamo`` the graph, then compile it with Inductor.

    Args:
        gm, example_inputs: from Dynamo.
        mode, options: ``torch.compile``'s, passed through to Inductor (``"reduce-overhead"`` = CUDA graphs).
        on_rewrite: called with each graph's ``RewriteReport`` (also logged at INFO on
            ``diagcompile.passes``). Bind it with ``functools.partial`` or ``diagcompile.compile``.
        warn_if_dense: warn (once per process) about a graph with linears and nothing sparse while no graph
            so far had any (``diagcompile.compile`` turns it off for a model that has sparse layers: a graph
            break can leave a dense head in a graph of its own).

    Returns:
        Inductor's compiled callable. A graph without marked weights goes to Inductor unchanged.
    """
    from torch._inductor.compile_fx import compile_fx

    patches = inductor_config(mode, options)
    gm, report = rewrite_dynamo(gm, example_inputs)
    if on_rewrite is not None:
        on_rewrite(report)
    if warn_if_dense:
        _warn_if_nothing_sparse(gm, report)
    extra = diag_inputs(gm)
    dense = linear_weight_inputs(gm)
    if not extra and not dense:
        return compile_fx(gm, example_inputs, config_patches=patches)
    compiled = compile_fx(gm, [*example_inputs, *extra(example_inputs)], config_patches=patches)
    # The rewritten graph takes the diagonal state of the weights actually passed after Dynamo's inputs.
    # Dynamo calls a backend's result as fn(*args) (compile_fx's own result is such a function, although
    # it carries the `_boxed_call` attribute of the boxed function it wraps).
    # Dynamo reuses a graph for every module that passes its guards (shapes and dtypes, not marks), so one
    # compiled for an unmarked block would run a marked block dense, silently: each call checks that the
    # weights this graph runs dense are still unmarked (a dict lookup per weight).
    dense_at = tuple(i for i, _ in dense)

    def run(*args: object) -> Any:
        for i in dense_at:
            if get_sparse_mark(args[i]) is not None:
                _refuse_marked(args[i], dict(dense)[i])
        return compiled(*args, *extra(args))

    return run


def _refuse_marked(weight: object, name: str) -> NoReturn:
    raise SparseRewriteError(
        f"this compiled graph was built for the unmarked (dense) weight '{name}' and is now called with a "
        f"weight marked sparse ({get_sparse_mark(weight)}) in its place: it would run dense. Dynamo shares one "
        f"graph between modules of the same shapes (a graph break inside a repeated block, one compiled "
        f"function called on several modules), and a dense first block builds it for all. Mark the blocks "
        f"alike, or swap the marked linears for DiagLinear first (diagcompile.compile(model, sparsify=True)), "
        f"whose blocks get graphs of their own; call torch._dynamo.reset() after changing marks"
    )


_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)


_dense_state = {"warned": False, "seen_sparse": False}


def _warn_if_nothing_sparse(gm: fx.GraphModule, report: RewriteReport) -> None:
    """Warn, once per process, about a graph with linears but nothing diagonal while no graph compiled so far
    had any: the user chose this backend for a rewrite that will not happen, and the model would run dense
    without a sign. The usual cause is ``copy.deepcopy``: torch rebuilds Parameters from their data, dropping
    the marks on the weights, which are all this backend sees (a marked module keeps its own mark;
    ``diagcompile.compile`` and ``sync_marks`` copy it back onto the weight)."""
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    if report.count or any(str(t).startswith("diagcompile.") for t in targets):
        _dense_state["seen_sparse"] = True
        return
    n_linear = sum(t in _LINEARS for t in targets)
    if n_linear and not _dense_state["seen_sparse"] and not _dense_state["warned"]:
        _dense_state["warned"] = True
        warnings.warn(
            f"diagcompile backend: a graph with {n_linear} linear(s) and none sparse-marked or diagonal compiles "
            f"as plain Inductor. If the model was marked and then copied: copy.deepcopy drops the marks on weight "
            f"tensors (torch rebuilds Parameters from their data). Compile with diagcompile.compile(model), or "
            f"call diagcompile.marking.sync_marks(model) first (marked nn.Linear modules), or mark the copy. (A "
            f"dense part split off by a graph break is fine; this is said once per process.)",
            stacklevel=2,
        )


def _restore_weight_marks(model: nn.Module) -> None:
    """Give each marked linear's weight its module's mark where the weight has none (``copy.deepcopy``
    drops tensor attributes): ``sync_marks``, which keeps a weight's own (pinned) mark; refuses a marked
    linear whose weight is parametrized, which no mark can reach."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and get_sparse_mark(m) is not None and parametrize.is_parametrized(m, "weight"):
            # m.weight is recomputed on every access: a mark put on it is gone by the time Dynamo reads it.
            raise SparseRewriteError(
                f"'{name or '<root>'}' is marked sparse but its weight is parametrized (weight_norm, spectral_norm, "
                f"...): the compiled graph sees a weight computed at each call, which carries no mark. Use "
                f"diagcompile.compile(model, sparsify=True) (it converts from the current weight and drops the "
                f"parametrization), or remove it first: torch.nn.utils.parametrize.remove_parametrizations(m, "
                f"'weight')"
            )
    sync_marks(model)


def compile(
    model: nn.Module | Callable[..., Any],
    *,
    sparsify: bool = False,
    on_rewrite: Callable[[RewriteReport], None] | None = None,
    **kwargs: Any,
) -> Callable[..., Any]:
    """``torch.compile(model, backend="diagcompile", **kwargs)``, plus two conveniences.

    Args:
        model: a module (or function) whose linears are marked with ``mark_sparse``.
        sparsify: first swap the marked linears of ``model`` for ``DiagLinear`` in place
            (``sparsify_(model, DiagSparsityConfig(only_marked=True))``): the parameters become the compact
            ``(k, D)`` values, so the optimizer (build it *after* this call) and its state see only the kept
            diagonals. Recommended for training. Without it, marked weights stay dense parameters and the
            backend rewrites them per graph (see ``rewrite_dynamo``).
        on_rewrite: called with each compiled graph's ``RewriteReport``.
        **kwargs: ``torch.compile`` arguments (``fullgraph``, ``dynamic``, ``mode``, ``options``, ...).

    Returns:
        The compiled module or function (``sparsify=True`` on a bare ``nn.Linear`` compiles its replacement).
    """
    if "backend" in kwargs:
        raise TypeError("diagcompile.compile always uses the diagcompile backend; do not pass backend=")
    if isinstance(model, nn.Module):
        if not sparsify:  # sparsify_ converts marked modules itself (a parametrized one from its current weight)
            _restore_weight_marks(model)
        else:
            from diagcompile.api import sparsify_
            from diagcompile.config import DiagSparsityConfig

            model = sparsify_(model, DiagSparsityConfig(only_marked=True))
    elif sparsify:
        raise TypeError(f"sparsify=True needs an nn.Module, got {type(model).__name__}")
    # A model with sparse layers may still produce a dense-only graph (a graph break before a dense head).
    has_sparse = isinstance(model, nn.Module) and any(
        isinstance(m, DiagLinear) or get_sparse_mark(m) is not None for m in model.modules()
    )
    backend = functools.partial(diagcompile_backend, on_rewrite=on_rewrite, warn_if_dense=not has_sparse)
    return torch.compile(model, backend=backend, **kwargs)

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

import dataclasses
import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.utils import parametrize

from diagcompile.marking import get_sparse_mark, sync_marks, tensor_mark
from diagcompile.modules import DiagLinear
from diagcompile.passes._core import RewriteReport, SparseRewriteError, weight_inputs
from diagcompile.passes.inline import inline_small_layers
from diagcompile.passes.rewrite_dynamo import (
    DiagInputs,
    MarkPatternMismatch,
    copy_dynamo_graph_module,
    diag_inputs,
    rewrite_dynamo,
    weight_state,
)

__all__ = ["diagcompile_backend", "compile", "inductor_config"]

log = logging.getLogger("diagcompile.passes")


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
    inline_small: bool = True,
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
        inline_small: compile small CPU layers as plain ops (the dense weight built in the graph, then a
            GEMM) instead of op calls, where ``ops.dispatch.inline_in_graph`` says that is faster (``passes.inline``;
            ``force_path`` turns it off too). The report lists them as ``inlined``.

    Returns:
        The compiled graph. A call whose weights are marked differently from the ones it was compiled for
        (Dynamo shares a graph between modules of the same shapes) runs a variant compiled for its marks.
    """
    patches = inductor_config(mode, options)
    compile_graph = functools.partial(_compile_graph, patches=patches, on_rewrite=on_rewrite, inline_small=inline_small)
    weights = weight_inputs(gm, example_inputs)  # before the rewrite: the inputs whose marks matter
    if not weights:  # nothing a call's marks could change
        graph = compile_graph(gm, example_inputs, warn_if_dense=warn_if_dense)
        return graph if len(graph.extra) else graph.compiled
    variants = _Variants(gm, weights, compile_graph)
    base = variants.add(example_inputs, compile_graph(gm, example_inputs, warn_if_dense=warn_if_dense))
    return base.with_fallback(variants)


class _Graph:
    """One compiled graph and how to call it: Dynamo's inputs, then the diagonal state of the marked
    weights actually passed (``DiagInputs``)."""

    __slots__ = ("compiled", "extra", "dense_at")

    def __init__(self, compiled: Callable[..., Any], extra: DiagInputs) -> None:
        self.compiled = compiled
        self.extra = extra
        # The weights this graph runs dense, which must still be unmarked when it is called (set by _Variants).
        self.dense_at: tuple[int, ...] = ()

    def __call__(self, *args: object) -> Any:
        # Dynamo calls a backend's result as fn(*args) (compile_fx's own result is such a function, although
        # it carries the `_boxed_call` attribute of the boxed function it wraps).
        return self.compiled(*args, *self.extra(args))

    def with_fallback(self, variants: _Variants) -> Callable[..., Any]:
        """The callable Dynamo keeps: this graph while the marks of the weights passed are the ones it was
        compiled for, else ``variants``. Dynamo reuses a graph for every module that passes its guards
        (shapes and dtypes, not marks): a dense first block and marked later ones (a graph break in the
        block, regional compilation), or blocks of different sparsities, share one Dynamo graph."""
        compiled, extra, dense_at = self.compiled, self.extra, self.dense_at

        if not len(extra):  # all dense: only the marks to check

            def run_dense(*args: object) -> Any:
                for i in dense_at:  # a dict lookup per weight
                    if tensor_mark(args[i]) is not None:
                        return variants(args)
                return compiled(*args)

            return run_dense

        def run(*args: object) -> Any:
            for i in dense_at:
                if tensor_mark(args[i]) is not None:
                    return variants(args)
            try:
                inputs = extra(args)  # an identity and a version check per weight when nothing changed
            except MarkPatternMismatch:
                return variants(args)
            return compiled(*args, *inputs)

        return run


def _compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[object],
    patches: dict[str, Any],
    on_rewrite: Callable[[RewriteReport], None] | None,
    warn_if_dense: bool = False,
    fake_mode: FakeTensorMode | None = None,
    inline_small: bool = True,
) -> _Graph:
    """Rewrite ``gm`` for the marks of the weights in ``example_inputs``, inline its small layers
    (``inline_small``), then compile it with Inductor (with the real tensors among the inputs made static fakes
    of ``fake_mode`` first, if given)."""
    from torch._inductor.compile_fx import compile_fx

    gm, report = rewrite_dynamo(gm, example_inputs)
    if warn_if_dense:
        _warn_if_nothing_sparse(gm, report)
    check = None
    if inline_small:
        gm, inlined, check = inline_small_layers(gm)
        if inlined:
            report = dataclasses.replace(report, inlined=inlined)
            log.info("diagcompile: inlined as dense GEMMs (small layers): %s", ", ".join(inlined))
    if on_rewrite is not None:
        on_rewrite(report)
    extra = diag_inputs(gm)
    inputs = [*example_inputs, *extra(example_inputs)]
    if fake_mode is not None:
        # Fakes made by Inductor would get fresh symbolic sizes: Dynamo's record of the weights' static
        # shapes belongs to its own tracing context.
        inputs = [_static_fake(fake_mode, t) for t in inputs]
    compiled = compile_fx(gm, inputs, config_patches=patches)
    return _Graph(compiled if check is None else check.wrap(compiled), extra)


# Each distinct mark pattern of one Dynamo graph compiles once; beyond this many, something is changing
# marks in a loop (Dynamo's own recompile limit is 8).
_MAX_VARIANTS = 8


class _Variants:
    """The graphs compiled from one Dynamo graph, one per pattern of marks on its weights.

    A call whose marks differ from the first graph's compiles a variant of the pristine Dynamo graph, in
    Dynamo's fake mode and from the graph's own example values (so a dynamic batch stays dynamic), with the
    call's weights in their places: they decide the rewrite. Dynamo never sees the variant; its guards were
    decided by the first compile, so a variant that would need a new guard (or shape replacement) is refused
    instead. That guard stays in the shared shape environment, where a later variant would take it as given:
    after one refusal every new pattern is refused, and a refused pattern is not compiled again.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        weights: tuple[tuple[int, str], ...],
        compile_graph: Callable[..., _Graph],
    ) -> None:
        self.positions = tuple(i for i, _ in weights)
        self.names = dict(weights)
        self.compile_graph = compile_graph
        context = torch._guards.TracingContext.try_get()
        self.fake_mode = None if context is None else context.fake_mode
        placeholders = gm.graph.find_nodes(op="placeholder")
        self.examples = [n.meta.get("example_value") for n in placeholders]
        if self.fake_mode is not None and all(e is not None for e in self.examples):
            # Before Inductor compiles gm, which may edit it in place.
            self.pristine: fx.GraphModule | None = copy_dynamo_graph_module(gm)
        else:  # not called by Dynamo: nothing to compile a variant from
            self.pristine = None
        self.graphs: dict[tuple[int | None, ...], _Graph] = {}
        self.refused = ""  # why the shape environment can no longer be trusted for new variants

    def pattern(self, args: Sequence[object]) -> tuple[int | None, ...]:
        """Per weight input (``weight_inputs``): its ``k`` if marked (top-k resolved and pinned), else ``None``."""
        return tuple(_marked_k(args[i]) for i in self.positions)

    def add(self, args: Sequence[object], graph: _Graph) -> _Graph:
        """Record ``graph`` as the one for the marks of ``args``' weights."""
        key = self.pattern(args)
        graph.dense_at = tuple(i for i, k in zip(self.positions, key) if k is None)
        self.graphs[key] = graph
        return graph

    def __call__(self, args: Sequence[object]) -> Any:
        key = self.pattern(args)
        graph = self.graphs.get(key)
        if graph is None:
            # A variant is a recompile that Dynamo does not see: honour torch.compiler.set_stance for it.
            stance = _dynamo_stance()
            if stance == "fail_on_recompile":
                self._refuse(
                    args, key, "", RuntimeError, "Detected recompile when torch.compile stance is 'fail_on_recompile': "
                )
            if stance == "eager_on_recompile" and self.pristine is not None:
                return self.pristine(*args)  # Dynamo's own graph, run eagerly: marked linears run dense
            graph = self.add(args, self._compile(args, key))
        return graph(*args)

    def _compile(self, args: Sequence[object], key: tuple[int | None, ...]) -> _Graph:
        if self.pristine is None:
            self._refuse(args, key, "")
        if self.refused:
            self._refuse(args, key, self.refused)
        if len(self.graphs) >= _MAX_VARIANTS:
            self._refuse(args, key, f"{_MAX_VARIANTS} mark patterns compiled already")
        examples = list(self.examples)
        for i in self.positions:
            examples[i] = args[i]
        shape_env = self.fake_mode.shape_env
        before = _shape_facts(shape_env)
        with torch._guards.tracing(torch._guards.TracingContext(self.fake_mode)):
            graph = self.compile_graph(copy_dynamo_graph_module(self.pristine), examples, fake_mode=self.fake_mode)
        if _shape_facts(shape_env) != before:
            self.refused = "a variant needed a shape guard the first compile did not install"
            self._refuse(args, key, self.refused)
        return graph

    def _refuse(
        self,
        args: Sequence[object],
        key: tuple[int | None, ...],
        why: str,
        error: type[Exception] = SparseRewriteError,
        prefix: str = "",
    ) -> NoReturn:
        first = next(iter(self.graphs))
        j = next(j for j, (a, b) in enumerate(zip(first, key)) if a != b)
        was = "unmarked (dense)" if first[j] is None else f"sparse-marked (k={first[j]})"
        now = "an unmarked weight" if key[j] is None else f"a weight marked sparse (k={key[j]})"
        raise error(
            f"{prefix}this compiled graph was built for the {was} weight '{self.names[self.positions[j]]}' and is "
            f"now called with {now} in its place, and no variant of the graph can be compiled for it"
            f"{f' ({why})' if why else ''}. Dynamo shares one graph between "
            f"modules of the same shapes (a graph break inside a repeated block, regional compilation, one "
            f"compiled function called on several modules). Mark the blocks alike, or swap the marked linears "
            f"for DiagLinear first (diagcompile.compile(model, sparsify=True)), whose blocks get graphs of their "
            f"own; call torch._dynamo.reset() after changing marks"
        )


def _dynamo_stance() -> str:
    """``torch.compiler.set_stance``'s current stance (``"default"`` if this torch keeps it elsewhere)."""
    return getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")


def _shape_facts(shape_env: Any) -> tuple[int, int]:
    """How many guards and replacements ``shape_env`` holds (a compile that adds either assumed a fact)."""
    return (0, 0) if shape_env is None else (len(shape_env.guards), len(shape_env.replacements))


def _static_fake(fake_mode: FakeTensorMode, t: object) -> object:
    if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor):
        return fake_mode.from_tensor(t, static_shapes=True)
    return t


def _marked_k(weight: torch.Tensor) -> int | None:
    mark = tensor_mark(weight)
    return None if mark is None else weight_state(weight, mark).k


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
    inline_small: bool = True,
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
        inline_small: compile small CPU layers as plain ops where that is faster (``diagcompile_backend``).
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
    backend = functools.partial(
        diagcompile_backend, on_rewrite=on_rewrite, warn_if_dense=not has_sparse, inline_small=inline_small
    )
    return torch.compile(model, backend=backend, **kwargs)

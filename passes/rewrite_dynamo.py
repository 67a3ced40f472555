"""Pass for Dynamo graphs (what a ``torch.compile`` backend receives).

Targets: ``F.linear`` (``torch._C._nn.linear``) whose weight is a placeholder or ``get_attr`` holding a
marked tensor, and ``call_module`` of a marked ``nn.Linear`` in graphs built that way. Dynamo inlines
``nn.Module`` calls and lifts parameters to graph inputs, so a weight's mark is read from the matching entry
of ``example_inputs``: the user's real ``Parameter``.

**One graph, many weights.** Dynamo reuses a compiled graph for every call that passes its guards, and its
guards check a parameter's shape and dtype, not its identity: a block whose forward has a graph break is
compiled once and then run for all twelve blocks of a model, each with its own weights. So the rewritten
graph never bakes one weight's diagonals in. For each marked weight input it takes extra inputs, appended
after Dynamo's own: ``offsets`` plus either the converted ``values`` (inference) or a flat ``index``
(training). ``DiagInputs`` produces them for the weight tensors actually passed in a call; the backend does
this on every call. The per-weight state behind them (pinned offsets, converted values, index) is cached on
the weight tensor itself, so it lives and dies with the weight and costs a few attribute reads per call.

What happens to the dense weight, per weight:

* **inference** (grad disabled, or the weight does not require grad): its values are converted once per
  weight *version* (the tensor's in-place version counter and its storage), so ``load_state_dict``, an
  optimizer step or a ``.data =`` assignment (``vector_to_parameters``, ``model.half().float()``) between
  calls is picked up by the next call, at the cost of one re-conversion. The dense input goes unused by the
  graph. (In-place writes into ``.data`` bypass the version counter and are not seen. A weight created under
  ``torch.inference_mode()`` has no version counter: it is re-converted on every call.)
* **training** (grad enabled and the weight requires grad): the values are gathered from the live dense
  weight inside the graph at every call (``torch.take`` with the flat index), then go through
  ``diag_linear`` and its backward ops. The gradient reaches the dense weight on the kept diagonals only
  (exactly zero elsewhere), so the optimizer trains exactly the kept entries and the forward never reads
  the others: the model trains as the diagonal model would, while parameter, gradient and optimizer state
  stay dense in memory. For compact training state, swap the modules first
  (``diagcompile.compile(model, sparsify=True)`` or ``sparsify_``).

Top-k marks are resolved when a weight is first compiled and pinned on the weight's mark, so recompiles
and later conversions keep the same diagonals. ``DiagInputs`` refuses, with a clear
error (``MarkPatternMismatch``), a call that passes an unmarked weight or one marked with a different ``k``
in the place of a marked one; the backend compiles a variant of the graph for such a call instead.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, fx

from diagcompile.marking import SparseMark, get_sparse_mark, pin_top_k
from diagcompile.ops import OFFSET_DTYPE
from diagcompile.passes._core import (
    InputSpec,
    PassResult,
    RewriteReport,
    SparseRewriteError,
    StateMode,
    convert_values,
    flat_index,
    has_marked_sites,
    rewrite_sites,
)

__all__ = ["rewrite_dynamo", "DiagInputs", "diag_inputs", "MarkPatternMismatch"]

_STATE = "_diagcompile_state"
_INPUTS_META = "diagcompile_inputs"


class MarkPatternMismatch(SparseRewriteError):
    """A rewritten graph was called with an unmarked weight, or one marked with another ``k``, in the place
    of a marked one (Dynamo reuses a graph for every module of the same shapes). The backend catches it and
    compiles a variant of the graph for the call's marks (on every such call: the message is built only
    when read)."""

    def __init__(self, weight: str, k: int, got: int | None) -> None:
        super().__init__(weight, k, got)
        self.weight, self.k, self.got = weight, k, got

    def __str__(self) -> str:
        got = "an unmarked tensor" if self.got is None else f"a weight marked with k={self.got}"
        return (
            f"this compiled graph was built for the sparse-marked weight '{self.weight}' (k={self.k}) and is now "
            f"called with {got} in its place. Dynamo shares one graph between modules of the same shapes (a graph "
            f"break inside a repeated block, one compiled function called on several modules): mark them alike, "
            f"or call torch._dynamo.reset() after changing marks. If the weight was replaced by a new tensor "
            f"(load_state_dict(assign=True), a new nn.Parameter), its mark stayed on the old one: "
            f"diagcompile.marking.sync_marks(model) copies the marks of marked modules onto their current weights"
        )


class _WeightState:
    """The diagonal state of one dense weight, shared by every graph compiled for it.

    Attached to the weight tensor (``weight._diagcompile_state``), so it is freed with the weight and a
    ``copy.deepcopy`` (which drops tensor attributes) starts afresh.
    """

    __slots__ = ("mark", "offsets", "k", "_index", "_values")

    def __init__(self, mark: SparseMark, offsets: Tensor) -> None:
        self.mark = mark  # the (pinned) mark this state was built for
        self.offsets = offsets
        self.k = int(offsets.numel())
        self._index: Tensor | None = None
        # dtype -> (values, the weight's version and a weak reference to its storage when they were converted)
        self._values: dict[torch.dtype, tuple[Tensor, int | None, weakref.ref]] = {}

    def __getstate__(self) -> tuple[SparseMark, Tensor]:
        # Pickled with its weight (torch.save(model), a model sent to a process): the mark and offsets, not the
        # caches, whose weak references cannot be pickled and describe this process's tensors anyway.
        return self.mark, self.offsets

    def __setstate__(self, state: tuple[SparseMark, Tensor]) -> None:
        self.__init__(*state)

    def values(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """``(k, D)`` values of ``weight`` in ``dtype``, re-converted in place if the weight changed."""
        cached = self._values.get(dtype)
        version, storage = _version(weight), weight.untyped_storage()
        if cached is None:
            self._values[dtype] = (convert_values(weight, self.offsets, dtype), version, weakref.ref(storage))
        elif version is None or cached[1] != version or cached[2]() is not storage:
            # In place: the tensor keeps its address, which CUDA graphs recorded as a static input.
            with torch.no_grad():
                cached[0].copy_(convert_values(weight, self.offsets, dtype))
            self._values[dtype] = (cached[0], version, weakref.ref(storage))
        return self._values[dtype][0]

    def index(self, weight: Tensor) -> Tensor:
        if self._index is None:
            self._index = flat_index(weight, self.offsets)
        return self._index

    def rebind(self, weight: Tensor, mark: SparseMark, offsets: Tensor) -> None:
        """Take the new diagonals of a mark with the same ``k``, in place: CUDA graphs recorded these
        tensors as static inputs. The values are re-converted at their next use."""
        self.mark = mark
        with torch.inference_mode(False), torch.no_grad():
            self.offsets.copy_(offsets)
            if self._index is not None:
                self._index.copy_(flat_index(weight, offsets))
        self._values = {dtype: (v, -1, storage) for dtype, (v, _, storage) in self._values.items()}


def weight_state(weight: Tensor, mark: SparseMark | None = None, *, pin: bool = True) -> _WeightState:
    """The state of a marked weight, created (and its top-k mark pinned) on first use."""
    mark = mark if mark is not None else get_sparse_mark(weight)
    if mark is None:
        raise SparseRewriteError("the weight is not marked sparse")
    state: _WeightState | None = weight.__dict__.get(_STATE)
    if state is not None and _same_mark(state.mark, mark):
        return state
    # A new weight, or one marked anew since its state was built (also: a load undid the pin): resolve (top-k:
    # from the current values). Not an inference tensor, so that a later rebind can write it in place.
    with torch.inference_mode(False):
        offsets = mark.resolve_offsets(weight).to(device=weight.device, dtype=OFFSET_DTYPE)
    if mark.offsets is None and pin:
        mark = pin_top_k(weight, offsets)
    if state is not None and state.k == offsets.numel() and state.offsets.device == offsets.device:
        state.rebind(weight, mark, offsets)
        return state
    state = _WeightState(mark, offsets)
    weight.__dict__[_STATE] = state
    return state


# A weight is unchanged since its values were converted while it has the same in-place version counter and
# the same storage: ``.data =`` swaps the storage without a version bump (``vector_to_parameters``,
# ``Module.half()``). The storage is compared by identity through a weak reference (torch keeps one Python
# object per live storage), which, unlike its address, cannot match a new storage, and keeps nothing alive.
def _version(weight: Tensor) -> int | None:
    """The in-place version counter, or ``None`` (re-convert every time) for an inference tensor, which has
    none, so an in-place write under ``torch.inference_mode()`` (a ``load_state_dict`` there) is otherwise
    invisible."""
    try:
        return weight._version
    except RuntimeError:
        return None


def _same_mark(a: SparseMark | None, b: SparseMark | None) -> bool:
    return a is b or a == b


class DiagInputs:
    """Produces the extra inputs of a rewritten Dynamo graph for one call's inputs.

    ``graph(*args, *diag_inputs(args))`` runs the rewritten graph; the backend does exactly this on every
    call. The common case (the same weight tensors as in the previous call, none changed in place) costs
    an identity and a version check per weight.
    """

    def __init__(self, specs: Sequence[InputSpec]) -> None:
        self.specs = tuple(specs)
        keys: dict[object, int] = {}
        for spec in self.specs:
            keys.setdefault(spec.source if isinstance(spec.source, int) else id(spec.source), len(keys))
        self._slots = tuple(keys[s.source if isinstance(s.source, int) else id(s.source)] for s in self.specs)
        # Per weight slot: the graph input that carries it, or the (get_attr) tensor itself.
        first = {}
        for spec, slot in zip(self.specs, self._slots):
            first.setdefault(slot, spec.source)
        self._arg_index = tuple(first[i] if isinstance(first[i], int) else None for i in range(len(keys)))
        self._fixed = tuple(None if isinstance(first[i], int) else first[i] for i in range(len(keys)))
        # The cached call, one tuple replaced whole (threads share a graph, and two blocks' weights may take
        # turns in it): (id, version, weak reference to the storage) of each weight, or empty for no cache;
        # the inputs made for them; the weak references to the weights that drop the cache when one dies.
        self._cache: tuple[list[tuple[int, int, weakref.ref]], tuple[Tensor, ...], list[weakref.ref]] = ([], (), [])

    def __len__(self) -> int:
        return len(self.specs)

    def __call__(self, args: Sequence[object]) -> tuple[Tensor, ...]:
        weights = [args[i] if i is not None else f for i, f in zip(self._arg_index, self._fixed)]
        cache = self._cache  # read once: another thread may store its own call's meanwhile
        if self._unchanged(weights, cache[0]):
            return cache[1]
        out = []
        for spec, slot in zip(self.specs, self._slots):
            weight = weights[slot]
            state = weight.__dict__.get(_STATE) if isinstance(weight, Tensor) else None
            if state is None or state.k != spec.k or not _same_mark(state.mark, get_sparse_mark(weight)):
                state = self._state_for(weight, spec)
            if spec.kind == "values":
                out.append(state.values(weight, spec.dtype))
            elif spec.kind == "index":
                out.append(state.index(weight))
            else:
                out.append(state.offsets)
        out = tuple(out)
        try:
            seen = [(id(w), w._version, weakref.ref(w.untyped_storage())) for w in weights]
        except RuntimeError:  # an inference tensor has no version counter: no cache
            seen = []
        self._cache = (seen, out, [weakref.ref(w, self._forget) for w in weights])
        return out

    def _unchanged(self, weights: list[object], seen: list[tuple[int, int, weakref.ref]]) -> bool:
        """Whether ``weights`` are the cached call's tensors ``seen``, unchanged (an identity, a version and a
        storage check each). Ids are safe to compare: the cache's weak references drop it as soon as a weight
        dies, before its id can be reused."""
        if not seen:
            return False
        try:
            for w, (wid, version, storage) in zip(weights, seen):
                if id(w) != wid or w._version != version or storage() is not w.untyped_storage():
                    return False
        except (AttributeError, RuntimeError):  # not a tensor (the slow path names it), an inference tensor
            return False
        return True

    def _forget(self, _: object = None) -> None:
        self._cache = ([], (), [])

    @staticmethod
    def _state_for(weight: object, spec: InputSpec) -> _WeightState:
        mark = get_sparse_mark(weight) if isinstance(weight, Tensor) else None
        state = weight_state(weight, mark) if mark is not None else None
        if state is None or state.k != spec.k:
            raise MarkPatternMismatch(spec.weight, spec.k, None if state is None else state.k)
        return state


def diag_inputs(gm: fx.GraphModule) -> DiagInputs:
    """The ``DiagInputs`` of a graph module rewritten by ``rewrite_dynamo`` (empty if nothing was)."""
    return gm.meta.get(_INPUTS_META, DiagInputs(()))


def copy_dynamo_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph module over a copy of Dynamo's graph, with the metadata AOTAutograd reads back.

    Dynamo keeps using its own graph after the backend returns (it generates the call from the graph's
    placeholders), so the rewrite, which appends inputs, must not edit it. AOTAutograd recognizes a Dynamo
    graph by ``meta["dynamo_compile_id"]``, ``_param_name_to_source`` and each placeholder's
    ``_dynamo_source``; from them it marks parameters as static inputs (CUDA graphs do not copy static
    inputs on every replay). Propagated exactly as torch's own DDPOptimizer does for its split graphs
    (``torch._dynamo.backends.distributed.propagate_metadata`` / ``propagate_dynamo_source``).
    """
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old_node, new_node in zip(gm.graph.find_nodes(op="placeholder"), new.graph.find_nodes(op="placeholder")):
        if hasattr(old_node, "_dynamo_source"):
            new_node._dynamo_source = old_node._dynamo_source
    return new


def rewrite_dynamo(
    gm: fx.GraphModule,
    example_inputs: Sequence[object],
    *,
    training: bool | None = None,
) -> PassResult:
    """Rewrite the sparse-marked linears of a Dynamo graph into ``diagcompile::diag_linear``.

    Args:
        gm: the graph module a ``torch.compile`` backend receives.
        example_inputs: the backend's ``example_inputs`` (one per placeholder, in order).
        training: ``None`` (default) decides per weight from ``torch.is_grad_enabled()`` and
            ``weight.requires_grad``, which is what AOTAutograd will do; ``True`` / ``False`` forces the
            training (gathered from the dense weight every call) or inference (converted) treatment for
            weights that require grad. A weight without ``requires_grad`` is always converted.

    Returns:
        ``(graph_module, report)``: ``gm`` itself, untouched, when nothing is marked; otherwise a new graph
        module (Dynamo's is left as it is) that takes extra inputs after Dynamo's: call it as
        ``new(*args, *diag_inputs(new)(args))``.

    Raises:
        SparseRewriteError: a marked weight is used other than as a linear's weight, or tied across
            linears marked differently.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"rewrite_dynamo expects a torch.fx.GraphModule, got {type(gm).__name__}")
    grad = torch.is_grad_enabled() if training is None else training
    if not has_marked_sites(gm, list(example_inputs), "dynamo"):
        return PassResult(gm, RewriteReport("dynamo"))
    gm = copy_dynamo_graph_module(gm)

    def mode(weight: Tensor) -> StateMode:
        return "gathered" if grad and weight.requires_grad else "converted"

    result, specs = rewrite_sites(
        gm,
        ir="dynamo",
        state_mode=mode,
        placeholder_tensors=list(example_inputs),
        resolve=lambda weight, mark: weight_state(weight, mark).offsets,
    )
    if specs:
        result.graph_module.meta[_INPUTS_META] = DiagInputs(specs)
    return result

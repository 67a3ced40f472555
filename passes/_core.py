"""Machinery shared by the rewrite passes: find the sites of sparse-marked linears in an FX graph, convert
their dense weights, and emit one ``diagcompile::diag_linear`` node per site.

Vocabulary
----------
* A **site** is one linear call whose weight is marked (``diagcompile.mark_sparse``):

  - ``call_module`` of an ``nn.Linear`` or subclass (``torch.fx.symbolic_trace`` graphs);
  - ``call_function`` of ``F.linear`` (``torch._C._nn.linear``) or ``aten.linear.default`` whose *weight*
    argument is read straight from a ``get_attr`` node or a ``placeholder`` (Dynamo lifts parameters to
    placeholders; its ``example_inputs`` are the real ``Parameter`` objects, so their marks are visible).

* A **weight** is one dense ``(N_out, N_in)`` tensor, identified by object identity. A tied weight has
  several sites and is converted once: every site reads the same diagonal state.

* The **state mode** says where a weight's diagonal values live after the rewrite:

  - ``"parameter"``: a new ``(k, D)`` ``nn.Parameter`` and an int32 ``(k,)`` offsets buffer, placed where
    the dense weight lived (``<owner>.values`` / ``<owner>.offsets``: the ``DiagLinear`` state_dict
    layout); the dense weight is removed from the graph module. Used on ``symbolic_trace`` and
    ``ep.module()`` graphs, which own their state.
  - ``"converted"``: the values (and offsets) become extra graph *inputs*, appended after the graph's own
    placeholders and described by an ``InputSpec`` each; the caller feeds them per call, converted once
    per weight (see ``rewrite_dynamo``). The dense weight stays an (unused) input. Dynamo inference.
  - ``"gathered"``: a flat index (and the offsets) become extra inputs and the values are gathered from the
    live dense weight inside the graph at every call, so autograd sends the gradient to the dense weight,
    on the kept diagonals only. Dynamo training.

  Dynamo reuses one compiled graph for every tensor that fits its guards (for instance the twelve blocks
  of a model whose block forward has a graph break), so a Dynamo graph must never bake one weight's
  diagonals in: hence inputs, looked up for the weight tensor actually passed.

Which mark a weight obeys: the mark on the weight tensor if it has one (it is the mark that travels with
the tensor into every IR), else the mark of the ``nn.Linear`` that owns it (after ``copy.deepcopy`` only the
module keeps its mark). Every use of a marked weight must be the weight argument of a linear call;
anything else (``x @ w.T``, ``w * 2``, an embedding tied to the weight, a leaf module that hides the linear)
raises ``SparseRewriteError`` naming the node, never a silent partial rewrite.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor, fx, nn

from diagcompile.marking import SparseMark, get_sparse_mark, is_sparse_marked, mark_sparse
from diagcompile.ops import OFFSET_DTYPE, extract_diagonals
from diagcompile.ops.reference import diagonal_indices

__all__ = [
    "SparseRewriteError",
    "RewriteSite",
    "RewriteReport",
    "PassResult",
    "StateMode",
    "InputSpec",
    "LINEAR_FUNCTIONS",
    "rewrite_sites",
    "rewrite_marked_linears",
    "has_marked_sites",
    "weight_inputs",
    "flat_index",
    "convert_values",
    "pin_marks_",
    "resolve_mark",
]

log = logging.getLogger("diagcompile.passes")

StateMode = Literal["parameter", "converted", "gathered"]

#: The call_function targets treated as a linear. ``F.linear`` *is* ``torch._C._nn.linear``.
LINEAR_FUNCTIONS: tuple[object, ...] = (torch._C._nn.linear, torch.ops.aten.linear.default)

_DIAG_LINEAR = torch.ops.diagcompile.diag_linear.default

# Node metadata carried over from a replaced linear: its value (same shape and dtype as ours) and where it
# came from. Not ``source_fn_stack``: it names F.linear, and passes that look for linears must not match.
_KEPT_META = ("val", "example_value", "tensor_meta", "stack_trace", "nn_module_stack")


class SparseRewriteError(ValueError):
    """A sparse-marked weight cannot be rewritten (used outside a linear, tied inconsistently, ...)."""


@dataclass(frozen=True)
class RewriteSite:
    """One rewritten linear call.

    Attributes:
        node: name of the replaced node in the graph.
        weight: where the dense weight came from (module path + ``.weight``, ``get_attr`` target, or the
            original parameter name of a Dynamo placeholder).
        out_features, in_features: the dense weight's shape ``(N_out, N_in)``.
        k: number of kept diagonals (of ``P = max(N_out, N_in)``).
        state: the state mode (``"parameter"``, ``"converted"`` or ``"gathered"``).
    """

    node: str
    weight: str
    out_features: int
    in_features: int
    k: int
    state: StateMode

    @property
    def sparsity(self) -> float:
        """Realised sparsity ``1 - k / P``."""
        return 1.0 - self.k / max(self.out_features, self.in_features)


@dataclass(frozen=True)
class RewriteReport:
    """What one pass did to one graph: the sites it rewrote, in graph order.

    ``inlined``: the op calls the ``diagcompile`` backend then compiled as plain ops (``passes.inline``), by
    node name; the rewritten sites' nodes keep their names there.
    """

    ir: str
    sites: tuple[RewriteSite, ...] = ()
    inlined: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        """Number of rewritten linear calls."""
        return len(self.sites)

    @property
    def weights(self) -> tuple[str, ...]:
        """Distinct dense weights converted (a tied weight counts once), in order of first use."""
        return tuple(dict.fromkeys(s.weight for s in self.sites))

    def __str__(self) -> str:
        head = f"diagcompile [{self.ir}]: rewrote {self.count} sparse linear site(s) from {len(self.weights)} weight(s)"
        rows = [
            f"  {s.node}: {s.weight} {s.out_features}x{s.in_features} k={s.k} (sparsity {s.sparsity:.3f}, {s.state})"
            for s in self.sites
        ]
        if self.inlined:
            rows.append(f"  inlined as dense GEMMs (small layers): {', '.join(self.inlined)}")
        return "\n".join([head, *rows])


class PassResult(NamedTuple):
    """The return value of a pass: the (rewritten) graph module and its report. Unpacks as a pair."""

    graph_module: fx.GraphModule
    report: RewriteReport


@dataclass(frozen=True)
class InputSpec:
    """One extra input that a ``"converted"`` / ``"gathered"`` rewrite appended to the graph.

    Attributes:
        source: where the dense weight comes from at call time: the index of the graph input that carries
            it, or the tensor itself (a weight the graph reads with ``get_attr``).
        kind: ``"values"`` (``(k, D)`` in ``dtype``), ``"index"`` (``(k, D)`` int64 flat positions of the kept
            entries in the dense weight) or ``"offsets"`` (``(k,)`` int32).
        dtype: the dtype of ``"values"``.
        k: the number of diagonals the graph was compiled for.
        weight: the weight's name (for error messages).
    """

    source: int | Tensor
    kind: Literal["values", "index", "offsets"]
    dtype: torch.dtype
    k: int
    weight: str


# ----------------------------------------------------------------------------------------------------
# Graph inspection
# ----------------------------------------------------------------------------------------------------
def _arg(node: fx.Node, i: int, name: str) -> object:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name)


def _fetch(root: nn.Module, target: str) -> object:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _meta_dtype(node: object) -> torch.dtype | None:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val", node.meta.get("example_value"))
    return v.dtype if isinstance(v, Tensor) else None


def _readable(node: fx.Node) -> str:
    """A weight's name: the ``get_attr`` target, or a Dynamo placeholder's name turned back into a path
    (``L_self_modules_fc1_parameters_weight_`` -> ``self.fc1.weight``; a label only)."""
    name = str(node.target)
    if node.op != "placeholder":
        return name
    name = re.sub(r"^L_|_$", "", name)
    return re.sub(r"_(modules|parameters|buffers)_", ".", name)


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"node '{node.name}' ({node.op} {target})"


@dataclass(eq=False)
class _Site:
    """One linear call to rewrite. Its input (and, for function sites, its bias) is *not* recorded here:
    it is read from ``node`` at rewrite time, because rewriting an earlier site replaces that site's node
    (``x`` of ``fc2(fc1(x))`` is ``fc1``'s node until ``fc1`` is rewritten, then the new ``diag_linear``)."""

    node: fx.Node
    module_bias: Tensor | None  # call_module sites: the nn.Linear's bias tensor (function sites: None)
    module_path: str | None  # set for call_module sites

    def current_input(self) -> object:
        return _arg(self.node, 0, "input")

    def current_bias(self) -> object:
        """A function site's bias argument as the graph has it now (an ``fx.Node`` or ``None``)."""
        return _arg(self.node, 2, "bias")


@dataclass(eq=False)
class _Weight:
    tensor: Tensor
    name: str
    weight_mark: SparseMark | None
    module_marks: dict[str, SparseMark] = field(default_factory=dict)  # module path -> mark
    sites: list[_Site] = field(default_factory=list)
    source_nodes: list[fx.Node] = field(default_factory=list)  # get_attr / placeholder nodes yielding it

    def mark(self) -> SparseMark:
        """The weight's own mark, else its module's; linears that share the weight must agree."""
        distinct = set(self.module_marks.values())
        if len(distinct) > 1:
            detail = ", ".join(f"'{p}': {m}" for p, m in self.module_marks.items())
            raise SparseRewriteError(
                f"the tied weight '{self.name}' is shared by linears marked differently ({detail}); "
                f"mark them identically (mark_sparse on the shared weight) or untie them"
            )
        return self.weight_mark if self.weight_mark is not None else next(iter(distinct))


def _collect(gm: fx.GraphModule, placeholder_tensors: Sequence[object] | None, what: str) -> list[_Weight]:
    """Find every marked weight and its sites; raise on any use that is not the weight of a linear."""
    graph = gm.graph
    modules = dict(gm.named_modules(remove_duplicate=False))
    weights: dict[int, _Weight] = {}

    def entry(t: Tensor, name: str) -> _Weight:
        w = weights.get(id(t))
        if w is None:
            w = weights[id(t)] = _Weight(t, name, get_sparse_mark(t))
        return w

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if placeholder_tensors is not None and len(placeholder_tensors) != len(placeholders):
        raise ValueError(
            f"{what}: got {len(placeholder_tensors)} example inputs for a graph with {len(placeholders)} placeholders"
        )
    position = {n: i for i, n in enumerate(placeholders)}

    for node in graph.nodes:
        t: object = None
        if node.op == "placeholder" and placeholder_tensors is not None:
            t = placeholder_tensors[position[node]]
        elif node.op == "get_attr":
            t = _fetch(gm, node.target)
        elif node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Linear) and get_sparse_mark(mod) is not None:
                if type(mod).forward is not nn.Linear.forward:
                    raise SparseRewriteError(
                        f"{what}: '{node.target}' is marked sparse but its class {type(mod).__name__} overrides "
                        f"nn.Linear.forward, and the graph calls it as one module ({_describe(node)}); the pass "
                        f"only replaces a plain linear. Let the tracer trace through it (its F.linear on the "
                        f"marked weight is then rewritten) or unmark it"
                    )
                w = entry(mod.weight, f"{node.target}.weight")
                own = mod.__dict__.get("_diagcompile_sparse_mark")
                if own is not None:
                    w.module_marks[node.target] = own
                w.sites.append(_Site(node, mod.bias, node.target))
                continue
            hidden = [n for n, p in mod.named_parameters() if is_sparse_marked(p)]
            hidden += [f"{n}.weight" for n, sub in mod.named_modules() if n and get_sparse_mark(sub) is not None]
            if hidden:
                raise SparseRewriteError(
                    f"{what}: '{node.target}.{hidden[0]}' is marked sparse but is used inside '{node.target}' "
                    f"({type(mod).__name__}), which the graph calls as one opaque module ({_describe(node)}). "
                    f"Only linear calls on a marked weight can be rewritten: if the module hides a linear, "
                    f"trace through it (a torch.fx.Tracer whose is_leaf_module returns False for it); if the "
                    f"weight is tied to a non-linear use, untie it or unmark it"
                )
            continue
        if isinstance(t, Tensor) and is_sparse_marked(t):
            entry(t, _readable(node)).source_nodes.append(node)

    # Every user of a node that yields a marked weight must use it as the weight of a linear.
    for w in weights.values():
        for src in w.source_nodes:
            for user in list(src.users):
                ok = (
                    user.op == "call_function"
                    and user.target in LINEAR_FUNCTIONS
                    and _arg(user, 1, "weight") is src
                    and _arg(user, 0, "input") is not src
                    and _arg(user, 2, "bias") is not src
                )
                if not ok and _is_region(user):
                    raise SparseRewriteError(
                        f"{what}: the weight '{w.name}' is marked sparse and used inside a "
                        f"{_region_name(user)} region ({_describe(user)}); the pass does not rewrite linears "
                        f"inside such regions (activation checkpointing, torch.compiler wrap). Swap the marked "
                        f"linears for DiagLinear first, which works inside them: diagcompile.compile(model, "
                        f"sparsify=True) or diagcompile.sparsify_(model, DiagSparsityConfig(only_marked=True))"
                    )
                if not ok and _is_fast_path(user):
                    raise SparseRewriteError(
                        f"{what}: the weight '{w.name}' is marked sparse but {_describe(user)}, torch's fused fast "
                        f"path of nn.TransformerEncoderLayer / nn.MultiheadAttention (eval mode without grad), "
                        f"reads it as a dense matrix instead of calling the linear. Turn the fast path off: "
                        f"diagcompile.compile(model, sparsify=True) does it for the layers it converts, or "
                        f"torch.backends.mha.set_fastpath_enabled(False) for the whole program"
                    )
                if not ok:
                    raise SparseRewriteError(
                        f"{what}: the weight '{w.name}' is marked sparse but {_describe(user)} uses it other than "
                        f"as the weight of a linear. Only nn.Linear / F.linear / aten.linear calls on the marked "
                        f"weight itself can become diagonal-sparse; unmark it (diagcompile.unmark_sparse) or "
                        f"compute that use from a separate tensor"
                    )
                w.sites.append(_Site(user, None, None))
        if w.tensor.dim() != 2:
            raise SparseRewriteError(f"{what}: marked weight '{w.name}' must be 2-D, got {tuple(w.tensor.shape)}")
    # Modules that own a marked weight and are replaced must not hide it from other, non-linear users:
    # a call_module site's weight reached through another module was caught above (opaque module).
    return [w for w in weights.values() if w.sites]


def _is_region(node: fx.Node) -> bool:
    """Whether ``node`` calls a higher-order op (``torch.utils.checkpoint``'s ``tag_activation_checkpoint``,
    ``wrap``, ...), which runs a subgraph of its own on the tensors it is given."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)


def _is_fast_path(node: fx.Node) -> bool:
    name = str(node.target)
    return node.op == "call_function" and ("_transformer_encoder_layer_fwd" in name or "_native_multi_head" in name)


def _region_name(node: fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    return "torch.utils.checkpoint" if name == "tag_activation_checkpoint" else f"higher-order op '{name}'"


_ENTER_AUTOCAST = torch.amp.autocast_mode._enter_autocast


def _autocast_possible(graph: fx.Graph, devices: Sequence[str]) -> bool:
    """Whether the graph's linears may run under autocast, where mixed input dtypes are legal: autocast is on
    now for one of the weights' ``devices`` (Dynamo calls the backend inside the user's region) or the graph
    enters it itself."""
    if any(torch.amp.is_autocast_available(d) and torch.is_autocast_enabled(d) for d in {*devices, "cpu"}):
        return True
    # The node Dynamo records for ``with torch.autocast(...)`` (and the deprecated per-device forms) in the graph;
    # matched exactly: a name match ("autocast" in any target) also waived the check for a user's own function.
    return bool(graph.find_nodes(op="call_function", target=_ENTER_AUTOCAST))


def weight_inputs(gm: fx.GraphModule, example_inputs: Sequence[object]) -> tuple[tuple[int, str], ...]:
    """``(position, name)`` of each placeholder whose mark decides how the graph is rewritten, in placeholder
    order: one used as a linear's weight or passed to a subgraph region (``_is_region``), or a 2-D
    ``nn.Parameter`` from which a linear's weight is computed (``w.clone()``, ``w.t()``: a marked one is
    refused by the rewrite). The backend checks the marks of these at each call (Dynamo reuses a graph for
    other modules)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    direct: set[fx.Node] = set()
    computed: set[fx.Node] = set()  # nodes a linear's weight is computed from
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
            weight = _arg(node, 1, "weight")
            if isinstance(weight, fx.Node):
                direct.add(weight)
                stack = list(weight.all_input_nodes)
                while stack:
                    n = stack.pop()
                    if n not in computed:
                        computed.add(n)
                        stack.extend(n.all_input_nodes)
        elif _is_region(node):
            direct.update(node.all_input_nodes)
    found = []
    for i, (node, example) in enumerate(zip(placeholders, example_inputs)):
        parameter = isinstance(example, nn.Parameter) and example.dim() == 2
        if (node in direct and node.op == "placeholder") or (parameter and node in computed):
            found.append((i, _readable(node)))
    return tuple(found)


def has_marked_sites(gm: fx.GraphModule, placeholder_tensors: Sequence[object] | None = None, ir: str = "") -> bool:
    """Whether ``gm`` has anything to rewrite (raises ``SparseRewriteError`` like the passes would)."""
    return bool(_collect(gm, placeholder_tensors, ir))


# ----------------------------------------------------------------------------------------------------
# State placement
# ----------------------------------------------------------------------------------------------------
def _owned_parent(gm: fx.GraphModule, path: str) -> tuple[nn.Module, str]:
    """The module that holds ``path``'s last component, copied-on-write so the user's modules never change.

    ``GraphModule`` reuses the user's module objects for ``call_module`` targets (and their parents when a
    parent is itself a target), so every module on the path is replaced by a shallow copy owned by ``gm``
    before it is edited. The copies keep the same children and tensors.
    """
    *prefix, last = path.split(".")
    parent: nn.Module = gm
    for name in prefix:
        child = parent._modules[name]
        clone = child.__class__.__new__(child.__class__)
        clone.__dict__ = child.__dict__.copy()
        for d in ("_modules", "_parameters", "_buffers"):
            clone.__dict__[d] = child.__dict__[d].copy()
        parent._modules[name] = clone
        parent = clone
    return parent, last


def _free_name(owner: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(owner, name):
        name, i = f"{base}_{i}", i + 1
    return name


@torch.no_grad()
def convert_values(weight: Tensor, offsets: Tensor, dtype: torch.dtype) -> Tensor:
    """``(k, D)`` copies of the kept entries of a dense weight, in ``dtype``, contiguous, no autograd."""
    # Outside inference mode: a buffer created under torch.inference_mode() could not be used later by
    # a graph that records autograd.
    with torch.inference_mode(False):
        return extract_diagonals(weight.detach(), offsets).to(dtype).contiguous()


def flat_index(weight: Tensor, offsets: Tensor) -> Tensor:
    """``(k, D)`` int64 positions of the kept entries in the flattened dense weight (for ``torch.take``)."""
    rows, cols = diagonal_indices(weight.shape[0], weight.shape[1], offsets)
    with torch.inference_mode(False):
        return (rows * weight.shape[1] + cols).to(weight.device)


class _Inputs:
    """Appends placeholders after the graph's last one, each with its ``InputSpec``."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.last = placeholders[-1] if placeholders else None
        # Dynamo's graphs carry per-placeholder metadata that AOTAutograd reads back (a source, and whether
        # the input is static: parameters are, so CUDA graphs do not copy them each replay). Our inputs are
        # per-weight state that lives as long as the weight: mark them static too.
        self.dynamo = any(hasattr(n, "_dynamo_source") for n in placeholders)
        self.specs: list[InputSpec] = []

    def add(self, name: str, spec: InputSpec) -> fx.Node:
        ctx = self.graph.inserting_after(self.last) if self.last is not None else self.graph.inserting_before()
        with ctx:
            node = self.graph.placeholder(name)
        if self.dynamo:
            node._dynamo_source = None
            node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        self.last = node
        self.specs.append(spec)
        return node


class _Emitter:
    """Creates, once per (weight, dtype), the graph nodes that yield a weight's values and offsets."""

    def __init__(
        self,
        gm: fx.GraphModule,
        w: _Weight,
        offsets: Tensor,
        mode: StateMode,
        index: int,
        inputs: _Inputs,
        position: dict[fx.Node, int],
    ) -> None:
        self.gm, self.w, self.offsets, self.mode, self.index = gm, w, offsets, mode, index
        self.inputs, self.position = inputs, position
        self.values_nodes: dict[torch.dtype, fx.Node] = {}
        self.offsets_node: fx.Node | None = None
        self.index_node: fx.Node | None = None
        self.param: nn.Parameter | None = None
        self.containers: set[str] = set()  # call_module paths whose nn.Linear was replaced (parameter mode)
        self.attr_names: tuple[str, str] | None = None  # (values target, offsets target)

    # -- parameter mode: state next to the dense weight -------------------------------------------
    def _place_parameter_state(self) -> None:
        gm, w = self.gm, self.w
        self.param = nn.Parameter(
            convert_values(w.tensor, self.offsets, w.tensor.dtype), requires_grad=w.tensor.requires_grad
        )
        for site in w.sites:
            path = site.module_path
            if path is not None and path not in self.containers:
                # Replace the nn.Linear by a plain container holding values / offsets / bias: the
                # DiagLinear state_dict layout, and the dense weight is gone with the module.
                holder = nn.Module()
                holder.register_parameter("values", self.param)
                holder.register_buffer("offsets", self.offsets)
                if isinstance(site.module_bias, nn.Parameter):
                    holder.register_parameter("bias", site.module_bias)
                elif isinstance(site.module_bias, Tensor):
                    holder.register_buffer("bias", site.module_bias)
                parent, last = _owned_parent(gm, path)
                parent._modules[last] = holder
                self.containers.add(path)
        for target in dict.fromkeys(n.target for n in w.source_nodes):
            prefix = target.rpartition(".")[0]
            if prefix in self.containers:  # the get_attr reads the weight of a module just replaced
                self.attr_names = self.attr_names or (f"{prefix}.values", f"{prefix}.offsets")
                continue
            parent, last = _owned_parent(gm, target)
            base = "" if last == "weight" else f"{last}_"
            vname, oname = _free_name(parent, f"{base}values"), _free_name(parent, f"{base}offsets")
            parent.register_parameter(vname, self.param)
            parent.register_buffer(oname, self.offsets)
            names = (f"{prefix}.{vname}" if prefix else vname, f"{prefix}.{oname}" if prefix else oname)
            self.attr_names = self.attr_names or names
        if self.attr_names is None:
            first = next(iter(self.containers))
            self.attr_names = (f"{first}.values", f"{first}.offsets")

    # -- input modes: per-weight state fed as extra graph inputs ----------------------------------
    def _source(self) -> int | Tensor:
        src = self.w.source_nodes[0] if self.w.source_nodes else None
        if src is not None and src.op == "placeholder":
            return self.position[src]
        return self.w.tensor

    def _input(self, kind: str, dtype: torch.dtype) -> fx.Node:
        suffix = kind if kind != "values" or dtype == self.w.tensor.dtype else f"values_{str(dtype).split('.')[-1]}"
        spec = InputSpec(self._source(), kind, dtype, int(self.offsets.numel()), self.w.name)
        return self.inputs.add(f"diag{self.index}_{suffix}", spec)

    def _weight_node(self, site: _Site) -> fx.Node:
        if self.w.source_nodes:
            return self.w.source_nodes[0]
        return self.gm.graph.get_attr(f"{site.module_path}.weight")

    def nodes(self, site: _Site, dtype: torch.dtype) -> tuple[fx.Node, fx.Node]:
        """``(values, offsets)`` nodes for ``site``; call inside ``graph.inserting_before(site.node)``."""
        graph = self.gm.graph
        if self.offsets_node is None:
            if self.mode == "parameter":
                self._place_parameter_state()
                self.offsets_node = graph.get_attr(self.attr_names[1])
            else:
                self.offsets_node = self._input("offsets", torch.int32)
        if dtype not in self.values_nodes:
            if self.mode == "parameter":
                node = graph.get_attr(self.attr_names[0])
                if dtype != self.w.tensor.dtype:
                    node = graph.call_method("to", (node, dtype))
            elif self.mode == "converted":
                node = self._input("values", dtype)
            else:
                if self.index_node is None:
                    self.index_node = self._input("index", torch.int64)
                node = graph.call_function(torch.take, (self._weight_node(site), self.index_node))
                if dtype != self.w.tensor.dtype:
                    node = graph.call_method("to", (node, dtype))
            self.values_nodes[dtype] = node
        return self.values_nodes[dtype], self.offsets_node

    def bias_node(self, site: _Site, dtype: torch.dtype) -> fx.Node | None:
        """The site's bias as a node of ``dtype``, or ``None``."""
        if site.module_path is None:  # F.linear / aten.linear: the bias argument (a node or None)
            bias = site.current_bias()
            node, bias_dtype = bias, _meta_dtype(bias)
        elif site.module_bias is None:
            return None
        else:  # nn.Linear: its bias, in the container that replaced it or on the module itself
            node, bias_dtype = self.gm.graph.get_attr(f"{site.module_path}.bias"), site.module_bias.dtype
        if isinstance(node, fx.Node) and bias_dtype not in (None, dtype):
            node = self.gm.graph.call_method("to", (node, dtype))
        return node


# ----------------------------------------------------------------------------------------------------
# The rewrite
# ----------------------------------------------------------------------------------------------------
Resolver = Callable[[Tensor, SparseMark], Tensor]


def resolve_mark(weight: Tensor, mark: SparseMark) -> Tensor:
    """The offsets a mark selects for a weight, without pinning: ``mark.resolve_offsets(weight)``."""
    return mark.resolve_offsets(weight)


def rewrite_sites(
    gm: fx.GraphModule,
    *,
    ir: str,
    state_mode: StateMode | Callable[[Tensor], StateMode],
    placeholder_tensors: Sequence[object] | None = None,
    resolve: Resolver = resolve_mark,
) -> tuple[PassResult, list[InputSpec]]:
    """Rewrite, in place, every linear site of a sparse-marked weight in ``gm`` into ``diag_linear``.

    Args:
        gm: the graph module; edited in place (and recompiled) only if it has something to rewrite.
        ir: a label for the report and the error messages.
        state_mode: where the values live (see the module docstring), or a function of the dense weight.
        placeholder_tensors: the runtime value of each placeholder, in order (Dynamo's ``example_inputs``);
            ``None`` when weights can only come from ``get_attr`` / ``call_module``.
        resolve: ``(weight, mark) -> offsets`` (int32, sorted); default ``mark.resolve_offsets(weight)``.

    Returns:
        ``((gm, report), specs)``: ``specs`` describes the inputs appended to the graph, in order (empty in
        ``"parameter"`` mode). When nothing is marked, ``gm`` is untouched and ``report.count == 0``.

    Raises:
        SparseRewriteError: a marked weight is used other than as a linear's weight, sits inside an opaque
            module, or is tied across linears marked differently.
    """
    weights = _collect(gm, placeholder_tensors, ir)
    if not weights:
        return PassResult(gm, RewriteReport(ir)), []
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    position = {n: i for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    inputs = _Inputs(graph)
    emitters: dict[int, _Emitter] = {}
    work: list[tuple[_Site, _Weight]] = []
    for i, w in enumerate(weights):
        mark = w.mark()
        try:
            offsets = resolve(w.tensor, mark).to(device=w.tensor.device, dtype=OFFSET_DTYPE)
        except RuntimeError as e:  # e.g. a fake tensor without data: top-k needs the real weight
            raise SparseRewriteError(f"{ir}: cannot choose the diagonals of '{w.name}': {e}") from e
        mode = state_mode(w.tensor) if callable(state_mode) else state_mode
        emitters[id(w)] = _Emitter(gm, w, offsets, mode, i, inputs, position)
        work += [(s, w) for s in w.sites]
    work.sort(key=lambda sw: order[sw[0].node])

    sites: list[RewriteSite] = []
    # Only Dynamo graphs need the check: their fake propagation lets F.linear's mixed dtypes through, while
    # an exported program or a symbolic trace records what actually ran (autocast applied while tracing).
    autocast = ir != "dynamo" or _autocast_possible(graph, [w.tensor.device.type for w in weights])
    for site, w in work:
        em = emitters[id(w)]
        n_out, n_in = w.tensor.shape
        dtype = _meta_dtype(site.node) or w.tensor.dtype
        x_dtype = _meta_dtype(site.current_input())
        if not autocast and x_dtype is not None and x_dtype != w.tensor.dtype:
            # Eager F.linear raises here; the rewrite would cast x to the traced output dtype and run.
            raise SparseRewriteError(
                f"{ir}: dtype mismatch at {_describe(site.node)}: its input is {x_dtype} but the marked weight "
                f"'{w.name}' is {w.tensor.dtype} (eager nn.Linear raises on this); convert the input or the model"
            )
        with graph.inserting_before(site.node):
            values, offsets = em.nodes(site, dtype)
            x = site.current_input()
            if _meta_dtype(x) not in (None, dtype):
                x = graph.call_method("to", (x, dtype))
            bias = em.bias_node(site, dtype)
            if bias is None:
                bias = graph.call_function(torch.ops.aten.new_empty.default, (values, [0]))
            new = graph.call_function(_DIAG_LINEAR, (x, values, offsets, bias, n_out))
        new.meta.update({k: v for k, v in site.node.meta.items() if k in _KEPT_META})
        site.node.replace_all_uses_with(new)
        graph.erase_node(site.node)
        sites.append(RewriteSite(new.name, w.name, n_out, n_in, int(em.offsets.numel()), em.mode))

    # Dead dense weights: get_attr nodes without users go; in "parameter" mode (the graph module owns its
    # state) so do their attributes, once nothing refers to them. A placeholder is never removed: the
    # graph's inputs are its caller's contract.
    for w in weights:
        for src in w.source_nodes:
            if src.op == "get_attr" and not src.users:
                graph.erase_node(src)
    referenced = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    for w in weights:
        if emitters[id(w)].mode != "parameter":
            continue
        for src in w.source_nodes:
            if src.op == "get_attr" and src.target not in referenced:
                parent, last = _owned_parent(gm, src.target)
                if last in parent._parameters:
                    del parent._parameters[last]
                elif last in parent._buffers:
                    del parent._buffers[last]
                elif last in parent.__dict__:
                    delattr(parent, last)
                referenced.add(src.target)  # a tied target is deleted once
    graph.lint()
    gm.recompile()
    report = RewriteReport(ir, tuple(sites))
    log.info("%s", report)
    return PassResult(gm, report), inputs.specs


def rewrite_marked_linears(gm: fx.GraphModule, *, ir: str, state_mode: StateMode = "parameter") -> PassResult:
    """``rewrite_sites`` for graph modules that own their state (``"parameter"`` mode, no extra inputs)."""
    if state_mode != "parameter":
        raise ValueError("rewrite_marked_linears places state in the graph module; use rewrite_sites for inputs")
    result, _ = rewrite_sites(gm, ir=ir, state_mode=state_mode)
    return result


# ----------------------------------------------------------------------------------------------------
# Pinning top-k marks
# ----------------------------------------------------------------------------------------------------
def pin_marks_(model: nn.Module) -> int:
    """Resolve every top-k mark in ``model`` to explicit offsets, on each marked linear *and* its weight.

    After this, ``sparsify_``, the passes, the backend and export all keep the same diagonals, however the
    dense weight changes. The weight's mark wins where the two differ: the ``diagcompile`` backend pins its
    top-k choice on the *weight* when it first compiles a graph, so after a compiled training run

        pin_marks_(model); sparsify_(model, DiagSparsityConfig(only_marked=True))

    turns each trained dense layer into a ``DiagLinear`` on exactly the diagonals that were trained. A
    weight that lost its mark (``copy.deepcopy``) gets its module's. Top-k marks resolve from the *current*
    weights: pin after loading a checkpoint, not before (a load undoes only the backend's own pins, not
    these). Returns the number of marked linears.
    """
    n = 0
    for m in model.modules():
        if not isinstance(m, nn.Linear):
            continue
        module_mark = m.__dict__.get("_diagcompile_sparse_mark")
        weight_mark = get_sparse_mark(m.weight)
        mark = weight_mark or module_mark
        if mark is None:
            continue
        offsets = mark.offsets if mark.offsets is not None else tuple(mark.resolve_offsets(m.weight).tolist())
        mark_sparse(m, offsets=list(offsets))
        n += 1
    return n

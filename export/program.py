"""``torch.export`` for diagonal-sparse models: ``export_program``, ``save``, ``load``, ``check_program``.

Each ``DiagLinear`` becomes exactly one ``torch.ops.diagcompile.diag_linear.default`` node of the program, and
stays one node through ``ep.run_decompositions()`` (the op is opaque: one kernel for every backend, no
decomposition). A ``.pt2`` file stores only the op's *name*, not its code, so loading needs the op
registered: ``load`` imports diagcompile first.

Also here, because ``diagcompile.export.onnx`` reuses them: the on-the-way conversion of sparse-marked
linears (``prepare_for_export``), how example inputs are resized to another batch size for checks, and the
``CheckResult`` / ``ExportCheckError`` pair every artifact check returns or raises.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from diagcompile._files import atomic_write, check_output_path
from diagcompile.marking import SparseMark, apply_sparse_mark, get_sparse_mark, mark_sparse

__all__ = [
    "CheckResult",
    "ExportCheckError",
    "NoDiagonalLayersWarning",
    "check_program",
    "count_diag_nodes",
    "export_program",
    "load",
    "prepare_for_export",
    "save",
]

log = logging.getLogger(__name__)


class ExportCheckError(RuntimeError):
    """An exported artifact does not reproduce its source model within tolerance."""


class NoDiagonalLayersWarning(UserWarning):
    """The exported model has no diagonal layer: the artifact is a plain export."""


@dataclass(frozen=True)
class CheckResult:
    """Outcome of running an exported artifact against its source model.

    Each output tensor is judged against its own tolerance, ``atol + rtol * max|eager|`` over that output's
    finite entries (at every batch size), so a large output does not hide an error in a small one. Non-finite
    entries (``inf``, ``NaN``) are compared position by position: the artifact must have the same ones at the
    same places (``-inf`` where eager has ``-inf``, ``NaN`` where it has ``NaN``); only the entries finite in
    both are compared numerically. Integer and bool outputs must match exactly, or within an ``atol`` the
    caller gives (never the relative part, which would grow with the values). An output of another shape or
    dtype than eager's raises ``ExportCheckError``.

    Attributes:
        artifact: what was checked (``"pt2"``, ``"onnx-portable"``, ``"onnx-plugin"``, ...).
        max_abs_diff: the deciding output's largest ``|artifact - eager|`` (over its entries finite in both, at
            every batch size; ``inf`` where its non-finite entries differ). The deciding output is the one
            furthest over (or closest to) its own tolerance: the check passes iff this one does.
        tolerance: that output's allowed maximum, ``atol + rtol * max|eager|`` (defaults by its dtype).
        batch_sizes: the batch sizes that were run.
        input_shapes: the first tensor input's shape at each run, where dims other than the batch were varied
            too (dynamic sequence lengths, say), or where its only dim is not a batch (a static 1-D input);
            empty when only the batch changed.
        output: the index of the deciding output among the model's output tensors (pytree order); ``None``
            when the model has at most one.
        nonfinite_mismatch: where the deciding output's ``inf`` / ``NaN`` entries differ from eager's (count,
            first index, both values); empty when they agree.
        elements: the number of output entries compared over all runs; ``0`` means nothing was compared (every
            output was empty, e.g. a static batch of 0), which does not pass. ``None``: not counted.
    """

    artifact: str
    max_abs_diff: float
    tolerance: float
    batch_sizes: tuple[int, ...]
    input_shapes: tuple[tuple[int, ...], ...] = ()
    output: int | None = None
    nonfinite_mismatch: str = ""
    elements: int | None = None

    @property
    def passed(self) -> bool:
        # A check that compared nothing proved nothing: it must not read as a success.
        return self.elements != 0 and not self.nonfinite_mismatch and self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        if self.input_shapes:
            plural = "s" if len(self.input_shapes) > 1 else ""
            where = f"input shape{plural} " + ", ".join(str(tuple(s)) for s in self.input_shapes)
        else:
            plural = "s" if len(self.batch_sizes) > 1 else ""
            where = f"batch size{plural} " + ", ".join(str(b) for b in self.batch_sizes)
        if self.elements == 0:
            return (
                f"{self.artifact}: nothing compared, every output is empty at {where}: NOT CHECKED (export from "
                f"a non-empty example, or check at a batch size that has data)"
            )
        verdict = "OK" if self.passed else "FAILED"
        which = f" in output {self.output}" if self.output is not None else ""
        text = (
            f"{self.artifact}: max |artifact - eager| = {self.max_abs_diff:.3e}{which} "
            f"(tolerance {self.tolerance:.1e}) at {where}: {verdict}"
        )
        if self.nonfinite_mismatch:
            text += f" ({self.nonfinite_mismatch})"
        return text


# ----------------------------------------------------------------------------------------------------
# Preparing a model
# ----------------------------------------------------------------------------------------------------
def _marked_linears(model: nn.Module) -> list[str]:
    return [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and get_sparse_mark(m) is not None]


def _marked_parameters(model: nn.Module) -> dict[str, SparseMark]:
    """Every sparse-marked parameter by name (a tied one under each of its names) and its mark."""
    marks: dict[str, SparseMark] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        mark = get_sparse_mark(p)
        if mark is not None:
            marks[fqn] = mark
    return marks


def _copy_with_marks(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` with every mark carried over.

    ``deepcopy`` rebuilds each ``Parameter`` from its data and drops its Python attributes, so a mark set on
    a weight (``mark_sparse(linear.weight)``, a bare ``F.linear`` parameter, or a top-k choice that the
    compile backend pinned on the weight) would be lost; only module marks survive. Marks are recorded by
    parameter name before the copy and set again on the copy's parameters. A linear then obeys its weight's
    mark where it has one, as the graph passes and the compile backend do, else its module's.
    """
    weight_marks = _marked_parameters(model)
    copied = copy.deepcopy(model)
    for fqn, mark in weight_marks.items():
        apply_sparse_mark(copied.get_parameter(fqn), mark)
    for m in copied.modules():
        if isinstance(m, nn.Linear):
            mark = get_sparse_mark(m.weight) or get_sparse_mark(m)
            if mark is not None:
                apply_sparse_mark(m, mark)  # the module and its weight now agree
    return copied


def _pin_and_mask_(param: nn.Parameter, mark: SparseMark) -> None:
    """Pin ``param``'s mark to explicit offsets and zero its entries off those diagonals, in place.

    Used on the export copy for marked parameters that no ``nn.Linear`` owns (``F.linear(x, self.w)``):
    ``sparsify_`` cannot swap them, so ``export_program`` converts their linear calls in the exported graph
    (``diagcompile.passes``). Pinned, the graph pass keeps exactly these diagonals; masked, the copy computes
    in eager what the exported diagonal layer computes, so it is the reference of ``check_program``.
    """
    from diagcompile.ops import extract_diagonals, to_dense

    offsets = mark.resolve_offsets(param)
    mark_sparse(param, offsets=offsets)
    with torch.no_grad():
        param.copy_(to_dense(extract_diagonals(param.detach(), offsets), offsets, *param.shape))


def refuse_training_layers(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first module of ``model`` that is a training-time layer, one that says
    so with a ``_diagcompile_not_exportable`` message (a soft DynaDiag ``DynaDiagLinear``: it picks its active
    diagonals from data, which torch.export cannot trace)."""
    for fqn, m in model.named_modules():
        why = getattr(m, "_diagcompile_not_exportable", None)
        if why:
            raise ValueError(f"cannot export '{fqn or '<root>'}': {why}")


def prepare_for_export(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Convert what is sparse-marked in ``model`` so that it exports as diagonal layers; never touches ``model``.

    Returns:
        ``(model_to_export, converted_fqns)``. Without marks this is ``(model, [])``, no copy. With some, it is
        a deep copy (marks on modules and on parameters carried over) in which

        * exactly the marked ``nn.Linear`` layers became ``DiagLinear`` (their mark's sparsity/offsets; top-k
          diagonals by L2 norm when the mark has no offsets; a weight's own mark wins over its module's);
        * a marked parameter that no ``nn.Linear`` owns (a bare ``nn.Parameter`` used with ``F.linear``) stays
          a dense parameter, pinned to its diagonals and zero elsewhere: ``export_program`` turns its linear
          calls into diagonal layers in the exported graph.

        ``converted_fqns`` names the marked linears, then the marked bare parameters.

    Raises:
        ValueError: a marked linear cannot become a ``DiagLinear`` (``diagcompile.api.replaceable_linears``: a
            subclass that overrides ``forward``, an ``nn.MultiheadAttention`` ``out_proj``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    refuse_training_layers(model)
    marked = _marked_linears(model)
    if not marked and not _marked_parameters(model):
        return model, []
    from diagcompile.api import sparsify_
    from diagcompile.config import DiagSparsityConfig

    converted = _copy_with_marks(model)
    if marked:
        converted = sparsify_(converted, DiagSparsityConfig(only_marked=True))
    bare = _marked_parameters(converted)  # what sparsify_ left: parameters no nn.Linear owns
    seen: set[int] = set()
    for fqn, mark in bare.items():
        param = converted.get_parameter(fqn)
        if id(param) not in seen:  # a tied parameter once
            seen.add(id(param))
            _pin_and_mask_(param, mark)
    if marked:
        log.info("converted %d sparse-marked linear(s) on the way: %s", len(marked), ", ".join(marked))
    if bare:
        log.info("sparse-marked parameter(s) to convert in the exported graph: %s", ", ".join(bare))
    return converted, [*marked, *bare]


def count_diag_layers(model: nn.Module) -> int:
    """Number of ``DiagLinear`` modules in ``model``."""
    from diagcompile.modules import DiagLinear

    return sum(isinstance(m, DiagLinear) for m in model.modules())


def count_diag_nodes(program: torch.export.ExportedProgram | torch.fx.GraphModule) -> int:
    """Number of ``diagcompile::diag_linear`` nodes in an exported program or graph module."""
    graph = program.graph
    target = torch.ops.diagcompile.diag_linear.default
    return sum(n.op == "call_function" and n.target is target for n in graph.nodes)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Export the inference behaviour (dropout off), and give the model back in the mode it came in."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


# ----------------------------------------------------------------------------------------------------
# Example inputs
# ----------------------------------------------------------------------------------------------------
def _as_args(example_args: Any) -> tuple:
    if isinstance(example_args, Tensor):
        return (example_args,)
    if isinstance(example_args, list):
        return tuple(example_args)
    if not isinstance(example_args, tuple):
        raise TypeError(
            f"example_args must be a tuple of model inputs (or one Tensor), got {type(example_args).__name__}"
        )
    return example_args


def flatten_inputs(example_args: Any, example_kwargs: Mapping[str, Any] | None = None) -> tuple[tuple, Any]:
    """The leaves of ``(example_args, example_kwargs)`` in pytree order, and the spec that rebuilds them.

    Pytree order is the order of an exported program's user inputs and of an ONNX model's graph inputs
    (nested lists / tuples / dicts flattened, keyword arguments after the positional ones, in the dict's
    order), so the checks match every tensor, nested or passed by keyword, to the artifact input it feeds.
    """
    args = _as_args(example_args)
    if example_kwargs is None:
        kwargs: dict[str, Any] = {}
    elif isinstance(example_kwargs, Mapping) and all(isinstance(k, str) for k in example_kwargs):
        kwargs = dict(example_kwargs)
    else:
        raise TypeError(
            f"example_kwargs must be a dict of keyword arguments (str keys), got {type(example_kwargs).__name__}"
        )
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return tuple(leaves), spec


def unflatten_inputs(leaves: Sequence[Any], spec: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` rebuilt from ``flatten_inputs``' leaves (resized or not) and spec."""
    args, kwargs = pytree.tree_unflatten(list(leaves), spec)
    return tuple(args), kwargs


def input_names(spec: Any) -> list[str]:
    """A readable name per leaf of ``flatten_inputs``: ``example_args[0]``, ``example_args[1][2]``,
    ``example_kwargs['mask']``."""
    paths, _ = pytree.tree_flatten_with_path(pytree.tree_unflatten([None] * spec.num_leaves, spec))
    root = ("example_args", "example_kwargs")
    return [root[path[0].idx] + pytree.keystr(path[1:]) for path, _ in paths]


def _batch_size(args: tuple) -> int | None:
    """The shared dim-0 size of the tensor arguments; ``None`` without a batched tensor."""
    sizes = {a.shape[0] for a in args if isinstance(a, Tensor) and a.dim() >= 1}
    if not sizes:
        return None
    if len(sizes) > 1:
        raise ValueError(
            f"dynamic_batch=True treats dim 0 of every tensor argument as one shared batch dimension, but the "
            f"example arguments have dim-0 sizes {sorted(sizes)}; pass dynamic_batch=False to export static shapes"
        )
    return sizes.pop()


def widen_batch_of_one(example_args: Any) -> tuple:
    """The example inputs with a shared batch of 1 repeated to 2 (torch.export fixes a dim whose example size
    is 1, so a dynamic batch must be traced at another size); other inputs unchanged."""
    args = _as_args(example_args)
    if _batch_size(args) != 1:
        return args
    return tuple(a.expand(2, *a.shape[1:]).clone() if isinstance(a, Tensor) and a.dim() >= 1 else a for a in args)


#: The name of the ``Dim`` that ``dynamic_batch=True`` gives dim 0 of every tensor input (ONNX files name it so).
BATCH_DIM = "batch"


def _dynamic_shapes(model: nn.Module, leaves: tuple, spec: Any) -> Any:
    """torch.export's spec making dim 0 of every tensor input (nested or keyword too) one ``batch`` dim."""
    batch = torch.export.Dim(BATCH_DIM)
    args, kwargs = unflatten_inputs(leaves, spec)
    if not kwargs and len(args) == len(leaves):  # flat positional inputs: the plain per-argument tuple
        return tuple({0: batch} if isinstance(a, Tensor) and a.dim() >= 1 else None for a in args)
    shapes = torch.export.ShapesCollection()
    for a in leaves:
        if isinstance(a, Tensor) and a.dim() >= 1:
            shapes[a] = {0: batch}
    return shapes.dynamic_shapes(model, args, kwargs)


def resize_inputs(
    example_args: Any, batch: int | None, dims: Mapping[tuple[int, int], int] | None = None, seed: int = 0
) -> tuple:
    """Fresh inputs shaped like ``example_args`` (a flat tuple: ``flatten_inputs``' leaves), with dim 0 =
    ``batch`` and ``dims[(i, d)]`` for dim ``d`` of input ``i``.

    ``batch=None`` keeps every dim 0; ``dims`` (dims other than 0, e.g. a dynamic sequence length) may be
    empty. Floating tensors get standard-normal values (never zeros: they hide indexing bugs); integer tensors
    get values drawn from the example's own entries (so token ids stay in the vocabulary); other arguments pass
    through unchanged.
    """
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    dims = dict(dims or {})
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, a in enumerate(_as_args(example_args)):
        if not isinstance(a, Tensor) or a.dim() == 0:
            out.append(a)
            continue
        shape = [dims.get((i, d), n) for d, n in enumerate(a.shape)]
        if batch is not None:
            shape[0] = batch
        if a.is_floating_point():
            t = torch.randn(shape, generator=g, dtype=torch.float32).to(a.dtype)
        elif a.dtype == torch.bool:
            t = torch.rand(shape, generator=g) < 0.5
        elif a.numel() > 0:
            flat = a.detach().reshape(-1).cpu()
            t = flat[torch.randint(0, flat.numel(), shape, generator=g)]
        else:
            t = torch.zeros(shape, dtype=a.dtype)
        out.append(t.to(a.device))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------
# Dynamic dims other than the batch: which sizes a check runs them at
# ----------------------------------------------------------------------------------------------------
#: ``(position among flatten_inputs' leaves, dim) -> size expression`` for the dynamic dims of an artifact's
#: tensor inputs, and each symbol's ``(lowest, highest or None)`` allowed value.
DimExprs = dict[tuple[int, int], sympy.Expr]
DimRanges = dict[sympy.Symbol, tuple[int, int | None]]


def _parse_dim(name: str) -> sympy.Expr:
    """An ONNX ``dim_param`` (``"batch"``, ``"s75"``, ``"2*s75"``) as an expression in plain symbols."""
    names = set(re.findall(r"[A-Za-z_]\w*", name))
    return sympy.sympify(name, locals={n: sympy.Symbol(n) for n in names})


def program_dynamic_dims(ep: torch.export.ExportedProgram, args: tuple) -> tuple[DimExprs, DimRanges]:
    """The dynamic dims of ``ep``'s tensor inputs (matched to ``args``' tensors in order) and their ranges."""
    user_inputs = set(ep.graph_signature.user_inputs)
    vals = [
        n.meta["val"]
        for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in user_inputs and isinstance(n.meta.get("val"), Tensor)
    ]
    positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
    exprs: DimExprs = {}
    for i, val in zip(positions, vals):
        for d, n in enumerate(val.shape):
            if isinstance(n, torch.SymInt):
                exprs[(i, d)] = sympy.sympify(n.node.expr)
    ranges: DimRanges = {}
    for sym, vr in ep.range_constraints.items():
        if isinstance(sym, sympy.Symbol):
            lo, hi = vr.lower, vr.upper  # hi may be torch's int_oo: not a sympy Integer
            ranges[sym] = (int(lo) if lo.is_Integer else 0, int(hi) if hi.is_Integer else None)
    return exprs, ranges


def _symbol_examples(exprs: DimExprs, example_args: tuple) -> dict[sympy.Symbol, int]:
    """Each symbol's value in the example: read where it is a dim's whole size, else solved from a dim whose
    size is an expression in it alone (``2*s``)."""
    example: dict[sympy.Symbol, int] = {}
    for (i, d), e in exprs.items():
        if isinstance(e, sympy.Symbol):
            example.setdefault(e, int(example_args[i].shape[d]))
    for (i, d), e in exprs.items():
        unknown = e.free_symbols - example.keys()
        if len(unknown) == 1:
            (sym,) = unknown
            sols = sympy.solve(sympy.Eq(e.subs(example), int(example_args[i].shape[d])), sym)
            ints = [int(v) for v in sols if v.is_integer]
            if ints:
                example[sym] = ints[0]
    missing = set().union(*(e.free_symbols for e in exprs.values())) - example.keys() if exprs else set()
    if missing:
        raise ValueError(
            f"cannot tell the example value of the dynamic size(s) {sorted(map(str, missing))} from the input "
            f"shapes, so the check cannot run other sizes; pass the check inputs' sizes another way"
        )
    return example


def check_sizes(
    artifact: str,
    batch_sizes: Sequence[int] | None,
    example_args: tuple,
    exprs: DimExprs,
    ranges: DimRanges,
    static_batch: int | None,
) -> tuple[tuple[int, ...], list[dict[tuple[int, int], int]]]:
    """The batch sizes a check runs, and for each one the size of every dynamic dim of the artifact.

    The batch is the symbol at dim 0 of the first tensor input. Without ``batch_sizes`` it runs at two sizes
    other than the example's (``default_check_batches``) inside the symbol's range; a static dim 0
    (``static_batch``) runs at its own size only. Every other symbol takes a value other than the example's
    within its range (example - 1 - k, else example + 1 + k, at the k-th batch size), so a dim that the artifact
    wrongly made static fails the check. Dims whose size is an expression (``2*s``) follow their symbols; dims
    not in ``exprs`` (static) keep the example's size.

    Raises:
        ValueError: ``batch_sizes`` holds a size the artifact cannot run (static, or outside the range).
    """
    tensors = [i for i, a in enumerate(example_args) if isinstance(a, Tensor) and a.dim() >= 1]
    batch_sym = exprs.get((tensors[0], 0)) if tensors else None
    if not isinstance(batch_sym, sympy.Symbol):
        batch_sym = None
    if batch_sym is None:
        if static_batch is None and tensors and (tensors[0], 0) not in exprs:
            static_batch = int(example_args[tensors[0]].shape[0])
        sizes = check_batches(artifact, batch_sizes, example_args, static_batch)
    else:
        b0 = int(example_args[tensors[0]].shape[0])
        lo, hi = ranges.get(batch_sym, (0, None))
        lo = max(lo, 1)

        def fits(b: int) -> bool:
            return lo <= b and (hi is None or b <= hi)

        if batch_sizes is None:
            wanted = [*default_check_batches(b0), b0 - 1, b0 + 1, lo, hi if hi is not None else b0 + 2]
            sizes = tuple(dict.fromkeys(b for b in wanted if b != b0 and fits(b)))[:2] or (b0,)
        else:
            sizes = tuple(batch_sizes)
            bad = [b for b in sizes if not fits(b)]
            if bad:
                # An empty batch may well run, but it compares nothing, so a check never uses it.
                why = "an empty batch compares nothing; check" if bad == [0] * len(bad) else "the artifact accepts"
                raise ValueError(
                    f"{artifact}: batch size(s) {bad} are outside the range {why} [{lo}, {'inf' if hi is None else hi}]"
                )
    example = _symbol_examples(exprs, example_args)
    points = []
    for k, b in enumerate(sizes):
        values: dict[sympy.Symbol, int] = {}
        for sym, n in example.items():
            if sym == batch_sym:
                values[sym] = b
                continue
            lo, hi = ranges.get(sym, (1, None))
            ok = [c for c in (n - 1 - k, n + 1 + k) if c >= max(lo, 1) and (hi is None or c <= hi)]
            values[sym] = ok[0] if ok else n
        points.append({key: int(e.subs(values)) for key, e in exprs.items()})
    return sizes, points


def default_check_batches(example_batch: int | None) -> tuple[int, ...]:
    """Two batch sizes that differ from the example's (the dynamic dim must really be dynamic)."""
    if example_batch is None:
        return (1,)
    candidates = [1, example_batch + 3, 2 * example_batch + 5]
    return tuple(b for b in candidates if b != example_batch)[:2]


def check_batches(
    artifact: str, batch_sizes: Sequence[int] | None, example_args: tuple, static_batch: int | None
) -> tuple[int, ...]:
    """The batch sizes to check an artifact at.

    Args:
        artifact: its name, for the error message.
        batch_sizes: the caller's choice, or ``None`` for the default.
        example_args: the example inputs.
        static_batch: the artifact's dim-0 size if an input has a fixed one (exported with
            ``dynamic_batch=False``), else ``None``.

    Returns:
        ``batch_sizes`` if given; else for a static artifact its own batch size (it accepts no other), and
        for a dynamic one ``default_check_batches`` of the example's.

    Raises:
        ValueError: ``batch_sizes`` asks a static artifact for a batch size it cannot run.
    """
    if static_batch is None:
        return tuple(batch_sizes) if batch_sizes is not None else default_check_batches(_batch_size(example_args))
    if batch_sizes is None:
        return (static_batch,)
    other = [b for b in batch_sizes if b != static_batch]
    if other:
        raise ValueError(
            f"{artifact}: the batch dimension is static ({static_batch}; exported with dynamic_batch=False), so it "
            f"cannot run at batch size(s) {other}; check it at {static_batch} or export with a dynamic batch"
        )
    return tuple(batch_sizes)


def _program_static_batch(ep: torch.export.ExportedProgram) -> int | None:
    """Dim 0 of the first user input of ``ep`` whose dim 0 is a constant, or ``None`` if all are dynamic."""
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if isinstance(val, Tensor) and val.dim() >= 1 and isinstance(val.shape[0], int):
            return val.shape[0]
    return None


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for comparing an artifact with eager in ``dtype``."""
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2, 1e-2
    if dtype == torch.float64:
        return 1e-10, 1e-9
    return 1e-5, 1e-4


def _flat_tensors(out: Any) -> list[Tensor]:
    """The tensors of a model output in pytree order: the order of an exported program's and an ONNX
    model's outputs (dicts in insertion order, not sorted)."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, Tensor)]


def _nonfinite_mismatch(ref: Tensor, got: Tensor) -> tuple[int, str]:
    """How many entries of ``got`` disagree with ``ref`` where either is non-finite, and the first of them.

    Agreeing means the same value at the same place: ``+inf`` with ``+inf``, ``-inf`` with ``-inf``, ``NaN``
    with ``NaN`` (a fully masked attention row is ``NaN`` in eager and in a faithful artifact alike). ``ref``
    and ``got`` are float64 tensors of one shape.
    """
    nonfinite = ~torch.isfinite(ref) | ~torch.isfinite(got)
    same = (ref == got) | (torch.isnan(ref) & torch.isnan(got))
    bad = nonfinite & ~same
    n = int(bad.sum())
    if n == 0:
        return 0, ""
    first = tuple(int(i) for i in bad.nonzero()[0])
    return n, f"index {first}: eager {float(ref[first]):.3e}, artifact {float(got[first]):.3e}"


def compare_outputs(
    artifact: str,
    run_artifact: Any,
    model: nn.Module,
    example_leaves: tuple,
    spec: Any,
    batch_sizes: Sequence[int],
    atol: float | None,
    rtol: float | None,
    seed: int,
    dim_sizes: Sequence[Mapping[tuple[int, int], int]] | None = None,
) -> CheckResult:
    """Run ``run_artifact(*args, **kwargs)`` (a list of output tensors) and ``model(*args, **kwargs)`` at each
    batch size, on inputs resized from ``example_leaves`` and rebuilt with ``spec`` (``flatten_inputs``).

    ``dim_sizes[k]``: the size of every dynamic dim at the ``k``-th batch size (``check_sizes``; keys are
    ``(leaf position, dim)``), dim 0 included; the other dims keep the example's sizes. ``None``: only dim 0
    changes, to the batch size.

    Each output gets its own tolerance, from its own dtype (``default_tolerance``, unless ``atol`` / ``rtol``
    are given) and its own scale (``max|eager|`` over its finite entries at every batch size): one tolerance
    for all outputs let a large output (or a single ``-inf``, which made it infinite) hide any error in the
    others. Non-finite entries must match position by position (see ``CheckResult``).
    """
    shapes = []
    # Per output index (the same structure at every batch size): largest finite |diff|, largest finite |eager|,
    # dtype, entries seen, and the non-finite disagreements (count, the first one described).
    diffs: list[float] = []
    scales: list[float] = []
    dtypes: list[torch.dtype] = []
    entries: list[int] = []
    bad: list[int] = []
    first_bad: list[str] = []
    with torch.no_grad(), _eval_mode(model):
        for i, b in enumerate(batch_sizes):
            if dim_sizes is None:
                leaves = resize_inputs(example_leaves, b, None, seed=seed + i)
            else:
                leaves = resize_inputs(example_leaves, None, dim_sizes[i], seed=seed + i)
            shapes.append(next((tuple(a.shape) for a in leaves if isinstance(a, Tensor)), ()))
            args, kwargs = unflatten_inputs(leaves, spec)
            ref = _flat_tensors(model(*args, **kwargs))
            got = [torch.as_tensor(t) for t in run_artifact(*args, **kwargs)]
            if len(got) != len(ref):
                raise ExportCheckError(f"{artifact}: {len(got)} outputs but the eager model returns {len(ref)}")
            for j, (r, o) in enumerate(zip(ref, got)):
                if tuple(o.shape) != tuple(r.shape):
                    raise ExportCheckError(
                        f"{artifact}: output {j} has shape {tuple(o.shape)} at input shape {shapes[-1]}, "
                        f"eager {tuple(r.shape)}"
                    )
                if o.dtype != r.dtype:  # a consumer of the artifact gets other numbers (or a type error)
                    raise ExportCheckError(
                        f"{artifact}: output {j} has dtype {o.dtype} at input shape {shapes[-1]}, eager {r.dtype}"
                    )
                if j == len(diffs):
                    diffs.append(0.0)
                    scales.append(0.0)
                    dtypes.append(r.dtype)
                    entries.append(0)
                    bad.append(0)
                    first_bad.append("")
                entries[j] += r.numel()
                if not _is_float(r.dtype):
                    # Integers and bools: compared as integers (float64 holds them exactly only up to 2**53);
                    # no non-finite values, no scale (their tolerance has no relative part).
                    ri, oi = r.detach().cpu(), o.detach().cpu().to(r.dtype)
                    if r.numel() and not torch.equal(ri, oi):
                        big = (ri.to(torch.int64) - oi.to(torch.int64)).abs().max()  # (wraps only past 2**63)
                        diffs[j] = max(diffs[j], float(big), 1.0)
                    continue
                r64, o64 = r.detach().cpu().double(), o.detach().cpu().double()
                n_bad, first = _nonfinite_mismatch(r64, o64)
                bad[j] += n_bad
                if n_bad and not first_bad[j]:
                    first_bad[j] = f"at input shape {shapes[-1]}, {first}"
                both = torch.isfinite(r64) & torch.isfinite(o64)
                if bool(both.any()):
                    diffs[j] = max(diffs[j], float((o64[both] - r64[both]).abs().max()))
                finite_ref = r64[torch.isfinite(r64)]
                if finite_ref.numel():
                    scales[j] = max(scales[j], float(finite_ref.abs().max()))
    # The deciding output: one whose non-finite entries differ, else the one with the largest diff relative to
    # its own tolerance (the check passes iff that one is within it).
    tolerances = []
    ratios = []
    for j, (diff, dtype) in enumerate(zip(diffs, dtypes)):
        if _is_float(dtype):
            d_atol, d_rtol = default_tolerance(dtype)
            tol = (d_atol if atol is None else atol) + (d_rtol if rtol is None else rtol) * scales[j]
        else:
            # Integer / bool outputs (token ids, masks, argmax): exact unless the caller gives an atol; never
            # the relative part, which would scale with the ids themselves.
            tol = 0.0 if atol is None else atol
        tolerances.append(tol)
        if bad[j]:
            ratios.append(math.inf)
        else:
            ratios.append(diff / tol if tol > 0 else (math.inf if diff > 0 else 0.0))
    static_1d = _static_one_dim_input(example_leaves, dim_sizes)
    varied = dim_sizes is not None and any(d > 0 for point in dim_sizes for _, d in point)
    where = tuple(shapes) if varied or static_1d else ()
    if not diffs:  # the model returned no tensor: nothing to compare (CheckResult says so)
        d_atol = default_tolerance(torch.float32)[0]
        return CheckResult(artifact, 0.0, d_atol if atol is None else atol, tuple(batch_sizes), where, elements=0)
    j = max(range(len(ratios)), key=lambda k: ratios[k])  # the first one on ties
    mismatch = ""
    if bad[j]:
        mismatch = f"its inf/NaN entries differ from eager's at {bad[j]} of {entries[j]} entries; first {first_bad[j]}"
    return CheckResult(
        artifact,
        math.inf if bad[j] else diffs[j],  # |(-inf) - 99.9| is inf: the message says why
        tolerances[j],
        tuple(batch_sizes),
        where,
        output=j if len(diffs) > 1 else None,
        nonfinite_mismatch=mismatch,
        elements=sum(entries),
    )


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _static_one_dim_input(example_leaves: tuple, dim_sizes: Sequence[Mapping[tuple[int, int], int]] | None) -> bool:
    """Whether the first tensor input is 1-D with a static dim: its only dim is then a feature size, not a
    batch, and a check message must not call it one."""
    first = next(((i, a) for i, a in enumerate(example_leaves) if isinstance(a, Tensor) and a.dim() >= 1), None)
    if first is None or first[1].dim() != 1 or dim_sizes is None:
        return False
    return all((first[0], 0) not in point for point in dim_sizes)


def finish_check(result: CheckResult, raise_on_failure: bool) -> CheckResult:
    log.info("%s", result)
    if raise_on_failure and not result.passed:
        raise ExportCheckError(str(result))
    return result


# ----------------------------------------------------------------------------------------------------
# Export, save, load
# ----------------------------------------------------------------------------------------------------
def export_program(
    model: nn.Module,
    example_args: Any,
    dynamic_batch: bool | None = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export`` a model so that each diagonal layer is one ``diagcompile::diag_linear`` node.

    Args:
        model: any module; sparse-marked ``nn.Linear`` layers are converted to ``DiagLinear`` on a copy first
            (``model`` itself is never modified), and the ``F.linear`` calls on a sparse-marked bare parameter
            become diagonal layers in the exported graph (``diagcompile.passes.rewrite_exported_program``).
            Exported in eval mode.
        example_args: a tuple of inputs (or one tensor), e.g. ``(torch.randn(8, 197, 768),)``. An argument
            may be a list / tuple / dict of tensors.
        dynamic_batch: make dim 0 of every tensor input (nested and keyword ones too) one shared dynamic
            ``batch`` dimension
            (range ``[0, inf)``). An example batch of 1 is traced at batch 2, because torch.export
            specializes a size-1 example to the constant 1; an empty example batch (size 0, specialized too)
            is refused. Default: ``True`` unless ``dynamic_shapes`` is given; ``False`` exports the example's
            shapes.
        dynamic_shapes: torch.export's own spec, for other dynamic dims (a sequence length, say), e.g.
            ``({0: Dim("batch"), 1: Dim("seq", max=256)},)`` or ``Dim.AUTO`` for a dim whose range the model
            decides. It replaces the batch-only spec: it cannot be combined with ``dynamic_batch=True``. Every
            dynamic dim needs an example size of at least 2. With ``example_kwargs``, give it as a dict keyed
            by the forward's parameter names.
        example_kwargs: keyword inputs, e.g. ``{"attention_mask": mask}``; the program takes them by keyword.
        strict: passed to ``torch.export.export``.

    Returns:
        The ``ExportedProgram``. ``ep.run_decompositions()`` keeps every diagonal layer as one op node.

    Warns:
        NoDiagonalLayersWarning: the program has no diagonal layer (the export is a plain one).

    Raises:
        ValueError: with ``dynamic_batch=True``, the example batch is empty, or the model does not work for
            other dim-0 sizes (a 1-D unbatched input, say); a dim of ``dynamic_shapes`` that the model fixes
            (torch.export's reason included); both ``dynamic_batch=True`` and ``dynamic_shapes``; a marked
            linear cannot become a ``DiagLinear`` (see ``prepare_for_export``).
        diagcompile.passes.SparseRewriteError: a marked parameter is used other than as a linear's weight.
    """
    leaves, spec = flatten_inputs(example_args, example_kwargs)
    if dynamic_shapes is not None and dynamic_batch:
        raise ValueError(
            "export_program: pass dynamic_batch=True or dynamic_shapes, not both: dynamic_shapes replaces the "
            "batch-only spec (make dim 0 dynamic in it too, e.g. {0: Dim('batch'), 1: Dim('seq')})"
        )
    prepared, _ = prepare_for_export(model)
    user_spec = dynamic_shapes is not None
    if dynamic_batch is None:
        dynamic_batch = not user_spec
    if dynamic_batch:
        if _batch_size(leaves) == 0:
            # torch.export specializes an example dim of 0, like one of 1. A batch of 1 is widened by repeating
            # the user's own row; an empty batch has no row to repeat, so widening would mean tracing on invented
            # values (and integer inputs such as token ids have no known-valid values at all): refuse instead.
            raise ValueError(
                "export_program: the example batch is empty (dim 0 of the example inputs is 0), so it cannot be "
                "exported with a dynamic batch dimension: torch.export fixes a dim whose example size is 0 or 1 "
                "to that constant. Pass a non-empty example (a batch of 1 is widened to 2 for you), or "
                "dynamic_batch=False to export a program that runs empty batches only"
            )
        leaves = widen_batch_of_one(leaves)
        dynamic_shapes = _dynamic_shapes(prepared, leaves, spec)
    args, kwargs = unflatten_inputs(leaves, spec)
    with _eval_mode(prepared):
        try:
            ep = torch.export.export(prepared, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=strict)
        except torch._dynamo.exc.UserError as e:
            if dynamic_shapes is None:
                raise
            if user_spec and ("specialized" in str(e) or "Constraints violated" in str(e)):
                # torch's message names the dim, the guard that fixed it and a suggested spec.
                raise ValueError(
                    f"export_program: torch.export cannot make these dims dynamic (an example size below 2, or the "
                    f"model fixes the size or bounds it; give a max=, or use Dim.AUTO to let the model decide): {e}"
                ) from e
            if user_spec or "specialized it to be a constant" not in str(e):
                raise
            raise ValueError(_specialized_batch_message(leaves, spec)) from e
        bare = _marked_parameters(prepared)
        if bare:
            # Marked parameters that no nn.Linear owns (F.linear(x, self.w)): prepare_for_export pinned them,
            # the graph pass turns their linear calls into diag_linear nodes (raising SparseRewriteError for
            # any other use), exactly as the compile backend does.
            from diagcompile.passes import rewrite_exported_program

            ep, _ = rewrite_exported_program(ep, strict=strict)
    n = count_diag_nodes(ep)
    if n == 0:
        layers = count_diag_layers(prepared) + len({id(prepared.get_parameter(f)) for f in bare})
        if layers == 0:
            msg = (
                "the model has no diagonal layer (no DiagLinear and no sparse-marked linear or parameter); "
                "exported as a plain torch.export program"
            )
        else:
            msg = (
                f"the model has {layers} diagonal layer(s) or marked parameter(s), but its forward used none of "
                f"them on these inputs: the program has no diag_linear node"
            )
        warnings.warn(f"export_program: {msg}", NoDiagonalLayersWarning, stacklevel=2)
    log.info("exported %d diagonal layer(s) as diagcompile::diag_linear nodes", n)
    return ep


def _specialized_batch_message(leaves: tuple, spec: Any) -> str:
    """Why torch.export found the dynamic batch dim to be a constant, in the user's terms."""
    flat = [
        (name, tuple(a.shape))
        for name, a in zip(input_names(spec), leaves)
        if isinstance(a, Tensor) and a.dim() == 1 and a.numel() > 1
    ]
    if flat:
        names = ", ".join(f"{name} (shape {shape})" for name, shape in flat)
        return (
            f"export_program: {names} is 1-D, so with dynamic_batch=True its only dim is taken as the batch "
            f"dimension, but the model needs that size fixed (an unbatched input?). Add a batch dimension "
            f"(x.unsqueeze(0)) or pass dynamic_batch=False"
        )
    return (
        "export_program: with dynamic_batch=True dim 0 of every tensor input is the batch dimension, but the "
        "model only works for the example's dim-0 size (it uses that size as a constant). Pass "
        "dynamic_batch=False to export static shapes, or make dim 0 of each input the batch dimension"
    )


def save(ep: torch.export.ExportedProgram, path: str | os.PathLike) -> Path:
    """Write ``ep`` to ``path`` (a ``.pt2`` archive) atomically; returns the path."""
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"save expects a torch.export.ExportedProgram, got {type(ep).__name__}")
    path = check_output_path(path, "save", ".pt2")  # the torch.export archive format
    with atomic_write(path, "save") as tmp:
        torch.export.save(ep, tmp)
    return path


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    # torch.export.load logs a full traceback at WARNING before raising; we raise our own message instead.
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` written by ``save`` (or ``torch.export.save``), registering the diagcompile ops first.

    Args:
        path: the ``.pt2`` file.
        device: move the program's weights *and* the devices recorded in its graph to this device
            (``torch.export.passes.move_to_device_pass``): a program exported on the CPU then runs on CUDA.
            ``ep.module().to(device)`` is not enough, the graph asserts the device it was traced on.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a torch.export archive (corrupted, truncated, or another format), or it
            uses a ``diagcompile`` op this version does not define.
    """
    import diagcompile.ops  # noqa: F401  (registers torch.ops.diagcompile.*: the archive holds only names)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .pt2 file at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a torch.export archive (not a valid zip file): it is corrupted or truncated, "
            f"or was not written by diagcompile.export.save / torch.export.save"
        )
    try:
        with _quiet("torch.export"):
            ep = torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - torch raises many types here; we name the file and keep the cause
        msg = str(e)
        hint = ""
        if "diagcompile" in msg and "resolve" in msg:
            hint = " It uses a diagcompile op this version does not define: was it written by a newer diagcompile?"
        elif "deserializ" in msg.lower():
            hint = " Run with logging for torch.export at WARNING to see the deserialization traceback."
        raise ValueError(f"could not load {path} as an ExportedProgram ({type(e).__name__}: {msg}).{hint}") from e
    if device is not None:
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(ep, torch.device(device))
    return ep


def check_program(
    program: torch.export.ExportedProgram | str | os.PathLike,
    model: nn.Module,
    example_args: Any,
    batch_sizes: Sequence[int] | None = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    raise_on_failure: bool = True,
    seed: int = 0,
) -> CheckResult:
    """Run an exported program (or a ``.pt2`` path) against the eager model; return the max difference.

    The eager side is ``model`` after the same on-the-way conversion of sparse-marked linears as
    ``export_program``. Inputs are fresh random tensors shaped like ``example_args`` at each batch size
    (default: two sizes different from the example's, so a wrongly static batch dim is caught; a program
    exported with ``dynamic_batch=False`` is checked at its own batch size, the only one it runs). Every other
    dynamic dim of the program (``dynamic_shapes``) is run at a size different from the example's too, within
    its range (``check_sizes``). ``example_kwargs``: the keyword inputs the program was exported with.

    Raises:
        ExportCheckError: when ``raise_on_failure`` and an output differs from eager by more than its own
            ``atol + rtol * max|eager|`` (defaults by its dtype: float32 ``1e-5 + 1e-4 * scale``), has ``inf`` /
            ``NaN`` where eager has not (or vice versa), or nothing was compared (every output empty). Integer
            and bool outputs: exact (or within a given ``atol``).
        ValueError: ``batch_sizes`` holds a size that a static-batch program cannot run.
    """
    leaves, spec = flatten_inputs(example_args, example_kwargs)
    ep = load(program) if isinstance(program, (str, os.PathLike)) else program
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"program must be an ExportedProgram or a .pt2 path, got {type(ep).__name__}")
    reference, _ = prepare_for_export(model)
    module = ep.module()
    exprs, ranges = program_dynamic_dims(ep, leaves)
    sizes, dims = check_sizes("pt2", batch_sizes, leaves, exprs, ranges, _program_static_batch(ep))

    def run(*args: Any, **kwargs: Any) -> list[Tensor]:
        return _flat_tensors(module(*args, **kwargs))

    result = compare_outputs("pt2", run, reference, leaves, spec, sizes, atol, rtol, seed, dims)
    return finish_check(result, raise_on_failure)

"""ONNX export of diagonal-sparse models, in two forms, both checked in onnxruntime.

``to_onnx(model, example_args, path, mode=...)`` goes through ``torch.onnx.export(dynamo=True)`` with a
translation for ``torch.ops.diagcompile.diag_linear.default``:

``mode="portable"``: standard ONNX ops that any runtime runs. Each layer is stored sparsely (``values`` (k, D)
and ``offsets`` (k,) initializers, nothing dense in the file) and the graph rebuilds the dense transposed weight
from them, ``W^T = ScatterND(zeros(N_in, N_out), index(offsets), values)``, then applies ``MatMul`` (+ ``Add``
bias). The index arithmetic and the scatter depend only on initializers, so a runtime folds them once when it
loads the model (onnxruntime does) and each call is one GEMM. Why not ``Gather/Mul/ReduceSum`` (gather the k
diagonals of ``x`` and reduce)? In onnxruntime 1.32 on 2 CPU cores it was 20-400x slower than the GEMM for
ViT-sized layers at 90% sparsity (``benchmarks/results/onnx_cpu.md``), and it materializes an (M, k, D)
intermediate (the tall form (M, k, N_out)), several GB at M=2048. The folded weight is dense in the
runtime's memory; sparse speed comes from the plugin form or from PyTorch.

``mode="plugin"``: one custom-domain node per layer, ``diagcompile::DiagLinear``, whose ``op_type`` equals the
TensorRT plugin name and whose attributes tell TensorRT's ONNX parser how to map it
(``plugin_namespace="diagcompile"``, ``plugin_version="1"``, ``aot=1`` for the PTX implementation) plus
``out_features``/``in_features``. Inputs are ``x``, ``values``, ``offsets`` (int32) and ``bias``; a layer without
bias gets a zero ``(N_out,)`` bias initializer, because TensorRT plugin inputs cannot be optional cleanly and
the kernel then has one code path (cost: ``4 * N_out`` bytes). By default the file also carries a model-local
``FunctionProto`` with the same (domain, name) whose body is the portable math, so plain onnxruntime runs the
file. ``local_function=False`` (or ``strip_local_functions``) gives the bare TensorRT file: a parser that
knows local functions could otherwise inline the body instead of calling the plugin. Without the function,
onnxruntime runs the node through onnxruntime-extensions (``make_session(..., runtime="extensions")``),
whose Python op calls ``torch.ops.diagcompile.diag_linear``.

Supported: opsets ``SUPPORTED_OPSETS`` (default 20), float32 and float16 models (compute in float32, like the
op). Export bfloat16/float64 models as float32 and lower precision in the runtime (TensorRT builder flags).
"""

import contextlib
import functools
import inspect
import keyword
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
import sympy
import torch
import torch.utils._pytree as pytree
from onnx import defs
from onnxscript import FLOAT, INT64, script
from onnxscript import opset18 as op
from torch import Tensor, nn

from diagcompile._files import atomic_write, check_output_path
from diagcompile.export import program as _program
from diagcompile.export.program import CheckResult

__all__ = [
    "CONTRIB_DOMAIN",
    "DEFAULT_OPSET",
    "ONNX_DTYPES",
    "PLUGIN_NAME",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "SUPPORTED_OPSETS",
    "add_local_functions",
    "check_onnx",
    "count_diag_layers",
    "count_plugin_nodes",
    "make_session",
    "register_ort_extensions_op",
    "strip_local_functions",
    "to_contrib_domain",
    "to_onnx",
]

log = logging.getLogger(__name__)

PLUGIN_NAMESPACE = "diagcompile"
PLUGIN_NAME = "DiagLinear"
PLUGIN_VERSION = "1"
#: onnxruntime-extensions runs Python custom ops only in this domain.
CONTRIB_DOMAIN = "ai.onnx.contrib"

#: Opsets the exporter and onnxruntime both handle for our graphs (each one tested).
SUPPORTED_OPSETS: tuple[int, ...] = (18, 19, 20, 21, 22, 23)
DEFAULT_OPSET = 20
ONNX_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16)

MODES = ("portable", "plugin")
_MODE_KEY = "diagcompile.mode"
#: Model metadata: how many diagonal layers the file holds. The plugin form has one node per layer, but the
#: portable form dissolves each layer into standard ops (ScatterND + MatMul that a user's own model could have
#: too), so the count is recorded at export, where it is exact (the program's diag_linear nodes).
_LAYERS_KEY = "diagcompile.diag_layers"

# Node metadata key that keeps the exporter's optimizer from folding a node. The (k, D) index arithmetic
# would otherwise be folded into int64 initializers for layers below its size limit (tripling the file for
# those layers); the runtime folds it at load time instead, so the file holds only values and offsets.
_NO_FOLD = "diagcompile.no_fold"


def _no_fold(v):
    node = v.producer()
    if node is not None:
        node.metadata_props[_NO_FOLD] = "1"
    return v


def _should_fold(node: ir.Node) -> bool | None:
    return False if node.metadata_props.get(_NO_FOLD) else None


def _strip_no_fold(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key != _NO_FOLD]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


# ----------------------------------------------------------------------------------------------------
# The portable math, traced (mode="portable"): shapes are static here, so the graph is specialized.
# ----------------------------------------------------------------------------------------------------
def _static(v: Any, what: str) -> int:
    if not isinstance(v, int):
        raise ValueError(f"to_onnx: {what} must be static, got {v!r}; only the batch dimension may be dynamic")
    return v


def _portable_diag_linear(x, values, offsets, bias, out_features: int):
    """``y = x @ W^T + b`` with ``W^T`` scattered from ``values`` at the diagonal positions (see module doc)."""
    n_in = _static(x.shape[-1], "in_features (x.shape[-1])")
    k, d = (_static(s, "values.shape") for s in values.shape)
    p = max(n_in, out_features)
    offs = op.Unsqueeze(_no_fold(op.Cast(offsets, to=INT64.dtype)), op.Constant(value_ints=[1]))  # (k, 1)
    t = op.Unsqueeze(
        op.Range(op.Constant(value_int=0), op.Constant(value_int=d), op.Constant(value_int=1)),
        op.Constant(value_ints=[0]),
    )  # (1, D)
    wrapped = op.Mod(op.Add(offs, t), op.Constant(value_int=p))  # (k, D): index on the long side (mod P)
    fixed = _no_fold(op.Expand(t, op.Constant(value_ints=[k, d])))
    rows, cols = (wrapped, fixed) if out_features > n_in else (fixed, wrapped)
    last = op.Constant(value_ints=[-1])
    index = op.Concat(op.Unsqueeze(cols, last), op.Unsqueeze(rows, last), axis=-1)  # (k, D, 2) into W^T
    low_precision = values.dtype != ir.DataType.FLOAT
    if low_precision:  # compute in float32 like the op, return the input dtype
        values = op.Cast(values, to=FLOAT.dtype)
        x_in = op.Cast(x, to=FLOAT.dtype)
    else:
        x_in = x
    zeros = op.ConstantOfShape(op.Constant(value_ints=[n_in, out_features]))  # float32 zeros
    y = op.MatMul(x_in, op.ScatterND(zeros, index, values))
    if _static(bias.shape[0], "bias.shape") > 0:
        y = op.Add(y, op.Cast(bias, to=FLOAT.dtype) if low_precision else bias)
    if low_precision:
        y = op.Cast(y, to=x.dtype)
    return y


# ----------------------------------------------------------------------------------------------------
# The plugin node (mode="plugin") and its model-local function body
# ----------------------------------------------------------------------------------------------------
_PLUGIN_OPSET = onnxscript.values.Opset(PLUGIN_NAMESPACE, 1)


@functools.cache
def _plugin_schema() -> defs.OpSchema:
    F, A, T = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute, defs.OpSchema.AttrType
    return defs.OpSchema(
        PLUGIN_NAME,
        PLUGIN_NAMESPACE,
        1,
        doc="y = x @ W^T + bias, W diagonal-sparse (DynaDiag); TensorRT plugin diagcompile::DiagLinear",
        inputs=[F("x", "T"), F("values", "T"), F("offsets", "tensor(int32)"), F("bias", "T")],
        outputs=[F("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32 or float16")],
        attributes=[
            A("plugin_namespace", T.STRING, "TensorRT plugin namespace", required=False),
            A("plugin_version", T.STRING, "TensorRT plugin version", required=False),
            A("aot", T.INT, "1: use the plugin's ahead-of-time (PTX) implementation", required=False),
            A("out_features", T.INT, "N_out", required=False),
            A("in_features", T.INT, "N_in", required=False),
        ],
    )


@functools.cache
def _plugin_op() -> onnxscript.values.Op:
    # A custom-domain node needs an OpSchema or the exporter fails (apis.md §4); no global registration.
    return onnxscript.values.Op(_PLUGIN_OPSET, PLUGIN_NAME, _plugin_schema())


def _plugin_translation(aot: bool):
    def translate(x, values, offsets, bias, out_features: int):
        n_in = _static(x.shape[-1], "in_features (x.shape[-1])")
        if _static(bias.shape[0], "bias.shape") == 0:
            zeros = np.zeros(out_features, dtype=values.dtype.numpy())
            bias = op.Constant(value=onnx.numpy_helper.from_array(zeros, name="zero_bias"))
        if offsets.dtype != ir.DataType.INT32:
            offsets = op.Cast(offsets, to=onnx.TensorProto.INT32)
        return _plugin_op()(
            x,
            values,
            offsets,
            bias,
            plugin_namespace=PLUGIN_NAMESPACE,
            plugin_version=PLUGIN_VERSION,
            aot=int(aot),
            out_features=out_features,
            in_features=n_in,
        )

    return translate


@script(_PLUGIN_OPSET, default_opset=op)
def DiagLinear(x, values, offsets, bias, out_features: int, in_features: int):
    # Same math as _portable_diag_linear, but one body for every layer: the orientation is a runtime flag
    # (Where on n_out > n_in) instead of a Python branch. Everything but the MatMul depends only on
    # initializers and attributes, so onnxruntime folds it at load time.
    n_out = op.Constant(value_int=out_features)
    n_in = op.Constant(value_int=in_features)
    tall = op.Greater(n_out, n_in)
    offs = op.Unsqueeze(op.Cast(offsets, to=INT64.dtype), op.Constant(value_ints=[1]))
    t = op.Unsqueeze(
        op.Range(op.Constant(value_int=0), op.Min(n_out, n_in), op.Constant(value_int=1)),
        op.Constant(value_ints=[0]),
    )
    wrapped = op.Mod(op.Add(offs, t), op.Max(n_out, n_in))
    fixed = op.Expand(t, op.Shape(wrapped))
    rows = op.Where(tall, wrapped, fixed)
    cols = op.Where(tall, fixed, wrapped)
    last = op.Constant(value_ints=[-1])
    index = op.Concat(op.Unsqueeze(cols, last), op.Unsqueeze(rows, last), axis=-1)
    first = op.Constant(value_ints=[0])
    shape = op.Concat(op.Unsqueeze(n_in, first), op.Unsqueeze(n_out, first), axis=0)
    w_t = op.ScatterND(op.ConstantOfShape(shape), index, op.Cast(values, to=FLOAT.dtype))
    y = op.Add(op.MatMul(op.Cast(x, to=FLOAT.dtype), w_t), op.Cast(bias, to=FLOAT.dtype))
    return op.CastLike(y, x)


def _function_proto(opset: int) -> onnx.FunctionProto:
    fp = DiagLinear.to_function_proto()
    # Declare the TensorRT attributes too: onnxruntime rejects node attributes its function does not declare.
    for name in ("plugin_namespace", "plugin_version", "aot"):
        if name not in fp.attribute:
            fp.attribute.append(name)
    # Use the model's opset for the body (its ops mean the same from opset 18 on); a mismatch is an error.
    for imp in fp.opset_import:
        if imp.domain == "":
            imp.version = opset
    return fp


def _model_opset(model: onnx.ModelProto) -> int:
    return next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), DEFAULT_OPSET)


def _is_plugin_node(node: onnx.NodeProto, domain: str = PLUGIN_NAMESPACE) -> bool:
    return node.domain == domain and node.op_type == PLUGIN_NAME


def count_plugin_nodes(model: onnx.ModelProto | str | os.PathLike) -> int:
    """Number of ``diagcompile::DiagLinear`` nodes in the main graph of an ONNX model (or file)."""
    model = _load(model)
    return sum(_is_plugin_node(n) for n in model.graph.node)


def count_diag_layers(model: onnx.ModelProto | str | os.PathLike) -> int:
    """Number of diagonal layers in an ONNX model (or file) written by ``to_onnx``, in either form.

    Read from the count ``to_onnx`` records in the model's metadata (the portable form has no node that marks a
    layer); a file without it (written by another tool or an older diagcompile) counts its plugin nodes.
    """
    model = _load(model)
    recorded = {p.key: p.value for p in model.metadata_props}.get(_LAYERS_KEY)
    if recorded is not None and recorded.isdigit():
        return int(recorded)
    return count_plugin_nodes(model)


def add_local_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` carrying the ``diagcompile::DiagLinear`` local function (plain onnxruntime runs it)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not _has_local_function(out):
        out.functions.append(_function_proto(_model_opset(out)))
    return out


def _has_local_function(model: onnx.ModelProto) -> bool:
    """Whether ``model`` carries the ``diagcompile::DiagLinear`` local function (plain onnxruntime can run it)."""
    return any(f.domain == PLUGIN_NAMESPACE and f.name == PLUGIN_NAME for f in model.functions)


def strip_local_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the ``diagcompile`` local functions: the bare TensorRT-plugin file."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [f for f in out.functions if f.domain != PLUGIN_NAMESPACE]
    del out.functions[:]
    out.functions.extend(keep)
    return out


def to_contrib_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with the plugin nodes moved to ``ai.onnx.contrib`` for onnxruntime-extensions' Python op."""
    out = strip_local_functions(model)
    for node in out.graph.node:
        if _is_plugin_node(node):
            node.domain = CONTRIB_DOMAIN
    imports = [imp for imp in out.opset_import if imp.domain not in (PLUGIN_NAMESPACE, CONTRIB_DOMAIN)]
    del out.opset_import[:]
    out.opset_import.extend(imports)
    out.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return out


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------
def _check_dtypes(model: nn.Module, leaves: tuple, spec: Any) -> None:
    seen: dict[torch.dtype, str] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            seen.setdefault(t.dtype, name)
    for name, a in zip(_program.input_names(spec), leaves):
        if isinstance(a, Tensor) and a.is_floating_point():
            seen.setdefault(a.dtype, name)
    bad = {d: n for d, n in seen.items() if d not in ONNX_DTYPES}
    if bad:
        listing = ", ".join(f"{d} ('{n}')" for d, n in bad.items())
        raise TypeError(
            f"to_onnx supports float32 and float16 models; got {listing}. Export a float32 copy "
            f"(model.float()) and lower the precision in the runtime (e.g. TensorRT's FP16/BF16 builder flags)"
        )


def to_onnx(
    model: nn.Module,
    example_args: Any,
    path: str | os.PathLike,
    mode: str = "portable",
    dynamic_batch: bool | None = None,
    opset: int = DEFAULT_OPSET,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    local_function: bool = True,
    aot: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Export ``model`` to an ONNX file; see the module docstring for the two modes.

    Args:
        model: any module; sparse-marked linears are converted on a copy first (as in ``export_program``).
        example_args: a tuple of inputs (or one tensor); an argument may be a list / tuple / dict of tensors.
        path: output file, ending in ``.onnx`` (written atomically).
        mode: ``"portable"`` (standard ops) or ``"plugin"`` (one ``diagcompile::DiagLinear`` node per layer).
        dynamic_batch: dim 0 of every tensor input is one dynamic ``batch`` dimension (default: unless
            ``dynamic_shapes`` is given). In the file it is the symbolic dim (``dim_param``) ``"batch"``.
        dynamic_shapes: torch.export's spec for other dynamic dims (see ``export_program``); they become
            symbolic dims of the ONNX inputs, named after their ``Dim``: ``Dim("seq")`` is ``"seq"``, a dim
            given as ``2 * Dim("half")`` is ``"2*half"``. A dim without a name of its own (``Dim.AUTO``,
            ``Dim.DYNAMIC``) keeps the exporter's name (``"s27"``), and so does one whose name cannot be used:
            a second name for a dim torch found equal to an already named one (the first input's name wins),
            a name another dim in the file already has, a Python keyword (``lambda``).
        example_kwargs: keyword inputs (see ``export_program``). The ONNX graph inputs are the tensors of
            ``example_args`` then of ``example_kwargs``, nested ones flattened, in that order.
        opset: default-domain opset, one of ``SUPPORTED_OPSETS``.
        local_function: plugin mode only: also store the portable body as a model-local function so that
            plain onnxruntime runs the file. ``False`` writes the bare TensorRT file.
        aot: plugin mode only: the ``aot`` attribute (1 selects the TensorRT plugin's PTX implementation).
        input_names / output_names: ONNX graph input/output names (default ``x``/``y`` for one of each).

    Returns:
        ``path``. The file passes ``onnx.checker.check_model(full_check=True)``. Its symbolic dims use the
        names above everywhere (inputs, outputs, intermediate shapes), expressions too: an output twice as long
        as a ``seq`` input has dim ``"2*seq"``. Its metadata records the number of diagonal layers
        (``count_diag_layers``).

    float16 files in onnxruntime: onnxruntime 1.32.0's CPU NCHWc layout transformer (on at the default
    ``ORT_ENABLE_ALL``) segfaulted while creating a session for the portable float16 file of a sparsified
    ``nn.TransformerEncoder``. ``make_session`` / ``check_onnx`` disable it for float16 files; in your own
    session pass ``disabled_optimizers=["NchwcTransformer"]`` to ``onnxruntime.InferenceSession`` (or use
    ``ORT_ENABLE_EXTENDED``).

    Raises:
        ValueError: unknown mode or unsupported opset. TypeError: a parameter or input dtype other than
        float32/float16.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"opset {opset!r} is not supported; use one of {SUPPORTED_OPSETS} (default {DEFAULT_OPSET}). "
            f"Opsets below 18 lack the ScatterND/Range forms the translation emits; newer ones are not yet "
            f"handled by the installed exporter and onnxruntime"
        )
    path = check_output_path(path, "to_onnx", ".onnx")
    leaves, spec = _program.flatten_inputs(example_args, example_kwargs)
    _program.refuse_training_layers(model)  # before the dtype check: its float64 temperature is not the point
    _check_dtypes(model, leaves, spec)
    args, kwargs = _program.unflatten_inputs(leaves, spec)
    ep = _program.export_program(
        model, args, dynamic_batch=dynamic_batch, example_kwargs=kwargs, dynamic_shapes=dynamic_shapes
    )
    table = {
        torch.ops.diagcompile.diag_linear.default: (
            _portable_diag_linear if mode == "portable" else _plugin_translation(aot)
        )
    }
    tensor_inputs = sum(isinstance(a, Tensor) for a in leaves)
    if input_names is None and tensor_inputs == 1:
        input_names = ["x"]
    # The exporter prints progress lines on stdout, logs one warning per torchvision op it cannot register
    # (torchvision is not a dependency) and trips a deprecation inside torch's own pytree code: none of it is
    # the user's to act on.
    with (
        contextlib.redirect_stdout(_Sink()),
        _program._quiet("torch.onnx._internal.exporter._registration"),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
        program = torch.onnx.export(
            ep,
            args,
            kwargs=kwargs or None,
            dynamo=True,
            opset_version=opset,
            custom_translation_table=table,
            optimize=False,
            input_names=input_names,
            output_names=output_names,
            verbose=False,
        )
    onnxscript.optimizer.optimize_ir(program.model, should_fold=_should_fold)
    proto = ir.serde.serialize_model(program.model)
    _strip_no_fold(proto)
    if output_names is None:
        names = ["y"] if len(proto.graph.output) == 1 else _keyed_output_names(ep, len(proto.graph.output))
        if names:
            _rename_outputs(proto, names)
    onnx.helper.set_model_props(proto, {_MODE_KEY: mode, _LAYERS_KEY: str(_program.count_diag_nodes(ep))})
    if mode == "plugin" and local_function:
        proto = add_local_functions(proto)
    axes = _input_axes(model, args, kwargs, leaves, dynamic_batch, dynamic_shapes)
    _rename_dims(proto, _dim_renames(proto, axes))
    onnx.checker.check_model(proto, full_check=True)
    with atomic_write(path, "to_onnx") as tmp:
        onnx.save_model(proto, tmp)
    n_nodes = count_plugin_nodes(proto)
    log.info("wrote %s (%s mode, opset %d, %d plugin node(s))", path, mode, opset, n_nodes)
    return path


# ----------------------------------------------------------------------------------------------------
# Naming the symbolic dims: torch's symbols (s77) -> the Dim names of the spec (batch, seq)
# ----------------------------------------------------------------------------------------------------
#: A name in a dim_param expression (``s77``, ``seq``, ``Max``); not the ``e5`` of a number such as ``2e5``.
_NAME = re.compile(r"(?<!\w)[A-Za-z_]\w*")
#: Graph metadata in which torch.onnx stores the ExportedProgram's ``range_constraints`` (keyed by symbol).
_RANGES_KEY = "pkg.torch.export.ExportedProgram.range_constraints"


def _tensor_axes(value: Any, entry: Any, out: dict[int, dict[int, Any]]) -> None:
    """Walk one argument and its ``dynamic_shapes`` entry together: ``out[id(tensor)] = {axis: Dim}``."""
    if entry is None:
        return
    if isinstance(value, Tensor):
        if isinstance(entry, Mapping):
            axes = {k: v for k, v in entry.items() if isinstance(k, int) and not isinstance(k, bool)}
        elif isinstance(entry, (list, tuple)):
            axes = dict(enumerate(entry))
        else:  # a hint for the whole tensor: no names
            return
        axes = {k % value.dim(): v for k, v in axes.items() if -value.dim() <= k < value.dim()}
        seen = out.setdefault(id(value), axes)
        if seen is not axes and (seen.keys() != axes.keys() or any(seen[k] is not axes[k] for k in axes)):
            out[id(value)] = {}  # one tensor passed twice with two specs: name neither
    elif isinstance(value, (list, tuple)) and isinstance(entry, (list, tuple)) and len(value) == len(entry):
        for v, e in zip(value, entry):
            _tensor_axes(v, e, out)
    elif isinstance(value, Mapping) and isinstance(entry, Mapping):
        for k, v in value.items():
            if k in entry:
                _tensor_axes(v, entry[k], out)


def _spec_axes(model: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic_shapes: Any) -> dict[int, dict]:
    """``id(tensor) -> {axis: Dim}`` for the tensors of ``(args, kwargs)`` as torch.export reads
    ``dynamic_shapes``: a ``ShapesCollection``, a dict keyed by ``forward``'s parameter names, or a tuple over
    them (in signature order). Parts that match no argument are skipped: naming never fails an export."""
    try:
        if callable(getattr(dynamic_shapes, "dynamic_shapes", None)):  # ShapesCollection and friends
            dynamic_shapes = dynamic_shapes.dynamic_shapes(model, args, kwargs)
        bound = dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError) as e:
        log.debug("cannot match dynamic_shapes to the inputs (%s): ONNX dims keep the exporter's names", e)
        return {}
    out: dict[int, dict] = {}
    if isinstance(dynamic_shapes, Mapping):
        for name, entry in dynamic_shapes.items():
            if name in bound:
                _tensor_axes(bound[name], entry, out)
    elif isinstance(dynamic_shapes, (list, tuple)):
        values = list(bound.values())
        if len(values) != len(dynamic_shapes) and not kwargs:
            values = list(args)
        if len(values) == len(dynamic_shapes):
            for value, entry in zip(values, dynamic_shapes):
                _tensor_axes(value, entry, out)
    return out


def _input_axes(
    model: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    leaves: tuple,
    dynamic_batch: bool | None,
    dynamic_shapes: Any,
) -> list[dict[int, Any]]:
    """Per tensor input of the ONNX graph (``leaves``' tensors, in order): ``{axis: Dim or name}`` as the
    export was asked for (``export_program``'s batch-only spec, or ``dynamic_shapes``)."""
    tensors = [a for a in leaves if isinstance(a, Tensor)]
    if dynamic_shapes is None:
        batch = dynamic_batch is None or dynamic_batch
        return [{0: _program.BATCH_DIM} if batch and t.dim() >= 1 else {} for t in tensors]
    by_id = _spec_axes(model, args, kwargs, dynamic_shapes)
    return [by_id.get(id(t), {}) for t in tensors]


def _axis_name(entry: Any) -> tuple[str, bool] | None:
    """``(name, is_expression)`` of a spec entry: a ``Dim``'s name; a derived ``Dim`` (``2 * half``) gives its
    root's name; hints (``Dim.AUTO``), ``None`` and static sizes give ``None``."""
    if isinstance(entry, str):
        return entry, False
    if not isinstance(entry, torch.export.Dim):
        return None
    root, derived = entry, False
    while isinstance(getattr(root, "root", None), torch.export.Dim):
        root, derived = root.root, True
    name = getattr(root, "__name__", None)
    return (name, derived) if isinstance(name, str) else None


def _usable_name(name: str) -> bool:
    """A name that ``input_dynamic_dims`` reads back as the plain symbol it is (not ``lambda``, say)."""
    if not name.isidentifier() or keyword.iskeyword(name):
        return False
    try:
        return _program._parse_dim(name) == sympy.Symbol(name)
    except (sympy.SympifyError, SyntaxError, TypeError, ValueError):
        return False


def _dim_renames(model: onnx.ModelProto, input_axes: Sequence[Mapping[int, Any]]) -> dict[str, str]:
    """``{exporter symbol: name}`` read off the graph inputs' dims and the spec's ``Dim`` at each.

    A dim whose dim_param is one symbol (``s77``) under ``Dim("batch")`` maps that symbol to ``batch``; one that
    is an expression in one symbol (``2*s44``) under a derived ``Dim`` maps it to the root's name (``half``).
    First come, first named: a symbol keeps the first name found for it, a name goes to the first symbol that
    asks for it. A name already in the file (another dim's symbol, a function such as ``Max``) is not used, so
    two different dims never become one.
    """
    inputs = model.graph.input
    if len(inputs) != len(input_axes):
        log.debug("%d graph inputs, %d tensor inputs: the dims keep the exporter's names", len(inputs), len(input_axes))
        return {}
    in_file = {n for d in _dim_protos(model) if d.dim_param for n in _NAME.findall(d.dim_param)}
    renames: dict[str, str] = {}
    for value, axes in zip(inputs, input_axes):
        dims = value.type.tensor_type.shape.dim
        for axis in sorted(axes):
            named = _axis_name(axes[axis])
            param = dims[axis].dim_param if axis < len(dims) else ""
            if named is None or not param:
                continue
            name, derived = named
            symbols = set(_NAME.findall(param))
            if len(symbols) != 1:
                continue
            (symbol,) = symbols
            if (param == symbol) == derived:  # a Dim's dim is its symbol; a derived Dim's, an expression in it
                continue
            if symbol in renames:
                if renames[symbol] != name:
                    log.debug("dim %s is named %r; %r is not used", symbol, renames[symbol], name)
                continue
            if name != symbol and (name in renames.values() or name in in_file or not _usable_name(name)):
                log.debug("dim %s keeps its name: %r is taken or not a usable name", symbol, name)
                continue
            renames[symbol] = name
    return {k: v for k, v in renames.items() if k != v}


def _dim_protos(model: onnx.ModelProto) -> Iterator[onnx.TensorShapeProto.Dimension]:
    """Every dim of every type in ``model``: graph inputs, outputs and value_info, subgraphs (``If``/``Loop``
    bodies) and local functions included."""

    def of_type(tp: onnx.TypeProto) -> Iterator[onnx.TensorShapeProto.Dimension]:
        kind = tp.WhichOneof("value")
        if kind in ("tensor_type", "sparse_tensor_type"):
            t = getattr(tp, kind)
            if t.HasField("shape"):
                yield from t.shape.dim
        elif kind == "sequence_type":
            yield from of_type(tp.sequence_type.elem_type)
        elif kind == "optional_type":
            yield from of_type(tp.optional_type.elem_type)
        elif kind == "map_type":
            yield from of_type(tp.map_type.value_type)

    def of_nodes(nodes: Sequence[onnx.NodeProto]) -> Iterator[onnx.TensorShapeProto.Dimension]:
        for node in nodes:
            for a in node.attribute:
                if a.HasField("g"):
                    yield from of_graph(a.g)
                for g in a.graphs:
                    yield from of_graph(g)
                if a.HasField("tp"):
                    yield from of_type(a.tp)
                for tp in a.type_protos:
                    yield from of_type(tp)

    def of_values(values: Sequence[onnx.ValueInfoProto]) -> Iterator[onnx.TensorShapeProto.Dimension]:
        for v in values:
            if v.HasField("type"):
                yield from of_type(v.type)

    def of_graph(g: onnx.GraphProto) -> Iterator[onnx.TensorShapeProto.Dimension]:
        yield from of_values([*g.input, *g.output, *g.value_info])
        yield from of_nodes(g.node)

    yield from of_graph(model.graph)
    for f in model.functions:
        yield from of_values(getattr(f, "value_info", ()))
        yield from of_nodes(f.node)


def _rename_dims(model: onnx.ModelProto, renames: Mapping[str, str]) -> None:
    """Rename symbols in every dim_param of ``model``, in place: whole names only (``s7`` leaves ``s77`` alone),
    all at once (``{"s1": "s2", "s2": "s1"}`` swaps), inside expressions too (``2*s77`` -> ``2*batch``)."""
    if not renames:
        return

    def sub(m: re.Match) -> str:
        return renames.get(m.group(), m.group())

    for d in _dim_protos(model):
        if d.HasField("dim_param"):
            d.dim_param = _NAME.sub(sub, d.dim_param)
    # The exporter also records the program's ranges by symbol ("{s77: VR[0, int_oo], s27: VR[0, 64]}").
    for prop in model.graph.metadata_props:
        if prop.key == _RANGES_KEY:
            prop.value = _NAME.sub(sub, prop.value)


class _Sink:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def _keyed_output_names(ep: torch.export.ExportedProgram, n_outputs: int) -> list[str] | None:
    """The graph outputs' names for a model whose output has keys (a dict, a dataclass or namedtuple, nested):
    each leaf's path, ``{"logits": a, "aux": {"h": b}}`` gives ``logits``, ``aux.h``. ``None`` where the exporter's
    names stay: an output of plain tuples and lists (positions name nothing), or one with non-tensor leaves, which
    are not graph outputs (the names could not be matched to them)."""
    spec = ep.call_spec.out_spec
    if spec is None or spec.num_leaves != n_outputs:
        return None
    paths, _ = pytree.tree_flatten_with_path(pytree.tree_unflatten([0] * spec.num_leaves, spec))
    keyed = (pytree.MappingKey, pytree.GetAttrKey)
    if not any(isinstance(k, keyed) for path, _ in paths for k in path):
        return None

    def part(k: object) -> str:
        return str(k.key if isinstance(k, pytree.MappingKey) else k.name if isinstance(k, pytree.GetAttrKey) else k.idx)

    names = [".".join(part(k) for k in path) for path, _ in paths]
    return names if len(set(names)) == len(names) else None


def _rename_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Rename the graph outputs to ``names``, each as :func:`_rename_output` allows, whatever their order.

    A key may be the exporter's name of another output (``{"mean": linear_out, "linear": mean_out}``): renamed one
    by one, the first was refused its key (taken) and the second too, so both kept the exporter's names, each the
    other's key, and a consumer reading ``"mean"`` got the linear. So which outputs keep their names is settled
    first (refused for a value that is no output, then for the name a kept output keeps), and an output whose name
    another is to take moves to a name of its own before the others take their keys."""
    g = model.graph
    olds = [o.name for o in g.output]
    made = {o for node in g.node for o in node.output}
    values = ({v.name for v in [*g.input, *g.value_info]} | {i.name for i in g.initializer} | made) - set(olds)
    kept = {i for i, old in enumerate(olds) if names[i] in values or olds.count(old) > 1 or old not in made}
    while more := {i for i in range(len(olds)) if i not in kept and names[i] in {olds[j] for j in kept}}:
        kept |= more
    todo = [i for i in range(len(olds)) if i not in kept and names[i] != olds[i]]
    taken = values | set(olds) | set(names)
    for i in (i for i in todo if olds[i] in names):  # only a name another output is to take moves out of its way
        tmp = f"{olds[i]}_{i}"
        while tmp in taken:
            tmp += "_"
        taken.add(tmp)
        _rename_output(model, tmp, i)
    for i in todo:
        _rename_output(model, names[i], i)


def _rename_output(model: onnx.ModelProto, name: str, index: int = 0) -> None:
    """Rename graph output ``index`` to ``name`` unless another value already has that name (an input called
    ``y``) or the output is itself an input, an initializer or another output (a model returning its input, or
    one tensor twice): ONNX names are single-assignment, and a clash would make an invalid file."""
    g = model.graph
    old = g.output[index].name
    if old == name:
        return
    made = {o for node in g.node for o in node.output}
    taken = {v.name for v in [*g.input, *g.value_info]} | {i.name for i in g.initializer} | made
    others = [o.name for i, o in enumerate(g.output) if i != index]
    if name in taken - {old} or name in others or old in others or old not in made:
        log.debug("output %d keeps the name %r: %r is taken, or it is not a node's output", index, old, name)
        return
    for node in model.graph.node:
        for i, o in enumerate(node.output):
            if o == old:
                node.output[i] = name
        for i, v in enumerate(node.input):
            if v == old:
                node.input[i] = name
    g.output[index].name = name


# ----------------------------------------------------------------------------------------------------
# Running in onnxruntime
# ----------------------------------------------------------------------------------------------------
_PYOP_REGISTERED = False


def register_ort_extensions_op() -> None:
    """Register ``DiagLinear`` as an onnxruntime-extensions Python op (float32) calling our torch op.

    Idempotent. The op lives in ``ai.onnx.contrib``: run models through ``to_contrib_domain`` first, and
    create sessions with ``onnxruntime_extensions.get_library_path()`` registered (``make_session`` does both).
    """
    global _PYOP_REGISTERED
    if _PYOP_REGISTERED:
        return
    try:
        from onnxruntime_extensions import PyOp, onnx_op
    except ImportError as e:
        raise ImportError(
            "running diagcompile plugin nodes through onnxruntime-extensions needs `pip install "
            "onnxruntime-extensions` (or keep the model-local function: to_onnx(..., local_function=True))"
        ) from e

    @onnx_op(
        op_type=PLUGIN_NAME,
        inputs=[PyOp.dt_float, PyOp.dt_float, PyOp.dt_int32, PyOp.dt_float],
        outputs=[PyOp.dt_float],
        attrs={
            "plugin_namespace": PyOp.dt_string,
            "plugin_version": PyOp.dt_string,
            "aot": PyOp.dt_int64,
            "out_features": PyOp.dt_int64,
            "in_features": PyOp.dt_int64,
        },
    )
    def _diag_linear_pyop(x, values, offsets, bias, **attrs):
        y = torch.ops.diagcompile.diag_linear(
            torch.from_numpy(np.ascontiguousarray(x)),
            torch.from_numpy(np.ascontiguousarray(values)),
            torch.from_numpy(np.ascontiguousarray(offsets)),
            torch.from_numpy(np.ascontiguousarray(bias)),
            int(attrs["out_features"]),
        )
        return y.numpy()

    _PYOP_REGISTERED = True


def _load(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    try:
        return onnx.load(path)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise ValueError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from e


#: onnxruntime graph optimizers that ``make_session`` turns off for float16 models, and why: in onnxruntime 1.32.0
#: (CPU) the NCHWc layout transformer (``ORT_ENABLE_ALL`` only) segfaults at session creation on the portable
#: float16 file of a sparsified ``nn.TransformerEncoder`` (the whole process dies, exit 139), while the same file
#: loads and runs correctly at ``ORT_ENABLE_EXTENDED`` or with just this optimizer disabled. It is onnxruntime's
#: bug, not the file's: the crash needs only the ``Transpose -> MatMul`` at the start of ``nn.MultiheadAttention``
#: in float16, for which onnxruntime's CPU provider inserts ``Cast`` nodes the transformer then dereferences
#: (microsoft/onnxruntime#28392; the dense float16 encoder cut after that ``MatMul`` crashes too).
FP16_DISABLED_OPTIMIZERS: tuple[str, ...] = ("NchwcTransformer",)

# Creates a session with onnxruntime's default options for the file given as argv[1], then prints the sentinel:
# a crash kills only this child, and a child that could not even try (no onnxruntime) prints nothing.
_PROBE_OK = "diagcompile-probe-ok"
_DEFAULT_SESSION_PROBE = (
    "import sys, onnxruntime as ort; ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
    f"print({_PROBE_OK!r})"
)


def _default_session_problem(path: str | os.PathLike) -> str | None:
    """``None`` if onnxruntime's default options create a session for the file at ``path`` in a child process,
    else what happened (a crash, an error, a child that could not run, a timeout)."""
    import subprocess
    import sys

    try:
        probe = subprocess.run(
            [sys.executable, "-c", _DEFAULT_SESSION_PROBE, str(path)], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not be checked ({type(e).__name__}: {e})"
    if probe.returncode == 0 and _PROBE_OK in probe.stdout:
        return None
    # A signal: negative on POSIX; on Windows a crash exits with its NTSTATUS (0xC0000005: access violation).
    if probe.returncode < 0 or probe.returncode >= 0xC0000000:
        code = -probe.returncode if probe.returncode < 0 else probe.returncode
        return f"crashed (signal {code})" if probe.returncode < 0 else f"crashed (exit status {code:#x})"
    last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
    return f"failed (exit status {probe.returncode}: {last})"


def _warn_if_default_session_fails(proto: onnx.ModelProto, path: str | os.PathLike | None) -> None:
    """Warn when a session with onnxruntime's default options cannot be created for ``proto`` (saved at ``path``
    if it came from a file) in a child process: float16 files only, where ``make_session`` and so ``check_onnx``
    work around ``FP16_DISABLED_OPTIMIZERS``, so the check would pass a file that crashes a consumer's plain
    ``InferenceSession``. Costs a child process and an ``ORT_ENABLE_ALL`` session build (~0.3 s for a layer)."""
    import tempfile

    import onnxruntime as ort

    if path is not None:
        problem = _default_session_problem(path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            onnx.save(proto, Path(tmp) / "model.onnx")
            problem = _default_session_problem(Path(tmp) / "model.onnx")
    if problem is None:
        return
    warnings.warn(
        f"onnxruntime {ort.__version__} {problem} creating a session with its default options for this float16 "
        f"file, which this check ran with its {', '.join(FP16_DISABLED_OPTIMIZERS)} optimizer turned off (in "
        f"onnxruntime 1.32.0 that optimizer crashes on float16 attention, microsoft/onnxruntime#28392): every "
        f"consumer of the file must do the same, ort.InferenceSession(path, providers=['CPUExecutionProvider'], "
        f"disabled_optimizers={list(FP16_DISABLED_OPTIMIZERS)}), or use GraphOptimizationLevel.ORT_ENABLE_EXTENDED",
        stacklevel=3,
    )


def _has_float16(proto: onnx.ModelProto) -> bool:
    """Whether ``proto`` computes anything in float16: a graph input / output / initializer of that type, or a
    ``Cast`` to it (the exporter's low-precision layers cast around float32 math)."""
    f16 = onnx.TensorProto.FLOAT16
    g = proto.graph
    if any(v.type.tensor_type.elem_type == f16 for v in [*g.input, *g.output]):
        return True
    if any(i.data_type == f16 for i in g.initializer):
        return True
    return any(a.name == "to" and a.i == f16 for n in g.node if n.op_type == "Cast" for a in n.attribute)


def make_session(model: onnx.ModelProto | str | os.PathLike, runtime: str = "auto"):
    """An onnxruntime CPU session for a portable or plugin-form model.

    For a float16 model the session is created with onnxruntime's NCHWc layout transformer disabled
    (``FP16_DISABLED_OPTIMIZERS``): in onnxruntime 1.32.0 it segfaulted at session creation (default
    ``ORT_ENABLE_ALL``) on the portable file of a float16 sparsified ``nn.TransformerEncoder``, killing the
    process. It only re-lays out float32 Conv/pooling for x86 SIMD, so the other optimizations stay on, and
    float32 models keep it. To build such a session yourself::

        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["NchwcTransformer"])

    (or ``so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED``).

    Args:
        runtime: how plugin nodes run: ``"function"`` (attach the local function if missing),
            ``"extensions"`` (onnxruntime-extensions Python op; float32 only), or ``"auto"`` (= ``"function"``).
            Portable models ignore it.
    """
    import onnxruntime as ort

    if runtime not in ("auto", "function", "extensions"):
        raise ValueError(f"runtime must be 'auto', 'function' or 'extensions', got {runtime!r}")
    proto = _load(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if count_plugin_nodes(proto):
        if runtime == "extensions":
            import onnxruntime_extensions

            inits = {i.name: i.data_type for i in proto.graph.initializer}
            dtypes = {inits.get(n.input[1]) for n in proto.graph.node if _is_plugin_node(n)}
            if dtypes - {onnx.TensorProto.FLOAT}:
                raise ValueError(
                    "the onnxruntime-extensions path runs float32 plugin nodes only; this model has "
                    f"{sorted(onnx.TensorProto.DataType.Name(d) for d in dtypes if d is not None)} ones "
                    "(use runtime='function')"
                )

            register_ort_extensions_op()
            proto = to_contrib_domain(proto)
            so.register_custom_ops_library(onnxruntime_extensions.get_library_path())
        else:
            proto = add_local_functions(proto)
    # Only for float16 models: NCHWc re-lays out float32 Conv/pooling for x86 SIMD, a real speedup that float32
    # CNNs run through this session should keep; the crash was seen on float16 graphs only.
    disabled = list(FP16_DISABLED_OPTIMIZERS) if _has_float16(proto) else []
    return ort.InferenceSession(
        proto.SerializeToString(), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


def _artifact_name(proto: onnx.ModelProto, runtime: str) -> str:
    if not count_plugin_nodes(proto):
        return "onnx-portable"
    if runtime == "extensions":
        return "onnx-plugin (onnxruntime-extensions)"
    if not _has_local_function(proto):
        # A pass must not read as "plain onnxruntime runs this file": it refuses a bare file at load.
        return "onnx-plugin (bare; the check attached the local function, the file needs TensorRT or extensions)"
    return "onnx-plugin (local function)"


def check_onnx(
    path: str | os.PathLike | onnx.ModelProto,
    model: nn.Module,
    example_args: Any,
    batch_sizes: Sequence[int] | None = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    runtime: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    raise_on_failure: bool = True,
    seed: int = 0,
) -> CheckResult:
    """Run an ONNX file in onnxruntime against the eager model; return the max difference.

    The file must pass ``onnx.checker.check_model(full_check=True)``. Plugin-form files run through their
    local function (attached in memory if the file is bare) or, with ``runtime="extensions"``, through
    onnxruntime-extensions. Inputs are random tensors shaped like ``example_args`` at each batch size
    (default: two sizes different from the example's; a file whose inputs have a fixed dim 0, exported with
    ``dynamic_batch=False``, at that size only). Other symbolic dims of the inputs (``dynamic_shapes``) are
    run at sizes below the example's (the file records no ranges; see ``check_sizes``). ``example_kwargs``:
    the keyword inputs it was exported with; the file's inputs take the tensors in ``to_onnx``'s order.

    A float16 portable file is also loaded by a plain ``InferenceSession`` in a child process, with onnxruntime's
    default options: if that fails (``FP16_DISABLED_OPTIMIZERS``, which this check turns off), a warning says
    so and what every consumer must pass.

    Raises:
        ExportCheckError: when ``raise_on_failure`` and the check fails (see ``check_program``: each output
            within its own tolerance, ``inf`` / ``NaN`` where eager has them, something compared).
        ValueError: the file is not a valid ONNX model, or ``batch_sizes`` holds a size that a static-batch
            file cannot run.
    """
    proto = _load(path)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"the ONNX model fails onnx.checker (full check): {e}") from e
    leaves, spec = _program.flatten_inputs(example_args, example_kwargs)
    reference, _ = _program.prepare_for_export(model)
    session = make_session(proto, runtime=runtime)
    if _has_float16(proto) and not count_plugin_nodes(proto):
        _warn_if_default_session_fails(proto, None if isinstance(path, onnx.ModelProto) else path)
    names = [i.name for i in session.get_inputs()]
    artifact = _artifact_name(proto, runtime)
    exprs = input_dynamic_dims([i.shape for i in session.get_inputs()], leaves)
    static = [_static_size(i.shape[0]) for i in session.get_inputs() if i.shape]
    static = [n for n in static if n is not None]
    sizes, dims = _program.check_sizes(artifact, batch_sizes, leaves, exprs, {}, static[0] if static else None)

    def run(*args: Any, **kwargs: Any) -> list[Tensor]:
        flat = _program.flatten_inputs(args, kwargs)[0]
        arrays = [a.detach().cpu().numpy() for a in flat if isinstance(a, Tensor)]
        if len(arrays) != len(names):
            raise _program.ExportCheckError(
                f"the ONNX model has {len(names)} inputs {names} but the example has {len(arrays)} tensors"
            )
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, dict(zip(names, arrays)))]

    result = _program.compare_outputs(artifact, run, reference, leaves, spec, sizes, atol, rtol, seed, dims)
    return _program.finish_check(result, raise_on_failure)


def _static_size(n: int | str | None) -> int | None:
    """An input dim's fixed size: an int, or a dim_param the exporter wrote for a dim it fixed (``"3"``)."""
    if isinstance(n, int):
        return n
    return int(n) if isinstance(n, str) and n.isdigit() else None


def input_shapes(model: onnx.ModelProto) -> list[list[int | str | None]]:
    """The graph inputs' shapes as onnxruntime reports them: an int per fixed dim, the ``dim_param`` string per
    symbolic one (``None`` where neither is set)."""
    return [
        [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    ]


def input_dynamic_dims(shapes: Sequence[Sequence[int | str | None] | None], args: tuple) -> _program.DimExprs:
    """The symbolic dims (``dim_param``) of a model's input ``shapes`` (``input_shapes``, or a session's),
    matched to ``args``' tensors in order."""
    positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
    exprs: _program.DimExprs = {}
    for i, shape in zip(positions, shapes):
        for d, n in enumerate(shape or ()):
            if isinstance(n, str) and n:
                e = _program._parse_dim(n)
                # The exporter writes a dim it specialized (Dim.AUTO) as a dim_param such as "4": not dynamic.
                if e.free_symbols:
                    exprs[(i, d)] = e
    return exprs

"""ONNX export in both forms, run in onnxruntime (real runtime, CPU)."""

import copy
import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torch.export import Dim

from diagcompile import DiagLinear, DiagSparsityConfig, sparsify_
from diagcompile.export import ExportCheckError, NoDiagonalLayersWarning, check_onnx, to_onnx
from diagcompile.export.onnx import (
    _RANGES_KEY,
    DEFAULT_OPSET,
    FP16_DISABLED_OPTIMIZERS,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    SUPPORTED_OPSETS,
    _has_float16,
    count_diag_layers,
    count_plugin_nodes,
    make_session,
    strip_local_functions,
    to_contrib_domain,
)
from diagcompile.marking import sync_marks
from diagcompile.testing import (
    DictOutputModel,
    ExportTestModel,
    KeywordInputModel,
    LengthShifted,
    keyword_inputs,
    make_export_model,
    run_python,
)

N = ExportTestModel.N_DIAG_LAYERS


def _converted(model: nn.Module) -> nn.Module:
    """The eager model the artifact must reproduce: marked linears converted, as export does."""
    out = copy.deepcopy(model)
    sync_marks(out)
    return sparsify_(out, DiagSparsityConfig(only_marked=True))


def _run(session: ort.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.fixture(scope="module")
def model_and_args():
    return make_export_model()


@pytest.fixture(scope="module")
def portable(model_and_args, tmp_path_factory):
    model, args = model_and_args
    return to_onnx(model, args, tmp_path_factory.mktemp("onnx") / "portable.onnx", mode="portable")


@pytest.fixture(scope="module")
def plugin(model_and_args, tmp_path_factory):
    model, args = model_and_args
    return to_onnx(model, args, tmp_path_factory.mktemp("onnx") / "plugin.onnx", mode="plugin")


# ----------------------------------------------------------------------------------------------------
# portable
# ----------------------------------------------------------------------------------------------------
def test_portable_passes_the_full_checker_and_uses_only_standard_ops(portable):
    model = onnx.load(portable)
    onnx.checker.check_model(model, full_check=True)
    assert {imp.domain for imp in model.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert not model.functions


@pytest.mark.parametrize("batch", [1, 8])
def test_portable_matches_torch_in_onnxruntime(portable, model_and_args, batch):
    model, _ = model_and_args
    session = ort.InferenceSession(str(portable), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 5, 96)  # 3-D input, batch != the example's 3
    with torch.no_grad():
        expected = _converted(model)(x)
    torch.testing.assert_close(_run(session, x), expected, rtol=1e-5, atol=1e-5)


def test_portable_file_stores_the_diagonals_not_dense_weights(portable, model_and_args):
    model, _ = model_and_args
    conv = _converted(model)
    layers = [m for m in conv.modules() if isinstance(m, DiagLinear)]
    assert len(layers) == N
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(portable).graph.initializer}
    dense_sizes = {m.in_features * m.out_features for m in layers}
    assert not [n for n, a in inits.items() if a.size in dense_sizes], "a dense diagonal-layer weight was stored"
    assert len([n for n in inits if n.endswith(".values")]) == N
    # Weight bytes: the diagonal values plus what the rest of the model needs (biases, offsets, dense head,
    # small constants), far below the dense layers. The index arithmetic is not folded into the file.
    sparse = sum(m.values.numel() for m in layers) * 4
    dense = sum(m.in_features * m.out_features for m in layers) * 4
    other = sum(p.numel() * 4 for n, p in conv.named_parameters() if not n.endswith(".values"))
    offsets = sum(m.k for m in layers) * 4
    aranges = sum(min(m.in_features, m.out_features) for m in layers) * 8  # folded arange(D), int64
    stored = sum(a.nbytes for a in inits.values())
    assert stored < sparse + other + offsets + aranges + 512 < dense, (stored, sparse, other, dense)


def test_check_onnx_passes_and_reports_two_batch_sizes(portable, model_and_args):
    model, args = model_and_args
    result = check_onnx(portable, model, args)
    assert result.passed and result.artifact == "onnx-portable"
    assert len(result.batch_sizes) == 2 and 3 not in result.batch_sizes


def test_check_onnx_fails_on_a_broken_file(portable, model_and_args, tmp_path):
    model, args = model_and_args
    broken = onnx.load(portable)
    for init in broken.graph.initializer:
        if init.name == "tall.values":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.05, init.name))
    path = tmp_path / "broken.onnx"
    onnx.save(broken, path)
    with pytest.raises(ExportCheckError, match="FAILED"):
        check_onnx(path, model, args)
    assert not check_onnx(path, model, args, raise_on_failure=False).passed


# ----------------------------------------------------------------------------------------------------
# plugin
# ----------------------------------------------------------------------------------------------------
def _plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == PLUGIN_NAMESPACE and n.op_type == PLUGIN_NAME]


def test_plugin_has_one_node_per_layer_with_tensorrt_attributes(plugin, model_and_args):
    model = onnx.load(plugin)
    onnx.checker.check_model(model, full_check=True)
    nodes = _plugin_nodes(model)
    assert len(nodes) == N == count_plugin_nodes(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    layers = [m for m in _converted(model_and_args[0]).modules() if isinstance(m, DiagLinear)]
    for node, layer in zip(nodes, layers):  # graph order == forward order
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"diagcompile" and attrs["plugin_version"] == b"1"
        assert attrs["aot"] == 1
        assert (attrs["out_features"], attrs["in_features"]) == (layer.out_features, layer.in_features)
        x, values, offsets, bias = node.input
        np.testing.assert_array_equal(inits[offsets], layer.offsets.numpy())
        assert inits[offsets].dtype == np.int32
        np.testing.assert_array_equal(inits[values], layer.values.detach().numpy())
        expected_bias = layer.bias.detach().numpy() if layer.bias is not None else np.zeros(layer.out_features)
        np.testing.assert_array_equal(inits[bias], expected_bias.astype(np.float32))


def test_plugin_with_local_function_runs_in_plain_onnxruntime(plugin, model_and_args):
    model, _ = model_and_args
    assert [f.name for f in onnx.load(plugin).functions] == [PLUGIN_NAME]
    session = ort.InferenceSession(str(plugin), providers=["CPUExecutionProvider"])
    conv = _converted(model)
    for batch in (1, 6):
        x = torch.randn(batch, 5, 96)
        with torch.no_grad():
            torch.testing.assert_close(_run(session, x), conv(x), rtol=1e-5, atol=1e-5)


def test_bare_plugin_file_needs_the_plugin_and_runs_through_onnxruntime_extensions(plugin, model_and_args):
    model, args = model_and_args
    bare = strip_local_functions(onnx.load(plugin))
    assert not bare.functions and count_plugin_nodes(bare) == N
    with pytest.raises(Exception, match="DiagLinear"):  # plain onnxruntime has no such op
        ort.InferenceSession(bare.SerializeToString(), providers=["CPUExecutionProvider"])
    contrib = to_contrib_domain(bare)
    assert all(n.domain == "ai.onnx.contrib" for n in contrib.graph.node if n.op_type == PLUGIN_NAME)
    session = make_session(bare, runtime="extensions")
    x = torch.randn(4, 5, 96)
    with torch.no_grad():
        torch.testing.assert_close(_run(session, x), _converted(model)(x), rtol=1e-5, atol=1e-5)
    result = check_onnx(bare, model, args, runtime="extensions")
    assert result.passed and "onnxruntime-extensions" in result.artifact


def test_bare_export_option_and_check_attaches_the_function(model_and_args, tmp_path):
    layer = DiagLinear(24, 36, bias=False, sparsity=0.75)
    path = to_onnx(layer, (torch.randn(2, 24),), tmp_path / "bare.onnx", mode="plugin", local_function=False, aot=False)
    model = onnx.load(path)
    assert not model.functions and count_plugin_nodes(model) == 1
    assert {a.name: a.i for a in _plugin_nodes(model)[0].attribute if a.name == "aot"} == {"aot": 0}
    result = check_onnx(path, layer, (torch.randn(2, 24),))  # function attached in memory
    # Its report must not read as "plain onnxruntime runs this file" (it refuses a bare file at load).
    assert result.passed and result.artifact.startswith("onnx-plugin (bare;") and "TensorRT" in result.artifact
    with_function = to_onnx(layer, (torch.randn(2, 24),), tmp_path / "full.onnx", mode="plugin")
    assert check_onnx(with_function, layer, (torch.randn(2, 24),)).artifact == "onnx-plugin (local function)"


# ----------------------------------------------------------------------------------------------------
# opsets, dtypes, models without diagonal layers
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [SUPPORTED_OPSETS[0], SUPPORTED_OPSETS[-1]])
def test_supported_opset_bounds_export_and_run(opset, tmp_path):
    layer = DiagLinear(20, 30, sparsity=0.8)
    path = to_onnx(layer, (torch.randn(2, 20),), tmp_path / f"o{opset}.onnx", opset=opset)
    assert next(i.version for i in onnx.load(path).opset_import if i.domain == "") == opset
    assert check_onnx(path, layer, (torch.randn(2, 20),)).passed


@pytest.mark.parametrize("opset", [SUPPORTED_OPSETS[0] - 1, SUPPORTED_OPSETS[-1] + 1, "20"])
def test_unsupported_opset_is_a_clear_error(opset, tmp_path):
    with pytest.raises(ValueError, match=f"opset .* is not supported; use one of .*default {DEFAULT_OPSET}"):
        to_onnx(DiagLinear(8, 8, sparsity=0.5), (torch.randn(2, 8),), tmp_path / "x.onnx", opset=opset)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_unsupported_dtype_is_a_clear_error(dtype, tmp_path):
    layer = DiagLinear(8, 8, sparsity=0.5).to(dtype)
    with pytest.raises(TypeError, match=f"float32 and float16.*{str(dtype).split('.')[-1]}"):
        to_onnx(layer, (torch.randn(2, 8, dtype=dtype),), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_unknown_mode_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        to_onnx(DiagLinear(8, 8, sparsity=0.5), (torch.randn(2, 8),), tmp_path / "x.onnx", mode="fast")


@pytest.mark.parametrize("mode", ["portable", "plugin"])
def test_float16_model_matches(mode, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(DiagLinear(32, 16, sparsity=0.75), nn.ReLU(), DiagLinear(16, 48, bias=False, sparsity=0.75))
    model = model.half()
    args = (torch.randn(3, 32, dtype=torch.float16),)
    path = to_onnx(model, args, tmp_path / "h.onnx", mode=mode)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 32, dtype=torch.float16)
    out = _run(session, x)
    assert out.dtype == torch.float16
    with torch.no_grad():
        ref = model.float()(x.float())
    model.half()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_model_without_diagonal_layers_exports_with_a_note(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh())
    with pytest.warns(NoDiagonalLayersWarning):
        path = to_onnx(model, (torch.randn(3, 6),), tmp_path / "plain.onnx", mode="plugin")
    assert count_plugin_nodes(path) == 0
    assert check_onnx(path, model, (torch.randn(3, 6),)).passed


def test_check_onnx_rejects_a_non_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    with pytest.raises(ValueError, match="not a readable ONNX model|onnx.checker"):
        check_onnx(bad, DiagLinear(8, 8, sparsity=0.5), (torch.randn(2, 8),))


def test_extensions_runtime_refuses_float16_plugin_nodes(tmp_path):
    layer = DiagLinear(16, 8, sparsity=0.5).half()
    path = to_onnx(layer, (torch.randn(2, 16, dtype=torch.float16),), tmp_path / "h.onnx", mode="plugin")
    with pytest.raises(ValueError, match="float32 plugin nodes only"):
        make_session(path, runtime="extensions")


def test_static_batch_file_is_checked_at_its_own_batch_size(tmp_path):
    layer = DiagLinear(8, 12, sparsity=0.5)
    args = (torch.randn(4, 8),)
    path = to_onnx(layer, args, tmp_path / "static.onnx", dynamic_batch=False)
    result = check_onnx(path, layer, args)
    assert result.passed and result.batch_sizes == (4,)
    with pytest.raises(ValueError, match=r"batch dimension is static \(4.*batch size\(s\) \[1\]"):
        check_onnx(path, layer, args, batch_sizes=[1])


def test_dict_outputs_are_checked_in_the_files_output_order(tmp_path):
    """ONNX outputs follow the dict's insertion order; a sorted comparison paired logits with features."""

    model = DictOutputModel()
    args = (torch.randn(4, 8),)
    path = to_onnx(model, args, tmp_path / "dict.onnx")
    assert check_onnx(path, model, args).passed


def test_written_file_gets_the_mode_of_a_new_file(tmp_path):
    old = os.umask(0o027)
    try:
        path = to_onnx(DiagLinear(8, 8, sparsity=0.5), (torch.randn(2, 8),), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # mkstemp's 0o600 before the fix


def test_writing_to_a_directory_fails_before_exporting(tmp_path, monkeypatch):
    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported before checking the output path")

    monkeypatch.setattr("diagcompile.export.program.export_program", no_export)
    with pytest.raises(ValueError, match="is a directory"):
        to_onnx(DiagLinear(8, 8, sparsity=0.5), (torch.randn(2, 8),), tmp_path)


@pytest.mark.parametrize("mode", ["portable", "plugin"])
def test_dynamic_sequence_length_file_runs_other_lengths_and_its_check_varies_them(mode, model_and_args, tmp_path):
    model, args = model_and_args  # x: (3, 5, 96)
    spec = ({0: Dim("batch"), 1: Dim("seq")},)
    path = to_onnx(model, args, tmp_path / "seq.onnx", mode=mode, dynamic_shapes=spec)
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in dims] == [True, True, False]
    result = check_onnx(path, model, args)
    assert result.passed and len(result.input_shapes) == 2
    assert all(s[1] != 5 for s in result.input_shapes), result.input_shapes
    # A reference that differs only at other lengths: caught, because other lengths are run.
    with pytest.raises(ExportCheckError, match="input shapes"):
        check_onnx(path, LengthShifted(model, length=5), args)


class _FixedLength(nn.Module):  # uses dim 1 as a constant: Dim.AUTO gets it specialized
    def __init__(self) -> None:
        super().__init__()
        self.fc = DiagLinear(32, 16, sparsity=0.5)

    def forward(self, x):
        return self.fc(x.reshape(x.shape[0], 32))


def test_a_dim_the_exporter_specialized_is_checked_as_static(tmp_path):
    # The exporter writes such a dim as dim_param "4"; the check must not try other sizes there.
    model, x = _FixedLength().eval(), torch.randn(2, 4, 8)
    path = to_onnx(model, (x,), tmp_path / "f.onnx", dynamic_shapes=({0: Dim("batch"), 1: Dim.AUTO},))
    result = check_onnx(path, model, (x,))
    assert result.passed and result.input_shapes == () and 2 not in result.batch_sizes


class _FixedBatch(nn.Module):  # uses dim 0 as a constant: Dim.AUTO gets it specialized
    def __init__(self) -> None:
        super().__init__()
        self.fc = DiagLinear(8, 8, sparsity=0.5)

    def forward(self, x):
        return self.fc(x).reshape(3, -1)


def test_a_batch_the_exporter_fixed_is_checked_at_its_own_size(tmp_path):
    # The exporter writes the fixed batch as dim_param "3": it is static, not a batch to vary.
    model, x = _FixedBatch().eval(), torch.randn(3, 4, 8)
    path = to_onnx(model, (x,), tmp_path / "b.onnx", dynamic_shapes=({0: Dim.AUTO, 1: Dim("seq")},))
    result = check_onnx(path, model, (x,))
    assert result.passed and result.batch_sizes == (3,) and all(s[0] == 3 for s in result.input_shapes)


@pytest.mark.parametrize("mode", ["portable", "plugin"])
def test_nested_and_keyword_inputs_become_graph_inputs_in_pytree_order(mode, tmp_path):
    model = KeywordInputModel()
    args, kwargs = keyword_inputs(batch=3)
    path = to_onnx(model, args, tmp_path / "m.onnx", mode=mode, example_kwargs=kwargs)
    session = make_session(path)
    assert [i.name for i in session.get_inputs()] == ["x", "pair_0", "pair_1", "mask"]
    (x, (a, b)), kw = keyword_inputs(batch=5)
    feed = {"x": x.numpy(), "pair_0": a.numpy(), "pair_1": b.numpy(), "mask": kw["mask"].numpy()}
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, feed)[0]), model(x, [a, b], **kw))
    assert check_onnx(path, model, args, example_kwargs=kwargs).passed
    with pytest.raises(ExportCheckError):
        check_onnx(path, KeywordInputModel(swapped=True), args, example_kwargs=kwargs)


def test_unsupported_keyword_input_dtype_is_named(tmp_path):
    args, kwargs = keyword_inputs()
    with pytest.raises(TypeError, match=r"example_kwargs\['mask'\]"):
        to_onnx(KeywordInputModel(), args, tmp_path / "m.onnx", example_kwargs={"mask": kwargs["mask"].double()})


# ----------------------------------------------------------------------------------------------------
# names of the symbolic dims
# ----------------------------------------------------------------------------------------------------
def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _all_dim_params(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return {d for v in (*graph.input, *graph.output, *graph.value_info) for d in _shape(v) if isinstance(d, str)}


@pytest.mark.parametrize("fixture", ["portable", "plugin"])
def test_default_export_names_the_dynamic_batch_dim_batch(fixture, request, model_and_args):
    path = request.getfixturevalue(fixture)
    model = onnx.load(path)
    assert _shape(model.graph.input[0]) == ["batch", 5, 96]
    assert _shape(model.graph.output[0]) == ["batch", 5, 10]
    assert _all_dim_params(model) == {"batch"}  # value_info too: no torch symbol (s77) left anywhere
    session = make_session(path)
    assert session.get_inputs()[0].shape == ["batch", 5, 96]
    assert session.get_outputs()[0].shape == ["batch", 5, 10]


@pytest.mark.parametrize("mode", ["portable", "plugin"])
def test_user_dims_keep_their_names_and_the_check_still_varies_them(mode, model_and_args, tmp_path):
    model, args = model_and_args  # x: (3, 5, 96)
    spec = ({0: Dim("batch"), 1: Dim("seq", max=64)},)
    path = to_onnx(model, args, tmp_path / "seq.onnx", mode=mode, dynamic_shapes=spec)
    proto = onnx.load(path)
    assert _shape(proto.graph.input[0]) == ["batch", "seq", 96]
    assert _shape(proto.graph.output[0]) == ["batch", "seq", 10]
    assert _all_dim_params(proto) == {"batch", "seq"}
    ranges = {p.key: p.value for p in proto.graph.metadata_props}.get(_RANGES_KEY)
    if ranges is not None:  # the exporter's record of the program's ranges speaks of the same names
        assert "batch:" in ranges and "seq:" in ranges, ranges
    result = check_onnx(path, model, args)
    assert result.passed and len(result.batch_sizes) == 2 and 3 not in result.batch_sizes
    assert all(s[1] != 5 for s in result.input_shapes) and len(result.input_shapes) == 2, result.input_shapes


class _SelfConcat(nn.Module):  # (B, T, 8) -> (B, 2T, 8): an output dim that is an expression in the input's
    def __init__(self) -> None:
        super().__init__()
        self.fc = DiagLinear(8, 8, sparsity=0.5)

    def forward(self, x):
        return torch.cat([self.fc(x), x], dim=1)


@pytest.mark.parametrize("mode", ["portable", "plugin"])
def test_a_derived_output_dim_is_renamed_with_its_symbol(mode, tmp_path):
    model, x = _SelfConcat().eval(), torch.randn(3, 5, 8)
    spec = ({0: Dim("batch"), 1: Dim("seq", max=64)},)
    path = to_onnx(model, (x,), tmp_path / "cat.onnx", mode=mode, dynamic_shapes=spec)
    proto = onnx.load(path)
    assert _shape(proto.graph.input[0]) == ["batch", "seq", 8]
    assert _shape(proto.graph.output[0]) == ["batch", "2*seq", 8]
    result = check_onnx(path, model, (x,))
    assert result.passed and len(result.input_shapes) == 2 and all(s[1] != 5 for s in result.input_shapes)


def test_an_input_dim_given_as_an_expression_is_named_after_its_root(tmp_path):
    model, args = make_export_model(batch=(3, 6))
    path = to_onnx(model, args, tmp_path / "half.onnx", dynamic_shapes=({0: Dim("batch"), 1: 2 * Dim("half")},))
    assert _shape(onnx.load(path).graph.input[0]) == ["batch", "2*half", 96]
    result = check_onnx(path, model, args)
    assert result.passed and all(s[1] != 6 and s[1] % 2 == 0 for s in result.input_shapes), result.input_shapes


def test_auto_dims_keep_the_exporters_name(tmp_path):
    model, args = make_export_model()
    path = to_onnx(model, args, tmp_path / "auto.onnx", dynamic_shapes=({0: Dim("batch"), 1: Dim.AUTO},))
    batch, seq, features = _shape(onnx.load(path).graph.input[0])
    assert batch == "batch" and isinstance(seq, str) and seq not in ("batch", "") and features == 96
    assert check_onnx(path, model, args).passed


@pytest.mark.parametrize("form", ["dict", "collection"])
def test_inputs_sharing_one_dim_all_get_its_name(form, tmp_path):
    model = KeywordInputModel()
    args, kwargs = keyword_inputs(batch=3)
    (x, (a, b)), mask = args, kwargs["mask"]
    n = Dim("n")
    if form == "dict":
        spec = {"x": {0: n}, "pair": [{0: n}, {0: n}], "mask": {0: n}}
    else:
        spec = torch.export.ShapesCollection()
        for t in (x, a, b, mask):
            spec[t] = {0: n}
    path = to_onnx(model, args, tmp_path / "m.onnx", example_kwargs=kwargs, dynamic_shapes=spec)
    proto = onnx.load(path)
    assert [_shape(i)[0] for i in proto.graph.input] == ["n"] * 4
    assert _shape(proto.graph.output[0])[0] == "n"
    assert check_onnx(path, model, args, example_kwargs=kwargs).passed


def test_default_batch_of_nested_and_keyword_inputs_is_named_batch(tmp_path):
    model = KeywordInputModel()
    args, kwargs = keyword_inputs(batch=3)
    path = to_onnx(model, args, tmp_path / "m.onnx", example_kwargs=kwargs)
    assert [_shape(i)[0] for i in onnx.load(path).graph.input] == ["batch"] * 4


def test_a_name_that_is_another_dims_exporter_name_does_not_merge_the_two(tmp_path):
    # Name dim 1 after the symbol the exporter gives dim 0: renaming dim 0 to "batch" and dim 1 to that symbol
    # one after the other would turn both into one dim. They must stay two.
    from diagcompile.export import export_program

    model, args = make_export_model()

    def symbols(spec):
        val = next(n for n in export_program(model, args, dynamic_shapes=spec).graph.nodes if n.name == "x")
        return [str(s) for s in val.meta["val"].shape[:2]]

    s0, s1 = symbols(({0: Dim("batch"), 1: Dim("seq")},))
    spec = ({0: Dim("batch"), 1: Dim(s0)},)
    assert symbols(spec) == [s0, s1], "the exporter's symbol names depend on the Dim names: the test needs rework"
    path = to_onnx(model, args, tmp_path / "clash.onnx", dynamic_shapes=spec)
    dims = _shape(onnx.load(path).graph.input[0])
    assert dims[0] == "batch" and dims[1] != "batch" and dims[1] == s1, dims
    result = check_onnx(path, model, args)
    assert result.passed and len({s[1] for s in result.input_shapes}) == 2


def test_dims_are_renamed_by_symbol_not_by_substring():
    from diagcompile.export.onnx import _rename_dims

    def value(name, dims):
        return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)

    inner = onnx.helper.make_graph([], "body", [], [value("z", ["s7", "s77 + s7"])])
    node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    graph = onnx.helper.make_graph(
        [node], "g", [value("x", ["s7", "s77", 4])], [value("y", ["2*s7", "s77*s7"])], value_info=[value("t", ["s7"])]
    )
    model = onnx.helper.make_model(graph)
    _rename_dims(model, {"s7": "seq"})
    assert _shape(model.graph.input[0]) == ["seq", "s77", 4]
    assert _shape(model.graph.output[0]) == ["2*seq", "s77*seq"]
    assert _shape(model.graph.value_info[0]) == ["seq"]
    assert _shape(model.graph.node[0].attribute[0].g.output[0]) == ["seq", "s77 + seq"]


class _InputNamedY(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = DiagLinear(8, 8, sparsity=0.5)

    def forward(self, x, y):
        return self.fc(x) + y


def test_an_input_named_y_keeps_the_single_output_from_taking_its_name(tmp_path):
    # The single output is renamed "y" by default; with an input already called y that made the exporter fail
    # ("'y' has been used as output names multiple times").
    model, args = _InputNamedY(), (torch.randn(3, 8), torch.randn(3, 8))
    path = to_onnx(model, args, tmp_path / "m.onnx")
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["x", "y"] and proto.graph.output[0].name != "y"
    assert check_onnx(path, model, args).passed


class _DictOutputs(nn.Module):
    def __init__(self, twice: bool = False):
        super().__init__()
        self.fc, self.head, self.twice = DiagLinear(8, 8, sparsity=0.5), nn.Linear(8, 3), twice

    def forward(self, x):
        h = self.fc(x)
        if self.twice:  # one tensor under two keys
            return {"a": h, "b": h}
        return {"logits": self.head(h), "features": {"hidden": h, "pooled": h.mean(-1)}}


@pytest.mark.parametrize("mode", ["portable", "plugin"])
def test_dict_outputs_are_named_by_their_keys(mode, tmp_path):
    """The graph outputs of a dict-returning model were the exporter's node names (``linear``, ``diag_linear``,
    ``mean``), so a consumer had to guess which was which; they are the keys' paths now."""
    x = torch.randn(4, 8)
    cases = ((_DictOutputs(), ["logits", "features.hidden", "features.pooled"]), (_DictOutputs(True), ["a", "b"]))
    for model, names in cases:
        model.eval()
        path = to_onnx(model, (x,), tmp_path / "m.onnx", mode=mode)
        assert [o.name for o in onnx.load(path).graph.output] == names
        assert [o.name for o in make_session(path).get_outputs()] == names
        assert check_onnx(path, model, (x,)).passed


class _SwappedKeys(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = DiagLinear(8, 8, sparsity=0.5), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        return {"mean": self.head(h), "linear": h.mean(-1)}  # each key the exporter's name of the other output


@pytest.mark.parametrize("mode", ["portable", "plugin"])
def test_keys_that_are_the_exporters_names_of_other_outputs_name_the_right_outputs(mode, tmp_path):
    """Renamed one by one, both outputs were refused their keys (each taken by the other) and kept the exporter's
    names: an output called ``mean`` held the linear's (4, 3) result and ``linear`` the mean."""
    model, x = _SwappedKeys().eval(), torch.randn(4, 8)
    path = to_onnx(model, (x,), tmp_path / "m.onnx", mode=mode)
    sess = make_session(path)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x.numpy()})))
    assert sorted(got) == ["linear", "mean"]
    for key, value in model(x).items():
        np.testing.assert_allclose(got[key], value.detach().numpy(), rtol=1e-5, atol=1e-5)


FP16_ENCODER = """
import torch
from torch import nn
import diagcompile
from diagcompile.export import check_onnx, to_onnx

torch.manual_seed(0)
layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
model = nn.Sequential(encoder, nn.Linear(16, 4)).eval()
diagcompile.sparsify_(model, diagcompile.DiagSparsityConfig(sparsity=0.5))
model = model.half()
args = (torch.randn(2, 6, 16).half(),)
path = to_onnx(model, args, {path!r})
print(check_onnx(path, model, args))
"""


def test_fp16_sparse_transformer_encoder_is_checked_without_crashing_onnxruntime(tmp_path):
    # onnxruntime 1.32.0's NCHWc transformer segfaulted creating a session for this file (ORT_ENABLE_ALL):
    # check_onnx took the whole process down. In a subprocess, a crash fails this test instead of pytest.
    out = run_python(FP16_ENCODER.format(path=str(tmp_path / "encoder_fp16.onnx")), timeout=600)
    assert out.strip().splitlines()[-1].startswith("onnx-portable: max |artifact - eager|")
    assert out.strip().endswith(": OK"), out


def test_check_onnx_warns_when_a_default_session_would_crash_on_the_file(tmp_path, monkeypatch, recwarn):
    """check_onnx turns the crashing optimizer off for float16 files; a consumer's plain InferenceSession does
    not. The check loads the file with default options in a child and warns unless that child says it did."""
    import diagcompile.export.onnx as onnx_export

    layer = DiagLinear(8, 12, sparsity=0.5).half().eval()
    args = (torch.randn(3, 8).half(),)
    path = to_onnx(layer, args, tmp_path / "half.onnx")
    assert onnx_export._default_session_problem(path) is None  # the real probe built a session and said so
    assert check_onnx(path, layer, args).passed
    assert not [w for w in recwarn.list if "default options" in str(w.message)]
    # A child that dies the way onnxruntime 1.32's NCHWc transformer does on some float16 encoders.
    monkeypatch.setattr(onnx_export, "_DEFAULT_SESSION_PROBE", "import os, signal; os.kill(os.getpid(), 11)")
    with pytest.warns(UserWarning, match=r"crashed \(signal 11\).*disabled_optimizers=\['NchwcTransformer'\]"):
        assert check_onnx(path, layer, args).passed
    with pytest.warns(UserWarning, match=r"crashed \(signal 11\)"):  # an in-memory model is saved for the child
        assert check_onnx(onnx.load(path), layer, args).passed
    # A child that could not try (no onnxruntime there) or exits without the sentinel is not a success.
    monkeypatch.setattr(onnx_export, "_DEFAULT_SESSION_PROBE", "import onnxruntime_missing")
    assert "failed (exit status 1: ModuleNotFoundError" in onnx_export._default_session_problem(path)
    monkeypatch.setattr(onnx_export, "_DEFAULT_SESSION_PROBE", "pass")
    assert onnx_export._default_session_problem(path) == "failed (exit status 0: no output)"
    float32 = to_onnx(layer.float(), (args[0].float(),), tmp_path / "float.onnx")
    recwarn.clear()
    assert check_onnx(float32, layer, (args[0].float(),)).passed  # float32 files keep the optimizer: no probe
    assert not [w for w in recwarn.list if "default options" in str(w.message)]


def test_only_float16_files_get_the_nchwc_transformer_disabled(portable, tmp_path):
    layer = DiagLinear(8, 12, sparsity=0.5).half().eval()
    half = to_onnx(layer, (torch.randn(3, 8).half(),), tmp_path / "half.onnx")
    assert _has_float16(onnx.load(half)) and not _has_float16(onnx.load(portable))
    assert FP16_DISABLED_OPTIMIZERS == ("NchwcTransformer",)


@pytest.mark.parametrize("mode", ["portable", "plugin"])
def test_the_file_records_its_number_of_diagonal_layers(mode, portable, plugin):
    # The portable form has no node per layer; the count is recorded at export (the CLI prints it).
    assert count_diag_layers(portable if mode == "portable" else plugin) == N
    model = onnx.load(plugin)
    del model.metadata_props[:]  # a file without the record (another tool): its plugin nodes count
    assert count_diag_layers(model) == N

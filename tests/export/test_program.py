"""torch.export round trip: export_program / save / load / check_program."""

import copy
import json
import math
import os
import stat
import warnings
import zipfile

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from diagcompile import (
    DiagLinear,
    DiagSparsityConfig,
    SparseMark,
    get_sparse_mark,
    is_sparse_marked,
    mark_sparse,
    sparsify_,
)
from diagcompile.export import (
    ExportCheckError,
    NoDiagonalLayersWarning,
    check_program,
    export_program,
    load,
    save,
)
from diagcompile.export.program import (
    _flat_tensors,
    check_sizes,
    compare_outputs,
    count_diag_nodes,
    flatten_inputs,
    input_names,
)
from diagcompile.marking import sync_marks
from diagcompile.passes import SparseRewriteError
from diagcompile.testing import (
    DictOutputModel,
    ExportTestModel,
    KeywordInputModel,
    LengthShifted,
    keyword_inputs,
    make_export_model,
    masked_dense_copy,
    run_python,
)

N = ExportTestModel.N_DIAG_LAYERS


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, args = make_export_model()
    ep = export_program(model, args)
    path = save(ep, tmp_path_factory.mktemp("pt2") / "model.pt2")
    return model, args, ep, path


def test_one_node_per_diagonal_layer_and_it_survives_decompositions(exported):
    model, _, ep, _ = exported
    assert count_diag_nodes(ep) == N
    decomposed = ep.run_decompositions()
    assert count_diag_nodes(decomposed) == N
    # The node is the opaque op itself, not its reference math (no gather/index_add left behind).
    targets = {str(n.target) for n in decomposed.graph.nodes if n.op == "call_function"}
    assert not any("index_add" in t or "gather" in t for t in targets), targets


def test_marked_linear_is_converted_on_a_copy(exported):
    model, _, ep, _ = exported
    assert isinstance(model.marked, nn.Linear) and is_sparse_marked(model.marked)  # source model untouched
    # The exported state holds diagonal values for the marked layer and no dense weight.
    assert "marked.values" in ep.state_dict and "marked.offsets" in ep.state_dict
    assert "marked.weight" not in ep.state_dict


def test_program_equals_eager_at_another_batch_size(exported):
    model, args, ep, _ = exported
    converted = copy.deepcopy(model)  # what export converts on the way, done independently here
    sync_marks(converted)
    sparsify_(converted, DiagSparsityConfig(only_marked=True))
    x = torch.randn(7, 5, 96)  # example batch was 3
    with torch.no_grad():
        assert torch.equal(ep.module()(x), converted(x))


def test_saved_program_loads_and_runs_in_a_fresh_process(exported, tmp_path):
    model, args, ep, path = exported
    x = torch.randn(6, 5, 96)
    with torch.no_grad():
        expected = ep.module()(x)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    code = f"""
import sys, torch
from diagcompile.export import load
io = torch.load({str(tmp_path / "io.pt")!r})
ep = load({str(path)!r})
n = sum(n.op == "call_function" and "diagcompile.diag_linear" in str(n.target) for n in ep.graph.nodes)
y = ep.module()(io["x"])
print(n, torch.equal(y, io["y"]), tuple(y.shape))
"""
    out = run_python(code).strip().splitlines()[-1]
    assert out == f"{N} True (6, 5, 10)"


def test_check_program_passes_at_two_new_batch_sizes(exported):
    model, args, ep, path = exported
    result = check_program(path, model, args)
    assert result.passed and result.max_abs_diff == 0.0
    assert len(result.batch_sizes) == 2 and 3 not in result.batch_sizes


def test_check_program_fails_on_a_broken_program(exported):
    model, args, _, _ = exported
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.tall.values[0, 0] += 0.5
    ep = export_program(broken, args)
    with pytest.raises(ExportCheckError, match="FAILED"):
        check_program(ep, model, args)
    result = check_program(ep, model, args, raise_on_failure=False)
    assert not result.passed and result.max_abs_diff > 10 * result.tolerance


def test_batch_of_one_example_still_exports_a_dynamic_batch():
    layer = DiagLinear(12, 20, sparsity=0.5)
    ep = export_program(layer, (torch.randn(1, 12),))
    for b in (1, 5):
        x = torch.randn(b, 12)
        with torch.no_grad():
            assert torch.equal(ep.module()(x), layer(x))


def test_export_restores_training_mode():
    model = nn.Sequential(DiagLinear(8, 8, sparsity=0.5), nn.Dropout(0.5)).train()
    export_program(model, (torch.randn(2, 8),))
    assert model.training and model[1].training


def test_model_without_diagonal_layers_exports_with_a_note():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    with pytest.warns(NoDiagonalLayersWarning, match="no diagonal layer"):
        ep = export_program(model, (torch.randn(3, 6),))
    assert count_diag_nodes(ep) == 0
    x = torch.randn(5, 6)
    assert torch.equal(ep.module()(x), model(x))


def test_static_batch_export():
    layer = DiagLinear(12, 6, sparsity=0.5)
    ep = export_program(layer, (torch.randn(4, 12),), dynamic_batch=False)
    with pytest.raises(Exception):  # noqa: B017 - torch's own guard error for a wrong static shape
        ep.module()(torch.randn(5, 12))


def test_mismatched_batch_sizes_are_rejected():
    class Two(nn.Module):
        def forward(self, a, b):
            return a.sum() + b.sum()

    with pytest.raises(ValueError, match="shared batch dimension"):
        export_program(Two(), (torch.randn(2, 3), torch.randn(4, 3)))


def test_save_validates_its_arguments(exported, tmp_path):
    _, _, ep, _ = exported
    with pytest.raises(ValueError, match=r"\.pt2"):
        save(ep, tmp_path / "model.zip")
    with pytest.raises(TypeError, match="ExportedProgram"):
        save(DiagLinear(4, 4, sparsity=0.5), tmp_path / "m.pt2")


def test_loading_a_corrupted_file_is_a_clear_error(exported, tmp_path):
    _, _, _, path = exported
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a pt2 archive" * 64)
    with pytest.raises(ValueError, match="not a torch.export archive"):
        load(garbage)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load(truncated)
    other_zip = tmp_path / "other.pt2"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("hello.json", json.dumps({"not": "a program"}))
    with pytest.raises(ValueError, match="could not load"):
        load(other_zip)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt2")


def test_load_can_move_a_program_to_another_device(exported):
    _, _, _, path = exported
    ep = load(path, device="meta")  # the CPU stand-in for "exported on CPU, run on CUDA"
    assert all(t.device.type == "meta" for t in ep.state_dict.values())
    y = ep.module()(torch.randn(4, 5, 96, device="meta"))
    assert y.shape == (4, 5, 10) and y.device.type == "meta"


def test_static_batch_program_is_checked_at_its_own_batch_size():
    layer = DiagLinear(8, 12, sparsity=0.5)
    args = (torch.randn(4, 8),)
    ep = export_program(layer, args, dynamic_batch=False)
    result = check_program(ep, layer, args)
    assert result.passed and result.batch_sizes == (4,)
    with pytest.raises(ValueError, match=r"batch dimension is static \(4.*batch size\(s\) \[5\]"):
        check_program(ep, layer, args, batch_sizes=[4, 5])


def test_saved_file_gets_the_mode_of_a_new_file(exported, tmp_path):
    _, _, ep, _ = exported
    old = os.umask(0o027)
    try:
        path = save(ep, tmp_path / "new.pt2")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # mkstemp's 0o600 before the fix
    path.chmod(0o604)
    save(ep, path)  # overwriting keeps the mode chosen for the existing file
    assert stat.S_IMODE(path.stat().st_mode) == 0o604
    assert [p.name for p in tmp_path.iterdir()] == ["new.pt2"]  # no temporary file left behind


def test_save_to_a_directory_is_a_clear_error(exported, tmp_path):
    _, _, ep, _ = exported
    (tmp_path / "dir.pt2").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        save(ep, tmp_path / "dir.pt2")


def _two_layers() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


def test_weight_only_mark_is_exported_sparse():
    """mark_sparse(linear.weight): the mark lives on the tensor only, which deepcopy drops."""
    model = _two_layers()
    mark_sparse(model[0].weight, sparsity=0.5)
    args = (torch.randn(4, 8),)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "no diagonal layer" nor sparsify_'s "nothing selected"
        ep = export_program(model, args)
    assert count_diag_nodes(ep) == 1 and "0.values" in ep.state_dict and "0.weight" not in ep.state_dict
    assert type(model[0]) is nn.Linear and get_sparse_mark(model[0].weight) == SparseMark(sparsity=0.5)  # untouched
    x = torch.randn(5, 8)
    torch.testing.assert_close(ep.module()(x), masked_dense_copy(model)(x), rtol=1e-5, atol=1e-5)
    assert check_program(ep, model, args).passed


def test_weight_mark_wins_over_its_module_mark():
    """As in the graph passes and the compile backend (which pins its top-k choice on the weight)."""
    model = _two_layers()
    mark_sparse(model[0], sparsity=0.5)
    mark_sparse(model[0].weight, offsets=[0, 1, 5, 9, 10, 11])
    ep = export_program(model, (torch.randn(4, 8),))
    assert ep.state_dict["0.offsets"].tolist() == [0, 1, 5, 9, 10, 11]


class _BareParam(nn.Module):
    """A sparse-marked bare parameter used with F.linear, feeding a DiagLinear."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 8))
        self.b = nn.Parameter(torch.randn(12))
        self.fc = DiagLinear(12, 4, sparsity=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(F.linear(x, self.w, self.b)))


def test_marked_bare_parameter_is_exported_sparse_like_the_compile_backend():
    model = _BareParam().eval()
    mark_sparse(model.w, sparsity=0.5)
    args = (torch.randn(4, 8),)
    ep = export_program(model, args)
    assert count_diag_nodes(ep) == 2 and "w" not in ep.state_dict and "w_values" in ep.state_dict
    assert get_sparse_mark(model.w) == SparseMark(sparsity=0.5)  # the source model is not pinned
    assert check_program(ep, model, args).passed
    x = torch.randn(5, 8)
    exported = ep.module()(x)
    torch.testing.assert_close(exported, masked_dense_copy(model)(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(model, backend="diagcompile")(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(exported, compiled, rtol=1e-5, atol=1e-5)


def test_marked_bare_parameter_used_outside_a_linear_is_an_error():
    class Misuse(_BareParam):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + self.w.sum()

    model = Misuse()
    mark_sparse(model.w, sparsity=0.5)
    with pytest.raises(SparseRewriteError, match="weight 'w' is marked sparse but node .*sum"):
        export_program(model, (torch.randn(4, 8),))


def test_marked_subclass_that_overrides_forward_is_an_error():
    """A DiagLinear in its place would silently drop the override (here: the * 2)."""

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2.0

    model = nn.Sequential(Scaled(8, 12))
    mark_sparse(model[0], sparsity=0.5)
    with pytest.raises(ValueError, match="'0' \\(Scaled overrides forward"):
        export_program(model, (torch.randn(4, 8),))


def test_unbatched_1d_example_with_a_dynamic_batch_is_a_clear_error():
    layer = DiagLinear(8, 12, sparsity=0.5)
    with pytest.raises(ValueError, match=r"example_args\[0\] \(shape \(8,\)\) is 1-D.*dynamic_batch=False"):
        export_program(layer, (torch.randn(8),))
    ep = export_program(layer, (torch.randn(8),), dynamic_batch=False)  # what the message suggests
    assert count_diag_nodes(ep) == 1


def test_diagonal_layer_unused_by_forward_is_named_in_the_warning():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = DiagLinear(8, 8, sparsity=0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    with pytest.warns(NoDiagonalLayersWarning, match="has 1 diagonal layer.*used none of them"):
        export_program(Unused(), (torch.randn(3, 8),))


def test_dict_outputs_are_compared_in_pytree_order():
    out = DictOutputModel()(torch.randn(2, 8))
    assert _flat_tensors(out) == [out["logits"], out["features"]]


# ---- dynamic dims other than the batch (dynamic_shapes) --------------------------------------------------
SEQ_SPEC = ({0: Dim("batch"), 1: Dim("seq")},)


def test_dynamic_sequence_length_runs_at_other_lengths_and_keeps_one_node_per_layer():
    model, args = make_export_model()  # x: (3, 5, 96)
    ep = export_program(model, args, dynamic_shapes=SEQ_SPEC)
    assert count_diag_nodes(ep.run_decompositions()) == N
    converted = copy.deepcopy(model)  # what export converts on the way, done independently here
    sync_marks(converted)
    sparsify_(converted, DiagSparsityConfig(only_marked=True))
    for shape in ((2, 7, 96), (4, 2, 96)):
        x = torch.randn(*shape)
        with torch.no_grad():
            assert torch.equal(ep.module()(x), converted(x)), shape
    result = check_program(ep, model, args)
    assert result.passed
    seqs = [s[1] for s in result.input_shapes]
    assert len(seqs) == 2 and 5 not in seqs, result.input_shapes
    assert "input shapes" in str(result)


def test_check_varies_dynamic_dims_beyond_the_batch():
    # The reference differs from the artifact only at other sequence lengths: a check that only varies the
    # batch passes it; ours runs other lengths on the dynamic-seq program and must fail.
    model, args = make_export_model()
    shifted = LengthShifted(model, length=5)
    with pytest.raises(ExportCheckError, match="input shapes"):
        check_program(export_program(model, args, dynamic_shapes=SEQ_SPEC), shifted, args)
    # A program whose dim 1 is static is checked at the example's length only (it runs no other).
    result = check_program(export_program(model, args), shifted, args)
    assert result.passed and result.input_shapes == ()


def test_dynamic_batch_and_dynamic_shapes_together_is_a_clear_error():
    model, args = make_export_model()
    with pytest.raises(ValueError, match="not both"):
        export_program(model, args, dynamic_batch=True, dynamic_shapes=SEQ_SPEC)


class _BoundedLength(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = DiagLinear(8, 8, sparsity=0.5)

    def forward(self, x):
        if x.shape[1] > 6:
            raise ValueError("sequence too long")
        return self.fc(x)


def test_dynamic_dim_the_model_bounds_is_a_clear_error_and_a_max_fixes_it():
    model, x = _BoundedLength(), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="cannot make these dims dynamic.*seq"):
        export_program(model, (x,), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},))
    ep = export_program(model, (x,), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", max=6)},))
    result = check_program(ep, model, (x,))
    # Other lengths stay inside the program's range [2, 6] (the example is 4).
    assert result.passed and all(2 <= s[1] <= 6 and s[1] != 4 for s in result.input_shapes), result.input_shapes


def test_check_sizes_respects_ranges_shared_symbols_and_expressions():
    b, s = sympy.Symbol("b"), sympy.Symbol("s")
    args = (torch.zeros(3, 8, 4), torch.zeros(3, 16))
    exprs = {(0, 0): b, (0, 1): s, (1, 0): b, (1, 1): 2 * s}
    # s at its maximum: the other sizes go below it; dims given as 2*s follow; the batch runs 1 and 6.
    sizes, points = check_sizes("t", None, args, exprs, {s: (2, 8)}, None)
    assert sizes == (1, 6)
    assert points == [
        {(0, 0): 1, (0, 1): 7, (1, 0): 1, (1, 1): 14},
        {(0, 0): 6, (0, 1): 6, (1, 0): 6, (1, 1): 12},
    ]
    # s at its minimum: above it.
    args_lo = (torch.zeros(3, 2, 4), torch.zeros(3, 4))
    assert check_sizes("t", [1], args_lo, exprs, {s: (2, 8)}, None)[1][0][(0, 1)] == 3
    # A symbol that only appears inside an expression is solved from the example and varied too.
    sizes, points = check_sizes("t", None, (torch.zeros(3, 10),), {(0, 0): b, (0, 1): 2 * s}, {}, None)
    assert [p[(0, 1)] for p in points] == [8, 6]
    # A dim-1 size that is the batch's symbol follows the batch.
    assert check_sizes("t", [1, 6], (torch.zeros(3, 3),), {(0, 0): b, (0, 1): b}, {}, None)[1] == [
        {(0, 0): 1, (0, 1): 1},
        {(0, 0): 6, (0, 1): 6},
    ]
    # The batch stays inside its range, and an explicit size outside it is refused.
    assert sorted(check_sizes("t", None, (torch.zeros(8, 2),), {(0, 0): b}, {b: (2, 8)}, None)[0]) == [2, 7]
    with pytest.raises(ValueError, match=r"outside the range .* \[2, 8\]"):
        check_sizes("t", [11], (torch.zeros(8, 2),), {(0, 0): b}, {b: (2, 8)}, None)
    # Size 0 runs in most artifacts, but it compares nothing: refused for that reason, not a wrong range.
    with pytest.raises(
        ValueError, match=r"\[0\] are outside the range an empty batch compares nothing; check \[1, inf\]"
    ):
        check_sizes("t", [0], (torch.zeros(8, 2),), {(0, 0): b}, {}, None)


class _MaskedSeq(nn.Module):
    """``x`` (B, T, 8) and ``mask`` (T, T): the length is dim 0 of the second input, not a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = DiagLinear(8, 8, sparsity=0.5)

    def forward(self, x, mask):
        return mask @ self.fc(x)


def test_a_length_at_dim_0_of_another_input_is_varied_as_a_length_not_a_batch():
    model = _MaskedSeq().eval()
    T = Dim("T")
    args = (torch.randn(3, 5, 8), torch.randn(5, 5))
    for batch in (None, Dim("batch")):
        spec = ({**({0: batch} if batch else {}), 1: T}, {0: T, 1: T})
        result = check_program(export_program(model, args, dynamic_shapes=spec), model, args)
        # A static batch is run at its own size only: one check; a dynamic one at two.
        assert result.passed and len(result.input_shapes) == (2 if batch else 1), result
        assert all(s[1] != 5 for s in result.input_shapes), result.input_shapes
        if batch is None:  # a static batch stays at the example's
            assert all(s[0] == 3 for s in result.input_shapes)


def test_dynamic_dim_given_only_as_an_expression_is_varied():
    model, args = make_export_model(batch=(3, 6))
    half = Dim("half")
    ep = export_program(model, args, dynamic_shapes=({0: Dim("batch"), 1: 2 * half},))
    result = check_program(ep, model, args)
    assert result.passed and len(result.input_shapes) == 2, result
    assert all(s[1] != 6 and s[1] % 2 == 0 for s in result.input_shapes), result.input_shapes


# ---- nested and keyword inputs (example_kwargs) ---------------------------------------------------------
def test_nested_and_keyword_inputs_export_with_one_dynamic_batch():
    model = KeywordInputModel()
    args, kwargs = keyword_inputs(batch=3)
    ep = export_program(model, args, example_kwargs=kwargs)
    assert count_diag_nodes(ep.run_decompositions()) == 1
    (x, pair), kw = keyword_inputs(batch=5)
    with torch.no_grad():
        assert torch.equal(ep.module()(x, pair, **kw), model(x, pair, **kw))
    result = check_program(ep, model, args, example_kwargs=kwargs)
    assert result.passed and 3 not in result.batch_sizes, result


def test_check_feeds_each_nested_and_keyword_input_to_its_own_place():
    # The reference swaps the two nested tensors: a check that matched inputs by top-level position, or
    # dropped the keyword one, could not see that.
    args, kwargs = keyword_inputs()
    ep = export_program(KeywordInputModel(), args, example_kwargs=kwargs)
    with pytest.raises(ExportCheckError):
        check_program(ep, KeywordInputModel(swapped=True), args, example_kwargs=kwargs)


def test_keyword_inputs_take_a_dynamic_shapes_dict_by_parameter_name():
    args, kwargs = keyword_inputs(batch=4)
    b = Dim("batch")
    spec = {"x": {0: b}, "pair": [{0: b}, {0: b}], "mask": {0: b}}
    ep = export_program(KeywordInputModel(), args, example_kwargs=kwargs, dynamic_shapes=spec)
    assert check_program(ep, KeywordInputModel(), args, example_kwargs=kwargs).passed


def test_example_kwargs_must_be_a_dict_with_str_keys():
    args, _ = keyword_inputs()
    for bad in ([1], {0: torch.zeros(3, 6)}):
        with pytest.raises(TypeError, match="example_kwargs must be a dict"):
            export_program(KeywordInputModel(), args, example_kwargs=bad)


def test_input_names_follow_the_nesting():
    _, spec = flatten_inputs(*keyword_inputs())
    assert input_names(spec) == [
        "example_args[0]",
        "example_args[1][0]",
        "example_args[1][1]",
        "example_kwargs['mask']",
    ]


# ---- comparing outputs: a tolerance per output, non-finite entries position by position ------------------
class _MaskedLogits(nn.Module):
    """A diagonal layer's logits with the last two classes masked to ``-inf``: legitimately non-finite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = DiagLinear(8, 8, sparsity=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).masked_fill(torch.arange(8) >= 6, float("-inf"))


def _compare(model: nn.Module, artifact: object, x: torch.Tensor, eager: object = None, atol: float | None = None):
    """``compare_outputs`` of ``artifact`` (a callable standing in for an exported artifact) against ``eager``
    (default: ``model``) at batch sizes 2 and 5, default tolerances (or ``atol``)."""
    leaves, spec = flatten_inputs((x,))

    def run(*args: torch.Tensor, **kwargs: torch.Tensor) -> list[torch.Tensor]:
        return _flat_tensors(artifact(*args, **kwargs))

    reference = model if eager is None else _Call(eager)
    return compare_outputs("fake", run, reference, leaves, spec, (2, 5), atol, None, 0)


class _Call(nn.Module):
    """A function as the eager model of a comparison."""

    def __init__(self, fn: object) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> object:
        return self.fn(x)


def test_an_inf_in_an_output_does_not_make_any_artifact_pass():
    # One -inf used to make the tolerance (atol + rtol * max|eager|) infinite: a program off by 100 passed.
    model, args = _MaskedLogits().eval(), (torch.randn(3, 8),)
    assert check_program(export_program(model, args), model, args).passed
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.fc.bias.add_(100.0)
    result = check_program(export_program(wrong, args), model, args, raise_on_failure=False)
    assert not result.passed and math.isfinite(result.tolerance), result
    assert result.max_abs_diff == pytest.approx(100.0, rel=1e-4), result


class _TwoScales(nn.Module):
    """Two outputs of very different sizes: ``x * 1e4`` and a diagonal layer's ``fc(x)`` (about 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = DiagLinear(8, 8, sparsity=0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 1e4, self.fc(x)


def test_each_output_is_judged_at_its_own_scale():
    # The 1e4-sized output used to set the tolerance for both, hiding a 0.5 error in the unit-sized one.
    model, x = _TwoScales().eval(), torch.randn(3, 8)
    result = _compare(model, lambda x: (x * 1e4, model.fc(x) + 0.5), x)
    assert not result.passed and result.output == 1 and "in output 1" in str(result), result
    assert result.max_abs_diff == pytest.approx(0.5, rel=1e-4) and result.tolerance < 1e-2, result
    # 1e-2 on the large output is 1e-6 of its scale: within its own tolerance
    assert _compare(model, lambda x: (x * 1e4 + 1e-2, model.fc(x)), x).passed


class _WithIds(nn.Module):
    """A diagonal layer's output and integer ids of up to ~5e4."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = DiagLinear(8, 8, sparsity=0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), (x.abs() * 1e4).long()


def test_integer_outputs_must_match_exactly():
    # Ids of ~5e4 got a float tolerance scaled by their size (~0.5 and more): an artifact off by 3 ids could pass.
    model, x = _WithIds().eval(), torch.randn(3, 8)
    result = _compare(model, lambda x: (model(x)[0], model(x)[1] + 3), x)
    assert not result.passed and result.output == 1 and result.tolerance == 0.0, result
    assert _compare(model, model, x).passed
    # beyond 2**53, where float64 cannot tell 2**60 from 2**60 + 1
    big = lambda x: torch.full((x.shape[0],), 2**60, dtype=torch.int64)  # noqa: E731
    result = _compare(model, lambda x: (model(x)[0], big(x) + 1), x, eager=lambda x: (model(x)[0], big(x)))
    assert not result.passed and result.max_abs_diff == 1.0, result
    # an explicit atol is the caller's allowance for integers too (argmax near-ties in float16)
    assert _compare(model, lambda x: (model(x)[0], model(x)[1] + 3), x, atol=3.0).passed


def test_an_output_of_another_dtype_fails():
    # Values within tolerance in another dtype used to pass: a consumer would get float64 (or int32 ids).
    model, x = _WithIds().eval(), torch.randn(3, 8)
    with pytest.raises(ExportCheckError, match=r"output 0 has dtype torch.float64 .* eager torch.float32"):
        _compare(model, lambda x: (model(x)[0].double(), model(x)[1]), x)
    with pytest.raises(ExportCheckError, match=r"output 1 has dtype torch.int32 .* eager torch.int64"):
        _compare(model, lambda x: (model(x)[0], model(x)[1].int()), x)


class _SpecialValues(nn.Module):
    """A diagonal layer's output followed by a NaN, a +inf and a -inf column."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = DiagLinear(8, 8, sparsity=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        special = torch.tensor([float("nan"), float("inf"), float("-inf")]).expand(y.shape[0], 3)
        return torch.cat([y, special], 1)


def test_inf_and_nan_at_the_same_places_agree():
    # A fully masked attention row is NaN in eager and in a faithful artifact alike: that used to FAIL.
    model = _SpecialValues().eval()
    result = _compare(model, model, torch.randn(3, 8))
    assert result.passed and result.max_abs_diff == 0.0 and not result.nonfinite_mismatch, result


@pytest.mark.parametrize(
    ("corrupt", "eager", "artifact"),
    [
        (lambda y: y.roll(1, dims=1), "9.", "-inf"),  # the -inf moved onto a finite logit (near 100)
        (lambda y: y.nan_to_num(neginf=float("inf")), "-inf", "inf"),  # right place, wrong sign
        (lambda y: y.masked_fill(torch.isinf(y), float("nan")), "-inf", "nan"),  # right place, NaN
    ],
    ids=["moved", "sign", "nan"],
)
def test_inf_or_nan_at_other_places_fails_and_says_where(corrupt, eager, artifact):
    model = _MaskedLogits().eval()
    with torch.no_grad():
        model.fc.bias.fill_(100.0)  # finite logits near 100, so a moved -inf meets a known value

    def wrong(x: torch.Tensor) -> torch.Tensor:
        return corrupt(model(x))

    result = _compare(model, wrong, torch.randn(3, 8))
    text = str(result)
    assert not result.passed and result.nonfinite_mismatch, text
    assert "inf/NaN entries differ from eager's" in text and "first at input shape (2, 8), index (0, " in text, text
    assert f"eager {eager}" in text and f"artifact {artifact})" in text, text


# ---- empty batches and unbatched inputs -----------------------------------------------------------------
def test_an_empty_example_batch_with_a_dynamic_batch_is_a_clear_error():
    layer = DiagLinear(24, 40, sparsity=0.7)
    with pytest.raises(ValueError, match=r"example batch is empty.*cannot be exported with a dynamic batch.*non-empty"):
        export_program(layer, (torch.randn(0, 24),))


def test_a_check_that_compares_nothing_does_not_pass():
    # A static batch of 0 has only empty outputs: the check used to report OK having compared nothing.
    layer = DiagLinear(24, 40, sparsity=0.7).eval()
    args = (torch.randn(0, 24),)
    ep = export_program(layer, args, dynamic_batch=False)
    result = check_program(ep, layer, args, raise_on_failure=False)
    assert not result.passed and result.elements == 0, result
    assert "nothing compared" in str(result) and ": OK" not in str(result), result
    with pytest.raises(ExportCheckError, match="nothing compared.*NOT CHECKED"):
        check_program(ep, layer, args)


def test_a_static_1d_input_is_reported_by_its_shape_not_as_a_batch_size():
    # Its only dim is the feature dim (24): "at batch size 24" was wrong.
    layer = DiagLinear(24, 40, sparsity=0.7).eval()
    args = (torch.randn(24),)
    result = check_program(export_program(layer, args, dynamic_batch=False), layer, args)
    assert result.passed and "at input shape (24,): OK" in str(result) and "batch" not in str(result), result


def test_a_model_in_dynamic_sparse_training_is_refused_until_finalized(tmp_path):
    # Mid-DynaDiag, torch.export failed with GuardOnDataDependentSymNode and to_onnx advised model.float() for
    # a float32 model (its temperature buffer is float64), which did not help (user trial).
    from diagcompile.dst import DiagSparsifier, DSTConfig
    from diagcompile.export import to_onnx
    from diagcompile.testing import not_head, tiny_mlp

    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = DiagSparsifier(model, optimizer, DSTConfig(total_steps=10, sparsity=0.75), filter_fn=not_head)
    x = torch.randn(2, 16)
    expected = r"cannot export 'body.0': it is a DynaDiagLinear of dynamic sparse training .*finalize\(\) first"
    with pytest.raises(ValueError, match=expected):
        export_program(model, (x,))
    with pytest.raises(ValueError, match=expected):
        to_onnx(model, (x,), tmp_path / "m.onnx")
    for layer in sp.layers.values():  # frozen layers export as they are (they exported before the refusal)
        layer.freeze_()
    assert count_diag_nodes(export_program(model, (x,))) == 2
    sp.finalize()
    assert count_diag_nodes(export_program(model, (x,))) == 2

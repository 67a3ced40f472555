"""torch.export round trip: export_program / save / load / check_program."""

import copy
import json
import zipfile

import pytest
import torch
from torch import nn

from diagcompile import DiagLinear, DiagSparsityConfig, is_sparse_marked, sparsify_
from diagcompile.export import (
    ExportCheckError,
    NoDiagonalLayersWarning,
    check_program,
    export_program,
    load,
    save,
)
from diagcompile.export.program import count_diag_nodes
from diagcompile.marking import sync_marks
from diagcompile.testing import ExportTestModel, make_export_model, run_python

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

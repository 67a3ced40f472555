"""rewrite_exported / rewrite_exported_program: torch.export graphs (aten.linear on get_attr weights)."""

import pytest
import torch
from torch import nn
from torch.export import Dim

from diagcompile import mark_sparse
from diagcompile.passes import SparseRewriteError, rewrite_exported, rewrite_exported_program
from diagcompile.testing import masked_dense_copy

DIAG = torch.ops.diagcompile.diag_linear.default
LINEAR = torch.ops.aten.linear.default


def _count(graph: torch.fx.Graph, target: object) -> int:
    return sum(n.op == "call_function" and n.target is target for n in graph.nodes)


def _export(model: nn.Module, batch: int = 4) -> torch.export.ExportedProgram:
    return torch.export.export(model, (torch.randn(batch, 12),), dynamic_shapes={"x": {0: Dim("batch", max=256)}})


def test_program_counts_numerics_dynamic_batch(zoo):
    net = zoo.make_net()
    ref = masked_dense_copy(net)
    ep = _export(net)
    assert _count(ep.graph, LINEAR) == zoo.NET_SITES + 2

    new, report = rewrite_exported_program(ep)
    assert report.count == zoo.NET_SITES == _count(new.graph, DIAG)
    assert _count(new.graph, LINEAR) == 2  # the unmarked skips
    # The dense weights are gone from the program's state; values/offsets are lifted state.
    sd = new.state_dict
    assert not any(k.endswith(("fc1.weight", "fc2.weight", "head.w")) for k in sd)
    assert {"blocks.0.fc1.values", "blocks.0.fc1.offsets", "head.w_values"} <= set(sd) | set(new.constants)
    # The batch dim stays dynamic with the original range.
    (sym,) = {s for s in new.range_constraints}
    assert new.range_constraints[sym].upper == 256
    m = new.module()
    for batch in (1, 3, 7):
        x = torch.randn(batch, 12)
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def test_op_survives_decompositions(zoo):
    new, _ = rewrite_exported_program(_export(zoo.make_net()))
    dec = new.run_decompositions()
    assert _count(dec.graph, DIAG) == zoo.NET_SITES
    x = torch.randn(2, 12)
    torch.testing.assert_close(dec.module()(x), new.module()(x))


def test_unlifted_module_pass(zoo):
    net = zoo.make_net()
    gm, report = rewrite_exported(_export(net).module())
    assert report.count == zoo.NET_SITES and report.ir == "export"
    assert not hasattr(gm.get_submodule("blocks.0.fc1"), "weight")
    x = torch.randn(5, 12)
    torch.testing.assert_close(gm(x), masked_dense_copy(net)(x), rtol=1e-5, atol=1e-5)


def test_marked_linears_fed_by_marked_linears(zoo):
    """Back to back, through reshapes, and an output read twice (see the Chain model)."""
    net = zoo.make_chain()
    ep = torch.export.export(net, (torch.randn(3, 8),), dynamic_shapes={"x": {0: Dim("batch")}})
    new, report = rewrite_exported_program(ep)
    assert report.count == zoo.CHAIN_SITES == _count(new.graph, DIAG) and _count(new.graph, LINEAR) == 0
    x = torch.randn(5, 8)
    torch.testing.assert_close(new.module()(x), masked_dense_copy(net)(x), rtol=1e-5, atol=1e-5)


def test_tied_weights(zoo):
    net = zoo.make_tied()
    ep = torch.export.export(net, (torch.randn(3, 16),))
    new, report = rewrite_exported_program(ep)
    assert report.count == 2 and len(report.weights) == 1 and _count(new.graph, DIAG) == 2
    x = torch.randn(3, 16)
    torch.testing.assert_close(new.module()(x), masked_dense_copy(net)(x))


def test_nothing_marked_returns_the_same_program(zoo):
    ep = _export(zoo.make_net(mark=False))
    new, report = rewrite_exported_program(ep)
    assert new is ep and report.count == 0


def test_marked_weight_used_outside_linear_raises():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + self.fc.weight.sum()

    m = M()
    mark_sparse(m.fc, sparsity=0.5)
    with pytest.raises(SparseRewriteError, match=r"weight 'fc.weight' is marked sparse but node .*sum"):
        rewrite_exported_program(torch.export.export(m, (torch.randn(2, 8),)))


def test_type_errors():
    with pytest.raises(TypeError, match="ExportedProgram"):
        rewrite_exported_program(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ep.module"):
        rewrite_exported(nn.Linear(2, 2))


def test_a_program_exported_under_autocast_is_rewritten():
    """Autocast applied while exporting leaves linears of mixed input dtypes in the program; they are legal
    there (the dtype refusal is for Dynamo graphs, whose fake propagation lets eager errors through)."""
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    for i in (0, 2):
        mark_sparse(model[i], sparsity=0.5)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ep = torch.export.export(model, (x,))
        ref = masked_dense_copy(model)(x)
    gm, report = rewrite_exported(ep.module())
    assert report.count == 2
    torch.testing.assert_close(gm(x).float(), ref.float(), rtol=2e-2, atol=2e-2)

"""DynaDiagLinear: forward through the op on the active set, gradients of V and alpha, freeze/fold, compaction."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from diagcompile import DiagLinear
from diagcompile.dst import DynaDiagLinear
from diagcompile.dst.relax import threshold
from diagcompile.testing import dense_from_convention

SHAPES = [(16, 24), (24, 16), (12, 12), (7, 13)]


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _dense_weight(layer: DynaDiagLinear, scale: torch.Tensor) -> torch.Tensor:
    """W = sum_p scale_p V_p placed on candidate p's diagonal, built by the written convention."""
    v = (layer.values.detach().double() * scale.double()[:, None]).float()
    return dense_from_convention(v, layer.candidate_offsets, layer.out_features, layer.in_features).float()


@pytest.mark.parametrize("n_out,n_in", SHAPES)
def test_constant_alpha_start_is_the_density_scaled_dense_layer(n_out, n_in):
    lin = nn.Linear(n_in, n_out)
    P = max(n_out, n_in)
    layer = DynaDiagLinear.from_linear(lin, k=3, rescale_init=False)  # alpha = 1/P for all: alpha~ = k/P
    x = torch.randn(5, n_in)
    assert torch.allclose(layer(x), nn.functional.linear(x, lin.weight * (3 / P), lin.bias), atol=1e-5)
    assert layer.bias is lin.bias  # the same Parameter object: optimizer groups stay valid
    rescaled = DynaDiagLinear.from_linear(lin, k=3)
    assert torch.allclose(rescaled.values, layer.values * math.sqrt(P / 3))


@pytest.mark.parametrize("n_out,n_in", SHAPES)
def test_forward_goes_through_the_op_and_matches_the_relaxed_weight(n_out, n_in):
    lin = nn.Linear(n_in, n_out)
    layer = DynaDiagLinear.from_linear(lin, k=3, alpha_init_noise=1.0, temperature=0.2)
    x = torch.randn(2, 4, n_in)
    with _OpLog() as log:
        y = layer(x)
        y.square().sum().backward()
    assert "diagcompile.diag_linear.default" in log.ops and "diagcompile.diag_linear_dv.default" in log.ops
    assert not any("aten.mm" in o or "aten.addmm" in o for o in log.ops), "dense matmul in a DST forward"
    at = threshold(layer.alpha.detach(), 3, 0.2)
    active = (at > layer.active_eps) | torch.isin(torch.arange(at.numel()), layer.alpha.topk(3).indices)
    W = _dense_weight(layer, at * active)
    assert torch.allclose(y, nn.functional.linear(x, W, lin.bias), atol=1e-5)


@pytest.mark.parametrize("n_out,n_in", SHAPES)
def test_rms_soft_scale_starts_as_the_dense_layer_it_replaces(n_out, n_in):
    lin = nn.Linear(n_in, n_out)
    # alpha~ = k/P everywhere, values sqrt(P/k) * W's diagonals, g = sqrt(P/k): g * (k/P) * sqrt(P/k) = 1
    layer = DynaDiagLinear.from_linear(lin, k=3, alpha_init_noise=0.0, soft_scale="rms")
    x = torch.randn(5, n_in)
    assert torch.allclose(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    assert layer.soft_gain() == pytest.approx(math.sqrt(max(n_out, n_in) / 3))
    layer.freeze_()
    assert layer.soft_gain() == 1.0
    paper = DynaDiagLinear.from_linear(lin, k=3, alpha_init_noise=0.0)
    assert not torch.allclose(paper(x), lin(x), atol=1e-3)  # the paper's layer starts sqrt(P/k) too small


def test_rms_soft_scale_is_one_for_a_hard_topk_and_rejects_unknown_names():
    lin = nn.Linear(12, 12)
    hard = dict(k=3, alpha_init_noise=1.0, temperature=1e-4)
    torch.manual_seed(0)
    a = DynaDiagLinear.from_linear(lin, soft_scale="rms", **hard)
    torch.manual_seed(0)
    b = DynaDiagLinear.from_linear(lin, **hard)
    x = torch.randn(4, 12)
    assert torch.allclose(a(x), b(x), atol=1e-6)
    with pytest.raises(ValueError, match="soft_scale"):
        DynaDiagLinear.from_linear(lin, k=3, soft_scale="l2")


@pytest.mark.parametrize("soft_scale", ["none", "rms"])
def test_gradients_of_values_and_alpha_match_a_dense_autograd_reference(soft_scale):
    n_out, n_in, k, T = 10, 6, 3, 0.5
    lin = nn.Linear(n_in, n_out).double()
    layer = DynaDiagLinear.from_linear(
        lin, k=k, alpha_init_noise=0.5, temperature=T, active_eps=0.0, soft_scale=soft_scale
    )
    x = torch.randn(7, n_in, dtype=torch.float64)
    layer(x).sin().sum().backward()
    # Reference: the same function written densely, every candidate, autograd all the way.
    values = layer.values.detach().clone().requires_grad_(True)
    alpha = layer.alpha.detach().clone().requires_grad_(True)
    P = values.shape[0]
    at = threshold(alpha, k, T)
    if soft_scale == "rms":  # g = sqrt(k / sum(alpha~^2)), a constant for autograd
        at = at * torch.sqrt(k / at.detach().square().sum())
    D = min(n_out, n_in)
    W = torch.zeros(n_out, n_in, dtype=torch.float64)
    for p in range(P):
        # diagonal p, entry t sits at W[(t + p) % N_out, t] for this tall layer (the written convention)
        rows = torch.tensor([(t + p) % n_out for t in range(D)])
        W = W.index_put((rows, torch.arange(D)), values[p] * at[p], accumulate=True)
    nn.functional.linear(x, W, lin.bias).sin().sum().backward()
    assert torch.allclose(layer.values.grad, values.grad, atol=1e-10)
    assert torch.allclose(layer.alpha.grad, alpha.grad, atol=1e-10)


def test_inactive_candidates_get_no_value_gradient():
    layer = DynaDiagLinear.from_linear(nn.Linear(16, 16), k=2, alpha_init_noise=3.0, temperature=0.01)
    layer(torch.randn(4, 16)).sum().backward()
    at = layer.alpha_tilde().detach()
    inactive = at <= layer.active_eps
    inactive[layer.alpha.topk(2).indices] = False
    assert inactive.any()
    assert torch.count_nonzero(layer.values.grad[inactive]) == 0
    assert torch.count_nonzero(layer.values.grad[~inactive]) > 0


@pytest.mark.parametrize("soft_scale", ["none", "rms"])
@pytest.mark.parametrize("n_out,n_in", SHAPES)
def test_freeze_folds_alpha_so_the_output_does_not_move(n_out, n_in, soft_scale):
    layer = DynaDiagLinear.from_linear(
        nn.Linear(n_in, n_out), k=4, alpha_init_noise=1.0, temperature=1e-3, soft_scale=soft_scale
    )
    x = torch.randn(6, n_in)
    before = layer(x)
    keep = layer.freeze_()
    assert layer.frozen and keep.tolist() == sorted(layer.alpha.topk(4).indices.tolist())
    # At T=1e-3 only the top-k are active: the product alpha~ * V is the same float, summed in the same order.
    assert torch.equal(layer(x), before)
    compact = layer.to_diag_linear()
    assert isinstance(compact, DiagLinear) and compact.values.shape == (4, min(n_in, n_out))
    assert torch.equal(compact.offsets, layer.candidate_offsets[keep])
    assert torch.allclose(compact(x), before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("soft_scale", ["none", "rms"])
def test_freeze_at_high_temperature_drops_the_mass_outside_the_topk(soft_scale):
    n_out = n_in = 12
    layer = DynaDiagLinear.from_linear(
        nn.Linear(n_in, n_out), k=3, alpha_init_noise=0.1, temperature=1.0, active_eps=0.0, soft_scale=soft_scale
    )
    at = layer.alpha_tilde().detach()
    if soft_scale == "rms":  # the kept rows are folded with the gain the forward used, over all C candidates
        at = at * torch.sqrt(3 / at.square().sum())
        x0 = torch.randn(5, n_in)
        assert torch.allclose(layer(x0), nn.functional.linear(x0, _dense_weight(layer, at), layer.bias), atol=1e-6)
    keep = layer.alpha.topk(3).indices.sort().values
    expected = _dense_weight(layer, torch.zeros_like(at).index_copy(0, keep, at[keep]))
    x = torch.randn(5, n_in)
    layer.freeze_()
    assert torch.allclose(layer(x), nn.functional.linear(x, expected, layer.bias), atol=1e-6)


def test_after_freeze_alpha_gets_an_exactly_zero_gradient_and_paper_mode_does_not_fold():
    lin = nn.Linear(8, 8)
    layer = DynaDiagLinear.from_linear(lin, k=2, alpha_init_noise=1.0, temperature=0.5)
    values_before = layer.values.detach().clone()
    at = layer.alpha_tilde().detach()
    layer.freeze_(fold=False)
    assert torch.equal(layer.values, values_before)  # the paper: alpha~ := 1 on the top-k, V unchanged
    layer(torch.randn(3, 8)).sum().backward()
    assert torch.equal(layer.alpha.grad, torch.zeros(8))
    assert torch.count_nonzero(layer.values.grad[layer.keep_idx]) > 0
    assert torch.equal(layer.alpha_tilde(), torch.zeros(8).index_fill_(0, layer.keep_idx, 1.0))
    assert at.sum() == pytest.approx(2, rel=1e-6)


def test_pool_layer_and_state_dict_restores_frozen():
    lin = nn.Linear(20, 10)
    cand = torch.tensor([17, 3, 9, 0, 12])
    layer = DynaDiagLinear.from_linear(lin, k=2, candidate_offsets=cand)
    assert layer.is_pool and layer.candidate_offsets.tolist() == [0, 3, 9, 12, 17]
    assert layer.values.shape == (5, 10) and layer.alpha.shape == (5,)
    layer.freeze_()
    other = DynaDiagLinear.from_linear(nn.Linear(20, 10), k=2, candidate_offsets=cand)
    other.load_state_dict(layer.state_dict())
    assert other.frozen and torch.equal(other.keep_idx, layer.keep_idx)
    x = torch.randn(3, 20)
    assert torch.equal(other(x), layer(x))
    assert "pool=5" in repr(layer) and "frozen=True" in repr(layer)


def test_a_copy_given_a_frozen_layer_s_buffers_computes_the_frozen_function():
    # A copy made before the freeze (an EMA or SWA model) whose buffers are then copy_'d from the frozen layer
    # (AveragedModel(use_buffers=False) does this every update) kept computing the soft relaxation.
    layer = DynaDiagLinear.from_linear(nn.Linear(12, 8), k=3, temperature=0.5)
    copy = DynaDiagLinear.from_linear(nn.Linear(12, 8), k=3, temperature=0.5)
    layer.freeze_()
    with torch.no_grad():
        for a, b in [*zip(copy.parameters(), layer.parameters()), *zip(copy.buffers(), layer.buffers())]:
            a.copy_(b)
    x = torch.randn(4, 12)
    assert copy.frozen and "frozen=True" in repr(copy)
    assert torch.equal(copy(x), layer(x))
    with torch.no_grad():
        copy.frozen_flag.zero_()  # and back: the soft layer again
    assert not copy.frozen and not torch.equal(copy(x), layer(x))


def test_a_compiled_copy_follows_its_written_buffers_after_eval():
    # Under torch.compile the forward reads the Python mirror (Dynamo guards on it), not the buffer: after an
    # EMA-style buffer copy, model.eval() re-reads the buffer, and the guard recompiles (review).
    layer = DynaDiagLinear.from_linear(nn.Linear(12, 8), k=3, temperature=0.5)
    copy = DynaDiagLinear.from_linear(nn.Linear(12, 8), k=3, temperature=0.5)
    compiled = torch.compile(copy, backend="eager")
    x = torch.randn(4, 12)
    compiled(x)  # compiled while soft
    layer.freeze_()
    with torch.no_grad():
        for a, b in [*zip(copy.parameters(), layer.parameters()), *zip(copy.buffers(), layer.buffers())]:
            a.copy_(b)
    copy.eval()
    assert torch.equal(compiled(x), layer(x))


def test_a_pickle_from_before_the_frozen_property_loads():
    # Whole-model pickles of the previous version hold a plain "_frozen" attribute and no mirror fields.
    layer = DynaDiagLinear.from_linear(nn.Linear(12, 8), k=3)
    layer.freeze_()
    state = layer.__getstate__().copy()
    del state["_frozen_mirror"], state["_frozen_seen"]
    state["_frozen"] = True
    old = DynaDiagLinear.__new__(DynaDiagLinear)
    old.__setstate__(state)
    x = torch.randn(2, 12)
    assert old.frozen and torch.equal(old(x), layer(x))


def test_bad_arguments():
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="k="):
        DynaDiagLinear.from_linear(lin, k=9)
    with pytest.raises(ValueError, match="distinct"):
        DynaDiagLinear.from_linear(lin, k=1, candidate_offsets=torch.tensor([1, 1, 2]))
    with pytest.raises(ValueError, match="relaxation"):
        DynaDiagLinear.from_linear(lin, k=1, relaxation="gumbel")
    layer = DynaDiagLinear.from_linear(lin, k=1)
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="freeze_"):
        layer.to_diag_linear()
    with pytest.raises(ValueError, match="temperature"):
        layer.set_temperature(0.0)

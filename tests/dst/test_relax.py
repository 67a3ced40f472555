"""Relaxed top-k: threshold keeps sum = k at every temperature (with the implicit-tau gradient);
softmax_clamp (the paper's Eq. 5) collapses at low temperature."""

import math

import pytest
import torch

from diagcompile.dst.relax import boundary_alpha, hard_topk, softmax_clamp, threshold, threshold_tau


@pytest.mark.parametrize("C,k", [(768, 77), (128, 1), (128, 127), (13, 5), (3072, 308)])
@pytest.mark.parametrize("T", [1e-4, 1e-2, 0.3, 1.0, 10.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_sums_to_k_at_any_temperature(C, k, T, dtype):
    g = torch.Generator().manual_seed(C + k)
    alpha = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    at = threshold(alpha, k, T)
    assert at.dtype == dtype and at.shape == (C,)
    assert ((at >= 0) & (at <= 1)).all()
    assert float(at.double().sum()) == pytest.approx(k, rel=1e-6)


def test_threshold_limits_hard_topk_and_uniform():
    g = torch.Generator().manual_seed(0)
    alpha = torch.randn(200, generator=g, dtype=torch.float64)
    k = 20
    hard = torch.zeros(200, dtype=torch.float64)
    hard[alpha.topk(k).indices] = 1.0
    assert torch.allclose(threshold(alpha, k, 1e-6), hard, atol=1e-9)  # T -> 0: the top-k indicator
    assert torch.allclose(threshold(alpha, k, 1e6), torch.full_like(alpha, k / 200), atol=1e-6)  # T -> inf
    # all equal: exactly k / C each (the paper's constant init)
    assert torch.allclose(threshold(torch.full((50,), 0.02), 5, 0.5), torch.full((50,), 0.1), atol=1e-7)


def test_threshold_is_shift_invariant_and_order_preserving():
    alpha = torch.randn(64, dtype=torch.float64)
    a, b = threshold(alpha, 7, 0.3), threshold(alpha + 3.25, 7, 0.3)
    assert torch.allclose(a, b, atol=1e-10)
    order = alpha.argsort()
    assert (a[order].diff() >= 0).all()


def test_threshold_gradient_is_the_implicit_function_gradient():
    # gradcheck against finite differences of the full map alpha -> alpha~ (tau re-solved each time).
    alpha = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: threshold(a, 4, 0.7), (alpha,), eps=1e-6, atol=1e-6)


def test_threshold_gradient_preserves_the_sum():
    # sum(alpha~) == k for every alpha, so its gradient is exactly zero; a detached tau would not give that.
    alpha = torch.randn(100, dtype=torch.float64, requires_grad=True)
    threshold(alpha, 10, 0.5).sum().backward()
    assert alpha.grad.abs().max() < 1e-12
    alpha.grad = None
    w = torch.randn(100, dtype=torch.float64)
    (threshold(alpha, 10, 0.5) * w).sum().backward()
    assert alpha.grad.abs().max() > 1e-3  # but it is not the zero map


def test_threshold_k_equals_C_is_all_ones_with_zero_gradient():
    alpha = torch.randn(9, requires_grad=True)
    at = threshold(alpha, 9, 0.1)
    assert torch.equal(at, torch.ones(9))
    at.sum().backward()
    assert torch.equal(alpha.grad, torch.zeros(9))
    assert threshold_tau(alpha, 9, 0.1) == -math.inf


def test_tau_is_a_deterministic_function_of_its_inputs():
    alpha = torch.randn(3000)
    taus = {threshold_tau(alpha, 300, 0.05) for _ in range(3)}
    assert len(taus) == 1


def test_softmax_clamp_matches_eq5_and_collapses_at_low_temperature():
    # The documented failure mode (research/dynadiag.md section 2.3): P=768, k=77, alpha with spread (std) 1:
    # at T=0.1 about 20-30 diagonals > 0.01 and sum ~10; at T=0.05 sum ~3-4; towards top-1 as T -> 0.
    P, k = 768, 77
    g = torch.Generator().manual_seed(0)
    alpha = torch.randn(P, generator=g, dtype=torch.float64)
    for T in (1.0, 0.1, 0.05, 0.01):
        sc = softmax_clamp(alpha, k, T)
        ref = torch.clamp(k * torch.exp(alpha / T) / torch.exp(alpha / T).sum(), max=1.0)  # Eq. 5 written out
        assert torch.allclose(sc, ref, rtol=1e-12)
    high, low = softmax_clamp(alpha, k, 1.0), softmax_clamp(alpha, k, 0.05)
    assert float(high.sum()) == pytest.approx(k, rel=1e-2)  # (almost) nothing clamped: sums to ~k
    assert float(low.sum()) < 0.1 * k, "collapse: the relaxation keeps far fewer than k diagonals"
    assert int((low > 0.01).sum()) < k // 4
    assert float(softmax_clamp(alpha, k, 0.01).sum()) < 1.1  # top-1
    # while the threshold relaxation at the same temperature still holds exactly k
    assert float(threshold(alpha, k, 0.05).sum()) == pytest.approx(k, rel=1e-9)


def test_hard_topk_is_deterministic_on_ties():
    alpha = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1, 0.5])
    assert hard_topk(alpha, 3).tolist() == [0, 1, 3]  # the tie at 0.5 goes to the smaller index
    assert hard_topk(alpha, 1).tolist() == [1]


def test_boundary_alpha_gives_half():
    alpha = torch.randn(50, dtype=torch.float64)
    tau = boundary_alpha("threshold", alpha, 5, 0.2)
    assert tau == pytest.approx(threshold_tau(alpha, 5, 0.2))
    a = boundary_alpha("softmax_clamp", alpha, 5, 0.2)
    assert 5 * math.exp(a / 0.2) / float(torch.exp(alpha / 0.2).sum()) == pytest.approx(0.5)

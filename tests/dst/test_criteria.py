"""Probe scores and the drop/grow and pool-refresh rules, on hand-made cases."""

import pytest
import torch
from torch import nn

from diagcompile.dst.criteria import drop_grow, probe_dv, probe_scores, refresh_pool, row_sources
from diagcompile.testing import dense_from_convention


@pytest.mark.parametrize("n_out,n_in", [(16, 24), (24, 16), (12, 12), (7, 13)])
def test_probe_is_the_dense_weight_gradient_read_along_every_diagonal(n_out, n_in):
    # The probe of candidate p must be dL/dW of a *dense* layer on the same batch, at the entries of diagonal p.
    lin = nn.Linear(n_in, n_out).double()
    x = torch.randn(5, 3, n_in, dtype=torch.float64)
    target = torch.randn(5, 3, n_out, dtype=torch.float64)
    y = lin(x)
    y.retain_grad()
    ((y - target) ** 2).sum().backward()
    P, D = max(n_out, n_in), min(n_out, n_in)
    dv = probe_dv(y.grad, x, P)
    assert dv.shape == (P, D)
    # Independent check: place each probe row on its diagonal by the written convention and compare.
    for p in range(P):
        mask = dense_from_convention(torch.ones(1, D), [p], n_out, n_in).bool()
        placed = dense_from_convention(dv[p : p + 1], [p], n_out, n_in)
        assert torch.allclose(placed[mask], lin.weight.grad[mask], atol=1e-12)
    assert torch.allclose(probe_scores(dv), dv.float().norm(dim=1))


def test_probe_of_mixed_dtypes_is_computed_in_the_wider_one():
    # Under autocast a layer sees a float32 input and gets a bfloat16 output gradient.
    x, dy = torch.randn(6, 12), torch.randn(6, 8).bfloat16()
    dv = probe_dv(dy, x, 12)
    assert dv.dtype == torch.float32
    torch.testing.assert_close(dv, probe_dv(dy.float(), x, 12))


def test_drop_grow_hand_case():
    offsets = torch.tensor([0, 3, 5, 7], dtype=torch.int32)
    norms = torch.tensor([0.1, 5.0, 0.2, 3.0])  # 0 and 5 are the weakest
    scores = torch.zeros(10)
    scores[5], scores[9], scores[1] = 10.0, 8.0, 1.0  # 5 (just dropped) and 9 are the strongest non-kept
    new, src = drop_grow(offsets, norms, scores, 2)
    assert new.tolist() == [3, 5, 7, 9]
    # 3 -> old row 1, 5 regrown -> keeps old row 2 (RigL keeps a dropped-and-regrown weight), 7 -> 3, 9 is new
    assert src.tolist() == [1, 2, 3, -1]
    assert new.dtype == torch.int32


def test_drop_grow_ties_and_extremes():
    offsets = torch.tensor([1, 2, 4], dtype=torch.int32)
    new, src = drop_grow(offsets, torch.ones(3), torch.zeros(6), 1)
    # equal norms: the smaller row (offset 1) drops; equal scores: the smallest free offset (0) grows
    assert new.tolist() == [0, 2, 4] and src.tolist() == [-1, 1, 2]
    new, src = drop_grow(offsets, torch.rand(3), torch.rand(6), 0)
    assert new.tolist() == [1, 2, 4] and src.tolist() == [0, 1, 2]
    new, _ = drop_grow(offsets, torch.rand(3), torch.arange(6.0), 3)  # replace all: top-3 scores
    assert new.tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="n="):
        drop_grow(offsets, torch.rand(3), torch.rand(6), 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_refused(bad):
    # All-NaN scores (a GradScaler-skipped step) grew offsets that were already kept: [5, 5, 7, 7].
    offsets, scores = torch.tensor([0, 3, 5, 7], dtype=torch.int32), torch.full((10,), bad)
    with pytest.raises(ValueError, match="probe scores must be finite"):
        drop_grow(offsets, torch.tensor([0.1, 5.0, 0.2, 3.0]), scores, 2)
    with pytest.raises(ValueError, match="probe scores must be finite"):
        refresh_pool(offsets, torch.tensor([3.0, 2.0, 1.0, 0.5]), 2, scores, 1)


def test_refresh_pool_keeps_the_topk_and_swaps_the_weakest_others():
    cand = torch.tensor([0, 2, 4, 6, 8, 10], dtype=torch.int32)
    alpha = torch.tensor([0.9, 0.1, 0.8, 0.2, -1.0, 0.3])  # k=2 -> top-k rows 0, 2 (offsets 0, 4)
    scores = torch.zeros(12)
    scores[0] = 100.0  # a member: not eligible to enter
    scores[11], scores[5], scores[7] = 9.0, 7.0, 1.0
    new, src = refresh_pool(cand, alpha, 2, scores, 2)
    # leave: the 2 weakest non-top-k members: offsets 8 (alpha -1) and 2 (0.1); enter: 11, 5
    assert new.tolist() == [0, 4, 5, 6, 10, 11]
    assert src.tolist() == [0, 2, -1, 3, 5, -1]
    with pytest.raises(ValueError, match="C - k"):
        refresh_pool(cand, alpha, 2, scores, 5)


def test_refresh_pool_caps_swaps_at_the_number_of_non_members():
    cand = torch.tensor([0, 1, 2], dtype=torch.int32)
    new, src = refresh_pool(cand, torch.tensor([3.0, 2.0, 1.0]), 1, torch.arange(4.0), 2)
    assert new.tolist() == [0, 1, 3] and src.tolist() == [0, 1, -1]


def test_row_sources():
    assert row_sources(torch.tensor([2, 5, 9]), torch.tensor([1, 5, 9]), 10).tolist() == [-1, 1, 2]

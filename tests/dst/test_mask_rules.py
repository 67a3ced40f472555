"""The pure mask rules of the baselines, each against an independent (loop-based or closed-form) construction."""

import math

import pytest
import torch

from diagcompile.dst.mask_rules import (
    choose_nm,
    erk_nnz,
    frame_at,
    mask_decay_beta,
    nm_mask,
    random_fan_in_mask,
    random_mask,
    rigl_drop_grow,
    srigl_fan_in,
    srigl_update,
    structure_decay_frames,
)


# ----------------------------------------------------------------------------------------------------
# Budgets and initial masks
# ----------------------------------------------------------------------------------------------------
def test_erk_densities_are_proportional_to_the_er_ratio_and_fit_the_budget():
    shapes = [(128, 64), (128, 128), (10, 128)]
    budgets = [832, 1664, 130]
    nnz = erk_nnz(shapes, budgets)
    assert sum(nnz) <= sum(budgets) and sum(nnz) >= sum(budgets) - len(shapes)
    dens = [n / (o * i) for n, (o, i) in zip(nnz, shapes)]
    ratio = [(o + i) / (o * i) for o, i in shapes]
    eps = [d / r for d, r in zip(dens, ratio)]
    assert max(eps) - min(eps) < 2e-3 * max(eps), "density / ER ratio must be one constant eps"
    assert dens[2] > dens[1], "the narrow head gets a higher density than the square layer"


def test_erk_makes_a_layer_dense_when_its_density_would_exceed_one():
    shapes = [(4, 4), (256, 256)]  # the tiny layer's ER ratio is 32x larger
    budgets = [8, 0.3 * 65536]
    budgets = [int(b) for b in budgets]
    nnz = erk_nnz(shapes, budgets)
    assert nnz[0] == 16, "the tiny layer is dense"
    assert nnz[1] == math.floor(sum(budgets) - 16), "the rest of the budget goes to the other layer"
    with pytest.raises(ValueError, match="budgets"):
        erk_nnz(shapes, [1])


def test_erk_power_zero_is_uniform_density():
    shapes = [(32, 16), (64, 64)]
    nnz = erk_nnz(shapes, [100, 800], power=0.0)
    d = [n / (o * i) for n, (o, i) in zip(nnz, shapes)]
    assert abs(d[0] - d[1]) < 1e-3


def test_random_masks_have_the_exact_counts_and_follow_the_generator():
    m = random_mask(7, 11, 23, torch.Generator().manual_seed(1))
    assert m.shape == (7, 11) and int(m.sum()) == 23
    assert torch.equal(m, random_mask(7, 11, 23, torch.Generator().manual_seed(1)))
    assert not torch.equal(m, random_mask(7, 11, 23, torch.Generator().manual_seed(2)))
    f = random_fan_in_mask(9, 13, 4, torch.Generator().manual_seed(0))
    assert f.sum(1).tolist() == [4] * 9
    assert len({tuple(r.nonzero().squeeze(1).tolist()) for r in f}) > 1, "rows draw independently"
    with pytest.raises(ValueError):
        random_mask(2, 2, 5)
    with pytest.raises(ValueError):
        random_fan_in_mask(2, 2, 3)


# ----------------------------------------------------------------------------------------------------
# RigL
# ----------------------------------------------------------------------------------------------------
def _rigl_loop(mask, w, g, n):
    """Independent RigL reference: python lists, explicit ranking with index tie-break."""
    flat_m, flat_w, flat_g = mask.flatten().tolist(), w.abs().flatten().tolist(), g.abs().flatten().tolist()
    active = [i for i, a in enumerate(flat_m) if a]
    active.sort(key=lambda i: (flat_w[i], -i))  # weakest first; among equal |W| the larger index drops first
    kept = set(active[n:])
    cand = [i for i in range(len(flat_m)) if i not in kept]
    cand.sort(key=lambda i: (-flat_g[i], i))
    new = kept | set(cand[:n])
    return torch.tensor([i in new for i in range(len(flat_m))]).view(mask.shape)


@pytest.mark.parametrize("seed", range(5))
def test_rigl_drop_grow_matches_a_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(6, 10, 20, g)
    w = torch.randn(6, 10, generator=g) * mask
    grad = torch.randn(6, 10, generator=g)
    for n in (0, 1, 7, 20):
        new = rigl_drop_grow(mask, w, grad, n)
        assert int(new.sum()) == 20
        assert torch.equal(new, _rigl_loop(mask, w, grad, n)), n


def test_rigl_regrows_a_just_dropped_weight_with_a_large_gradient():
    mask = torch.tensor([[True, True, False, False]])
    w = torch.tensor([[0.1, 2.0, 0.0, 0.0]])
    grad = torch.tensor([[9.0, 0.0, 1.0, 0.5]])
    new = rigl_drop_grow(mask, w, grad, 1)
    assert new.tolist() == [[True, True, False, False]], "dropped position 0 has the largest gradient: regrown"
    with pytest.raises(ValueError, match="n=3"):
        rigl_drop_grow(mask, w, grad, 3)


# ----------------------------------------------------------------------------------------------------
# SRigL
# ----------------------------------------------------------------------------------------------------
def _setup(n_out=8, n_in=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = random_fan_in_mask(n_out, n_in, k, g)
    w = (torch.randn(n_out, n_in, generator=g).abs() + 0.5) * mask
    grad = torch.randn(n_out, n_in, generator=g)
    return mask, w, grad


@pytest.mark.parametrize("seed", range(4))
def test_srigl_keeps_a_constant_fan_in_without_ablation(seed):
    mask, w, grad = _setup(seed=seed)
    dec = srigl_update(mask, w, grad, fraction=0.3, target_nnz=32, gamma_sal=0.3, ablation=False)
    assert dec.k == 4 and not dec.ablated.any() and dec.theta == 0
    assert dec.mask.sum(1).tolist() == [4] * 8


def test_srigl_ablates_a_neuron_without_salient_weights_and_raises_the_fan_in():
    mask, w, grad = _setup()
    w[3] *= 1e-6  # neuron 3: tiny weights and no gradient: nothing salient
    grad[3] = 0
    dec = srigl_update(mask, w, grad, fraction=0.3, target_nnz=32, gamma_sal=0.3, ablation=True)
    assert dec.ablated.tolist() == [i == 3 for i in range(8)]
    assert dec.k == srigl_fan_in(32, 12, 7) == 4  # floor(32 / 7)
    assert int(dec.mask[3].sum()) == 0
    assert dec.mask[~dec.ablated].sum(1).tolist() == [dec.k] * 7
    # with a larger budget per neuron the freed weights raise the fan-in
    mask, w, grad = _setup(k=6)
    w[[1, 5]] *= 1e-6
    grad[[1, 5]] = 0
    dec = srigl_update(mask, w, grad, fraction=0.3, target_nnz=48, gamma_sal=0.3, ablation=True)
    assert dec.ablated.sum() == 2 and dec.k == 8
    assert dec.mask[~dec.ablated].sum(1).tolist() == [8] * 6


def test_srigl_safeguard_keeps_enough_neurons_for_the_budget():
    mask, w, grad = _setup()
    # threshold 100 salient weights per neuron: everything would go; the safeguard keeps ceil(32 / 12) = 3.
    dec = srigl_update(mask, w, grad, fraction=0.3, target_nnz=32, gamma_sal=100.0, ablation=True)
    alive = int((~dec.ablated).sum())
    assert alive >= 3 and dec.k == min(12, 32 // alive) and dec.k <= 12
    assert dec.mask[~dec.ablated].sum(1).tolist() == [dec.k] * alive


def test_srigl_truncation_keeps_the_largest_weights_of_a_row():
    # One neuron, 6 inputs; 5 active; fraction 0 (nothing pruned globally); a budget of 3: truncate to the 3
    # largest |W| (the reference would keep arbitrary survivors), grow nothing.
    mask = torch.tensor([[True, True, True, True, True, False]])
    w = torch.tensor([[0.5, 3.0, 0.1, 2.0, 1.0, 0.0]])
    grad = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    dec = srigl_update(mask, w, grad, fraction=0.0, target_nnz=3, gamma_sal=0.3, ablation=False)
    assert dec.mask.tolist() == [[False, True, False, True, True, False]]


def test_srigl_grows_by_gradient_and_prunes_by_magnitude():
    mask = torch.tensor([[True, True, True, False, False, False]])
    w = torch.tensor([[0.2, 3.0, 2.0, 0.0, 0.0, 0.0]])
    grad = torch.tensor([[0.0, 0.0, 0.0, 0.1, 7.0, 0.3]])
    dec = srigl_update(mask, w, grad, fraction=0.34, target_nnz=3, gamma_sal=0.3, ablation=False)
    # n_prune = floor(0.34 * 3) = 1: input 0 (smallest |W|) goes, input 4 (largest |G|) comes.
    assert dec.mask.tolist() == [[False, True, True, False, True, False]]


# ----------------------------------------------------------------------------------------------------
# N:M
# ----------------------------------------------------------------------------------------------------
def test_nm_mask_keeps_the_n_largest_of_every_group():
    w = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
    for n, m in [(1, 4), (2, 4), (3, 8), (5, 6), (4, 4)]:
        mask = nm_mask(w, n, m)
        groups = mask.view(5, 24 // m, m)
        assert (groups.sum(-1) == n).all()
        aw = w.abs().view(5, 24 // m, m)
        kept_min = torch.where(groups, aw, torch.inf).amin(-1)
        dropped_max = torch.where(groups, -torch.inf, aw).amax(-1)
        assert (kept_min >= dropped_max).all()
    ties = torch.ones(2, 8)
    assert nm_mask(ties, 2, 4).tolist() == [[True, True, False, False] * 2] * 2, "ties go to the earlier input"
    with pytest.raises(ValueError, match="fan-in"):
        nm_mask(w, 1, 5)


def test_choose_nm_picks_the_closest_density_among_divisors():
    assert choose_nm(64, 832 / 8192) == (3, 32)  # 90% in diagonal units on a 128x64 layer
    assert choose_nm(768, 0.1) == (3, 32)
    assert choose_nm(60, 0.1) == (1, 10)
    assert choose_nm(16, 0.125) == (1, 8), "1:8 and 2:16 tie: the smaller M wins"
    assert choose_nm(64, 0.5) == (1, 2)
    assert choose_nm(64, 0.1, m=16) == (2, 16)
    assert choose_nm(64, 0.001, m=4) == (1, 4), "N is at least 1"
    for n_in, d in [(64, 0.1), (96, 0.27), (120, 0.05)]:
        n, m = choose_nm(n_in, d)
        best = min(abs(max(1, round(d * c)) / c - d) for c in range(2, 33) if n_in % c == 0)
        assert abs(n / m - d) <= best + 1e-12 and n_in % m == 0
    with pytest.raises(ValueError, match="divide"):
        choose_nm(64, 0.1, m=5)
    with pytest.raises(ValueError, match="nm_m"):
        choose_nm(37, 0.1)
    with pytest.raises(ValueError, match="at least 2"):
        choose_nm(1, 0.5)


def test_choose_nm_without_a_divisor_gives_advice_that_can_work():
    # it said "pass nm_m explicitly", but an explicit nm_m must divide the fan-in too: no help for a prime one
    with pytest.raises(ValueError) as e:
        choose_nm(37, 0.1)
    msg = str(e.value)
    assert "no N:M group size M in [2, 32] divides the fan-in 37" in msg and "explicit nm_m must divide it too" in msg
    assert "exclude it (filter_fn) or change its fan-in" in msg and "nm_max_m" not in msg
    with pytest.raises(ValueError, match=r"change its fan-in, or allow groups of 37 with nm_max_m=37"):
        choose_nm(37 * 41, 0.1)  # a larger group does divide this one
    assert choose_nm(37 * 41, 0.1, max_m=37)[1] == 37


def test_structure_decay_frames_halve_down_to_the_target():
    assert structure_decay_frames(1, 8) == [7, 4, 2, 1]
    assert structure_decay_frames(2, 4) == [3, 2]
    assert structure_decay_frames(1, 4) == [3, 2, 1]
    assert structure_decay_frames(3, 32) == [31, 16, 8, 4, 3]
    assert structure_decay_frames(1, 2) == [1]
    assert structure_decay_frames(4, 4) == [4]
    for n, m in [(1, 16), (3, 10), (5, 24), (2, 3)]:
        f = structure_decay_frames(n, m)
        assert f[-1] == n and all(a > b for a, b in zip(f, f[1:])) and f[0] <= m - 1


def test_frames_are_equal_parts_of_the_window():
    idx = [frame_at(t, 4, 40) for t in range(50)]
    assert idx == [t // 10 for t in range(40)] + [3] * 10
    assert frame_at(0, 3, 0) == 2


def test_mask_decay_beta():
    c, end = 0.1, 50
    assert mask_decay_beta(0, "exponential", c, end) == 1.0
    assert mask_decay_beta(7, "exponential", c, end) == pytest.approx(math.exp(-0.7))
    assert mask_decay_beta(50, "exponential", c, end) == 0.0
    assert mask_decay_beta(4, "linear", c, end) == pytest.approx(0.6)
    assert mask_decay_beta(20, "linear", c, end) == 0.0
    with pytest.raises(ValueError):
        mask_decay_beta(1, "cosine", c, end)

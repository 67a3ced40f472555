"""The representation and the reference math against an independent, entry-by-entry construction."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diagcompile.ops import reference as R
from diagcompile.testing import LAYER_SHAPES, dense_from_convention, random_offsets, random_problem, rel_err


@pytest.mark.parametrize("n_out,n_in", LAYER_SHAPES + [(6, 4), (4, 6), (12, 8)])
def test_candidates_tile_the_matrix_exactly_once(n_out, n_in):
    P, D = R.diag_shape(n_out, n_in)
    rows, cols = R.diagonal_indices(n_out, n_in, torch.arange(P))
    flat = rows * n_in + cols
    assert P * D == n_out * n_in
    assert torch.equal(flat.flatten().sort().values, torch.arange(n_out * n_in))


@pytest.mark.parametrize("n_out,n_in", LAYER_SHAPES)
def test_to_dense_matches_the_written_convention(n_out, n_in):
    P, D = R.diag_shape(n_out, n_in)
    for k in sorted({1, max(1, P // 2), P}):
        _, values, offsets, _ = random_problem(n_out, n_in, k, dtype=torch.float64)
        W = R.to_dense(values, offsets, n_out, n_in)
        assert torch.equal(W, dense_from_convention(values, offsets, n_out, n_in))
        assert torch.equal(R.extract_diagonals(W, offsets), values)
        assert int((W != 0).sum()) == k * D  # random normals are never exactly zero


def test_only_the_longer_side_wraps():
    # wide 2x5, offset 4: W[0, 4], W[1, 0] (column wraps); tall 5x2 offset 4: W[4, 0], W[0, 1] (row wraps)
    v = torch.tensor([[1.0, 2.0]])
    wide = R.to_dense(v, torch.tensor([4]), 2, 5)
    assert wide[0, 4] == 1 and wide[1, 0] == 2
    tall = R.to_dense(v, torch.tensor([4]), 5, 2)
    assert tall[4, 0] == 1 and tall[0, 1] == 2


@pytest.mark.parametrize(
    "n_out,n_in,s,k",
    [
        (768, 768, 0.9, 77),
        (2304, 768, 0.9, 231),
        (3072, 768, 0.9, 308),
        (768, 3072, 0.9, 308),
        (3072, 768, 0.99, 31),
        (4096, 1024, 0.5, 2048),
        (256, 784, 0.5, 392),
        (5, 1, 0.0, 5),
    ],
)
def test_k_from_sparsity_matches_the_formula_and_the_papers_table(n_out, n_in, s, k):
    P, D = R.diag_shape(n_out, n_in)
    assert R.k_from_sparsity(n_out, n_in, s) == k == max(1, math.ceil(math.floor((1 - s) * n_out * n_in) / D))
    assert k / P >= 1 - s - 1e-12  # realised density is at or above the target


@pytest.mark.parametrize(
    "n_out,n_in,s",
    [
        (n_out, n_in, s)
        for n_out, n_in in [(1, 10), (1, 50), (5, 16), (5, 256), (3, 7), (10, 10), (768, 3072)]
        for s in [0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
        if s <= R.max_sparsity(n_out, n_in)
    ],
)
def test_k_from_sparsity_is_exact_for_decimal_sparsities(n_out, n_in, s):
    # 1 - 0.8 is 0.19999999999999996 in binary: the plain floor drops a weight (1x10 at 0.8 gave k=1, 90%).
    P, D = R.diag_shape(n_out, n_in)
    kept = (1 - Fraction(str(s))) * n_out * n_in  # exact decimal arithmetic
    assert R.kept_entries(n_out * n_in, s) == math.floor(kept)
    assert R.k_from_sparsity(n_out, n_in, s) == min(P, max(1, math.ceil(math.floor(kept) / D)))


def test_k_from_sparsity_limits():
    assert R.k_from_sparsity(16, 8, R.max_sparsity(16, 8)) == 1
    # The largest sparsity written in float32 rounds above 1 - 1/P; it still means one diagonal.
    import numpy as np

    assert R.k_from_sparsity(100, 100, np.float32(0.99)) == 1 and R.k_from_sparsity(5, 5, np.float32(0.8)) == 1
    for bad in (-0.1, 1.0, R.max_sparsity(16, 8) + 1e-6, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            R.k_from_sparsity(16, 8, bad)
    with pytest.raises(TypeError):
        R.k_from_sparsity(16, 8, "0.5")


def test_topk_offsets_keeps_the_largest_norm_diagonals_sorted():
    n_out, n_in = 6, 9
    W = torch.randn(n_out, n_in)
    norms = torch.tensor(
        [dense_from_convention(torch.ones(1, 6), [p], n_out, n_in).bool().mul(W).norm() for p in range(9)]
    )
    off = R.topk_offsets(W, 4)
    assert off.dtype == R.OFFSET_DTYPE
    assert off.tolist() == sorted(torch.topk(norms, 4).indices.tolist())
    assert torch.allclose(R.diagonal_norms(W), norms)


def test_topk_offsets_ties_go_to_smaller_offsets():
    assert R.topk_offsets(torch.ones(4, 4), 2).tolist() == [0, 1]


def test_evenly_spaced_offsets_cover_every_unit():
    n_out, n_in = 3072, 768
    k = 4  # = P / D: evenly spaced diagonals reach every output row exactly once
    off = R.evenly_spaced_offsets(n_out, n_in, k)
    assert off.tolist() == [0, 768, 1536, 2304]
    rows, _ = R.diagonal_indices(n_out, n_in, off)
    assert torch.bincount(rows.flatten(), minlength=n_out).min() == 1


def _dense_products(x, values, offsets, bias, n_out, n_in):
    W = dense_from_convention(values, offsets, n_out, n_in)
    xd = x.double().reshape(-1, n_in)
    y = xd @ W.T + (bias.double() if bias is not None else 0)
    dy = torch.randn(xd.shape[0], n_out, dtype=torch.float64)
    return W, xd, y, dy


@pytest.mark.parametrize("n_out,n_in", LAYER_SHAPES)
@pytest.mark.parametrize("kind", ["one", "mid", "all"])
def test_reference_forward_and_gradients_equal_dense(n_out, n_in, kind):
    P, _ = R.diag_shape(n_out, n_in)
    k = {"one": 1, "mid": max(1, P // 2), "all": P}[kind]
    x, values, offsets, bias = random_problem(n_out, n_in, k, batch=(2, 3), dtype=torch.float64)
    W, xd, y_ref, dy = _dense_products(x, values, offsets, bias, n_out, n_in)
    y = R.diag_linear_ref(x, values, offsets, bias, n_out)
    assert y.shape == (2, 3, n_out)
    assert rel_err(y.reshape(-1, n_out), y_ref) < 1e-12
    assert rel_err(R.diag_linear_dx_ref(dy, values, offsets, n_in), dy @ W) < 1e-12
    dW = dy.T @ xd
    assert rel_err(R.diag_linear_dv_ref(dy, xd, offsets), R.extract_diagonals(dW, offsets)) < 1e-12


def test_reference_empty_batch_and_low_precision_dtype():
    x, values, offsets, bias = random_problem(8, 5, 3, batch=(0,), dtype=torch.bfloat16)
    assert R.diag_linear_ref(x, values, offsets, bias, 8).shape == (0, 8)
    assert R.diag_linear_dv_ref(torch.randn(0, 8, dtype=torch.bfloat16), x, offsets).abs().sum() == 0
    x, values, offsets, bias = random_problem(8, 5, 3, batch=(4,), dtype=torch.bfloat16)
    y = R.diag_linear_ref(x, values, offsets, bias, 8)
    assert y.dtype == torch.bfloat16


@settings(max_examples=60, deadline=None)
@given(
    n_out=st.integers(1, 20),
    n_in=st.integers(1, 20),
    data=st.data(),
)
def test_property_reference_equals_dense(n_out, n_in, data):
    P, _ = R.diag_shape(n_out, n_in)
    k = data.draw(st.integers(1, P))
    m = data.draw(st.integers(0, 5))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    offsets = random_offsets(n_out, n_in, k, g)
    values = torch.randn(k, min(n_out, n_in), generator=g, dtype=torch.float64)
    x = torch.randn(m, n_in, generator=g, dtype=torch.float64)
    W = dense_from_convention(values, offsets, n_out, n_in)
    torch.testing.assert_close(R.diag_linear_ref(x, values, offsets, None, n_out), x @ W.T, rtol=1e-12, atol=1e-12)

"""diag_linear and the boundary validation: every bad input gets an error that names the problem."""

import pytest
import torch

from diagcompile import diag_linear
from diagcompile.functional import canonical_offsets
from diagcompile.testing import dense_from_convention, random_problem, rel_err


def test_diag_linear_matches_dense_and_accepts_int64_offsets():
    x, values, offsets, bias = random_problem(13, 7, 4, batch=(2, 5), dtype=torch.float64)
    W = dense_from_convention(values, offsets, 13, 7)
    for off in (offsets, offsets.long()):
        y = diag_linear(x, values, off, bias, 13)
        assert rel_err(y, x @ W.T + bias) < 1e-12
    assert rel_err(diag_linear(x, values, offsets, None, 13), x @ W.T) < 1e-12


def _good():
    return random_problem(8, 12, 3, batch=(4,))


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda x, v, o, b: (x, v, torch.tensor([1, 1, 2]), b), ValueError, "duplicated"),
        (lambda x, v, o, b: (x, v, torch.tensor([3, 1, 2]), b), ValueError, "sorted ascending"),
        (lambda x, v, o, b: (x, v, torch.tensor([0, 5, 12]), b), ValueError, "out of range"),
        (lambda x, v, o, b: (x, v, torch.tensor([-1, 2, 5]), b), ValueError, "out of range"),
        (lambda x, v, o, b: (x, v, o.float(), b), TypeError, "int32 or int64"),
        (lambda x, v, o, b: (x, v, o[:2], b), ValueError, "k=3 rows but offsets"),
        (lambda x, v, o, b: (x, v[:, :5], o, b), ValueError, "needs values of shape"),
        (lambda x, v, o, b: (x[:, :5], v, o, b), ValueError, "x.shape\\[-1\\]=5"),
        (lambda x, v, o, b: (x, v, o, b[:3]), ValueError, "bias is \\(3,\\)"),
        (lambda x, v, o, b: (x.double(), v, o, b), TypeError, "dtype mismatch: x is torch.float64"),
        (lambda x, v, o, b: (x, v, o, b.double()), TypeError, "bias is torch.float64"),
        (lambda x, v, o, b: (x.long(), v, o, b), TypeError, "float16/bfloat16/float32/float64"),
        (lambda x, v, o, b: (x, v, o.to("meta"), b), ValueError, "device mismatch"),
        (lambda x, v, o, b: (x, v[0], o, b), ValueError, "values must be 2-D"),
        (lambda x, v, o, b: (x.numpy(), v, o, b), TypeError, "x must be a Tensor"),
    ],
)
def test_bad_inputs_are_named(mutate, exc, match):
    args = mutate(*_good())
    with pytest.raises(exc, match=match):
        diag_linear(*args, 8)


def test_too_many_diagonals_and_bad_out_features():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="k=5 diagonals but a 3x4 layer has P=4"):
        diag_linear(x, torch.randn(5, 3), torch.arange(5), None, 3)
    with pytest.raises(ValueError, match="out_features"):
        diag_linear(x, torch.randn(1, 3), torch.arange(1), None, 0)


def test_in_features_catches_an_x_of_the_wrong_width_for_a_wide_layer():
    # Wide 64 -> 16: values are (k, 16) whatever x's width, so only in_features can tell a 48-wide x is wrong.
    x, values, offsets, bias = random_problem(16, 64, 4, batch=(2,))
    offsets = torch.tensor([0, 3, 7, 20], dtype=torch.int32)
    short = torch.randn(2, 48)
    assert diag_linear(short, values, offsets, bias, 16).shape == (2, 16)  # undetectable without it
    with pytest.raises(ValueError, match="x has last dim 48 but in_features=64"):
        diag_linear(short, values, offsets, bias, 16, in_features=64)
    torch.testing.assert_close(
        diag_linear(x, values, offsets, bias, 16, in_features=64), diag_linear(x, values, offsets, bias, 16)
    )
    with pytest.raises(TypeError, match="in_features must be an int"):
        diag_linear(x, values, offsets, bias, 16, in_features=64.0)
    # Without it, an offset past the width read from x names where that width came from.
    with pytest.raises(ValueError, match=r"N_in=48, read from x.shape\[-1\]\) out of range: \[50\]"):
        diag_linear(short, values, torch.tensor([0, 3, 7, 50]), bias, 16)


@pytest.mark.parametrize("bad", [2**32 + 3, -(2**32) + 3])
def test_unchecked_int64_offsets_are_not_wrapped_into_valid_ones_by_the_int32_cast(bad):
    """Found by fuzzing (audit C): with check_offsets=False an int64 offset of 2**32 + 3 was cast to int32 as 3 and
    used silently, where the raw op refuses it (it range-checks int64 offsets on the CPU before casting)."""
    x, values, _, _ = random_problem(4, 8, 2, batch=(2,))
    offsets = torch.tensor([1, bad], dtype=torch.int64)
    with pytest.raises(ValueError, match="out of range"):
        diag_linear(x, values, offsets, None, 4, check_offsets=False)
    good = torch.tensor([1, 3], dtype=torch.int64)  # valid ones still run unchecked, converted to int32
    W = dense_from_convention(values, good, 4, 8)
    assert rel_err(diag_linear(x, values, good, None, 4, check_offsets=False), x.double() @ W.T) < 1e-6


def test_unchecked_int64_offsets_under_vmap_run_and_are_range_checked():
    """vmap refuses .item(): the range check of unchecked int64 offsets reads the tensor under the batching (review
    of the fix above, which raised vmap's .item() error for every batch of int64 offsets)."""
    x, values, _, _ = random_problem(12, 8, 2, batch=(3,))
    run = torch.func.vmap(lambda o: diag_linear(x, values, o, None, 12, check_offsets=False))
    good = torch.tensor([[0, 3], [1, 5], [2, 11]])
    y = run(good)
    for i, o in enumerate(good):
        torch.testing.assert_close(y[i], diag_linear(x, values, o.to(torch.int32), None, 12))
    with pytest.raises(ValueError, match="out of range"):
        run(torch.tensor([[0, 3], [1, 2**32 + 5], [2, 11]]))


def test_empty_input_features_are_named():
    with pytest.raises(ValueError, match="last dim 0"):
        diag_linear(torch.randn(3, 0), torch.randn(1, 0), torch.arange(1), None, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_like_f_linear(dtype):
    # Under autocast F.linear runs in the region's dtype whatever its inputs' dtype; a DiagLinear between two
    # nn.Linears must do the same instead of refusing the mixed dtypes.
    x, values, offsets, bias = random_problem(24, 16, 5, batch=(3,), dtype=torch.float32)
    W = dense_from_convention(values, offsets, 24, 16).float()
    with torch.autocast("cpu", dtype=dtype):
        y = diag_linear(x, values, offsets, bias, 24)
        want = torch.nn.functional.linear(x, W, bias)
    assert y.dtype == want.dtype == dtype
    assert rel_err(y.float(), want.float()) < 2e-2
    values.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        diag_linear(x, values, offsets, None, 24).float().sum().backward()
    assert values.grad.dtype == torch.float32  # the gradient reaches the float32 parameter through the cast
    with torch.autocast("cpu", dtype=dtype):  # float64 is left alone, as autocast does
        assert diag_linear(x.double(), values.detach().double(), offsets, None, 24).dtype == torch.float64


def test_canonical_offsets_accepts_lists_and_rejects_junk():
    assert canonical_offsets([0, 2, 5], 6, 4).dtype == torch.int32
    with pytest.raises(TypeError, match="only ints"):
        canonical_offsets([0, 1.5], 6, 4)
    with pytest.raises(TypeError):
        canonical_offsets("012", 6, 4)
    with pytest.raises(ValueError, match="1-D"):
        canonical_offsets(torch.zeros(2, 2, dtype=torch.int64), 6, 4)

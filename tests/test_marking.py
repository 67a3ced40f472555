"""mark_sparse: the single definition of a sparse-marked linear."""

import copy

import pytest
import torch
from torch import nn

from diagcompile import SparseMark, get_sparse_mark, is_sparse_marked, mark_sparse, unmark_sparse
from diagcompile.marking import pin_top_k, sync_marks


class MyLinear(nn.Linear):
    pass


def test_mark_module_and_weight():
    lin = MyLinear(8, 16)
    assert mark_sparse(lin, sparsity=0.75) is lin
    assert is_sparse_marked(lin) and is_sparse_marked(lin.weight)
    assert get_sparse_mark(lin) == SparseMark(0.75, None)
    assert not is_sparse_marked(lin.bias) and not is_sparse_marked(nn.ReLU())
    unmark_sparse(lin)
    assert not is_sparse_marked(lin) and not is_sparse_marked(lin.weight)


def test_mark_with_offsets_and_parameter():
    w = nn.Parameter(torch.randn(6, 4))
    mark_sparse(w, offsets=[0, 3])
    m = get_sparse_mark(w)
    assert m.offsets == (0, 3) and m.resolve_offsets(w).tolist() == [0, 3]
    assert m.sparsity == pytest.approx(1 - 2 / 6)


def test_mark_resolves_topk_by_norm():
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4) * 10 + 0.01)
    mark_sparse(lin, sparsity=0.75)
    assert get_sparse_mark(lin).resolve_offsets(lin.weight).tolist() == [0]


def test_marks_survive_to_and_deepcopy_with_sync():
    model = nn.Sequential(nn.Linear(4, 4))
    mark_sparse(model[0], 0.5)
    model.to(torch.float64)
    assert is_sparse_marked(model[0].weight)
    clone = copy.deepcopy(model)
    assert is_sparse_marked(clone[0])
    assert not is_sparse_marked(clone[0].weight)  # torch rebuilds deep-copied Parameters without attributes
    assert sync_marks(clone) == 1
    assert get_sparse_mark(clone[0].weight) == get_sparse_mark(model[0])


def test_sync_marks_keeps_a_weight_mark_pinned_by_the_backend():
    """The backend pins its top-k choice on the weight; sync_marks must not put the module's top-k back,
    which trained values could resolve to other diagonals."""
    lin = nn.Linear(8, 8)
    mark_sparse(lin, sparsity=0.5)
    pinned = get_sparse_mark(lin).resolve_offsets(lin.weight)
    mark_sparse(lin.weight, offsets=pinned)  # what the backend does on first compile
    assert sync_marks(nn.Sequential(lin)) == 0
    assert get_sparse_mark(lin.weight).offsets == tuple(pinned.tolist())


def _strong_diagonals(n: int, offsets: list[int]) -> torch.Tensor:
    """An ``n x n`` weight whose top-k diagonals are ``offsets`` (square: diagonal p is W[t, (t + p) % n])."""
    w = torch.full((n, n), 0.01)
    t = torch.arange(n)
    for p in offsets:
        w[t, (t + p) % n] = 1.0
    return w


def test_loading_a_new_weight_undoes_the_backend_pin():
    """A pin made before a checkpoint was loaded held the random init's diagonals: a load must undo it, so
    the next compile or export resolves the loaded values' top-k (what a fresh process does)."""
    model = nn.Sequential(nn.Linear(8, 8))
    mark_sparse(model[0], sparsity=0.75)
    pinned = pin_top_k(model[0].weight, torch.tensor([1, 6], dtype=torch.int32))
    assert get_sparse_mark(model[0].weight) is pinned
    saved = {"0.weight": _strong_diagonals(8, [2, 5]), "0.bias": torch.zeros(8)}

    model.load_state_dict(saved, strict=False)
    assert get_sparse_mark(model[0].weight) == SparseMark(0.75, None)
    assert get_sparse_mark(model[0].weight).resolve_offsets(model[0].weight).tolist() == [2, 5]

    # The hook travels with copies of the module.
    clone = copy.deepcopy(model)
    sync_marks(clone)
    pin_top_k(clone[0].weight, torch.tensor([1, 6], dtype=torch.int32))
    clone.load_state_dict({"0.weight": torch.randn(8, 8), "0.bias": torch.zeros(8)})
    assert get_sparse_mark(clone[0].weight).offsets is None


def test_a_load_keeps_marks_that_are_not_backend_pins():
    saved = {"0.weight": _strong_diagonals(8, [2, 5]), "0.bias": torch.zeros(8)}
    # A load that does not carry the weight.
    model = nn.Sequential(nn.Linear(8, 8))
    mark_sparse(model[0], sparsity=0.75)
    pinned = pin_top_k(model[0].weight, torch.tensor([1, 6], dtype=torch.int32))
    model.load_state_dict({"0.bias": torch.zeros(8)}, strict=False)
    assert get_sparse_mark(model[0].weight) is pinned
    # Offsets the user gave, on the weight or (pin_marks_) on the module.
    model = nn.Sequential(nn.Linear(8, 8))
    mark_sparse(model[0], sparsity=0.75)
    mark_sparse(model[0].weight, offsets=[1, 6])
    model.load_state_dict(saved)
    assert get_sparse_mark(model[0].weight).offsets == (1, 6)
    mark_sparse(model[0], offsets=[0, 3])
    pin_top_k(model[0].weight, torch.tensor([0, 3], dtype=torch.int32))
    model.load_state_dict(saved)
    assert get_sparse_mark(model[0].weight).offsets == (0, 3)
    # A pin the user replaced by a mark of their own.
    model = nn.Sequential(nn.Linear(8, 8))
    mark_sparse(model[0], sparsity=0.75)
    pin_top_k(model[0].weight, torch.tensor([1, 6], dtype=torch.int32))
    mark_sparse(model[0].weight, offsets=[4, 7])
    model.load_state_dict(saved)
    assert get_sparse_mark(model[0].weight).offsets == (4, 7)


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="Conv2d"):
        mark_sparse(nn.Conv2d(3, 3, 3))
    with pytest.raises(TypeError, match="2-D nn.Parameter"):
        mark_sparse(nn.Parameter(torch.randn(3)))
    with pytest.raises(ValueError, match="mark_sparse on a 4x4 linear"):
        mark_sparse(nn.Linear(4, 4), sparsity=0.9)
    with pytest.raises(ValueError, match="duplicated"):
        mark_sparse(nn.Linear(4, 4), offsets=[1, 1])


def test_the_module_mark_wins_over_a_pin_on_its_weight():
    # The backend pins offsets on the weight (invariant 8: the graphs follow them); the module keeps its own
    # mark, which get_sparse_mark(module) reads: a pin made before new weights were loaded must not decide
    # which diagonals sparsify_ keeps (pin_marks_ copies pins to the modules after training).
    lin = nn.Linear(8, 8)
    mark_sparse(lin, sparsity=0.75)
    mark_sparse(lin.weight, offsets=[1, 6])
    assert get_sparse_mark(lin) == SparseMark(0.75, None)
    assert get_sparse_mark(lin.weight) == SparseMark(0.75, (1, 6))
    bare = nn.Linear(8, 8)
    mark_sparse(bare.weight, sparsity=0.5)  # only the weight is marked: that is the linear's mark
    assert get_sparse_mark(bare) == SparseMark(0.5, None)


def test_a_parametrized_weight_cannot_be_marked():
    # lin.weight is recomputed on every access: a mark on it would be lost at once.
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"parametrized.*remove_parametrizations\(m, \"weight\"\).*sparsify_"):
        mark_sparse(lin, sparsity=0.5)
    assert not is_sparse_marked(lin)


def test_a_load_keeps_a_pin_the_weight_was_trained_through():
    """Trained through the backend, only the pinned diagonals learn (the rest at most shrinks alike, by weight
    decay): a reload of the model's own earlier or later state keeps the pin, where a top-k of it could pick
    untrained diagonals."""
    model = nn.Sequential(nn.Linear(8, 8))
    mark_sparse(model[0], sparsity=0.75)
    pinned = pin_top_k(model[0].weight, torch.tensor([1, 6], dtype=torch.int32))
    own = model[0].weight.detach().clone() * 0.3  # decayed off the diagonals...
    t = torch.arange(8)
    own[t, (t + 1) % 8], own[t, (t + 6) % 8] = 1e-3, -1e-3  # ...and the trained diagonals near 0
    model.load_state_dict({"0.weight": own, "0.bias": torch.zeros(8)})
    assert get_sparse_mark(model[0].weight) is pinned
    assert sorted(get_sparse_mark(model[0]).resolve_offsets(own).tolist()) != [1, 6]  # a top-k would switch


def test_a_failed_load_keeps_the_pin_and_an_assigned_weight_gets_the_mark():
    model = nn.Sequential(nn.Linear(8, 8))
    mark_sparse(model[0], sparsity=0.75)
    pinned = pin_top_k(model[0].weight, torch.tensor([1, 6], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict({"0.weight": torch.zeros(8, 9), "0.bias": torch.zeros(8)})
    assert get_sparse_mark(model[0].weight) is pinned
    # assign=True puts new Parameters in place: the new weight carries the module's mark (else: runs dense)
    model.load_state_dict({"0.weight": _strong_diagonals(8, [2, 5]), "0.bias": torch.zeros(8)}, assign=True)
    assert get_sparse_mark(model[0].weight) == SparseMark(0.75, None)


@pytest.mark.parametrize("shape", [(8, 8), (6, 20), (20, 6), (1, 5)])
def test_the_lineage_sample_lies_off_the_pinned_diagonals(shape):
    from diagcompile.marking import _off_pin_sample
    from diagcompile.ops.reference import diagonal_indices

    n_out, n_in = shape
    offsets = (0, 2) if max(shape) > 2 else (0,)
    positions, values = _off_pin_sample(torch.arange(n_out * n_in, dtype=torch.float32).reshape(shape), offsets)
    rows, cols = diagonal_indices(n_out, n_in, torch.tensor(offsets))
    on = set((rows * n_in + cols).flatten().tolist())
    assert positions.numel() == min(64, n_out * n_in - len(on)) and not on & set(positions.tolist())
    assert values.tolist() == positions.double().tolist()  # the weight's own entries at those positions

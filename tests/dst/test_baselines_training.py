"""Short real training runs of every baseline (scikit-learn's bundled digits, 10 classes: chance is 10%).

The same setup as the diagonal methods' runs (tests/dst/test_sparsifier_training.py): MLP 64 -> 128 -> 128 -> 10,
both hidden linears at 90% sparsity in the diagonal methods' units (the non-zeros of 13 of 128 diagonals),
the head dense, AdamW, 400 steps of batch 64; then finalize() and evaluate on 397 held-out images. The
assertion (>= 85%) is far above chance and below what every method reaches (printed), so the test catches
a method that does not learn, not small regressions. It also checks the realised density of the final
weights against the method's pattern.
"""

import pytest
import torch
from torch import nn

from diagcompile.dst import make_sparsifier
from diagcompile.testing import accuracy, digits_mlp, digits_split, train_sparse

STEPS = 400
METHODS = {
    "rigl": {"update_every": 50},
    "rigl-erk": {"update_every": 50, "distribution": "erk"},
    "srigl": {"update_every": 50},
    "nm-srste": {},
    "nm-mask-decay": {},
    "nm-structure-decay": {},
}


@pytest.fixture(scope="module")
def digits():
    return digits_split()


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_short_training_beats_chance_by_a_wide_margin(name, digits):
    Xtr, ytr, Xte, yte = digits
    model = digits_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    method = name.split("-erk")[0]
    sp = make_sparsifier(model, opt, method, 0.9, STEPS, filter_fn=lambda m, fqn: fqn != "4", seed=0, **METHODS[name])
    train_sparse(model, opt, sp, Xtr, ytr, STEPS)
    diag = sp.diagnostics()
    sp.finalize()
    assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))
    density = {i: float((model[i].weight != 0).float().mean()) for i in (0, 2)}
    for i in (0, 2):
        assert density[i] <= diag[str(i)]["density"] + 1e-9
        if method == "rigl" and "distribution" not in METHODS[name]:
            assert diag[str(i)]["nnz"] == 13 * (64 if i == 0 else 128)  # the diagonal layer's non-zeros
        if method.startswith("nm-"):
            assert (diag[str(i)]["nm_n"], diag[str(i)]["nm_m"]) == (3, 32)
    acc = accuracy(model, Xte, yte)
    print(f"{name}: test accuracy {acc:.3f}, realised density {density}, diagnostics {diag['2']}")
    assert acc >= 0.85, f"{name}: accuracy {acc:.3f}"

"""Short real training runs (scikit-learn's bundled digits, 10 classes: chance is 10%) for every method.

Each run: MLP 64 -> 128 -> 128 -> 10 with both hidden linears at 90% sparsity (13 of 128 diagonals), the
head dense, AdamW, 400 steps of batch 64; then finalize() to compact DiagLinear and evaluate on 397 held-out
images. The assertion (>= 85%) is far above chance and below what every method reaches (see the printed
accuracy), so the test catches a method that does not learn, not small regressions.
"""

import pytest
import torch

from diagcompile import DiagLinear
from diagcompile.dst import DiagSparsifier, DSTConfig
from diagcompile.testing import accuracy, digits_mlp, digits_split, train_sparse

STEPS = 400

METHODS = {
    "diagheur": {"method": "diagheur", "update_every": 50},
    "dynadiag": {"method": "dynadiag"},
    "dynadiag-pool": {"method": "dynadiag", "pool": 2.0, "update_every": 25},
    "dynadiag-softmax-clamp": {"method": "dynadiag", "relaxation": "softmax_clamp"},
    "dynadiag-rms": {"method": "dynadiag", "soft_scale": "rms"},
}


@pytest.fixture(scope="module")
def digits():
    return digits_split()


@pytest.mark.parametrize("name", METHODS)
def test_short_training_beats_chance_by_a_wide_margin(name, digits):
    Xtr, ytr, Xte, yte = digits
    model = digits_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    cfg = DSTConfig(total_steps=STEPS, sparsity=0.9, **METHODS[name])
    sp = DiagSparsifier(model, opt, cfg, filter_fn=lambda m, fqn: fqn != "4")
    train_sparse(model, opt, sp, Xtr, ytr, STEPS)
    diag = sp.diagnostics()
    sp.finalize()
    assert isinstance(model[0], DiagLinear) and isinstance(model[2], DiagLinear)
    assert model[0].k == model[2].k == 13
    acc = accuracy(model, Xte, yte)
    print(f"{name}: test accuracy {acc:.3f}, diagnostics {diag['2']}")
    assert acc >= 0.85, f"{name}: accuracy {acc:.3f}"

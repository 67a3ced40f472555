"""The checks DiagSparsifier and MaskSparsifier share (diagcompile/dst/_base.py), run against both."""

import warnings

import pytest
import torch
from torch import nn

from diagcompile.dst import DiagSparsifier, DSTConfig, MaskConfig, MaskSparsifier
from diagcompile.testing import not_head, tiny_mlp, train_toy

SPARSIFIERS = [
    pytest.param(DiagSparsifier, DSTConfig, MaskConfig, id="diag"),
    pytest.param(MaskSparsifier, MaskConfig, DSTConfig, id="mask"),
]


@pytest.mark.parametrize("sparsifier, config_cls, other_config_cls", SPARSIFIERS)
def test_bad_arguments_are_refused_before_anything_changes(sparsifier, config_cls, other_config_cls):
    model = tiny_mlp()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match=f"already has state: construct {sparsifier.__name__} before"):
        sparsifier(model, opt, config_cls(total_steps=10))
    with pytest.raises(ValueError, match="single nn.Linear"):
        sparsifier(nn.Linear(4, 4), None, config_cls(total_steps=10))
    with pytest.raises(TypeError, match=f"config must be a {config_cls.__name__}"):
        sparsifier(tiny_mlp(), None, other_config_cls(total_steps=10))
    with pytest.raises(TypeError, match=config_cls.__name__):
        sparsifier(tiny_mlp(), None, {"total_steps": 10})
    tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied"):
        sparsifier(tied, None, config_cls(total_steps=10))
    assert all(type(m) is nn.Linear for m in (*model.modules(), *tied.modules()) if isinstance(m, nn.Linear))


def _past_end(record):
    return [w for w in record if issubclass(w.category, UserWarning) and "beyond total_steps" in str(w.message)]


@pytest.mark.parametrize("sparsifier, config_cls, other_config_cls", SPARSIFIERS)
def test_stepping_past_total_steps_warns_once(sparsifier, config_cls, other_config_cls):
    torch.manual_seed(0)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = sparsifier(model, opt, config_cls(total_steps=4, sparsity=0.5, update_every=2), filter_fn=not_head)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        train_toy(model, opt, sp, 4)  # exactly total_steps: a normal run, no warning
    assert not _past_end(rec)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        train_toy(model, opt, sp, 3, start=4)  # steps 5, 6, 7: past the end
    past = _past_end(rec)
    assert len(past) == 1, [str(w.message) for w in rec]
    msg = str(past[0].message)
    assert f"{sparsifier.__name__}.step() called for step 5, beyond total_steps=4" in msg, msg
    assert "the schedule is over" in msg and "topology" in msg and "temperature" in msg, msg
    assert past[0].filename == train_toy.__code__.co_filename  # points at the caller of step()
    assert sp.step_count == 7

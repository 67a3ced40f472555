"""The checks DiagSparsifier and MaskSparsifier share (diagcompile/dst/_base.py), run against both."""

import pytest
import torch
from torch import nn

from diagcompile.dst import DiagSparsifier, DSTConfig, MaskConfig, MaskSparsifier
from diagcompile.testing import tiny_mlp

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

"""DST tests run tiny models: one intra-op thread avoids thread hand-off costs that dominate such small ops
(and that explode when the 2 CI cores are shared)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

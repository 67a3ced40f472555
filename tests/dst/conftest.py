"""DST tests run tiny models on one intra-op thread (see ``one_thread`` in ``tests/conftest.py``)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def gloo_group(tmp_path):
    """A real one-process gloo default process group for the test (destroyed after it): enough for a sparsifier
    to see torch.distributed in use and for a real ``DistributedDataParallel`` wrapper, with no second process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()

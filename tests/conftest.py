"""Test-session setup shared by every tier.

* Fresh Inductor/Triton cache dirs per session: automatic-dynamic PGO stores recompile decisions in the
  cache, which would make graph-count assertions depend on earlier runs.
* A deterministic seed per test.
* ``one_thread``: opt-in (``pytest.mark.usefixtures("one_thread")``, or autouse in ``tests/dst``).
"""

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="diagcompile-test-cache-")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_CACHE, "triton"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: thread hand-off costs dominate such small ops (and explode
    when the 2 CI cores are shared), and results do not depend on the machine's core count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""The numba CPU kernels (ops/cpu_kernels.py): exactness vs the reference and an independent dense
construction, the op contract through ``force_path("kernel")``, determinism across thread counts,
thread/fork safety, the JIT cache fallbacks, and dispatch."""

import gc
import signal
import sys
import threading
import time
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diagcompile  # noqa: F401  (registers the ops)
from diagcompile.ops import cpu_kernels as K
from diagcompile.ops import dispatch, dispatch_table, force_path
from diagcompile.ops import reference as R
from diagcompile.testing import LAYER_SHAPES, dense_from_convention, random_problem, rel_err, run_python

OPS = torch.ops.diagcompile
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

# (out, in): the shared small shapes plus wider/taller/odd ones where tiles, 4-diagonal groups and wrap
# points all land at different places.
SHAPES = LAYER_SHAPES + [(31, 97), (97, 31), (64, 200), (200, 64), (257, 257), (33, 1000), (1000, 33)]


def _ks(n_out, n_in):
    P = max(n_out, n_in)
    return sorted({1, min(P, 3), min(P, 4), min(P, 5), max(1, P // 3), P})


def _wrap_heavy_offsets(n_out, n_in, k):
    """The k largest offsets: nearly every entry of these diagonals wraps around the long side."""
    P = max(n_out, n_in)
    return torch.arange(P - k, P, dtype=torch.int32)


def _all_three(n_out, n_in, x, values, offsets, bias):
    dy = torch.randn(x.shape[0], n_out, dtype=x.dtype)
    ours = (
        K.forward(x, values, offsets, bias, n_out),
        K.input_grad(dy, values, offsets, n_in),
        K.values_grad(dy, x, offsets),
    )
    ref = (
        R.diag_linear_ref(x, values, offsets, bias, n_out),
        R.diag_linear_dx_ref(dy, values, offsets, n_in),
        R.diag_linear_dv_ref(dy, x, offsets),
    )
    return ours, ref, dy


#: The masked gather has two kernels (ops/cpu_kernels.py picks by L and D): these settings force each everywhere.
MASKED_PLANS = {
    "diagonal-major": {"_SCATTER_MAX_L": 2**62, "_SCATTER_MAX_SQUARE_D": 2**62},
    "tiled": {"_SCATTER_MAX_L": 0, "_SCATTER_MAX_SQUARE_D": 0},
}


def _force_masked_plan(monkeypatch, plan: str) -> None:
    for name, value in MASKED_PLANS[plan].items():
        monkeypatch.setattr(K, name, value)


@pytest.fixture(params=list(MASKED_PLANS))
def masked_plan(request, monkeypatch):
    _force_masked_plan(monkeypatch, request.param)
    return request.param


def test_masked_gather_plan_picks_diagonal_major_where_it_was_measured_faster():
    def kernel(L, D):
        return K._masked_gather_plan(64, L, D, 1)[0]

    for L, D in [(192, 64), (64, 64), (128, 128), (512, 256), (3072, 768), (1536, 768), (4096, 1024)]:
        assert kernel(L, D) is K._masked_scatter_kernel, (L, D)
    for L, D in [(256, 256), (768, 768), (1024, 1024), (1535, 768), (14336, 4096), (8192, 64)]:
        assert kernel(L, D) is K._masked_gather_kernel, (L, D)


@pytest.mark.parametrize("n_out,n_in", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
@pytest.mark.parametrize("M", [0, 1, 5, 13])
@pytest.mark.parametrize("offsets_kind", ["random", "wrap-heavy"])
def test_kernels_equal_the_reference_fp64(masked_plan, n_out, n_in, M, offsets_kind):
    for k in _ks(n_out, n_in):
        x, values, offsets, bias = random_problem(n_out, n_in, k, batch=(M,), dtype=torch.float64, seed=k)
        if offsets_kind == "wrap-heavy":
            offsets = _wrap_heavy_offsets(n_out, n_in, k)
        for b in (bias, bias.new_empty(0)):
            ours, ref, _ = _all_three(n_out, n_in, x, values, offsets, b)
            for what, o, r in zip(("forward", "input_grad", "values_grad"), ours, ref):
                assert o.shape == r.shape and o.dtype == r.dtype, what
                assert rel_err(o, r) < 1e-13, f"{what} k={k}: {rel_err(o, r):.2e}"


@pytest.mark.parametrize("n_out,n_in", [(7, 13), (13, 7), (12, 12), (31, 97), (97, 31), (1, 5), (5, 1)])
def test_kernels_equal_the_independent_dense_construction(n_out, n_in):
    P = max(n_out, n_in)
    for k in sorted({1, 4, max(1, P // 2), P}):
        if k > P:
            continue
        x, values, offsets, bias = random_problem(n_out, n_in, k, batch=(6,), dtype=torch.float64, seed=k)
        W = dense_from_convention(values, offsets, n_out, n_in)
        dy = torch.randn(6, n_out, dtype=torch.float64)
        assert rel_err(K.forward(x, values, offsets, bias, n_out), x @ W.T + bias) < 1e-13
        assert rel_err(K.input_grad(dy, values, offsets, n_in), dy @ W) < 1e-13
        dv_dense = R.extract_diagonals(dy.T @ x, offsets)
        assert rel_err(K.values_grad(dy, x, offsets), dv_dense) < 1e-13


@pytest.mark.parametrize("n_out,n_in", [(96, 320), (320, 96), (128, 128)])
def test_fp32_accumulates_like_the_reference(n_out, n_in):
    x, values, offsets, bias = random_problem(n_out, n_in, 40, batch=(9,), dtype=torch.float32)
    ours, ref, dy = _all_three(n_out, n_in, x, values, offsets, bias)
    ref64 = (
        R.diag_linear_ref(x.double(), values.double(), offsets, bias.double(), n_out),
        R.diag_linear_dx_ref(dy.double(), values.double(), offsets, n_in),
        R.diag_linear_dv_ref(dy.double(), x.double(), offsets),
    )
    for o, r, r64 in zip(ours, ref, ref64):
        assert o.dtype == torch.float32
        assert rel_err(o, r64) < 1e-6
        assert rel_err(o, r) < 1e-6


@settings(max_examples=60, deadline=None)
@given(
    n_out=st.integers(1, 70),
    n_in=st.integers(1, 70),
    M=st.integers(0, 10),
    data=st.data(),
)
def test_property_kernels_equal_reference(n_out, n_in, M, data):
    P = max(n_out, n_in)
    k = data.draw(st.integers(1, P))
    offsets = torch.tensor(sorted(data.draw(st.sets(st.integers(0, P - 1), min_size=k, max_size=k))), dtype=torch.int32)
    x, values, _, bias = random_problem(n_out, n_in, k, batch=(M,), dtype=torch.float64)
    ours, ref, _ = _all_three(n_out, n_in, x, values, offsets, bias)
    for o, r in zip(ours, ref):
        assert rel_err(o, r) < 1e-13


@pytest.mark.parametrize("n_out,n_in", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_dense_and_extract_are_the_references_bit_for_bit(n_out, n_in, dtype):
    for k in _ks(n_out, n_in):
        for offsets in (R.topk_offsets(torch.randn(n_out, n_in), k), _wrap_heavy_offsets(n_out, n_in, k)):
            values = torch.randn(k, min(n_out, n_in), dtype=dtype)
            W = K.to_dense(values, offsets, n_out, n_in)
            assert W.dtype == dtype and torch.equal(W, R.to_dense(values, offsets, n_out, n_in)), (k, offsets)
            G = torch.randn(n_out, n_in, dtype=dtype)
            assert torch.equal(K.extract_diagonals(G, offsets), R.extract_diagonals(G, offsets))
            assert torch.equal(K.extract_diagonals(W, offsets), values)
            # The values gradient of a bf16 layer is reduced in float32 and cast on the way out.
            got = K.extract_diagonals(G, offsets, torch.bfloat16)
            assert got.dtype == torch.bfloat16 and torch.equal(got, R.extract_diagonals(G, offsets).bfloat16())


ZERO_TENSORS = """
import torch
from diagcompile import DiagLinear
from diagcompile.ops import cpu_kernels as K
from diagcompile.ops import force_path
from diagcompile.testing import random_problem

x, values, offsets, bias = random_problem(7, 13, 4, batch=(5,))
z = torch._efficientzerotensor
assert torch.equal(K.forward(z(5, 13), values, offsets, bias, 7), bias.expand(5, 7))
assert torch.equal(K.forward(x, z(4, 7), offsets, z(7), 7), torch.zeros(5, 7))
assert torch.equal(K.input_grad(z(5, 7), values, offsets, 13), torch.zeros(5, 13))
assert torch.equal(K.values_grad(z(5, 7), x, offsets), torch.zeros(4, 7))
assert torch.equal(K.to_dense(z(4, 7), offsets, 7, 13), torch.zeros(7, 13))
assert torch.equal(K.extract_diagonals(z(7, 13), offsets), torch.zeros(4, 7))
layer = DiagLinear(64, 64, sparsity=0.9)
x = torch.randn(8, 64, requires_grad=True)
with force_path("kernel"):
    layer(x).sgn().sum().backward()  # sgn's backward gives its input a zero tensor
assert torch.equal(x.grad, torch.zeros(8, 64)) and torch.equal(layer.values.grad, torch.zeros_like(layer.values))
print("ok")
"""


def test_zero_tensors_without_memory_are_read_as_zeros():
    """torch's efficient zero tensors (``torch._efficientzerotensor``; the gradient ``torch.sgn``'s backward
    passes on) have no memory and ``data_ptr() == 0``: the kernels read them as zeros (they read address 0 and
    crashed the process, so a fresh interpreter runs them)."""
    assert run_python(ZERO_TENSORS, timeout=300).split() == ["ok"]


def test_misaligned_tensors_reach_the_kernels_as_aligned_copies():
    """The kernels' array views are typed aligned: a tensor over a byte buffer at an odd offset is copied first,
    and every op gives the bits it gives for an aligned copy of the same input."""
    for dtype, (n_out, n_in) in [(torch.float32, (13, 31)), (torch.float64, (31, 13))]:
        size = torch.empty(0, dtype=dtype).element_size()
        x, values, offsets, bias = random_problem(n_out, n_in, 5, batch=(7,), dtype=dtype)
        buf = bytearray(x.numel() * size + 1)
        odd = torch.frombuffer(buf, dtype=dtype, offset=1, count=x.numel()).view(x.shape)
        odd.copy_(x)
        assert odd.data_ptr() % size and K._c(odd, dtype).data_ptr() % size == 0
        assert torch.equal(K._c(odd, dtype), x)
        dy = torch.randn(7, n_out, dtype=dtype)
        assert torch.equal(K.forward(odd, values, offsets, bias, n_out), K.forward(x, values, offsets, bias, n_out))
        assert torch.equal(K.values_grad(dy, odd, offsets), K.values_grad(dy, x, offsets))


def test_to_dense_and_extract_take_views_and_refuse_bad_offsets():
    values, offsets = torch.randn(5, 26)[:, ::2], torch.tensor([0, 2, 5, 9, 12], dtype=torch.int32)  # k=5, D=13
    assert not values.is_contiguous()
    assert torch.equal(K.to_dense(values, offsets.long(), 13, 31), R.to_dense(values, offsets, 13, 31))
    G = torch.randn(31, 13).T  # a (13, 31) view
    assert torch.equal(K.extract_diagonals(G, offsets), R.extract_diagonals(G, offsets))
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, P=31\)"):
        K.to_dense(values, torch.tensor([0, 2, 5, 9, 31], dtype=torch.int32), 13, 31)
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, P=31\)"):
        K.extract_diagonals(G, torch.tensor([-1, 2, 5, 9, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"values must be \(k, D\)"):
        K.to_dense(values, offsets[:4], 13, 31)
    with pytest.raises(TypeError, match="bfloat16"):
        K.to_dense(values.bfloat16(), offsets, 13, 31)


def test_the_dense_path_uses_the_cpu_copies(monkeypatch):
    """``force_path("dense")`` on float32 CPU tensors materializes W and reads dV through this module."""
    calls = []
    for name in ("to_dense", "extract_diagonals"):
        fn = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    x, values, offsets, bias = random_problem(12, 20, 4, batch=(3,))
    x.requires_grad_(True)
    values.requires_grad_(True)
    with force_path("dense"):
        OPS.diag_linear(x, values, offsets, bias, 12).sum().backward()
    assert sorted(calls) == ["extract_diagonals", "to_dense", "to_dense"]
    with force_path("reference"):
        x2, v2 = x.detach().requires_grad_(True), values.detach().requires_grad_(True)
        OPS.diag_linear(x2, v2, offsets, bias, 12).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and torch.allclose(values.grad, v2.grad, atol=1e-6)


def test_non_contiguous_inputs_and_fresh_outputs():
    n_out, n_in, k = 40, 90, 17
    x, values, offsets, bias = random_problem(n_out, n_in, k, batch=(11,), dtype=torch.float64)
    xt = x.T.contiguous().T  # same values, column-major
    vt = values.T.contiguous().T
    ot = torch.stack([offsets, offsets], 1)[:, 0]  # strided offsets
    bt = torch.stack([bias, bias], 1)[:, 1]
    dy = torch.randn(n_out, 11, dtype=torch.float64).T
    assert not (xt.is_contiguous() or vt.is_contiguous() or ot.is_contiguous() or dy.is_contiguous())
    y = K.forward(xt, vt, ot, bt, n_out)
    assert torch.equal(y, K.forward(x, values, offsets, bias, n_out))
    assert torch.equal(K.input_grad(dy, vt, ot, n_in), K.input_grad(dy.contiguous(), values, offsets, n_in))
    assert torch.equal(K.values_grad(dy, xt, ot), K.values_grad(dy.contiguous(), x, offsets))
    # Fresh tensors, never views of an input (a kernel may not alias; see the opcheck below).
    for out in (y, K.input_grad(dy, values, offsets, n_in), K.values_grad(dy, x, offsets)):
        assert out.is_contiguous()
        assert out.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in (x, values, dy)}


OPCHECK_CASES = [  # (n_out, n_in, batch, dtype, k, bias): both orientations, empty/1/3-D batch, k = 1 and k = P
    (7, 13, (2, 3), torch.float32, 1, True),
    (13, 7, (2, 3), torch.float32, 13, False),
    (13, 7, (0,), torch.float32, 3, True),
    (12, 12, (1,), torch.float64, 5, True),
]


@pytest.mark.parametrize("n_out,n_in,batch,dtype,k,with_bias", OPCHECK_CASES)
def test_opcheck_with_the_kernel_forced(n_out, n_in, batch, dtype, k, with_bias):
    x, values, offsets, b = random_problem(n_out, n_in, k, batch=batch, dtype=dtype, bias=with_bias)
    b = b if b is not None else values.new_empty(0)
    for t in (x, values, b):
        t.requires_grad_(True)
    dy = torch.randn(*batch, n_out, dtype=dtype, requires_grad=True)
    with force_path("kernel"):
        torch.library.opcheck(OPS.diag_linear, (x, values, offsets, b, n_out), test_utils=OPCHECK_UTILS)
        torch.library.opcheck(OPS.diag_linear_dx, (dy, values, offsets, n_in), test_utils=OPCHECK_UTILS)
        torch.library.opcheck(OPS.diag_linear_dv, (dy, x, offsets), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("n_out,n_in", [(7, 13), (13, 7), (16, 16)])
def test_3d_op_with_kernel_forced_matches_dense_autograd(n_out, n_in):
    x, values, offsets, b = random_problem(n_out, n_in, 5, batch=(2, 3), dtype=torch.float64)
    x.requires_grad_(True)
    values.requires_grad_(True)
    b.requires_grad_(True)
    W = dense_from_convention(values, offsets, n_out, n_in).requires_grad_(True)
    xd, bd = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y_ref = xd @ W.T + bd
    g = torch.randn_like(y_ref)
    dx_ref, dW_ref, db_ref = torch.autograd.grad(y_ref, (xd, W, bd), g)
    with force_path("kernel"):
        y = OPS.diag_linear(x, values, offsets, b, n_out)
        dx, dv, db = torch.autograd.grad(y, (x, values, b), g)
    assert y.shape == (2, 3, n_out) and dx.shape == x.shape
    assert rel_err(y, y_ref) < 1e-13
    assert rel_err(dx, dx_ref) < 1e-13
    assert rel_err(dv, R.extract_diagonals(dW_ref, offsets)) < 1e-13
    assert rel_err(db, db_ref) < 1e-13


def test_gradcheck_with_kernel_forced():
    x, values, offsets, b = random_problem(9, 5, 3, batch=(4,), dtype=torch.float64)
    for t in (x, values, b):
        t.requires_grad_(True)

    def f(x, values, b):
        return OPS.diag_linear(x, values, offsets, b, 9)

    with force_path("kernel"):
        assert torch.autograd.gradcheck(f, (x, values, b))
        assert torch.autograd.gradgradcheck(f, (x, values, b))


# ----------------------------------------------------------------------------------------------------
# Determinism and threads
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def many_threads(monkeypatch):
    """Let every call use several threads (normally small calls stay on one), restoring the count after."""
    monkeypatch.setattr(K, "_MIN_PARALLEL_WORK", 1)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n_out,n_in", [(300, 1000), (1000, 300), (512, 512), (64, 192), (192, 64)])
def test_bit_identical_across_thread_counts_runs_and_masked_kernels(many_threads, monkeypatch, n_out, n_in):
    for M in (1, 7, 33, 100):
        x, values, offsets, bias = random_problem(n_out, n_in, 60, batch=(M,), dtype=torch.float32, seed=M)
        dy = torch.randn(M, n_out)
        results = []
        for threads, plan in ((1, "tiled"), (1, "diagonal-major"), (2, "diagonal-major"), (3, "tiled"), (2, "tiled")):
            torch.set_num_threads(threads)
            _force_masked_plan(monkeypatch, plan)
            results.append(
                (
                    K.forward(x, values, offsets, bias, n_out),
                    K.input_grad(dy, values, offsets, n_in),
                    K.values_grad(dy, x, offsets),
                )
            )
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b), f"M={M}: results differ between thread counts or masked kernels"


def test_concurrent_callers_from_python_threads(many_threads):
    torch.set_num_threads(2)
    x, values, offsets, bias = random_problem(200, 700, 50, batch=(9,), dtype=torch.float32)
    expected = K.forward(x, values, offsets, bias, 200)
    ok: list[bool] = []

    def work():
        for _ in range(10):
            ok.append(torch.equal(K.forward(x, values, offsets, bias, 200), expected))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 40 and all(ok)


class _Interrupted(Exception):
    pass


def test_pool_threads_keep_their_tensors_alive_when_the_caller_is_interrupted(many_threads, monkeypatch):
    """An exception raised in the calling thread while it waits for the pool (Ctrl-C, a signal-based timeout) ends
    the call while pool threads may still read and write its tensors by address: each range must hold them until
    it has run (they were freed at once, and the real kernel then wrote into freed memory: a segfault)."""
    torch.set_num_threads(2)
    main = threading.main_thread().ident
    made: list[weakref.ref] = []
    alive: list[bool] = []
    caught = threading.Event()
    c = K._c

    def tracked_c(t, dtype):
        made.append(weakref.ref(out := c(t, dtype)))
        return out

    def ranges(*args):
        if threading.get_ident() == main:
            return  # the caller's own range: done at once, then it waits for the pool's
        for _ in range(5000):  # until the caller blocks in Future.exception()
            frame = sys._current_frames().get(main)
            waiting = frame is not None and frame.f_code.co_name == "wait"
            del frame  # a frame keeps its callers' frames, and their locals, alive
            if waiting:
                break
            time.sleep(0.001)
        signal.pthread_kill(main, signal.SIGUSR1)
        caught.wait(30)
        alive.extend(r() is not None for r in made)  # the real kernel would use them now

    def interrupt(signum, frame):
        raise _Interrupted

    monkeypatch.setattr(K, "_c", tracked_c)
    monkeypatch.setattr(K, "_rows_at", ranges)
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        x, values, offsets, bias = random_problem(256, 256, 64, batch=(64,), dtype=torch.float64)
        with pytest.raises(_Interrupted):  # float32 copies of every operand, made inside forward()
            K.forward(x.float().T.contiguous().T, values, offsets.long(), bias, 256)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        gc.collect()
        caught.set()
    for _ in range(3000):
        if alive:
            break
        time.sleep(0.01)
    assert len(made) == 4 and alive == [True] * 4


def test_a_pool_handed_out_stays_usable_when_a_bigger_one_replaces_it():
    """Two callers, one asking for more workers than the current pool has: the first may hold the old pool
    when the second replaces it, and its submits must still run (they raised 'cannot schedule new futures
    after shutdown', failing a plain forward under concurrent load of mixed sizes)."""
    small = K._get_pool(1)
    big = K._get_pool(small._max_workers + 2)  # another thread's larger call replaces the pool
    assert big is not small
    assert small.submit(lambda: 42).result(timeout=10) == 42
    assert K._get_pool(1) is big  # the larger pool serves smaller calls from now on


def test_no_numba_threading_layer_is_started(many_threads):
    """The kernels run on our own threads; numba's threading layer (omp/tbb/workqueue) is never launched."""
    import numba

    torch.set_num_threads(2)
    x, values, offsets, bias = random_problem(100, 300, 20, batch=(3,))
    K.forward(x, values, offsets, bias, 100)
    with pytest.raises(ValueError, match="not initialized"):
        numba.threading_layer()


FORK = """
import os, torch
from diagcompile.ops import cpu_kernels as K
from diagcompile.testing import random_problem
K._MIN_PARALLEL_WORK = 1
torch.set_num_threads(2)
x, values, offsets, bias = random_problem(300, 1000, 40, batch=(9,))
expected = K.forward(x, values, offsets, bias, 300)   # starts the thread pool
pid = os.fork()
if pid == 0:
    ok = torch.equal(K.forward(x, values, offsets, bias, 300), expected)  # 2 threads in the child
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def test_kernels_work_in_a_child_forked_after_use():
    assert run_python(FORK, timeout=120).strip() == "child 0"


#: The end of the fork scripts: print the child's exit code, or "child hung" (and kill it) after ``seconds``.
_AWAIT_CHILD = """
deadline = time.time() + {seconds}
while time.time() < deadline:
    finished, status = os.waitpid(pid, os.WNOHANG)
    if finished:
        print("child", os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.1)
else:
    os.kill(pid, 9)
    print("child hung")
"""


FORK_DURING_COMPILE = """
import os, threading, time
import numba, numpy as np
from numba.core.compiler_lock import global_compiler_lock as lock
from diagcompile.ops import cpu_kernels  # registers the at-fork handlers

def compile_many():  # fresh functions, so each call compiles (and holds numba's compiler lock meanwhile)
    for i in range(40):
        scope = {}
        exec(f"def f(a):\\n    return a.sum() * {i}\\n", scope)
        numba.njit(cache=False)(scope["f"])(np.ones(3))

threading.Thread(target=compile_many, daemon=True).start()
while lock._lock.acquire(blocking=False):  # until the other thread is compiling
    lock._lock.release()
    time.sleep(0.001)
pid = os.fork()
if pid == 0:
    os._exit(0 if numba.njit(cache=False)(lambda a: a.sum())(np.ones(3)) == 3.0 else 3)
""" + _AWAIT_CHILD.format(seconds=120)


FORK_INTERRUPTED = """
import os, signal, threading, time, torch
from numba.core.compiler_lock import global_compiler_lock as lock
from diagcompile.ops import cpu_kernels as K
from diagcompile.testing import random_problem
K._MIN_PARALLEL_WORK = 1
torch.set_num_threads(2)
x, values, offsets, bias = random_problem(300, 1000, 40, batch=(9,))
expected = K.forward(x, values, offsets, bias, 300)   # compiles, starts the thread pool
compiling, done = threading.Event(), threading.Event()

def compile_():  # another thread's compile, under numba's lock, until the Ctrl-C
    with lock:
        compiling.set()
        done.wait(60)

def ctrl_c(signum, frame):
    done.set()
    raise KeyboardInterrupt

signal.signal(signal.SIGINT, ctrl_c)
threading.Thread(target=compile_, daemon=True).start()
compiling.wait()
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # while the fork waits for the compile
pid = os.fork()
if pid == 0:
    ok = torch.equal(K.forward(x, values, offsets, bias, 300), expected)  # 2 threads in the child
    os._exit(0 if ok else 3)
""" + _AWAIT_CHILD.format(seconds=60)


def test_a_fork_whose_wait_for_a_compile_is_interrupted_still_gives_the_child_its_own_pool():
    """A Ctrl-C during the fork's wait for the compiler lock (CPython only prints an at-fork handler's exception
    and forks) made the child's handler fail releasing a lock it did not hold, before it replaced the parent's
    thread pool: the child's first threaded kernel call hung on threads it does not have."""
    assert run_python(FORK_INTERRUPTED, timeout=300).strip().splitlines()[-1] == "child 0"


def test_a_child_forked_during_a_compile_in_another_thread_compiles():
    """It inherited numba's compiler lock held by a thread it does not have, and hung at its first compile
    (DataLoader workers forked while a server thread compiled a kernel); the fork now waits for the compile."""
    assert run_python(FORK_DURING_COMPILE, timeout=300).strip() == "child 0"


# ----------------------------------------------------------------------------------------------------
# JIT cache
# ----------------------------------------------------------------------------------------------------
CACHE = """
import torch
from diagcompile.ops import cpu_kernels as K
from diagcompile.testing import random_problem
x, values, offsets, bias = random_problem(5, 9, 3, batch=(2,))
K.forward(x, values, offsets, bias, 5)
st = K._rows_at.stats
print(type(K._rows_at._cache).__name__, sum(st.cache_hits.values()), sum(st.cache_misses.values()))
"""


@pytest.mark.skipif(
    not hasattr(K.numba.core.config, "CACHE_LOCATOR_CLASSES"),
    reason=f"numba {K.numba.__version__}: no NUMBA_CACHE_LOCATOR_CLASSES (0.62+) to simulate a read-only install",
)
def test_jit_cache_falls_back_to_the_user_cache_dir(tmp_path):
    """A read-only install makes numba skip the in-tree ``__pycache__`` and use the user cache dir: the
    second process loads the machine code instead of compiling it again."""
    env = {"NUMBA_CACHE_LOCATOR_CLASSES": "UserWideCacheLocator", "XDG_CACHE_HOME": str(tmp_path)}
    first = run_python(CACHE, env=env, timeout=300).split()
    second = run_python(CACHE, env=env, timeout=300).split()
    assert first == ["FunctionCache", "0", "1"]  # compiled and saved
    assert second == ["FunctionCache", "1", "0"]  # loaded
    assert list((tmp_path / "numba").rglob("cpu_kernels._rows_at-*.nbi"))


def test_kernels_compile_without_a_writable_cache_dir():
    """Where no cache location is writable numba raises at decoration time; ``_jit`` compiles per process
    instead. A function whose source file does not exist has no cache location at all."""
    scope: dict = {}
    exec(compile("def f(a):\n    return a[0] * 2.0\n", "<no file>", "exec"), scope)
    f = K._jit(scope["f"])
    assert f(torch.ones(3).numpy()) == 2.0
    assert type(f._cache).__name__ == "NullCache"


# ----------------------------------------------------------------------------------------------------
# Validation and dispatch
# ----------------------------------------------------------------------------------------------------
def test_supports_and_unsupported_dtypes_raise_clearly():
    assert K.supports(torch.float32) and K.supports(torch.float64)
    assert not K.supports(torch.bfloat16) and not K.supports(torch.float16)
    x, values, offsets, bias = random_problem(6, 10, 3, batch=(2,), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        K.forward(x, values, offsets, bias, 6)
    with force_path("kernel"), pytest.raises(RuntimeError, match="no diagonal kernel for torch.bfloat16"):
        OPS.diag_linear(x, values, offsets, bias, 6)
    with force_path("kernel"), pytest.raises(RuntimeError, match="no diagonal kernel for torch.float16"):
        OPS.diag_linear_dv(torch.randn(2, 6).half(), x.half(), offsets)


def test_bad_arguments_raise_value_errors():
    x, values, offsets, bias = random_problem(6, 10, 3, batch=(2,))
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, P=10\)"):
        K.forward(x, values, torch.tensor([0, 4, 10], dtype=torch.int32), bias, 6)
    with pytest.raises(ValueError, match=r"offsets must lie"):
        K.values_grad(torch.randn(2, 6), x, torch.tensor([-1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"values must be \(k, D\)"):
        K.forward(x, values[:, :5], offsets, bias, 6)
    with pytest.raises(ValueError, match="bias"):
        K.forward(x, values, offsets, bias[:4], 6)
    with pytest.raises(ValueError, match="disagree on M"):
        K.values_grad(torch.randn(3, 6), x, offsets)


#: One layer (N_out, N_in) per shape class of the table: narrow and broad, tall and wide.
CLASS_LAYERS = {
    ("tall", 64): (256, 64),
    ("wide", 64): (64, 256),
    ("square", 64): (64, 64),
    ("tall", 256): (512, 128),
    ("wide", 256): (128, 512),
    ("square", 256): (128, 128),
    ("tall", dispatch_table.D_EDGES[-1]): (3072, 768),
    ("wide", dispatch_table.D_EDGES[-1]): (768, 3072),
    ("square", dispatch_table.D_EDGES[-1]): (768, 768),
}


def _table_cases(rule):
    lo = 0.0
    for edge, max_m in zip(rule["density_edges"], rule["max_m"]):
        yield (lo + edge) / 2, max_m
        lo = edge


#: A thread count in each thread bucket of the table.
THREADS_IN_BUCKET = {1: 1, dispatch_table.THREAD_EDGES[-1]: 2}


def test_shape_classes_and_thread_buckets_cover_the_table():
    assert set(CLASS_LAYERS) == set(dispatch_table.SHAPE_CLASSES)
    for cls, (n_out, n_in) in CLASS_LAYERS.items():
        assert dispatch.shape_class(n_out, n_in) == cls
    big = dispatch_table.D_EDGES[-1]
    assert dispatch.shape_class(64, 64) == ("square", 64)
    assert dispatch.shape_class(64, 127) == ("square", 64)  # wide, but the long side is under twice the short
    assert dispatch.shape_class(64, 128) == ("wide", 64)
    assert dispatch.shape_class(65, 64) == ("tall", 64)
    assert dispatch.shape_class(130, 65) == ("tall", 256)  # tall layers are not split by aspect
    assert dispatch.shape_class(65, 65) == ("square", 256)
    assert dispatch.shape_class(256, 256) == ("square", 256)
    assert dispatch.shape_class(257, 256) == ("tall", 256)
    assert dispatch.shape_class(257, 257) == ("square", big)  # D = 257: past the narrow edge
    assert dispatch.shape_class(300, 4096) == ("wide", big)
    assert set(THREADS_IN_BUCKET) == set(dispatch_table.THREAD_EDGES)
    for edge, n in THREADS_IN_BUCKET.items():
        assert dispatch.thread_bucket(n) == edge
    assert dispatch.thread_bucket(64) == dispatch_table.THREAD_EDGES[-1]
    assert {key for key in dispatch_table.TABLE if key[0] == "cpu"} == {("cpu", *k) for k in dispatch_table.RULE_KEYS}


@pytest.mark.parametrize("op", ["fwd", "dx", "dv"])
@pytest.mark.parametrize("cls", list(CLASS_LAYERS))
@pytest.mark.parametrize("t_edge", list(THREADS_IN_BUCKET))
def test_dispatch_picks_the_kernel_where_the_cpu_table_says(op, cls, t_edge):
    key = ("cpu", op, *cls, t_edge)
    assert key in dispatch_table.TABLE, f"the CPU section of ops/dispatch_table.py has no rule {key}"
    rule = dispatch_table.TABLE[key]["kernel"]
    n_out, n_in = CLASS_LAYERS[cls]
    P = max(n_out, n_in)
    threads = THREADS_IN_BUCKET[t_edge]

    def path(dtype, M, k):
        return dispatch.choose_path(dispatch.Problem(op, "cpu", dtype, M, n_out, n_in, k, threads))

    for density, max_m in _table_cases(rule):
        k = max(1, round(density * P))
        assert dispatch._threshold(rule, k / P) == max_m
        if max_m > 0:
            assert path(torch.float32, max_m, k) == "kernel"
            assert path(torch.float64, 1, k) == "kernel"
        assert path(torch.float32, max_m + 1, k) != "kernel"
        # No kernel for bf16: dispatch falls back to another path instead of failing.
        assert path(torch.bfloat16, 1, k) != "kernel"


def test_dispatch_reads_the_rule_of_the_layers_own_class_and_thread_count(monkeypatch):
    # Same op, M, density: only the shape class and thread count differ, so only they can change the path.
    kernel_everywhere = {"density_edges": [1.0], "max_m": [2**31 - 1]}
    never = {"density_edges": [1.0], "max_m": [0]}
    table = dict(dispatch_table.TABLE)
    for cls in dispatch_table.SHAPE_CLASSES:
        for t_edge in dispatch_table.THREAD_EDGES:
            kernel = kernel_everywhere if (cls, t_edge) == (("tall", 64), 1) else never
            table[("cpu", "fwd", *cls, t_edge)] = {"kernel": kernel, "reference": never}
    monkeypatch.setattr(dispatch_table, "TABLE", table)
    for cls, (n_out, n_in) in CLASS_LAYERS.items():
        for threads in (1, 2):
            p = dispatch.Problem("fwd", "cpu", torch.float32, 64, n_out, n_in, max(1, max(n_out, n_in) // 10), threads)
            want = "kernel" if (cls, threads) == (("tall", 64), 1) else "dense"
            assert dispatch.choose_path(p) == want, (cls, threads)
    # By default a call takes torch's thread count at the time it is made.
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p = dispatch.Problem("fwd", "cpu", torch.float32, 64, 256, 64, 6)
            assert p.threads == threads
            assert dispatch.choose_path(p) == ("kernel" if threads == 1 else "dense")
    finally:
        torch.set_num_threads(before)

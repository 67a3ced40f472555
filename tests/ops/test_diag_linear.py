"""The op contract: opcheck, autograd through our backward ops, every dispatch path, double backward."""

import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import diagcompile  # noqa: F401  (registers the ops)
from diagcompile.ops import call_diag_linear, dispatch, force_path, to_dense
from diagcompile.ops import reference as R
from diagcompile.ops.diag_linear import _DiagLinearFunction
from diagcompile.testing import (
    LAYER_SHAPES,
    dense_from_convention,
    deterministic_algorithms,
    random_problem,
    rel_err,
)

OPS = torch.ops.diagcompile
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _args(n_out, n_in, k, batch, dtype, grad, bias=True):
    x, values, offsets, b = random_problem(n_out, n_in, k, batch=batch, dtype=dtype, bias=bias)
    b = b if b is not None else values.new_empty(0)
    for t in (x, values, b) if grad else ():
        t.requires_grad_(True)
    return x, values, offsets, b


def _ks(n_out, n_in):
    P = max(n_out, n_in)
    return sorted({1, max(1, P // 3), P})


CASES = [
    pytest.param(n_out, n_in, k, id=f"{n_out}x{n_in}-k{k}") for n_out, n_in in LAYER_SHAPES for k in _ks(n_out, n_in)
]


@pytest.mark.parametrize("n_out,n_in,k", CASES)
@pytest.mark.parametrize("batch", [(0,), (1,), (2, 3)], ids=["empty", "m1", "3d"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "nograd"])
def test_opcheck_all_ops_fp32(n_out, n_in, k, batch, grad):
    x, values, offsets, b = _args(n_out, n_in, k, batch, torch.float32, grad)
    torch.library.opcheck(OPS.diag_linear, (x, values, offsets, b, n_out), test_utils=OPCHECK_UTILS)
    dy = torch.randn(*batch, n_out, requires_grad=grad)
    torch.library.opcheck(OPS.diag_linear_dx, (dy, values, offsets, n_in), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(OPS.diag_linear_dv, (dy, x, offsets), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("n_out,n_in", [(7, 13), (13, 7), (12, 12)])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "nograd"])
def test_opcheck_other_dtypes(dtype, n_out, n_in, grad):
    x, values, offsets, b = _args(n_out, n_in, 3, (2, 3), dtype, grad)
    torch.library.opcheck(OPS.diag_linear, (x, values, offsets, b, n_out), test_utils=OPCHECK_UTILS)
    dy = torch.randn(2, 3, n_out, dtype=dtype, requires_grad=grad)
    torch.library.opcheck(OPS.diag_linear_dx, (dy, values, offsets, n_in), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(OPS.diag_linear_dv, (dy, x, offsets), test_utils=OPCHECK_UTILS)


def test_opcheck_without_bias():
    x, values, offsets, b = _args(13, 7, 4, (5,), torch.float32, True, bias=False)
    assert b.numel() == 0
    torch.library.opcheck(OPS.diag_linear, (x, values, offsets, b, 13), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("path", ["reference", "dense", "auto"])
@pytest.mark.parametrize("n_out,n_in", LAYER_SHAPES)
def test_every_path_equals_the_independent_dense_construction(path, n_out, n_in):
    k = max(1, max(n_out, n_in) // 2)
    x, values, offsets, b = _args(n_out, n_in, k, (2, 3), torch.float64, True)
    W = dense_from_convention(values, offsets, n_out, n_in).requires_grad_(True)
    xd = x.detach().clone().requires_grad_(True)
    bd = b.detach().clone().requires_grad_(True)
    y_ref = xd @ W.T + bd
    g = torch.randn_like(y_ref)
    dx_ref, dW_ref, db_ref = torch.autograd.grad(y_ref, (xd, W, bd), g)
    with force_path(path):
        y = OPS.diag_linear(x, values, offsets, b, n_out)
        dx, dv, db = torch.autograd.grad(y, (x, values, b), g)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(dx, dx_ref) < 1e-12
    assert rel_err(dv, R.extract_diagonals(dW_ref, offsets)) < 1e-12
    assert rel_err(db, db_ref) < 1e-12


@pytest.mark.parametrize("n_out,n_in", [(7, 13), (13, 7), (6, 6), (1, 5), (5, 1)])
def test_gradcheck_and_gradgradcheck_fp64(n_out, n_in):
    x, values, offsets, b = _args(n_out, n_in, 2, (3,), torch.float64, True)

    def f(x, values, b):
        return OPS.diag_linear(x, values, offsets, b, n_out)

    assert torch.autograd.gradcheck(f, (x, values, b))
    assert torch.autograd.gradgradcheck(f, (x, values, b))


@pytest.mark.parametrize("path", ["reference", "dense"])
def test_low_precision_error_is_within_twice_torchs_own(path):
    from diagcompile.testing import bf16_oracle_check

    for n_out, n_in in [(96, 64), (64, 96)]:
        x, values, offsets, b = random_problem(n_out, n_in, 20, batch=(16,), dtype=torch.bfloat16)
        W64 = to_dense(values.double(), offsets, n_out, n_in)
        ref64 = x.double() @ W64.T + b.double()
        torch_bf16 = torch.nn.functional.linear(x, to_dense(values, offsets, n_out, n_in), b)
        with force_path(path):
            y = OPS.diag_linear(x, values, offsets, b, n_out)
        assert y.dtype == torch.bfloat16
        bf16_oracle_check(y, torch_bf16, ref64, f"{path} {n_out}x{n_in}")


def test_output_is_fresh_never_an_alias():
    x, values, offsets, b = _args(5, 5, 5, (5,), torch.float32, False, bias=False)
    for path in ("reference", "dense"):
        with force_path(path):
            y = OPS.diag_linear(x, values, offsets, b, 5)
        assert y.data_ptr() not in (x.data_ptr(), values.data_ptr())


def test_force_path_validation_and_env(monkeypatch):
    with pytest.raises(ValueError, match="unknown path"):
        with force_path("fast"):
            pass
    monkeypatch.setenv("DIAGCOMPILE_FORCE_PATH", "dense")
    assert dispatch.forced_path() == "dense"
    monkeypatch.setenv("DIAGCOMPILE_FORCE_PATH", "bogus")
    with pytest.raises(ValueError, match="DIAGCOMPILE_FORCE_PATH"):
        dispatch.forced_path()


def test_force_path_blocks_closing_out_of_order_leave_nothing_behind():
    # Two blocks that close in the order they opened (two threads, generators): each undoes only its own
    # setting, and once both are closed dispatch is automatic again.
    outer, inner = force_path("kernel"), force_path("dense")
    outer.__enter__()
    inner.__enter__()
    assert dispatch.forced_path() == "dense"
    outer.__exit__(None, None, None)
    assert dispatch.forced_path() == "dense"
    inner.__exit__(None, None, None)
    assert dispatch.forced_path() is None
    with force_path("dense"):
        with force_path(None):
            assert dispatch.forced_path() is None
        assert dispatch.forced_path() == "dense"
    assert dispatch.forced_path() is None


def test_a_force_path_opened_by_another_thread_mid_call_is_not_memoized(monkeypatch):
    # path_for finds nothing forced, then another thread opens force_path("reference") before the rule is read:
    # this call may take either path, but the shape's memo entry must stay the table's answer, or the forced
    # path outlives the block for every later call of that shape.
    call = ("fwd", "cpu", torch.float32, 37, 512, 512, 40)
    want = dispatch.choose_path(dispatch.Problem(*call))
    dispatch.clear_path_memo()
    answers = iter([None])
    monkeypatch.setattr(dispatch, "forced_path", lambda: next(answers, "reference"))
    dispatch.path_for(*call)
    monkeypatch.undo()
    assert dispatch.forced_path() is None
    assert dispatch.path_for(*call) == want != "reference"


def test_force_path_blocks_in_other_threads_never_break_a_call():
    # forced_path() read the innermost block after testing the list, and a block's exit searched it by an
    # index: a block closing in another thread meanwhile raised IndexError in either.
    import sys
    import threading
    import time

    errors: list[BaseException] = []
    stop = threading.Event()

    def blocks():
        try:
            while not stop.is_set():
                with force_path("dense"):
                    pass
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=blocks) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 1.0
        while not errors and time.monotonic() < deadline:
            for _ in range(1000):
                dispatch.forced_path()
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    assert dispatch.forced_path() is None


def test_dispatch_is_a_pure_function_of_shapes():
    # Fully dense diagonals at large M: the GEMM wins (at 90% sparsity the CPU kernel wins even here).
    p = dispatch.Problem("fwd", "cpu", torch.float32, 4096, 3072, 768, 3072)
    assert dispatch.choose_path(p) == dispatch.choose_path(p) == "dense"
    assert dispatch.choose_path(dispatch.Problem("fwd", "cpu", torch.float32, 0, 3072, 768, 308)) == "reference"


def test_inline_in_graph_is_a_rule_for_small_float_cpu_layers():
    f32, inline = torch.float32, dispatch.inline_in_graph
    work = dispatch.INLINE_MAX_WORK
    assert inline("cpu", f32, 17, 64, 256) and inline("cpu", torch.float64, 1, 64, 64)
    assert inline("cpu", f32, work // 4096, 64, 64) and not inline("cpu", f32, work // 4096 + 1, 64, 64)
    assert not inline("cpu", f32, 1, 256, 256)  # the weight alone is past the edge: the kernel wins
    # A dynamic M has no work bound to test: only the smaller weights.
    assert inline("cpu", f32, None, 64, 256) and not inline("cpu", f32, None, 128, 256)
    assert inline("cpu", f32, 1, 128, 256)
    assert not inline("cuda", f32, 1, 64, 64) and not inline("cpu", torch.bfloat16, 1, 64, 64)
    with force_path("kernel"):  # a pinned path asks for the op's own paths
        assert not inline("cpu", f32, 1, 64, 64)


def test_path_for_is_choose_path_and_follows_the_table(monkeypatch):
    from diagcompile.ops import dispatch_table

    call = ("fwd", "cpu", torch.float32, 64, 256, 64, 26)
    assert dispatch.path_for(*call) == dispatch.choose_path(dispatch.Problem(*call)) == "kernel"
    never = {"density_edges": [1.0], "max_m": [0]}
    table = {key: {"kernel": never, "reference": never} for key in dispatch_table.TABLE}
    monkeypatch.setattr(dispatch_table, "TABLE", table)  # a new table object: the memo is dropped
    assert dispatch.path_for(*call) == "dense"
    table[("cpu", "fwd", "tall", 64, dispatch.thread_bucket(torch.get_num_threads()))] = dict(
        kernel={"density_edges": [1.0], "max_m": [2**31 - 1]}, reference=never
    )
    assert dispatch.path_for(*call) == "dense"  # edited in place: remembered until cleared
    dispatch.clear_path_memo()
    assert dispatch.path_for(*call) == "kernel"
    with force_path("reference"):  # forcing is never memoized
        assert dispatch.path_for(*call) == "reference"
    assert dispatch.path_for(*call) == "kernel"


def test_path_for_remembers_a_layer_not_a_batch_size():
    """A server whose batch size or sequence length changes every call: one memo entry per layer shape, and the
    same answer as choose_path at every M, across the table's limits (the memo used to hold one entry per M, and
    emptied itself at 4096)."""
    dispatch.clear_path_memo()
    layers = [(64, 64, 7), (256, 64, 26), (64, 256, 26), (512, 2048, 205), (4096, 1024, 410)]
    for op in ("fwd", "dx", "dv"):
        for n_out, n_in, k in layers:
            for M in [*range(0, 300), *range(300, 5000, 7)]:
                call = (op, "cpu", torch.float32, M, n_out, n_in, k)
                assert dispatch.path_for(*call) == dispatch.choose_path(dispatch.Problem(*call)), call
    assert len(dispatch._memo) == 3 * len(layers)


# ----------------------------------------------------------------------------------------------------
# The eager call path (call_diag_linear): same bits and gradients as the op, and the op itself wherever
# anything but autograd could observe the call.
# ----------------------------------------------------------------------------------------------------
def _route(y):
    """How ``y`` was made: ``"eager"`` (call_diag_linear's own Function), ``"op"`` (any other autograd node, the
    op's), or ``None`` (no graph)."""
    if y.grad_fn is None:
        return None
    return "eager" if isinstance(y.grad_fn, _DiagLinearFunction._backward_cls) else "op"


def _forward_and_grads(fn, x, values, offsets, b, n_out):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, values, b)]
    y = fn(leaves[0], leaves[1], offsets, leaves[2], n_out)
    route = _route(y)
    if y.requires_grad:
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype))
    return y.detach(), [t.grad for t in leaves], route


@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
@pytest.mark.parametrize("n_out,n_in,bias", [(24, 10, True), (10, 24, False), (16, 16, True)])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "nograd"])
def test_eager_call_has_the_ops_bits_and_gradients(path, n_out, n_in, bias, grad):
    x, values, offsets, b = _args(n_out, n_in, 5, (2, 3), torch.float32, grad, bias=bias)
    with force_path(path):
        y_fast, g_fast, name_fast = _forward_and_grads(call_diag_linear, x, values, offsets, b, n_out)
        y_op, g_op, name_op = _forward_and_grads(OPS.diag_linear, x, values, offsets, b, n_out)
    assert name_fast == ("eager" if grad else None) and name_op == ("op" if grad else None)
    assert torch.equal(y_fast, y_op)
    for gf, go in zip(g_fast, g_op):
        assert (gf is None and go is None) or torch.equal(gf, go)


def test_eager_call_double_backward_goes_through_the_ops():
    x, values, offsets, b = _args(9, 14, 4, (3,), torch.float64, True)
    fn = lambda x, v, b: call_diag_linear(x, v, offsets, b, 9)  # noqa: E731
    assert _route(fn(x, values, b)) == "eager"
    assert torch.autograd.gradgradcheck(fn, (x, values, b))


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
def test_raw_op_calls_its_kernel_directly_only_where_a_redispatch_would(path):
    # The ops' autograd kernel calls the implementation itself when the next dispatch key is the backend, and
    # redispatches otherwise (a dispatch mode must see the op, not its insides): same bits and gradients.
    n_out = 13
    x, values, offsets, b = _args(n_out, 7, 4, (2, 3), torch.float32, True)

    def run():
        for t in (x, values, b):
            t.grad = None
        y = OPS.diag_linear(x, values, offsets, b, n_out)
        y.backward(torch.ones_like(y))  # through diag_linear_dx / _dv, the same autograd kernel
        return y.detach(), x.grad, values.grad, b.grad

    with force_path(path):
        direct = run()
        with _RecordOps() as rec:
            dispatched = run()
        with torch.no_grad():
            no_grad = OPS.diag_linear(x, values, offsets, b, n_out)
        with torch.inference_mode():  # no autograd key at all: the backend kernel itself
            inference = OPS.diag_linear(x, values, offsets, b, n_out)
    assert rec.ops.count("diagcompile.diag_linear.default") == 1
    assert {"diagcompile.diag_linear_dx.default", "diagcompile.diag_linear_dv.default"} <= set(rec.ops)
    for a, d in zip(direct, dispatched):
        assert torch.equal(a, d)
    assert torch.equal(no_grad, direct[0]) and torch.equal(inference, direct[0])
    ref = R.diag_linear_ref(x.detach().reshape(-1, 7), values.detach(), offsets, b.detach(), n_out)
    torch.testing.assert_close(direct[0].reshape(-1, n_out), ref)


def test_raw_op_behaves_alike_on_every_path_under_forward_ad_and_names_its_backward_nodes():
    # The autograd kernel runs the implementation below autograd on every path: a forward-AD dual that does not
    # require grad gets no tangent from the raw op (it has no jvp formula; the user API has one), whether the
    # dense path's torch ops or the kernel run it.
    n_out = 8
    x, values, offsets, b = _args(n_out, 8, 3, (4,), torch.float64, False)
    tangents = []
    for path in ("kernel", "dense", "reference"):
        with force_path(path), fwAD.dual_level():
            y = OPS.diag_linear(fwAD.make_dual(x, torch.randn_like(x)), values, offsets, b, n_out)
            tangents.append(fwAD.unpack_dual(y).tangent)
    assert tangents == [None, None, None]
    x, values, offsets, b = _args(n_out, 8, 3, (4,), torch.float64, True)
    y = OPS.diag_linear(x, values, offsets, b, n_out)
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert (y.grad_fn.name(), dx.grad_fn.name()) == ("diag_linearBackward", "diag_linear_dxBackward")


def test_eager_call_is_the_op_wherever_something_observes_it():
    x, values, offsets, b = _args(24, 10, 5, (4,), torch.float32, True)
    fwd = lambda: call_diag_linear(x, values, offsets, b, 24)  # noqa: E731
    assert _route(fwd()) == "eager"

    # A dispatch mode (what fake tensors, make_fx, FlopCounterMode and DebugMode are) sees every op.
    with _RecordOps() as rec:
        fwd().sum().backward()
    assert {"diagcompile.diag_linear.default", "diagcompile.diag_linear_dx.default"} <= set(rec.ops)
    assert "diagcompile.diag_linear_dv.default" in rec.ops

    # The profiler lists the op.
    with torch.profiler.profile() as prof:
        fwd()
    assert any(e.key == "diagcompile::diag_linear" for e in prof.key_averages())

    # A torch-function mode, a tensor subclass and make_fx: the op (and its autograd) as before.
    with torch.device("cpu"):
        assert _route(fwd()) == "op"
    xs = x.detach().as_subclass(_Subclass)
    _Subclass.seen.clear()
    call_diag_linear(xs, values, offsets, b, 24)
    assert _Subclass.seen == ["diagcompile.diag_linear"]
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x: call_diag_linear(x, values, offsets, b, 24))(x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [OPS.diag_linear.default]

    # A functorch transform: vmap runs the op (through its vmap rule; the numba provider could not read a batched
    # tensor's data) and gets the op's result.
    with torch.no_grad():
        y = torch.vmap(lambda xi: call_diag_linear(xi, values, offsets, b, 24))(x.detach().unsqueeze(1))
    assert torch.equal(y.squeeze(1), OPS.diag_linear(x.detach(), values.detach(), offsets, b.detach(), 24))


@pytest.fixture
def no_vmap_fallback():
    """vmap raises instead of falling back to torch's per-element loop: a missing vmap rule fails the test."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(True)


def _dense_fn(values, offsets, b, n_out, n_in):
    """The layer as plain torch ops on ``to_dense``: what every transform of ``call_diag_linear`` must match."""
    return lambda x, v=values, bb=b: x @ to_dense(v, offsets, n_out, n_in).T + bb


@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
@pytest.mark.parametrize("n_out,n_in", [(12, 7), (7, 12)])
def test_forward_mode_ad_matches_the_dense_layer(path, n_out, n_in):
    # Through the raw op torch.func.jvp returns a zero tangent (the op has no forward formula); the user API
    # carries one (the op is linear in x, in values and in bias).
    x, values, offsets, b = _args(n_out, n_in, 4, (5,), torch.float64, False)
    tx, tv, tb = torch.randn_like(x), torch.randn_like(values), torch.randn_like(b)
    fn = lambda x, v, bb: call_diag_linear(x, v, offsets, bb, n_out)  # noqa: E731
    dense = _dense_fn(values, offsets, b, n_out, n_in)
    with force_path(path):
        _, raw = torch.func.jvp(lambda x: OPS.diag_linear(x, values, offsets, b, n_out), (x,), (tx,))
        assert not raw.any()  # the raw op's silent zero (why the user API routes around it)
        y, t = torch.func.jvp(fn, (x, values, b), (tx, tv, tb))
        y_ref, t_ref = torch.func.jvp(dense, (x, values, b), (tx, tv, tb))
        torch.testing.assert_close((y, t), (y_ref, t_ref))
        torch.testing.assert_close(torch.func.jacfwd(fn)(x[0], values, b), to_dense(values, offsets, n_out, n_in))
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(x, tx), values, b)
            torch.testing.assert_close(fwAD.unpack_dual(out).tangent, tx @ to_dense(values, offsets, n_out, n_in).T)
            assert torch.equal(fn(x, values, b), OPS.diag_linear(x, values, offsets, b, n_out))


@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
def test_torch_func_grad_and_per_sample_gradients(path, no_vmap_fallback):
    # torch.func.grad through the raw op fails inside torch (its autograd Function runs inside the dispatcher);
    # vmap(grad) - per-sample gradients - needs vmap rules for all three ops (the fallback is off here).
    n_out, n_in = 9, 14
    x, values, offsets, b = _args(n_out, n_in, 4, (6,), torch.float64, False)
    loss = lambda x, v, bb: call_diag_linear(x, v, offsets, bb, n_out).pow(2).sum()  # noqa: E731
    dense_loss = lambda x, v, bb: _dense_fn(values, offsets, b, n_out, n_in)(x, v, bb).pow(2).sum()  # noqa: E731
    with force_path(path):
        grads = torch.func.grad(loss, argnums=(0, 1, 2))(x, values, b)
        torch.testing.assert_close(grads, torch.func.grad(dense_loss, argnums=(0, 1, 2))(x, values, b))
        per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(1, 2)), in_dims=(0, None, None))(x, values, b)
        for i in range(x.shape[0]):
            torch.testing.assert_close(
                (per_sample[0][i], per_sample[1][i]), torch.func.grad(dense_loss, argnums=(1, 2))(x[i], values, b)
            )


@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
def test_torch_func_vjp(path):
    # vjp's function runs the backward after its level has exited: the saved tensors are that level's dead wrappers,
    # which have no memory of their own (the CPU kernels, reading addresses, raised "Cannot access data pointer" on
    # every path: the others check the offsets with them).
    n_out, n_in = 9, 14
    x, values, offsets, b = _args(n_out, n_in, 4, (6,), torch.float64, False)
    dy = torch.randn(6, n_out, dtype=torch.float64)
    dense = _dense_fn(values, offsets, b, n_out, n_in)
    cases = {  # what is differentiated: x only, values only, all three
        "x": (lambda x: call_diag_linear(x, values, offsets, b, n_out), lambda x: dense(x, values, b), (x,)),
        "values": (lambda v: call_diag_linear(x, v, offsets, b, n_out), lambda v: dense(x, v, b), (values,)),
        "all": (lambda *a: call_diag_linear(a[0], a[1], offsets, a[2], n_out), dense, (x, values, b)),
    }
    with force_path(path):
        for name, (fn, dense_fn, primals) in cases.items():
            y, vjp_fn = torch.func.vjp(fn, *primals)
            y_dense, vjp_dense = torch.func.vjp(dense_fn, *primals)
            torch.testing.assert_close(y, y_dense, msg=name)
            torch.testing.assert_close(vjp_fn(dy), vjp_dense(dy), msg=name)


@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
def test_hessians_forward_over_reverse(path):
    n_out, n_in = 6, 9
    x, values, offsets, b = _args(n_out, n_in, 3, (4,), torch.float64, False)
    f = lambda x, v: call_diag_linear(x, v, offsets, b, n_out).pow(3).sum()  # noqa: E731
    dense = lambda x, v: _dense_fn(values, offsets, b, n_out, n_in)(x, v).pow(3).sum()  # noqa: E731
    with force_path(path):
        for arg in (0, 1):
            torch.testing.assert_close(
                torch.func.hessian(f, argnums=arg)(x, values), torch.func.hessian(dense, argnums=arg)(x, values)
            )


@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
def test_vmap_rules_fold_the_batch_or_loop_over_batched_weights(path, no_vmap_fallback):
    n_out, n_in = 10, 7
    x, values, offsets, b = _args(n_out, n_in, 3, (5, 4), torch.float32, False)  # vmap over dim 1 of x
    fn = lambda x, v: call_diag_linear(x, v, offsets, b, n_out)  # noqa: E731
    with force_path(path):
        y = torch.vmap(fn, in_dims=(1, None))(x, values)
        assert torch.equal(y, OPS.diag_linear(x.movedim(1, 0), values, offsets, b, n_out))
        vs = torch.stack([values, 2 * values, -values])  # one layer per batch element
        y = torch.vmap(fn, in_dims=(None, 0))(x, vs)
        assert y.shape == (3, 5, 4, n_out)
        for i in range(3):
            assert torch.equal(y[i], OPS.diag_linear(x, vs[i], offsets, b, n_out))
        dy = torch.randn(3, 5, 4, n_out)
        dv = torch.vmap(lambda d, x: OPS.diag_linear_dv(d, x, offsets))(dy, x.expand(3, 5, 4, n_in))
        for i in range(3):
            assert torch.equal(dv[i], OPS.diag_linear_dv(dy[i], x, offsets))


@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
def test_forward_over_forward_keeps_the_mixed_terms(path):
    # torch never differentiates an autograd.Function's jvp at an outer forward level: through one, the mixed
    # second derivative d2/dV dx of jacfwd(jacfwd) would be silently zero. The layer goes dense there instead.
    n_out, n_in = 7, 10
    x, values, offsets, b = _args(n_out, n_in, 3, (4,), torch.float64, False)
    f = lambda x, v: call_diag_linear(x, v, offsets, b, n_out).sin().sum()  # noqa: E731
    dense = lambda x, v: _dense_fn(values, offsets, b, n_out, n_in)(x, v).sin().sum()  # noqa: E731
    mixed = lambda fn: torch.func.jacfwd(torch.func.jacfwd(fn, argnums=1), argnums=0)(x, values)  # noqa: E731
    with force_path(path):
        got = mixed(f)
        assert got.abs().max() > 0.1
        torch.testing.assert_close(got, mixed(dense))
        tx, tv = torch.randn_like(x), torch.randn_like(values)
        inner = lambda fn: lambda x: torch.func.jvp(lambda v: fn(x, v), (values,), (tv,))[1]  # noqa: E731
        torch.testing.assert_close(torch.func.jvp(inner(f), (x,), (tx,)), torch.func.jvp(inner(dense), (x,), (tx,)))


def test_functionalize_and_make_fx_still_see_the_op():
    x, values, offsets, b = _args(7, 10, 3, (4,), torch.float32, False)
    f = lambda x: call_diag_linear(x, values, offsets, b, 7)  # noqa: E731
    assert torch.equal(torch.func.functionalize(f)(x), f(x))
    gm = torch.fx.experimental.proxy_tensor.make_fx(torch.func.functionalize(f))(x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [OPS.diag_linear.default]


@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
def test_legacy_batched_autograd_matches_dense(path):
    # torch.autograd.functional(vectorize=True) and autograd.grad(is_grads_batched=True) batch with the legacy
    # vmap, which the eager fast path must not feed to the kernels; forward-mode there is refused by name.
    n_out, n_in = 6, 9
    x, values, offsets, b = _args(n_out, n_in, 3, (4,), torch.float64, False)
    f = lambda x: call_diag_linear(x, values, offsets, b, n_out).sin()  # noqa: E731
    dense = lambda x: _dense_fn(values, offsets, b, n_out, n_in)(x).sin()  # noqa: E731
    AF = torch.autograd.functional
    with force_path(path):
        torch.testing.assert_close(AF.jacobian(f, x, vectorize=True), AF.jacobian(dense, x))
        xg = x.clone().requires_grad_()
        v = torch.randn(3, *x.shape[:-1], n_out, dtype=x.dtype)
        (g,) = torch.autograd.grad(f(xg), xg, v, is_grads_batched=True)
        (g_ref,) = torch.autograd.grad(dense(xg), xg, v, is_grads_batched=True)
        torch.testing.assert_close(g, g_ref)
        with pytest.raises(NotImplementedError, match="legacy batching"):
            AF.jacobian(f, x, vectorize=True, strategy="forward-mode")


def test_vmap_over_an_empty_batch(no_vmap_fallback):
    n_out, n_in = 7, 10
    x, values, offsets, b = _args(n_out, n_in, 3, (0, 3), torch.float32, False)
    grads = torch.func.vmap(
        torch.func.grad(lambda x, v: call_diag_linear(x, v, offsets, b, n_out).sum(), argnums=1), in_dims=(0, None)
    )(x, values)
    assert grads.shape == (0, *values.shape)
    y = torch.vmap(lambda v: call_diag_linear(x[0:0].reshape(0, n_in), v, offsets, b, n_out))(values.expand(0, -1, -1))
    assert y.shape == (0, 0, n_out)


@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
@pytest.mark.parametrize("batch", [(5,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("fn", [call_diag_linear, OPS.diag_linear], ids=["eager", "op"])
def test_outputs_can_be_modified_in_place_under_autograd(path, batch, fn):
    # nn.ReLU(inplace=True) or `y += residual` after a diagonal layer: autograd refuses in-place ops on an output
    # that a custom op or Function returns as a view of its own intermediate.
    x, values, offsets, b = _args(24, 10, 5, batch, torch.float32, True)
    with force_path(path):
        y = fn(x, values, offsets, b, 24)
        assert y._base is None
        y.relu_()
        y.sum().backward()
        grads = [t.grad.clone() for t in (x, values, b)]
        for t in (x, values, b):
            t.grad = None
        fn(x, values, offsets, b, 24).relu().sum().backward()
    for got, t in zip(grads, (x, values, b)):
        assert torch.equal(got, t.grad)
    dy = torch.randn(*batch, 24, requires_grad=True)
    with force_path(path):
        dx = OPS.diag_linear_dx(dy, values, offsets, 10)
    assert dx._base is None
    dx.mul_(2).sum().backward()


@pytest.mark.parametrize("fn", [call_diag_linear, OPS.diag_linear], ids=["eager", "op"])
def test_backward_keeps_only_what_it_needs_alive(fn):
    # A frozen layer (values without grad) under an input that needs grad: its backward needs the values only, so
    # the input must not stay alive with the output (torch's linear saves nothing more either); with the values
    # trainable and the input not, the values and the input are kept, and the gradients are right either way.
    x0, values, offsets, b = _args(24, 10, 5, (6,), torch.float32, False)
    x0.requires_grad_(True)
    h = x0 * 2  # an activation nothing else keeps
    ref = weakref.ref(h)
    y = fn(h, values, offsets, b, 24)
    del h
    assert ref() is None
    y.sum().backward()
    assert torch.allclose(x0.grad, 2 * torch.ones(6, 24) @ to_dense(values, offsets, 24, 10), atol=1e-5)
    values.requires_grad_(True)
    x = torch.randn(6, 10)
    packed: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = fn(x, values, offsets, b, 24)
    assert any(t is x for t in packed) and not any(t is values for t in packed)
    y.sum().backward()
    dense = to_dense(values.detach(), offsets, 24, 10).requires_grad_(True)
    (x @ dense.T).sum().backward()
    assert torch.allclose(values.grad, R.extract_diagonals(dense.grad, offsets), atol=1e-5)


def test_eager_call_compiles_to_one_op_node():
    x, values, offsets, b = _args(24, 10, 5, (4,), torch.float32, False)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    fn = torch.compile(lambda x: call_diag_linear(x, values, offsets, b, 24), backend=backend, fullgraph=True)
    assert torch.equal(fn(x), OPS.diag_linear(x, values, offsets, b, 24))
    assert [str(t).removesuffix(".default") for t in seen] == ["diagcompile.diag_linear"]


def test_force_path_env_is_read_from_a_replaced_environ(monkeypatch):
    # mock.patch("os.environ", {...}) swaps the mapping object itself; the lookup must follow it.
    import os
    from unittest import mock

    from diagcompile.ops import dispatch

    with mock.patch.object(os, "environ", {"DIAGCOMPILE_FORCE_PATH": "dense"}):
        assert dispatch.forced_path() == "dense"
    assert dispatch.forced_path() is None


# ---- preconditions every path meets alike (the raw op is public) -----------------------------------------
@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
def test_invalid_offsets_and_mixed_dtypes_fail_the_same_way_on_every_path(path):
    # Before, a duplicate was summed by the kernel and written once by the dense scatter, the reference
    # wrapped an out-of-range offset, and mixed dtypes ran on the kernel path but raised deep in the GEMM.
    x, values, offsets, b = _args(16, 24, 4, (5,), torch.float32, grad=False)
    dy = torch.randn(5, 16)
    dup = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
    far = torch.tensor([0, 3, 9, 24], dtype=torch.int32)
    with force_path(path):
        for bad, msg in ((dup, "distinct; \\[3\\]"), (far, "lie in \\[0, P=24\\)")):
            with pytest.raises(ValueError, match=msg):
                OPS.diag_linear(x, values, bad, b, 16)
            with pytest.raises(ValueError, match=msg):
                OPS.diag_linear_dx(dy, values, bad, 24)
            with pytest.raises(ValueError, match=msg):
                OPS.diag_linear_dv(dy, x, bad)
        with pytest.raises(TypeError, match="diag_linear: the floating inputs must share one dtype"):
            OPS.diag_linear(x.double(), values, offsets, b, 16)
        with pytest.raises(TypeError, match="diag_linear_dx: the floating inputs must share one dtype"):
            OPS.diag_linear_dx(dy.double(), values, offsets, 24)
        with pytest.raises(TypeError, match="diag_linear_dv: the floating inputs must share one dtype"):
            OPS.diag_linear_dv(dy, x.double(), offsets)


@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
def test_bad_shapes_dtypes_and_offsets_fail_the_same_way_on_every_path(path):
    """Found by a review (2026-11-24): each of these ran on some paths and failed or differed on others."""
    x, values, offsets, b = _args(16, 24, 4, (5,), torch.float32, grad=False)
    dy = torch.randn(5, 16)
    with force_path(path):
        cases = [
            # the reference dropped an extra offset; the kernel and dense paths raised
            (
                ValueError,
                "needs values \\(k, 16\\) and offsets",
                lambda: OPS.diag_linear(x, values[:3], offsets, b, 16),
            ),
            (
                ValueError,
                "needs values \\(k, 16\\) and offsets",
                lambda: OPS.diag_linear_dx(dy, values[:3], offsets, 24),
            ),
            # a (1, N_out) bias ran forward, then backward refused its gradient
            (ValueError, "bias must be \\(16,\\)", lambda: OPS.diag_linear(x, values, offsets, b[None], 16)),
            (ValueError, "must share their leading dims", lambda: OPS.diag_linear_dv(dy, x.reshape(5, 1, 24), offsets)),
            # the kernel divided by zero, the other paths returned empty results
            (ValueError, "N_out, N_in >= 1", lambda: OPS.diag_linear(x, values[:, :0], offsets, b[:0], 0)),
            # int64 2**32 + 1 wrapped to 1 on the kernel and dense paths and was taken mod P by the reference
            (ValueError, "lie in \\[0, P=24\\)", lambda: OPS.diag_linear(x, values, offsets.long() + 2**32, b, 16)),
            (TypeError, "offsets must be int32", lambda: OPS.diag_linear(x, values, offsets.float(), b, 16)),
            # the kernel skipped its offsets check for an empty batch
            (ValueError, "lie in \\[0, P=24\\)", lambda: OPS.diag_linear(x[:0], values, offsets + 20, b, 16)),
        ]
        for error, msg, call in cases:
            with pytest.raises(error, match=msg):
                call()
    # integer tensors ran exactly on the dense path and lossily (through float32) on the reference
    with pytest.raises(TypeError, match="must be floating point"):
        OPS.diag_linear(x.long(), values.long(), offsets, b.long(), 16)


@pytest.mark.parametrize("path", ["kernel", "dense", "reference", None])
def test_zero_d_operands_and_zero_width_values_gradients_are_named_on_every_path(path):
    """Found by fuzzing (audit C): a 0-d x / dy raised a bare ``IndexError: tuple index out of range``, and a
    zero-width dy or x in diag_linear_dv divided by zero (kernel and auto paths), failed in a reshape
    (reference) or returned an empty (k, 0) (dense)."""
    x, values, offsets, b = _args(16, 24, 4, (5,), torch.float32, grad=False)
    dy, scalar = torch.randn(5, 16), torch.tensor(1.0)
    with force_path(path):
        cases = [
            (
                "diag_linear: x must be \\(..., features\\), got a 0-d",
                lambda: OPS.diag_linear(scalar, values, offsets, b, 16),
            ),
            ("diag_linear_dx: dy must be \\(..., features\\)", lambda: OPS.diag_linear_dx(scalar, values, offsets, 24)),
            ("diag_linear_dv: dy must be \\(..., features\\)", lambda: OPS.diag_linear_dv(scalar, scalar, offsets)),
            ("diag_linear_dv: x must be \\(..., features\\)", lambda: OPS.diag_linear_dv(dy, scalar, offsets)),
            (
                "diag_linear_dv: a layer needs N_out, N_in >= 1, got 0x24",
                lambda: OPS.diag_linear_dv(dy[:, :0], x, offsets),
            ),
            ("N_out, N_in >= 1, got 0x24", lambda: OPS.diag_linear_dv(dy[:0, :0], x[:0], offsets)),
            ("N_out, N_in >= 1, got 16x0", lambda: OPS.diag_linear_dv(dy, x[:, :0], offsets)),
        ]
        for msg, call in cases:
            with pytest.raises(ValueError, match=msg):
                call()


def test_zero_d_operands_are_named_by_the_fake_kernels():
    """The fake kernels (torch.compile, torch.export, FakeTensorMode) read ``shape[-1]`` too: a 0-d operand raised
    a bare ``IndexError: tuple index out of range`` there, not the eager kernels' message."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, values, offsets, b = _args(16, 24, 4, (5,), torch.float32, grad=False)
    with FakeTensorMode() as mode:
        fx, fv, fo, fb = (mode.from_tensor(t) for t in (x, values, offsets, b))
        dy, scalar = torch.empty(5, 16), torch.empty(())
        cases = [
            ("diag_linear: x must be \\(..., features\\), got a 0-d", lambda: OPS.diag_linear(scalar, fv, fo, fb, 16)),
            ("diag_linear_dx: dy must be", lambda: OPS.diag_linear_dx(scalar, fv, fo, 24)),
            ("diag_linear_dv: dy must be", lambda: OPS.diag_linear_dv(scalar, fx, fo)),
            ("diag_linear_dv: x must be", lambda: OPS.diag_linear_dv(dy, scalar, fo)),
        ]
        for msg, call in cases:
            with pytest.raises(ValueError, match=msg):
                call()
        assert OPS.diag_linear(fx, fv, fo, fb, 16).shape == (5, 16)  # the checks pass a well-formed call


def test_a_meta_tensor_among_cpu_ones_is_refused_not_uninitialized_memory():
    x, values, offsets, b = _args(16, 24, 4, (5,), torch.float32, grad=False)
    with pytest.raises(RuntimeError, match="one device"):
        OPS.diag_linear(x, values.to("meta"), offsets, b, 16)
    with pytest.raises(RuntimeError, match="one device"):
        OPS.diag_linear_dx(torch.randn(5, 16), values, offsets.to("meta"), 24)
    with pytest.raises(RuntimeError, match="one device"):
        OPS.diag_linear_dv(torch.randn(5, 16), x.to("meta"), offsets)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("path", ["kernel", "dense", "reference"])
def test_deterministic_mode_runs_every_path_and_repeats_its_bits(path, threads):
    # torch.use_deterministic_algorithms(True) raises on an op without a deterministic implementation; none of the
    # ops' paths uses one (forward, both gradients, double backward), and a second identical call repeats the bits.
    def run(n_out: int, n_in: int, M: int) -> list[Tensor]:
        x, values, offsets, bias = random_problem(n_out, n_in, max(n_out, n_in) // 8, batch=(M,), seed=M)
        x, values, bias = (t.requires_grad_() for t in (x, values, bias))
        y = torch.ops.diagcompile.diag_linear(x, values, offsets, bias, n_out)
        gx, gv, gb = torch.autograd.grad(y, (x, values, bias), torch.ones_like(y).cumsum(-1), create_graph=True)
        ggx, ggv = torch.autograd.grad(gx.square().sum() + gv.square().sum(), (x, values))
        return [t.detach() for t in (y, gx, gv, gb, ggx, ggv)]

    with deterministic_algorithms(threads), force_path(path):
        for n_out, n_in, M in [(64, 64, 1), (256, 64, 300), (64, 256, 300), (512, 384, 1024)]:
            first, second = run(n_out, n_in, M), run(n_out, n_in, M)
            assert all(torch.equal(a, b) for a, b in zip(first, second)), (n_out, n_in, M)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_adds_the_bias_before_rounding_once(dtype):
    """Where the bias nearly cancels x @ W.T, rounding the product before adding it costs many ulps."""
    x, values, offsets, _ = _args(16, 24, 24, (64,), dtype, grad=False)
    exact = x.double() @ to_dense(values, offsets, 16, 24).double().T
    b = (-exact[0] + 1e-3 * torch.randn(16, dtype=torch.float64)).to(dtype)  # row 0 almost cancels
    want = (exact + b.double()).to(dtype)  # one rounding of the exact result
    got = R.diag_linear_ref(x, values, offsets, b, 16)
    ulps = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-30)).max()
    assert ulps < 2 * torch.finfo(dtype).eps, f"{dtype}: {ulps / torch.finfo(dtype).eps:.1f} ulp"


@pytest.mark.parametrize(("n_out", "n_in"), [(32, 64), (48, 16)])
def test_flop_counter_counts_a_multiply_add_per_stored_value_per_row(n_out, n_in):
    # Without FLOP formulas FlopCounterMode counted the diagonal layers as zero (user trial).
    from torch.utils.flop_counter import FlopCounterMode

    layer = diagcompile.DiagLinear(n_in, n_out, sparsity=0.75)
    x = torch.randn(3, 5, n_in, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    k, D = layer.values.shape
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    expected = 2 * 15 * k * D
    assert counts == {f"diagcompile.{op}": expected for op in ("diag_linear", "diag_linear_dx", "diag_linear_dv")}


# ---- property: every CPU path, forward and both gradients, against the dense float64 oracle ----------------
_UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _within_rounding(got: Tensor, exact: Tensor, scale: Tensor, terms: int, what: str) -> None:
    """``|got - exact| <= (terms + 2) u_acc scale + 4 u_out |exact| + 4 u_out tiny``: the worst-case error of a sum
    of ``terms`` products accumulated with unit roundoff ``u_acc`` (float32, float64 for float64; ``scale`` is the
    sum of the products' magnitudes), rounded once to the output dtype (``u_out``; 4x for the low-precision dense
    GEMM, which may round more than once, and a subnormal floor)."""
    dtype = got.dtype
    u_acc = _UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    u_out = _UNIT_ROUNDOFF[dtype]
    tol = (terms + 2) * u_acc * scale + 4 * u_out * (exact.abs() + torch.finfo(dtype).smallest_normal)
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    worst = float(((got.detach().double() - exact).abs() / tol).max()) if got.numel() else 0.0
    assert worst <= 1, f"{what}: error {worst:.2f}x the rounding bound"


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_every_path_forward_and_gradients_equal_the_dense_oracle(data):
    """Random layers (1..40 wide, any k, unsorted int32/int64 offsets), batches of 0..2 leading dims (empty
    ones too), every dtype, non-contiguous x and values, bias or not: the raw op on every CPU path, forward and
    autograd gradients, within the rounding bound of the float64 dense product (audit C's fuzz, kept small)."""
    draw = data.draw
    n_out, n_in = draw(st.integers(1, 40), "n_out"), draw(st.integers(1, 40), "n_in")
    P, D = max(n_out, n_in), min(n_out, n_in)
    k = draw(st.integers(1, P), "k")
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), "dtype")
    batch = tuple(draw(st.lists(st.sampled_from([0, 1, 3]), max_size=2), "batch"))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), "seed"))
    offsets = torch.randperm(P, generator=g)[:k].to(draw(st.sampled_from([torch.int32, torch.int64]), "offsets"))
    x = torch.randn(n_in, *batch, generator=g, dtype=torch.float64).movedim(0, -1).to(dtype)  # transposed
    values = torch.randn(D, k, generator=g, dtype=torch.float64).to(dtype).T  # column-major
    bias = torch.randn(n_out, generator=g, dtype=torch.float64).to(dtype)[: n_out * draw(st.booleans(), "bias")]
    dy = torch.randn(*batch, n_out, generator=g, dtype=torch.float64).to(dtype)
    W = to_dense(values.double(), offsets, n_out, n_in)
    x64, dy64 = x.double().reshape(-1, n_in), dy.double().reshape(-1, n_out)
    b64 = bias.double() if bias.numel() else torch.zeros(n_out, dtype=torch.float64)
    y_exact = (x64 @ W.T + b64).reshape(*batch, n_out)
    y_scale = (x64.abs() @ W.abs().T + b64.abs()).reshape(*batch, n_out)
    dx_exact, dx_scale = (dy64 @ W).reshape(*batch, n_in), (dy64.abs() @ W.abs()).reshape(*batch, n_in)
    dv_exact = R.extract_diagonals(dy64.T @ x64, offsets)
    dv_scale = R.extract_diagonals(dy64.abs().T @ x64.abs(), offsets)
    M = x64.shape[0]
    kernel = [] if dtype in (torch.float16, torch.bfloat16) else ["kernel"]
    for path in ["reference", "dense", None, *kernel]:
        xg, vg = x.detach().requires_grad_(True), values.detach().requires_grad_(True)
        with force_path(path):
            y = OPS.diag_linear(xg, vg, offsets, bias, n_out)
            y.backward(dy)
        _within_rounding(y, y_exact, y_scale, k, f"{path} forward")
        _within_rounding(xg.grad, dx_exact, dx_scale, k, f"{path} input grad")
        _within_rounding(vg.grad, dv_exact, dv_scale, M, f"{path} values grad")

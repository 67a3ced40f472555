"""The op on CUDA: the Triton kernels and every dispatch path on real layer shapes (GPU only).

Skipped, with a reason, where there is no CUDA device. Low-precision results use the FlashAttention
tolerance idiom (``bf16_oracle_check``): our error against a high-precision reference must be at most
twice PyTorch's own error for the same math in the same dtype, plus a small band. References are float64
for the small layers and float32 (no TF32) for the 4096 x 14336 ones, where float64 GEMMs would dominate
the run; both are far more accurate than bf16. Outputs are fresh allocations: before each kernel call the
caching allocator is filled with NaN blocks of the output's size, so an element a kernel forgets to write
shows up as NaN (best effort: it relies on the allocator reusing the freed block).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import diagcompile  # noqa: F401  (registers the ops)
from diagcompile.ops import dispatch, force_path, k_from_sparsity
from diagcompile.ops import reference as R
from diagcompile.testing import bf16_oracle_check, random_offsets, rel_err, requires_cuda

pytestmark = [requires_cuda(), pytest.mark.gpu]

OPS = torch.ops.diagcompile
DEV = "cuda"

#: (name, N_in, N_out): ViT-B/16 layers and the 7B-class MLP projections of the benchmark.
LAYERS = [
    ("vit proj 768->768", 768, 768),
    ("vit qkv 768->2304", 768, 2304),
    ("vit fc1 768->3072", 768, 3072),
    ("vit fc2 3072->768", 3072, 768),
    ("up 4096->14336", 4096, 14336),
    ("down 14336->4096", 14336, 4096),
]
BIG = {"up 4096->14336", "down 14336->4096"}


def _T():
    from diagcompile.ops import triton_kernels

    return triton_kernels


def _poison(*shapes_dtypes: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Leave NaN-filled blocks of these sizes in the caching allocator for the next allocations."""
    blocks = [torch.full(s, float("nan"), device=DEV, dtype=d) for s, d in shapes_dtypes if math.prod(s) > 0]
    del blocks


def _problem(n_in: int, n_out: int, M: int, sparsity: float, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = k_from_sparsity(n_out, n_in, sparsity)
    D = min(n_in, n_out)
    x = torch.randn(M, n_in, generator=g).to(DEV, dtype)
    v = (torch.randn(k, D, generator=g) / math.sqrt(k)).to(DEV, dtype)
    offs = random_offsets(n_out, n_in, k, g).to(DEV)
    b = torch.randn(n_out, generator=g).to(DEV, dtype)
    dy = torch.randn(M, n_out, generator=g).to(DEV, dtype)
    return x, v, offs, b, dy


def _refs(x, v, offs, b, dy, n_out, n_in, big: bool):
    """High-precision references and PyTorch's own low-precision computation of the same math."""
    acc = torch.float32 if big else torch.float64
    W_hi = R.to_dense(v.to(acc), offs, n_out, n_in)
    W_lo = R.to_dense(v, offs, n_out, n_in)
    hi = {
        "fwd": x.to(acc) @ W_hi.T + b.to(acc),
        "dx": dy.to(acc) @ W_hi,
        "dv": R.extract_diagonals(dy.to(acc).T @ x.to(acc), offs),
    }
    lo = {
        "fwd": F.linear(x, W_lo, b),
        "dx": dy @ W_lo,
        "dv": R.extract_diagonals(dy.T @ x, offs),
    }
    return hi, lo


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# ----------------------------------------------------------------------------------------------------
# The kernels, called directly, on real shapes
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,n_in,n_out", LAYERS, ids=[n for n, _, _ in LAYERS])
@pytest.mark.parametrize("M", [1, 16, 197])
def test_kernels_match_reference_bf16(name, n_in, n_out, M):
    T = _T()
    x, v, offs, b, dy = _problem(n_in, n_out, M, 0.9)
    hi, lo = _refs(x, v, offs, b, dy, n_out, n_in, name in BIG)
    D = min(n_in, n_out)
    _poison(((M, n_out), x.dtype), ((64, M, n_out), torch.float32))
    y = T.forward(x, v, offs, b, n_out)
    _poison(((M, n_in), x.dtype), ((64, M, n_in), torch.float32))
    dx = T.input_grad(dy, v, offs, n_in)
    _poison(((v.shape[0], D), x.dtype), ((64, v.shape[0], D), torch.float32))
    dv = T.values_grad(dy, x, offs)
    for what, out in (("fwd", y), ("dx", dx), ("dv", dv)):
        assert out.dtype == torch.bfloat16 and out.device.type == DEV
        bf16_oracle_check(out, lo[what], hi[what], f"{name} M={M} {what}")


@pytest.mark.parametrize("M", [4096, 50432])
def test_kernels_at_large_m_and_99_percent(M):
    """The regime where dispatch keeps the kernel at every M: 3072 -> 768 (ViT fc2) at 99%."""
    T = _T()
    x, v, offs, b, dy = _problem(3072, 768, M, 0.99)
    hi, lo = _refs(x, v, offs, b, dy, 768, 3072, big=True)
    got = {
        "fwd": T.forward(x, v, offs, b, 768),
        "dx": T.input_grad(dy, v, offs, 3072),
        "dv": T.values_grad(dy, x, offs),
    }
    for what, out in got.items():
        bf16_oracle_check(out, lo[what], hi[what], f"M={M} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name,n_in,n_out", [LAYERS[2], LAYERS[3]], ids=["fc1", "fc2"])
def test_kernels_fp32_and_fp16(dtype, name, n_in, n_out):
    T = _T()
    x, v, offs, b, dy = _problem(n_in, n_out, 37, 0.8, dtype=dtype)
    hi, lo = _refs(x, v, offs, b, dy, n_out, n_in, big=False)
    got = {
        "fwd": T.forward(x, v, offs, b, n_out),
        "dx": T.input_grad(dy, v, offs, n_in),
        "dv": T.values_grad(dy, x, offs),
    }
    for what, out in got.items():
        assert out.dtype == dtype
        if dtype == torch.float32:  # plain fp32 FMAs, fp32 accumulation: far under 1e-5
            assert rel_err(out, hi[what]) < 1e-5, (what, rel_err(out, hi[what]))
        else:
            bf16_oracle_check(out, lo[what], hi[what], f"{name} fp16 {what}")


def test_split_reductions_are_deterministic_on_the_gpu():
    """Split-K / split-M with real concurrency: the same bits on every run (no atomics, fixed order)."""
    T = _T()
    x, v, offs, b, dy = _problem(4096, 14336, 1, 0.9)
    cfg = T.gather_config(1, 14336, v.shape[0], 4096, masked=True)
    assert cfg.SPLIT > 1
    ys = [T.forward(x, v, offs, b, 14336) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    x, v, offs, b, dy = _problem(768, 3072, 3152, 0.9)
    assert T.sddmm_config(3152, v.shape[0], 768).SPLIT > 1
    dvs = [T.values_grad(dy, x, offs) for _ in range(3)]
    assert all(torch.equal(dvs[0], d) for d in dvs[1:])


def test_noncontiguous_inputs_on_the_gpu():
    T = _T()
    n_in, n_out, M = 768, 3072, 50
    x, v, offs, b, dy = _problem(n_in, n_out, M, 0.9)
    hi, lo = _refs(x, v, offs, b, dy, n_out, n_in, big=False)
    x_strided = torch.zeros(M, n_in + 64, device=DEV, dtype=x.dtype)[:, 32 : 32 + n_in].copy_(x)
    x_t = x.t().contiguous().t()
    v_t = v.t().contiguous().t()
    dy_t = dy.t().contiguous().t()
    for xx in (x_strided, x_t):
        bf16_oracle_check(T.forward(xx, v_t, offs.long(), b, n_out), lo["fwd"], hi["fwd"], "fwd strided")
        bf16_oracle_check(T.values_grad(dy_t, xx, offs), lo["dv"], hi["dv"], "dv strided")
    bf16_oracle_check(T.input_grad(dy_t, v_t, offs, n_in), lo["dx"], hi["dx"], "dx strided")


def test_dense_helpers_are_bit_exact_on_the_gpu():
    T = _T()
    for n_in, n_out in [(768, 3072), (3072, 768), (4096, 14336), (768, 768)]:
        _, v, offs, _, _ = _problem(n_in, n_out, 1, 0.9)
        _poison(((n_out, n_in), v.dtype))
        W = T.to_dense(v, offs, n_out, n_in)
        assert torch.equal(W, R.to_dense(v, offs, n_out, n_in))
        assert torch.equal(T.extract_diagonals(W, offs), v)


def test_aot_compiled_forward_runs_with_the_documented_launch():
    """The TensorRT plugin's kernel: compile from aot_forward_spec for sm_90, launch with spec.grid and
    spec.scalar_values, compare with the reference (validates the AOT argument order numerically)."""
    import triton
    from triton.backends.compiler import GPUTarget

    T = _T()
    for n_in, n_out in [(768, 3072), (3072, 768)]:
        x, v, offs, b, _ = _problem(n_in, n_out, 197, 0.9)
        spec = T.aot_forward_spec(torch.bfloat16, n_out, n_in, has_bias=True)
        compiled = triton.compile(
            spec.ast_source(),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        out = torch.full((197, n_out), float("nan"), device=DEV, dtype=torch.bfloat16)
        compiled[spec.grid(197)](*spec.runner_args(x, v, offs, b, out, M=197))
        hi, lo = _refs(x, v, offs, b, torch.zeros_like(out), n_out, n_in, big=False)
        bf16_oracle_check(out, lo["fwd"], hi["fwd"], f"aot {n_in}->{n_out}")


# ----------------------------------------------------------------------------------------------------
# Through the op: every dispatch path, autograd, empty batch, 3-D input
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["kernel", "dense", "reference", "auto"])
@pytest.mark.parametrize(
    "name,n_in,n_out,M", [("fc1", 768, 3072, 197), ("fc2", 3072, 768, 16), ("up", 4096, 14336, 16)]
)
def test_every_dispatch_path_forward_and_backward(path, name, n_in, n_out, M):
    x, v, offs, b, dy = _problem(n_in, n_out, M, 0.9)
    hi, lo = _refs(x, v, offs, b, dy, n_out, n_in, big=n_in > 3072 or n_out > 3072)
    xr, vr, br = (t.clone().requires_grad_(True) for t in (x, v, b))
    with force_path(path):
        y = OPS.diag_linear(xr, vr, offs, br, n_out)
        dx, dv, db = torch.autograd.grad(y, (xr, vr, br), dy)
    bf16_oracle_check(y, lo["fwd"], hi["fwd"], f"{path} {name} fwd")
    bf16_oracle_check(dx, lo["dx"], hi["dx"], f"{path} {name} dx")
    bf16_oracle_check(dv, lo["dv"], hi["dv"], f"{path} {name} dv")
    assert rel_err(db, dy.double().sum(0)) < 1e-2


def test_auto_dispatch_picks_the_table_path():
    k = k_from_sparsity(3072, 768, 0.9)
    small = dispatch.Problem("fwd", "cuda", torch.bfloat16, 1, 3072, 768, k)
    large = dispatch.Problem("fwd", "cuda", torch.bfloat16, 50432, 3072, 768, k)
    assert dispatch.choose_path(small) == "kernel"
    assert dispatch.choose_path(large) == "dense"
    k99 = k_from_sparsity(768, 3072, 0.99)
    assert dispatch.choose_path(dispatch.Problem("fwd", "cuda", torch.bfloat16, 50432, 768, 3072, k99)) == "kernel"


@pytest.mark.parametrize("path", ["kernel", "dense", "auto"])
@pytest.mark.parametrize("batch", [(0,), (1,), (4, 197)], ids=["empty", "m1", "3d"])
def test_empty_single_row_and_3d_batches(path, batch):
    n_in, n_out = 768, 2304
    _, v, offs, b, _ = _problem(n_in, n_out, 1, 0.9)
    x = torch.randn(*batch, n_in, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(*batch, n_out, device=DEV, dtype=torch.bfloat16)
    vr, br = v.clone().requires_grad_(True), b.clone().requires_grad_(True)
    with force_path(path):
        y = OPS.diag_linear(x, vr, offs, br, n_out)
        dx, dv, db = torch.autograd.grad(y, (x, vr, br), g)
    assert y.shape == (*batch, n_out) and dx.shape == x.shape and dv.shape == v.shape
    with force_path("reference"):
        y_ref = OPS.diag_linear(x.detach().float(), v.float(), offs, b.float(), n_out)
    assert rel_err(y, y_ref) < 2e-2
    if x.numel() == 0:
        assert torch.count_nonzero(dv) == 0 and torch.count_nonzero(db) == 0


@pytest.mark.parametrize("path", ["kernel", "auto"])
def test_opcheck_on_cuda(path):
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for n_in, n_out in [(96, 320), (320, 96)]:
        x, v, offs, b, dy = _problem(n_in, n_out, 6, 0.8)
        x = x.reshape(2, 3, n_in).requires_grad_(True)
        dy = dy.reshape(2, 3, n_out).requires_grad_(True)
        v.requires_grad_(True)
        b.requires_grad_(True)
        with force_path(None if path == "auto" else path):
            torch.library.opcheck(OPS.diag_linear, (x, v, offs, b, n_out), test_utils=utils)
            torch.library.opcheck(OPS.diag_linear_dx, (dy, v, offs, n_in), test_utils=utils)
            torch.library.opcheck(OPS.diag_linear_dv, (dy, x, offs), test_utils=utils)


def test_torch_compile_fullgraph_on_cuda():
    from torch._dynamo.decorators import mark_unbacked

    from diagcompile import DiagLinear

    torch._dynamo.reset()
    model = torch.nn.Sequential(
        DiagLinear(768, 3072, sparsity=0.9), torch.nn.GELU(), DiagLinear(3072, 768, sparsity=0.9)
    )
    model = model.to(DEV, torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True)
    counts = {"graphs": 0}

    def count_backend(gm, example_inputs):
        counts["graphs"] += 1
        return gm

    for M in (16, 197):
        x = torch.randn(M, 768, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        y_c = compiled(x)
        y_e = model(x)
        assert rel_err(y_c, y_e) < 1e-2
        (g_c,) = torch.autograd.grad(y_c.float().square().sum(), x)
        (g_e,) = torch.autograd.grad(y_e.float().square().sum(), x)
        assert rel_err(g_c, g_e) < 2e-2
    # One graph for every batch size with an unbacked batch dimension.
    torch._dynamo.reset()
    counted = torch.compile(model, backend=count_backend, fullgraph=True)
    for M in (3, 16, 197):
        x = torch.randn(M, 768, device=DEV, dtype=torch.bfloat16)
        mark_unbacked(x, 0)
        counted(x)
    assert counts["graphs"] == 1

"""The Triton kernels on a CPU: every kernel under ``TRITON_INTERPRET=1`` against independent references.

Each interpreter test runs in a fresh subprocess with ``TRITON_INTERPRET=1`` set before triton is imported
(the interpreter is chosen when ``@triton.jit`` decorates) and ``DIAGCOMPILE_TRITON_ON_CPU=1`` (dispatch
then hands CPU tensors to the Triton provider, so the kernels also run through the op). Shapes are tiny:
the interpreter executes every program of the grid in Python. The configs are forced where a tiny shape
would not reach a code path on its own (split-K / split-M, diagonal-chunk tails, row tails, the wrap and
edge branches). The other tests (config table, validation, ahead-of-time compilation to PTX) run
in-process: they import triton but launch nothing.

Interpreter caveat: Triton 3.6's interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest
even), so bf16 results here carry up to ~2x the rounding error they have on the GPU; the bf16 oracle check
(2x torch's own error + a band) still holds at these sizes, and tests/ops/test_cuda.py checks it on the GPU.
"""

import importlib.util

import pytest

from diagcompile.testing import run_python

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ENV = {"TRITON_INTERPRET": "1", "DIAGCOMPILE_TRITON_ON_CPU": "1"}

PRELUDE = '''
import os
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
import diagcompile
from diagcompile.ops import triton_kernels as T, reference as R
from diagcompile.testing import dense_from_convention, rel_err
torch.manual_seed(0)
N_CHECKS = 0

def check(tag, out, ref, tol):
    global N_CHECKS
    assert tuple(out.shape) == tuple(ref.shape), f"{tag}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out.double()).all(), f"{tag}: non-finite"
    err = rel_err(out, ref)
    assert err <= tol, f"{tag}: relative error {err:.3e} > {tol:.0e}"
    N_CHECKS += 1

def problem(no, ni, k, M, dtype=torch.float32, bias=True, sort=True):
    P, D = max(no, ni), min(no, ni)
    offs = torch.randperm(P)[:k]
    offs = (offs.sort().values if sort else offs).to(torch.int32)
    x = torch.randn(M, ni).to(dtype)
    v = torch.randn(k, D).to(dtype)
    b = torch.randn(no).to(dtype) if bias else torch.empty(0, dtype=dtype)
    return x, v, offs, b

def all_three(tag, no, ni, x, v, offs, b, dy, tol, cfg=None, scfg=None):
    """forward, input_grad and values_grad against W built entry by entry from the convention (float64)."""
    W = dense_from_convention(v, offs, no, ni)
    y = T.forward(x, v, offs, b, no, config=cfg)
    check(f"{tag} fwd", y, x.double() @ W.T + (b.double() if b.numel() else 0), tol)
    assert y.dtype == x.dtype
    dx = T.input_grad(dy, v, offs, ni, config=cfg)
    check(f"{tag} dx", dx, dy.double() @ W, tol)
    dv = T.values_grad(dy, x, offs, config=scfg)
    check(f"{tag} dv", dv, R.extract_diagonals(dy.double().T @ x.double(), offs), tol)
'''


def _run(body: str, timeout: float = 300) -> str:
    out = run_python(PRELUDE + body + "\nprint('checks', N_CHECKS)\n", env=ENV, timeout=timeout)
    assert "checks" in out, out
    return out


def _checks(out: str) -> int:
    return int(out.strip().splitlines()[-1].split()[-1])


# ----------------------------------------------------------------------------------------------------
# Interpreter tests (one subprocess each: importing torch + triton costs seconds)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.interpret
def test_every_kernel_matches_the_convention_fp32():
    """Wide, tall, square, 1xN / Nx1, prime sizes; k = 1, P/2, P; M = 0, 1, 3; bias and no bias; then
    wrap-heavy offsets (at the end of [0, P): every window wraps past the long side)."""
    out = _run("""
n = 0
for no, ni in [(5, 11), (11, 5), (8, 8), (1, 7), (7, 1), (3, 2), (13, 7)]:
    P = max(no, ni)
    for k in sorted({1, max(1, P // 2), P}):
        for M in (0, 1, 3):
            x, v, offs, b = problem(no, ni, k, M, bias=(k + M) % 2 == 0)
            dy = torch.randn(M, no)
            all_three(f"{no}x{ni} k={k} M={M}", no, ni, x, v, offs, b, dy, 1e-5)
            n += 3
for no, ni in [(6, 40), (40, 6), (9, 9)]:
    P, D = max(no, ni), min(no, ni)
    for offs in ([P - 1], list(range(P - 5, P)), [0, P // 2, P - 2]):
        offs = torch.tensor(offs, dtype=torch.int32)
        x, v, _, b = problem(no, ni, len(offs), 4)
        all_three(f"wrap {no}x{ni} offs={offs.tolist()}", no, ni, x, v, offs, b, torch.randn(4, no), 1e-5)
        n += 3
assert n == N_CHECKS
""")
    # 7 shapes: (3, 2) has P = 3, so k in {1, 3}; the others 3 distinct k. Then 3 x 3 wrap cases.
    assert _checks(out) == (6 * 3 + 2) * 3 * 3 + 3 * 3 * 3


@pytest.mark.interpret
def test_forced_configs_split_k_split_m_tails_and_determinism():
    """Paths a tiny shape does not reach with the shipped table: split-K (bias added by the reduce),
    diagonal-chunk tails, row tails (M < BLOCK_M: masked rows; M > BLOCK_M: the overlapping last tile),
    several column tiles with windows wrapping mid-grid, split-M with a masked last chunk, unsorted
    offsets; and the split reductions give the same bits on every run."""
    out = _run("""
C = T.KernelConfig
cases = [  # (N_out, N_in, k, M, forward/dx config, dV config, sorted offsets)
    (12, 30, 11, 5, C(8, 4, 32, 2, 1), C(8, 4, 32, 1, 1), True),    # M < BLOCK_M, k % BLOCK_J != 0, split-K
    (30, 12, 11, 13, C(8, 2, 32, 3, 1), C(4, 4, 16, 3, 1), False),  # overlapping row tile, split-K, split-M
    (17, 17, 9, 6, C(4, 2, 8, 1, 1), C(2, 8, 8, 2, 1), True),      # 3 column tiles, row tile overlap
    (8, 24, 6, 3, C(4, 4, 8, 1, 1), C(4, 2, 8, 1, 1), True),       # narrow tiles: wraps inside the grid
    (24, 8, 6, 3, C(4, 4, 8, 1, 1), C(4, 2, 8, 1, 1), False),
    (9, 20, 20, 9, C(16, 8, 32, 2, 1), C(8, 8, 32, 2, 1), True),    # k = P, every window wraps somewhere
]
for no, ni, k, M, cfg, scfg, srt in cases:
    offs = torch.randperm(max(no, ni))[:k]
    offs = torch.tensor(sorted(offs.tolist()) if srt else offs.tolist(), dtype=torch.int32)
    x, v, _, b = problem(no, ni, k, M)
    dy = torch.randn(M, no)
    all_three(f"{no}x{ni} k={k} M={M} {cfg}", no, ni, x, v, offs, b, dy, 1e-5, cfg=cfg, scfg=scfg)
    if cfg.SPLIT > 1 or scfg.SPLIT > 1:
        again = (T.forward(x, v, offs, b, no, config=cfg), T.values_grad(dy, x, offs, config=scfg))
        first = (T.forward(x, v, offs, b, no, config=cfg), T.values_grad(dy, x, offs, config=scfg))
        assert all(torch.equal(a, c) for a, c in zip(again, first)), "split reduction is not deterministic"
        N_CHECKS += 1
""")
    assert _checks(out) == 6 * 3 + 4  # four cases split K or M


@pytest.mark.interpret
def test_low_precision_and_noncontiguous_inputs():
    """bf16 / fp16 in and out with fp32 accumulation, within twice torch's own error (the FlashAttention
    tolerance idiom); then row-strided, transposed, stride-0 and strided-values inputs, int64 offsets."""
    out = _run("""
from diagcompile.testing import bf16_oracle_check
for dtype in (torch.bfloat16, torch.float16):
    for no, ni in [(24, 40), (40, 24), (32, 32)]:
        k = max(no, ni) // 3
        x, v, offs, b = problem(no, ni, k, 6, dtype=dtype)
        dy = torch.randn(6, no).to(dtype)
        W, W64 = R.to_dense(v, offs, no, ni), dense_from_convention(v, offs, no, ni)
        y = T.forward(x, v, offs, b, no)
        assert y.dtype == dtype
        bf16_oracle_check(y, torch.nn.functional.linear(x, W, b), x.double() @ W64.T + b.double(), "fwd")
        bf16_oracle_check(T.input_grad(dy, v, offs, ni), dy @ W, dy.double() @ W64, "dx")
        dv = T.values_grad(dy, x, offs)
        assert dv.dtype == dtype
        ref_dv = R.extract_diagonals(dy.double().T @ x.double(), offs)
        bf16_oracle_check(dv, R.extract_diagonals(dy.T @ x, offs), ref_dv, "dv")
        N_CHECKS += 3
no, ni, k, M = 10, 26, 7, 5
_, v, offs, b = problem(no, ni, k, M)
xs = {
    "row-strided slice": torch.randn(M, ni + 9)[:, 3:3 + ni],
    "transposed": torch.randn(ni, M).t(),
    "stride-0 rows": torch.randn(1, ni).expand(M, ni),
}
vs = {"transposed values": v.t().contiguous().t(), "strided values": torch.randn(k, 2 * no)[:, ::2]}
for xn, x in xs.items():
    for vn, vv in vs.items():
        all_three(f"{xn} / {vn}", no, ni, x, vv, offs.long(), b, torch.randn(no, M).t(), 1e-5)
xt = torch.randn(M, no + 2)[:, 1:-1]
all_three("tall, row-strided", ni, no, xt, vs["strided values"], offs, torch.randn(ni), torch.randn(M, ni), 1e-5)
""")
    assert _checks(out) == 2 * 3 * 3 + (3 * 2 + 1) * 3


@pytest.mark.interpret
def test_through_the_op_kernel_and_dense_paths_opcheck_and_dense_helpers():
    """The custom ops with force_path('kernel') (the Triton provider on CPU tensors) and
    force_path('dense') (the provider's to_dense / extract_diagonals) against the reference path, with a
    3-D input, an empty batch and autograd; opcheck with the kernel path; to_dense / extract bit-exact."""
    out = _run("""
from diagcompile.ops import dispatch, force_path
assert dispatch.kernel_module("cpu") is T
ops = torch.ops.diagcompile
for no, ni in [(9, 20), (20, 9)]:
    for batch in [(2, 3), (0,), (1,)]:
        P = max(no, ni)
        _, v0, offs, b0 = problem(no, ni, P // 2, 1)
        x0, g = torch.randn(*batch, ni), torch.randn(*batch, no)
        res = {}
        for path in ("reference", "kernel", "dense"):
            x, v, b = (t.detach().clone().requires_grad_(True) for t in (x0, v0, b0))
            with force_path(path):
                y = ops.diag_linear(x, v, offs, b, no)
                res[path] = (y, *torch.autograd.grad(y, (x, v, b), g))
        for path in ("kernel", "dense"):
            for name, a, r in zip("y dx dv db".split(), res[path], res["reference"]):
                check(f"{path} {no}x{ni} {batch} {name}", a, r, 1e-5)
utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
with force_path("kernel"):
    for no, ni in [(6, 10), (10, 6)]:
        x, v, offs, b = problem(no, ni, 4, 3)
        x = x.reshape(1, 3, ni).requires_grad_(True)
        v.requires_grad_(True)
        b.requires_grad_(True)
        dy = torch.randn(1, 3, no, requires_grad=True)
        torch.library.opcheck(ops.diag_linear, (x, v, offs, b, no), test_utils=utils)
        torch.library.opcheck(ops.diag_linear_dx, (dy, v, offs, ni), test_utils=utils)
        torch.library.opcheck(ops.diag_linear_dv, (dy, x, offs), test_utils=utils)
        N_CHECKS += 3
for dtype in (torch.float32, torch.bfloat16):
    for no, ni in [(7, 12), (12, 7), (9, 9), (1, 5), (5, 1)]:
        P = max(no, ni)
        for k in (1, P):
            _, v, offs, _ = problem(no, ni, k, 1, dtype=dtype, sort=k == 1)
            W = T.to_dense(v, offs, no, ni)
            assert W.dtype == dtype and torch.equal(W, R.to_dense(v, offs, no, ni)), (no, ni, k)
            assert torch.equal(T.extract_diagonals(W, offs), v)
            G = torch.randn(no, ni).t().contiguous().t()  # column-major: strided reads
            assert torch.equal(T.extract_diagonals(G, offs, torch.float64), R.extract_diagonals(G, offs).double())
            N_CHECKS += 3
""")
    assert _checks(out) == 2 * 3 * 2 * 4 + 2 * 3 + 2 * 5 * 2 * 3


# ----------------------------------------------------------------------------------------------------
# In-process tests: configs, validation, ahead-of-time compilation (no launch, no interpreter needed)
# ----------------------------------------------------------------------------------------------------
def _T():
    from diagcompile.ops import triton_kernels

    return triton_kernels


@pytest.mark.parametrize("masked", [False, True])
def test_gather_config_table(masked):
    T = _T()
    for M in (1, 2, 3, 4, 5, 8, 15, 16, 31, 32, 197, 4096, 50432):
        for n_cols, k, D in [(768, 308, 768), (3072, 308, 768), (4096, 1434, 4096), (14336, 1434, 4096), (5, 2, 5)]:
            cfg = T.gather_config(M, n_cols, k, D, masked=masked)
            assert cfg == T.gather_config(M, n_cols, k, D, masked=masked)  # a pure function of the shapes
            assert cfg.num_warps == 4 and cfg.BLOCK_N >= 32 * cfg.num_warps
            assert cfg.BLOCK_M <= max(1, M) or M < 16, cfg  # the overlapping-row-tile trick needs M >= BLOCK_M
            per_thread = cfg.BLOCK_M * cfg.BLOCK_J * cfg.BLOCK_N // (32 * cfg.num_warps)
            assert per_thread <= 32, cfg  # register budget: no spills at these sizes (see kernel_sass.py)
            assert 1 <= cfg.SPLIT <= max(1, k // (2 * cfg.BLOCK_J)), cfg
            if M >= 4096:
                assert cfg.SPLIT == 1  # large M fills the GPU without split-K


def test_sddmm_config_table():
    T = _T()
    for M in (1, 2, 16, 197, 3152, 50432):
        for k, D in [(308, 768), (1434, 4096), (31, 768), (2, 3)]:
            cfg = T.sddmm_config(M, k, D)
            assert cfg.BLOCK_M <= max(1, M) and cfg.BLOCK_J <= max(8, k)
            assert 1 <= cfg.SPLIT <= max(1, M // (4 * cfg.BLOCK_M))


def test_kernel_config_validation():
    T = _T()
    with pytest.raises(ValueError, match="power of two"):
        T.KernelConfig(3, 1, 64, 1, 4)
    with pytest.raises(ValueError, match="SPLIT"):
        T.KernelConfig(1, 1, 64, 0, 4)
    with pytest.raises(ValueError, match="num_warps"):
        T.KernelConfig(1, 1, 64, 1, 3)


def test_launchers_reject_bad_input_with_named_errors():
    import torch

    T = _T()
    x, v, offs, b = torch.randn(3, 8), torch.randn(2, 4), torch.tensor([0, 3], dtype=torch.int32), torch.randn(4)
    assert T.supports(torch.bfloat16) and not T.supports(torch.float64)
    with pytest.raises(TypeError, match="float64"):
        T.forward(x.double(), v, offs, b, 4)
    with pytest.raises(ValueError, match="values has 5 columns"):
        T.forward(x, torch.randn(2, 5), offs, b, 4)
    with pytest.raises(ValueError, match="bias must have shape"):
        T.forward(x, v, offs, torch.randn(5), 4)
    with pytest.raises(ValueError, match="offsets must have shape"):
        T.forward(x, v, offs[:1], b, 4)
    with pytest.raises(TypeError, match="offsets must be int32"):
        T.forward(x, v, offs.float(), b, 4)
    with pytest.raises(ValueError, match="x2 must be 2-D"):
        T.forward(x[None], v, offs, b, 4)
    with pytest.raises(ValueError, match="rows"):
        T.values_grad(torch.randn(2, 4), x, offs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "dtype_name,n_out,n_in,has_bias", [("bfloat16", 3072, 768, True), ("float16", 768, 3072, False)]
)
def test_aot_forward_spec_cross_compiles_to_ptx_for_sm90(dtype_name, n_out, n_in, has_bias):
    """The TensorRT plugin's path: triton.compile(ASTSource) for sm_90 on a machine without a GPU.

    Checks the PTX entry's parameters: the 4 input pointers, the int32 scalars of ``scalar_args``, the
    output pointer, in that order (TensorRT's AOT order), then Triton's hidden scratch pointers."""
    import re

    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    T = _T()
    spec = T.aot_forward_spec(getattr(torch, dtype_name), n_out, n_in, has_bias=has_bias)
    assert spec.scalar_names == ("M", "L", "D", "K")
    assert spec.scalar_args == (("M", "N_out", "N_in", "k") if n_out > n_in else ("M", "N_in", "N_out", "k"))
    assert spec.scalar_values(M=197, k=308) == (197, max(n_out, n_in), min(n_out, n_in), 308)
    assert spec.grid(197) == (triton.cdiv(197, spec.block_m) * triton.cdiv(n_out, spec.block_n), 1, 1)
    assert spec.grid(0)[0] == 0

    class Sym:  # like TensorRT's symbolic sizes: + // * with the symbol on the left, no comparisons
        def __init__(self, text):
            self.text = text

        def __add__(self, o):
            return Sym(f"({self.text} + {o})")

        def __floordiv__(self, o):
            return Sym(f"({self.text} // {o})")

        def __mul__(self, o):
            return Sym(f"({self.text} * {o})")

    gx = spec.grid(Sym("M"))[0].text
    assert eval(gx, {"M": 197}) == spec.grid(197)[0]  # noqa: S307 - our own arithmetic string
    assert spec.fn is (T._mgather_kernel if n_out > n_in else T._gather_kernel)
    args = spec.runner_args("x", "v", "o", "b", "y", M=197, k=308)  # every parameter, for CompiledKernel[grid](*args)
    assert len(args) == len(spec.fn.arg_names)
    assert args[:4] == ["x", "v", "o", "b"] and args[4:8] == list(spec.scalar_values(197, 308))
    assert args[spec.fn.arg_names.index("out_ptr")] == "y"
    compiled = triton.compile(
        spec.ast_source(),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    ptx = compiled.asm["ptx"]
    assert ".target sm_90" in ptx
    entry = re.search(r"\.visible \.entry (\w+)\(([^)]*)\)", ptx)
    assert entry and entry.group(1) == compiled.metadata.name
    params = re.findall(r"\.param \.(\w+)", entry.group(2))
    n_scalars = len(spec.scalar_args)
    assert params[:4] == ["u64"] * 4, params  # x, values, offsets, bias
    assert params[4 : 4 + n_scalars] == ["u32"] * n_scalars, params  # M, L, D, K
    assert params[4 + n_scalars] == "u64", params  # the output
    assert len(params) <= 4 + n_scalars + 1 + 2, params  # + Triton's hidden global/profile scratch pointers
    assert compiled.metadata.global_scratch_size == 0
    assert compiled.metadata.num_warps == spec.num_warps
    assert compiled.asm["cubin"]  # ptxas (shipped with triton) assembled it too


def _edge_cases():
    """(kernel name, run-time args, constexprs, warps): the launchers' calls at edge values, where sizes or
    strides equal to 1 turn into compile-time constants (the interpreter never sees that specialization)."""
    g_const = {"BLOCK_M": 1, "BLOCK_J": 4, "BLOCK_N": 128, "PARTIAL": False, "HAS_BIAS": True}
    cases = []
    for kern in ("_gather_kernel", "_mgather_kernel"):
        for t, M, L, D, K, split, partial in [
            ("bf16", 1, 7, 1, 1, 1, False),  # a 1 x 7 layer, one diagonal, one row
            ("fp32", 1, 1, 1, 1, 1, False),  # 1 x 1
            ("fp16", 16, 4096, 768, 308, 3, True),  # split-K, partials
            ("bf16", 197, 14336, 4096, 1434, 1, False),
        ]:
            args = {"a_ptr": f"*{t}", "v_ptr": f"*{t}", "off_ptr": "*i32", "bias_ptr": f"*{t}"}
            args.update(M=M, L=L, D=D, K=K, SPLIT=split, out_ptr="*fp32" if partial else f"*{t}")
            stride_am = L if kern == "_gather_kernel" else D
            const = dict(g_const, PARTIAL=partial, STRIDE_AM=stride_am, STRIDE_VK=D, BLOCK_M=min(32, M))
            cases.append((kern, args, const, 4))
    for M, K, D, L, split in [(1, 1, 1, 1, 1), (1, 1, 1, 9, 1), (3152, 308, 768, 3072, 2)]:
        args = {"a_ptr": "*bf16", "b_ptr": "*bf16", "off_ptr": "*i32", "M": M, "L": L, "D": D, "K": K}
        args.update(SPLIT=split, out_ptr="*fp32" if split > 1 else "*bf16")
        const = {"BLOCK_M": min(4, M), "BLOCK_J": 8, "BLOCK_N": 128, "STRIDE_AM": D, "STRIDE_BM": L}
        cases.append(("_sddmm_kernel", args, const, 4))
    for R, C, split in [(1, 1, 1), (1, 14336, 19), (197, 768, 3)]:
        args = {"ws_ptr": "*fp32", "bias_ptr": "*bf16", "R": R, "C": C, "SPLIT": split, "stride_or": C}
        args["out_ptr"] = "*bf16"
        cases.append(("_split_reduce_kernel", args, {"HAS_BIAS": True, "BLOCK_R": min(16, R), "BLOCK_C": 128}, 4))
    for n_out, n_in in [(1, 1), (1, 7), (7, 1), (3072, 768)]:
        args = {"v_ptr": "*bf16", "off_ptr": "*i32", "N_OUT": n_out, "N_IN": n_in, "K": 1}
        args.update(stride_vk=min(n_out, n_in), w_ptr="*bf16")
        cases.append(("_to_dense_kernel", args, {"BLOCK_R": 4, "BLOCK_C": 128, "BLOCK_J": 8}, 4))
        args = {"g_ptr": "*bf16", "off_ptr": "*i32", "K": 1, "D": min(n_out, n_in), "L": max(n_out, n_in)}
        args.update(stride_gr=n_in, stride_gc=1, out_ptr="*fp32")
        cases.append(("_extract_kernel", args, {"TALL": n_out > n_in, "BLOCK_J": 8, "BLOCK_N": 128}, 4))
    return cases


@pytest.mark.timeout(600)
def test_every_kernel_compiles_for_sm90_at_edge_values():
    """Compile (to PTX and cubin, for an H100) every kernel as the JIT would specialize the launchers'
    arguments at the edges: M = 1, k = 1, D = 1, a 1 x 1 layer, split and no split, each dtype."""
    T = _T()
    for kern, args, const, warps in _edge_cases():
        compiled = T.cross_compile(getattr(T, kern), args, const, num_warps=warps)
        assert compiled.asm["cubin"], kern
        assert compiled.metadata.global_scratch_size == 0, kern

"""TensorRT module: import guard, size expressions, and the AOT PTX path (compiled on the CPU, no GPU).

TensorRT itself cannot be installed here; what the AOT ``aot_impl`` computes without it is tested:

* the Triton kernel compiles to PTX for sm_90 on this CPU machine, with exactly the parameters TensorRT
  passes (input pointers, int32 scalars, output pointer), and ``ptxas`` assembles it;
* a kernel with that ABI, launched (under ``TRITON_INTERPRET=1``) with the grid and scalars ``launch_config``
  computes, reproduces the reference math for wide and tall layers;
* the size expressions work with TensorRT-like symbolic sizes (no reflected operators).

Both Triton parts run in subprocesses: Triton reads ``TRITON_INTERPRET`` when a kernel is decorated.
"""

import importlib.util
import inspect
import json
import os
import sys
import typing
from types import SimpleNamespace

import pytest

from diagcompile.export import tensorrt as trt_mod
from diagcompile.export.tensorrt import (
    TensorRTUnavailableError,
    eval_size_expr,
    strip_triton_scratch_params,
)
from diagcompile.testing import requires_cuda, run_python

pytest.importorskip("triton", reason="the AOT path compiles a Triton kernel")

# A forward kernel with the AOT ABI of ops/triton_kernels.AOTSpec: (x, values, offsets, bias) -> int scalars
# -> y -> constexprs. Private to these tests (the real kernel lives in ops/triton_kernels.py).
KERNEL_SRC = """
from dataclasses import dataclass
import triton
import triton.language as tl

@triton.jit
def diag_fwd_test_kernel(x_ptr, v_ptr, o_ptr, b_ptr, M, N_OUT, N_IN, K, y_ptr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TALL: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = rn < N_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, K):
        off = tl.load(o_ptr + j)
        if TALL:
            c = (rn - off + N_OUT) % N_OUT
            ok = in_n & (c < N_IN)
            vpos = j * N_IN + c
        else:
            c = (rn + off) % N_IN
            ok = in_n
            vpos = j * N_OUT + rn
        xv = tl.load(x_ptr + rm[:, None] * N_IN + c[None, :], mask=(rm[:, None] < M) & ok[None, :], other=0.0)
        vv = tl.load(v_ptr + vpos, mask=ok, other=0.0)
        acc += xv.to(tl.float32) * vv.to(tl.float32)[None, :]
    acc += tl.load(b_ptr + rn, mask=in_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N_OUT + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & in_n[None, :])

@dataclass(frozen=True)
class Spec:
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    scalar_args: tuple
    n_out: int

    def grid(self, M):
        return ((M + 15) // 16, (self.n_out + 31) // 32, 1)

def make_spec(dtype, out_features, in_features):
    t = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}[str(dtype)]
    sig = {"x_ptr": f"*{t}", "v_ptr": f"*{t}", "o_ptr": "*i32", "b_ptr": f"*{t}",
           "M": "i32", "N_OUT": "i32", "N_IN": "i32", "K": "i32", "y_ptr": f"*{t}"}
    return Spec(diag_fwd_test_kernel, sig, {"BLOCK_M": 16, "BLOCK_N": 32, "TALL": out_features > in_features},
                4, 2, ("M", "N_out", "N_in", "k"), out_features)
"""

SHAPES = [(24, 40), (40, 24)]  # (N_out, N_in): wide, tall


@pytest.fixture()
def kernel_dir(tmp_path):
    (tmp_path / "aot_test_kernel.py").write_text(KERNEL_SRC)
    (tmp_path / "fake_trt.py").write_text(FAKE_TRT_SRC)
    return tmp_path


# Stand-ins for what the plugin code touches in ``tensorrt`` / ``tensorrt.plugin``, following TensorRT's
# documented API. They check our plugin functions' structure and arithmetic; they are not TensorRT.
FAKE_TRT_SRC = '''
from types import SimpleNamespace


class Sym:
    """Like tensorrt.plugin.ShapeExpr: + - * // with the symbol on the left only, no reflected operators."""

    def __init__(self, text):
        self.text = str(text)

    def _op(self, sym, other):
        other = other.text if isinstance(other, Sym) else str(other)
        return Sym(f"({self.text} {sym} {other})")

    def __add__(self, o):
        return self._op("+", o)

    def __sub__(self, o):
        return self._op("-", o)

    def __mul__(self, o):
        return self._op("*", o)

    def __floordiv__(self, o):
        return self._op("//", o)


class TensorDesc:
    def __init__(self, dtype, shape_expr):
        self.dtype, self.shape_expr = dtype, list(shape_expr)

    @property
    def ndim(self):
        return len(self.shape_expr)

    def like(self):
        return TensorDesc(self.dtype, self.shape_expr)


class Tensor:
    pass


class KernelLaunchParams:
    pass


class SymInt32:
    def __init__(self, value):
        self.value = value


class SymIntExprs:
    @classmethod
    def from_tuple(cls, exprs):
        out = cls()
        out.exprs = list(exprs)
        return out


class AutoTuneCombination:
    def __init__(self, *args):
        self.args = args


trt = SimpleNamespace(float32="float32", float16="float16", bfloat16="bfloat16")
trtp = SimpleNamespace(TensorDesc=TensorDesc, Tensor=Tensor, KernelLaunchParams=KernelLaunchParams,
                       SymInt32=SymInt32, SymIntExprs=SymIntExprs, AutoTuneCombination=AutoTuneCombination)
'''


@pytest.fixture()
def fake(kernel_dir):
    spec = importlib.util.spec_from_file_location("fake_trt", kernel_dir / "fake_trt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------------
# Without TensorRT
# ----------------------------------------------------------------------------------------------------
def test_module_imports_without_tensorrt_and_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)
    assert trt_mod.is_available() is False
    with pytest.raises(TensorRTUnavailableError, match="needs TensorRT >= 10.9") as e:
        trt_mod.register_plugin()
    assert isinstance(e.value, ImportError)
    with pytest.raises(TensorRTUnavailableError):
        trt_mod.build_engine(tmp_path / "model.onnx")
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.raises(ImportError, match="torch_tensorrt"):
        trt_mod.register_torch_tensorrt_converter()


def test_build_engine_validates_the_profile_before_needing_tensorrt(tmp_path):
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        trt_mod.build_engine(tmp_path / "m.onnx", min_batch=8, opt_batch=4)


def test_build_engine_refuses_a_directory_as_engine_path_before_needing_tensorrt(tmp_path):
    with pytest.raises(ValueError, match="build_engine: .* is a directory"):
        trt_mod.build_engine(tmp_path / "m.onnx", tmp_path)


def test_zero_bias_of_a_bias_free_layer_has_the_values_dtype():
    """The converter's stand-in bias (the ITensor branch mimics a trt.DataType; TensorRT is not installed)."""
    import torch

    half = trt_mod.zero_bias(6, torch.zeros(2, 4, dtype=torch.float16))
    assert half.dtype == torch.float16 and half.shape == (6,) and not half.any()
    for name, dtype in [("HALF", torch.float16), ("FLOAT", torch.float32), ("BF16", torch.bfloat16)]:
        itensor = SimpleNamespace(dtype=SimpleNamespace(name=name))
        assert trt_mod.zero_bias(3, itensor).dtype == dtype


# ----------------------------------------------------------------------------------------------------
# Size expressions: ints and TensorRT-like symbols
# ----------------------------------------------------------------------------------------------------
def test_size_expressions_with_ints():
    env = {"M": 37, "N_out": 24, "N_in": 40, "k": 5}
    assert eval_size_expr("M", env) == 37
    assert eval_size_expr("(M + 15) // 16", env) == 3
    assert eval_size_expr("N_in * k - 2 * N_out", env) == 152


def test_size_expressions_keep_the_symbol_on_the_left(fake):
    M = fake.Sym("M")
    assert eval_size_expr("M * 2", {"M": M}).text == "(M * 2)"
    assert eval_size_expr("2 * M + 1", {"M": M}).text == "((M * 2) + 1)"  # reflected * avoided
    assert eval_size_expr("100 - M", {"M": M}).text == "(100 - M)"  # int lifted to the symbol's type
    assert eval_size_expr("(16 + M) // 16", {"M": M}).text == "((M + 16) // 16)"


@pytest.mark.parametrize("expr", ["M ** 2", "max(M, 1)", "M / 2", "N_in.bit_length()", "1.5 * M", "Q + 1", "M +"])
def test_size_expressions_reject_anything_else(expr):
    with pytest.raises(ValueError, match="size expression"):
        eval_size_expr(expr, {"M": 3, "N_in": 4})


# ----------------------------------------------------------------------------------------------------
# The plugin functions, against the stand-ins (TensorRT's documented Quick Deploy Plugin schema)
# ----------------------------------------------------------------------------------------------------
TENSORS = ["x", "values", "offsets", "bias"]
ATTRS = ["out_features", "in_features"]


def test_plugin_functions_follow_the_quick_deploy_plugin_schema(fake):
    fns = trt_mod._plugin_functions(fake.trt, fake.trtp)
    assert list(fns) == ["register", "autotune", "impl", "aot_impl"]  # registration order
    expected = {
        "register": TENSORS + ATTRS,
        "autotune": TENSORS + ["outputs"],
        "impl": TENSORS + ATTRS + ["outputs", "stream"],
        "aot_impl": TENSORS + ATTRS + ["outputs", "tactic"],
    }
    for kind, fn in fns.items():
        sig = inspect.signature(fn)
        assert list(sig.parameters) == expected[kind], kind
        for name, param in sig.parameters.items():
            # tensorrt.plugin calls issubclass() on these: they must be real classes, not strings.
            assert not isinstance(param.annotation, str), (kind, name)
            if name in TENSORS:
                want = fake.Tensor if kind == "impl" else fake.TensorDesc
                assert param.annotation is want, (kind, name)
            elif name in ATTRS + ["stream", "tactic"]:
                assert param.annotation is int, (kind, name)
    assert typing.get_args(inspect.signature(fns["register"]).return_annotation) == (fake.TensorDesc,)
    ret = inspect.signature(fns["aot_impl"]).return_annotation
    assert typing.get_origin(ret) is tuple
    assert typing.get_args(ret) == (str, str, fake.KernelLaunchParams, fake.SymIntExprs)


def _text(d):
    return getattr(d, "text", d)


def test_plugin_output_shape_is_leading_dims_by_out_features(fake):
    describe = trt_mod._plugin_functions(fake.trt, fake.trtp)["register"]
    x = fake.TensorDesc("float16", [fake.Sym("B"), fake.Sym("T"), 96])
    values, offsets, bias = (fake.TensorDesc("float16", s) for s in ([10, 40], [10], [40]))
    (y,) = describe(x, values, offsets, bias, 40, 96)
    assert y.dtype == "float16" and [_text(d) for d in y.shape_expr] == ["B", "T", 40]
    assert [_text(d) for d in x.shape_expr] == ["B", "T", 96]  # input untouched


# ----------------------------------------------------------------------------------------------------
# PTX parameter surgery
# ----------------------------------------------------------------------------------------------------
PTX = """
.visible .entry kern(
	.param .u64 .ptr .global .align 1 kern_param_0,
	.param .u32 kern_param_1,
	.param .u64 .ptr .global .align 1 kern_param_2,
	.param .u64 .ptr .global .align 1 kern_param_3,
	.param .u64 .ptr .global .align 1 kern_param_4
)
{
	ld.param.b64 	%rd1, [kern_param_0];
	ld.param.b32 	%r1, [kern_param_1];
	ld.param.b64 	%rd2, [kern_param_2];
}
"""


def test_strip_removes_unused_trailing_params():
    out = strip_triton_scratch_params(PTX, "kern", 3)
    assert "kern_param_2" in out and "kern_param_3" not in out and "kern_param_4" not in out
    assert strip_triton_scratch_params(out, "kern", 3) == out


def test_strip_refuses_to_drop_a_used_param():
    with pytest.raises(RuntimeError, match="reads its hidden parameter kern_param_2"):
        strip_triton_scratch_params(PTX, "kern", 2)
    with pytest.raises(RuntimeError, match="no entry"):
        strip_triton_scratch_params(PTX, "other", 3)


# ----------------------------------------------------------------------------------------------------
# The AOT path on the CPU
# ----------------------------------------------------------------------------------------------------
COMPILE = """
import json, re, subprocess, sys, torch, triton
sys.path.insert(0, {dir!r})
from aot_test_kernel import make_spec
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from diagcompile.export.tensorrt import compile_forward_ptx, launch_config

out = []
for dtype in (torch.float32, torch.float16):
    for n_out, n_in in {shapes!r}:
        spec = make_spec(dtype, n_out, n_in)
        kern = compile_forward_ptx(dtype, n_out, n_in, arch=90, spec=spec)
        raw = triton.compile(triton.compiler.ASTSource(spec.fn, {{**spec.signature, "BLOCK_M": "constexpr",
              "BLOCK_N": "constexpr", "TALL": "constexpr"}}, constexprs=spec.constexprs),
              target=GPUTarget("cuda", 90, 32), options={{"num_warps": 4, "num_stages": 2}}).asm["ptx"]
        entry = re.search(r"\\.entry\\s+" + kern.name + r"\\((.*?)\\)", kern.ptx, re.S).group(1)
        params = [p.split()[1] for p in entry.split(",") if p.strip()]
        raw_entry = re.search(r"\\.entry\\s+" + kern.name + r"\\((.*?)\\)", raw, re.S).group(1)
        path = {dir!r} + f"/{{kern.name}}_{{n_out}}x{{n_in}}.ptx"
        open(path, "w").write(kern.ptx)
        ptxas = subprocess.run([get_ptxas(90).path, "--gpu-name", "sm_90a", path, "-o", path + ".cubin"],
                               capture_output=True, text=True)
        cfg = launch_config(kern, 37, n_out, n_in, 5)
        out.append(dict(dtype=str(dtype), shape=[n_out, n_in], name=kern.name, params=params,
                        raw_params=len([p for p in raw_entry.split(",") if p.strip()]),
                        target=re.search(r"\\.target\\s+(\\S+)", kern.ptx).group(1), ptxas=ptxas.returncode,
                        ptxas_err=ptxas.stderr[-500:], grid=list(cfg.grid), block=list(cfg.block),
                        shared=cfg.shared_mem, scalars=list(cfg.scalars), warps=kern.num_warps))
print(json.dumps(out))
"""


def test_kernel_compiles_to_ptx_with_tensorrts_argument_layout_and_assembles(kernel_dir):
    out = json.loads(run_python(COMPILE.format(dir=str(kernel_dir), shapes=SHAPES), env=_env()).splitlines()[-1])
    assert len(out) == 4
    for r in out:
        assert r["name"] == "diag_fwd_test_kernel"
        assert r["target"].startswith("sm_90")
        # (x, values, offsets, bias) pointers, 4 int32 scalars, y pointer: nothing else.
        assert r["params"] == [".u64"] * 4 + [".u32"] * 4 + [".u64"], r
        assert r["raw_params"] == len(r["params"]) + 2  # Triton's global/profile scratch pointers, removed
        assert r["ptxas"] == 0, r["ptxas_err"]
        n_out, n_in = r["shape"]
        assert r["scalars"] == [37, n_out, n_in, 5]
        assert r["grid"] == [3, (n_out + 31) // 32, 1]
        assert r["block"] == [r["warps"] * 32, 1, 1] == [128, 1, 1]


PLUGIN_AOT = """
import json, sys, types
sys.path.insert(0, {dir!r})
import aot_test_kernel, fake_trt
# The plugin asks ops/triton_kernels for the kernel spec (not in this branch) and the GPU for its arch.
sys.modules["diagcompile.ops.triton_kernels"] = types.SimpleNamespace(aot_forward_spec=aot_test_kernel.make_spec)
import diagcompile.export.tensorrt as t
t._device_arch = lambda: 90
aot = t._plugin_functions(fake_trt.trt, fake_trt.trtp)["aot_impl"]
S, D = fake_trt.Sym, fake_trt.TensorDesc
x = D("float32", [S("B"), S("T"), 40])
args = (D("float32", [5, 24]), D("int32", [5]), D("float32", [24]))
name, ptx, params, extra = aot(x, *args, 24, 40, (D("float32", [S("B"), S("T"), 24]),), 0)
text = lambda d: getattr(d, "text", d)
print(json.dumps(dict(name=name, entry=f".entry {{name}}(" in ptx,
                      grid=[text(params.grid_x), text(params.grid_y), text(params.grid_z)],
                      block=[params.block_x, params.block_y, params.block_z], shared=params.shared_mem,
                      extra=[text(e.value) for e in extra.exprs])))
"""


def test_aot_impl_returns_ptx_and_symbolic_launch_parameters(kernel_dir):
    code = PLUGIN_AOT.format(dir=str(kernel_dir))
    out = json.loads(run_python(code, env=_env()).strip().splitlines()[-1])
    assert out["name"] == "diag_fwd_test_kernel" and out["entry"]
    # rows M = B * T stay symbolic: one engine for every batch size; the rest are build-time constants.
    assert out["grid"] == ["(((B * T) + 15) // 16)", 1, 1]
    assert out["block"] == [128, 1, 1] and isinstance(out["shared"], int)
    assert out["extra"] == ["(B * T)", 24, 40, 5]  # the kernel's int32 scalars (M, N_out, N_in, k)


LAUNCH = """
import sys, torch
sys.path.insert(0, {dir!r})
from aot_test_kernel import make_spec, diag_fwd_test_kernel
from diagcompile.export.tensorrt import AOTKernel, launch_config
from diagcompile.ops.reference import diag_linear_ref
from diagcompile.testing import random_problem

worst = 0.0
for n_out, n_in in {shapes!r}:
    k = 5
    x, values, offsets, bias = random_problem(n_out, n_in, k, batch=(37,), seed=n_out)
    spec = make_spec(torch.float32, n_out, n_in)
    kern = AOTKernel(name="", ptx="", arch=90, num_warps=spec.num_warps, shared_mem=0, n_inputs=4,
                     scalar_args=spec.scalar_args, n_outputs=1, grid=spec.grid)
    cfg = launch_config(kern, x.shape[0], n_out, n_in, k)
    y = torch.empty(x.shape[0], n_out)
    diag_fwd_test_kernel[cfg.grid](x, values, offsets, bias, *cfg.scalars, y, **spec.constexprs)
    ref = diag_linear_ref(x, values, offsets, bias, n_out)
    worst = max(worst, float((y - ref).abs().max()))
print(worst)
"""


@pytest.mark.interpret
def test_launch_config_drives_an_aot_abi_kernel_to_the_reference(kernel_dir):
    out = run_python(LAUNCH.format(dir=str(kernel_dir), shapes=SHAPES), env=_env(TRITON_INTERPRET="1"))
    assert float(out.splitlines()[-1]) < 1e-5


REAL = """
import torch
from diagcompile.export.tensorrt import compile_forward_ptx
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for n_out, n_in in ((768, 3072), (3072, 768)):
        kern = compile_forward_ptx(dtype, n_out, n_in, arch=90)
        print(kern.name, len(kern.ptx) > 0, len(kern.scalar_args))
"""


def test_real_forward_kernel_compiles_to_ptx_on_the_cpu():
    out = run_python(REAL, env=_env()).strip().splitlines()
    assert len(out) == 6 and all(" True " in line for line in out), out


# ----------------------------------------------------------------------------------------------------
# GPU: the script that launches the real kernel's PTX with the AOT launch parameters
# ----------------------------------------------------------------------------------------------------
@requires_cuda()
@pytest.mark.gpu
def test_gpu_verify_aot_script():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "benchmarks", "gpu_verify_aot.py")
    out = run_python(
        f"import runpy, sys; sys.argv = ['gpu_verify_aot', '--quick']; runpy.run_path({script!r}, run_name='__main__')"
    )
    assert "ALL CHECKS PASSED" in out, out

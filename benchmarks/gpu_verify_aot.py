"""Verify on a GPU what the TensorRT path can be verified with *without* TensorRT.  [UNVERIFIED: not run yet]

    python benchmarks/gpu_verify_aot.py           # all checks -> benchmarks/results/gpu_verify_aot.{csv,md}
    python benchmarks/gpu_verify_aot.py --out "$OUT"   # the same, results into the device tool's $OUT
    python benchmarks/gpu_verify_aot.py --quick   # fewer shapes, no results file (what the GPU test runs)

1. AOT kernel: for each dtype and layer shape, compile the real Triton forward kernel to PTX exactly as the
   TensorRT plugin's ``aot_impl`` does (``diagcompile.export.tensorrt.compile_forward_ptx``), compute the launch
   exactly as the ``aot_impl`` does (``launch_config``: grid, block, dynamic shared memory, int32 scalars),
   load the PTX with the CUDA driver (``cuModuleLoadDataEx``: the driver JIT-compiles it, as it does for a
   TensorRT engine) and launch it with the argument list TensorRT builds: input pointers
   ``x, values, offsets, bias``, the int32 scalars, the output pointer. Layers without bias get the zero bias
   the plugin-form ONNX carries. Compare with ``ops/reference.py``. If CuPy is installed, the same PTX is
   also launched through ``cupy.RawModule`` as a second opinion.
2. ``.pt2`` on CUDA: export the test model on CUDA, save, load in a fresh process, run, compare with eager;
   and load a CPU-exported ``.pt2`` with ``load(path, device="cuda")``.

Prints one line per check and ``ALL CHECKS PASSED`` (exit 0) or ``SOME CHECKS FAILED`` (exit 1).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from diagcompile.export import check_program, export_program, save  # noqa: E402
from diagcompile.export.tensorrt import AOTKernel, compile_forward_ptx, launch_config  # noqa: E402
from diagcompile.ops import k_from_sparsity  # noqa: E402
from diagcompile.ops.reference import diag_linear_ref  # noqa: E402
from diagcompile.testing import make_export_model, random_problem, rel_err, run_python  # noqa: E402

#: (N_out, N_in): wide, tall, square, odd, degenerate.
SHAPES = [(768, 3072), (3072, 768), (512, 512), (333, 1000), (1000, 333), (1, 257), (257, 1)]
QUICK_SHAPES = [(768, 3072), (3072, 768), (333, 1000)]
#: leading dims of x: the AOT impl multiplies them into M.
BATCHES = [(1,), (37,), (4, 75), (2048,)]
QUICK_BATCHES = [(1,), (4, 75)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: relative error vs a float64 reference; low precision: the inputs are rounded, accumulation is float32.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# ----------------------------------------------------------------------------------------------------
# The CUDA driver, through ctypes: the same call TensorRT makes (cuLaunchKernel with a kernelParams array)
# ----------------------------------------------------------------------------------------------------
class Driver:
    CU_JIT_ERROR_LOG_BUFFER = 5
    CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 6
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        c = ctypes
        self.lib.cuModuleLoadDataEx.argtypes = [
            c.POINTER(c.c_void_p),
            c.c_void_p,
            c.c_uint,
            c.POINTER(c.c_int),
            c.POINTER(c.c_void_p),
        ]
        self.lib.cuModuleGetFunction.argtypes = [c.POINTER(c.c_void_p), c.c_void_p, c.c_char_p]
        self.lib.cuFuncSetAttribute.argtypes = [c.c_void_p, c.c_int, c.c_int]
        self.lib.cuLaunchKernel.argtypes = [c.c_void_p] + [c.c_uint] * 7 + [c.c_void_p, c.c_void_p, c.c_void_p]
        self.lib.cuGetErrorName.argtypes = [c.c_int, c.POINTER(c.c_char_p)]
        self.lib.cuCtxGetCurrent.argtypes = [c.POINTER(c.c_void_p)]
        self._modules: dict[str, tuple[ctypes.c_void_p, ctypes.c_void_p]] = {}

    def _check(self, res: int, what: str, log: bytes = b"") -> None:
        if res != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(res, ctypes.byref(name))
            detail = f"\n{log.decode(errors='replace').strip()}" if log.strip(b"\0") else ""
            raise RuntimeError(f"{what} failed: {name.value.decode() if name.value else res}{detail}")

    def function(self, ptx: str, name: str) -> ctypes.c_void_p:
        """Load PTX into torch's (primary) context and return the kernel handle."""
        if ptx in self._modules:
            return self._modules[ptx][1]
        torch.zeros(1, device="cuda")  # makes torch's primary context current on this thread
        ctx = ctypes.c_void_p()
        self._check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            raise RuntimeError("no current CUDA context after torch initialised CUDA")
        image = ctypes.create_string_buffer(ptx.encode())
        log = ctypes.create_string_buffer(16384)
        opts = (ctypes.c_int * 2)(self.CU_JIT_ERROR_LOG_BUFFER, self.CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES)
        vals = (ctypes.c_void_p * 2)(ctypes.cast(log, ctypes.c_void_p), ctypes.c_void_p(len(log)))
        module = ctypes.c_void_p()
        self._check(
            self.lib.cuModuleLoadDataEx(ctypes.byref(module), ctypes.cast(image, ctypes.c_void_p), 2, opts, vals),
            "cuModuleLoadDataEx (PTX JIT)",
            log.raw,
        )
        func = ctypes.c_void_p()
        self._check(self.lib.cuModuleGetFunction(ctypes.byref(func), module, name.encode()), "cuModuleGetFunction")
        self._modules[ptx] = (module, func)
        return func

    def launch(self, kernel: AOTKernel, grid, block, shared: int, args: list) -> None:
        func = self.function(kernel.ptx, kernel.name)
        if shared > 48 * 1024:  # above 48 KiB dynamic shared memory must be opted into (Triton's launcher does too)
            self._check(
                self.lib.cuFuncSetAttribute(func, self.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared),
                "cuFuncSetAttribute",
            )
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(
            self.lib.cuLaunchKernel(
                func, *(int(g) for g in grid), *(int(b) for b in block), shared, stream, params, None
            ),
            "cuLaunchKernel",
        )


def _ctypes_args(inputs: list[torch.Tensor], scalars: tuple, output: torch.Tensor) -> list:
    """TensorRT's AOT argument list: input pointers, int32 scalars, output pointers."""
    return (
        [ctypes.c_uint64(t.data_ptr()) for t in inputs]
        + [ctypes.c_int32(int(s)) for s in scalars]
        + [ctypes.c_uint64(output.data_ptr())]
    )


def _launch_cupy(kernel: AOTKernel, cfg, inputs: list[torch.Tensor], output: torch.Tensor, tmp: Path) -> None:
    import cupy
    import numpy as np

    path = tmp / f"{kernel.name}_{abs(hash(kernel.ptx))}.ptx"
    path.write_text(kernel.ptx)
    fn = cupy.RawModule(path=str(path)).get_function(kernel.name)
    if cfg.shared_mem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = cfg.shared_mem
    args = (
        tuple(np.uint64(t.data_ptr()) for t in inputs)
        + tuple(np.int32(int(s)) for s in cfg.scalars)
        + (np.uint64(output.data_ptr()),)
    )
    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        fn(tuple(int(g) for g in cfg.grid), tuple(int(b) for b in cfg.block), args, shared_mem=cfg.shared_mem)


# ----------------------------------------------------------------------------------------------------
def _verdict(good: bool) -> str:
    return "ok  " if good else "FAIL"


def _check_case(driver, kernel, dtype, n_out, n_in, k, batch, has_bias, launchers, tmp: Path) -> tuple[bool, dict]:
    """One AOT launch (per launcher) of ``kernel`` for x of leading dims ``batch``; returns (ok, result row)."""
    x, values, offsets, bias = random_problem(
        n_out, n_in, k, batch=batch, dtype=dtype, device="cuda", bias=has_bias, seed=n_out + n_in
    )
    plugin_bias = bias if bias is not None else torch.zeros(n_out, device="cuda", dtype=dtype)  # as in the ONNX
    M = x.numel() // n_in  # the aot_impl multiplies x's leading dims
    cfg = launch_config(kernel, M, n_out, n_in, k)  # what the aot_impl hands TensorRT
    inputs = [x.contiguous(), values.contiguous(), offsets.contiguous(), plugin_bias]
    ref = diag_linear_ref(x.double(), values.double(), offsets, bias.double() if has_bias else None, n_out)
    name = str(dtype).split(".")[-1]
    case = f"{name:8s} {n_out:5d}x{n_in:<5d} x{tuple(x.shape)!s:14s} bias={has_bias!s:5s}"
    row = dict(dtype=name, n_out=n_out, n_in=n_in, x_shape=str(tuple(x.shape)), bias=has_bias, k=k)
    row.update(grid=str(tuple(int(g) for g in cfg.grid)), block=cfg.block[0], shared=cfg.shared_mem)
    ok = True
    for how in launchers:
        y = torch.full((*x.shape[:-1], n_out), float("nan"), device="cuda", dtype=dtype)
        try:
            if how == "driver":
                driver.launch(kernel, cfg.grid, cfg.block, cfg.shared_mem, _ctypes_args(inputs, cfg.scalars, y))
            else:
                _launch_cupy(kernel, cfg, inputs, y, tmp)
            torch.cuda.synchronize()
            err = rel_err(y, ref)
            good = bool(torch.isfinite(y).all()) and err <= TOL[dtype]
        except Exception as e:  # noqa: BLE001 - report and go on with the other cases
            err, good = float("nan"), False
            print(f"  {how} launch error: {e}")
        row[f"rel_err_{how}"] = err
        print(f"{_verdict(good)} AOT PTX via {how:6s} {case} rel err {err:.2e} (tol {TOL[dtype]:.0e})")
        ok &= good
    return ok, row


def check_aot(shapes, batches, dtypes, tmp: Path, rows: list[dict]) -> bool:
    driver = Driver()
    try:
        import cupy  # noqa: F401

        launchers: tuple[str, ...] = ("driver", "cupy")
    except ImportError:
        launchers = ("driver",)
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    ok = True
    for dtype in dtypes:
        for n_out, n_in in shapes:
            try:
                kernel = compile_forward_ptx(dtype, n_out, n_in, arch=arch)
            except Exception:  # noqa: BLE001
                print(f"FAIL compile {dtype} {n_out}x{n_in}:\n{traceback.format_exc()}")
                ok = False
                continue
            k = k_from_sparsity(n_out, n_in, 0.9)
            for batch in batches:
                for has_bias in (True, False):
                    good, row = _check_case(driver, kernel, dtype, n_out, n_in, k, batch, has_bias, launchers, tmp)
                    ok &= good
                    rows.append(row)
    return ok


def check_pt2(tmp: Path) -> bool:
    ok = True
    model, (x,) = make_export_model()
    model, x = model.cuda(), x.cuda()
    try:
        ep = export_program(model, (x,))
        path = save(ep, tmp / "cuda_model.pt2")
        print(f"ok   .pt2 exported on CUDA: {check_program(path, model, (x,))}")
        xs = torch.randn(9, 5, 96, device="cuda")
        with torch.no_grad():
            from diagcompile.export.program import prepare_for_export

            expected = prepare_for_export(model)[0](xs)
        torch.save({"x": xs.cpu(), "y": expected.cpu()}, tmp / "io.pt")
        code = (
            "import torch\nfrom diagcompile.export import load\n"
            f"io = torch.load({str(tmp / 'io.pt')!r})\nep = load({str(path)!r})\n"
            "y = ep.module()(io['x'].cuda())\n"
            "print(y.device, float((y.cpu() - io['y']).abs().max()))\n"
        )
        device, diff = run_python(code).strip().splitlines()[-1].split()
        good = device.startswith("cuda") and float(diff) <= 1e-4
        print(
            f"{'ok  ' if good else 'FAIL'} .pt2 loaded in a fresh process ran on {device}: max diff {float(diff):.2e}"
        )
        ok &= good
    except Exception:  # noqa: BLE001
        print(f"FAIL .pt2 on CUDA:\n{traceback.format_exc()}")
        ok = False
    try:
        cpu_model, (cx,) = make_export_model()
        cpu_path = save(export_program(cpu_model, (cx,)), tmp / "cpu_model.pt2")
        from diagcompile.export import load

        ep = load(cpu_path, device="cuda")
        xs = torch.randn(7, 5, 96)
        with torch.no_grad():
            from diagcompile.export.program import prepare_for_export

            expected = prepare_for_export(cpu_model)[0](xs)
            y = ep.module()(xs.cuda())
        diff = float((y.cpu() - expected).abs().max())
        good = y.is_cuda and diff <= 1e-4
        print(f"{_verdict(good)} CPU-exported .pt2 loaded with device='cuda': max diff vs CPU eager {diff:.2e}")
        ok &= good
    except Exception:  # noqa: BLE001
        print(f"FAIL CPU-exported .pt2 on CUDA:\n{traceback.format_exc()}")
        ok = False
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and batches; no results file")
    parser.add_argument("--out", type=Path, default=None, help="results dir (default: benchmarks/results)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ok = check_aot(
            QUICK_SHAPES if args.quick else SHAPES,
            QUICK_BATCHES if args.quick else BATCHES,
            DTYPES,
            tmp,
            rows,
        )
        ok &= check_pt2(tmp)
    if not args.quick and rows:
        md = write_results(
            "gpu_verify_aot",
            rows,
            "TensorRT AOT kernel: PTX launched with the aot_impl's launch parameters (no TensorRT)",
            notes="Relative error vs a float64 reference (ops/reference.py). 'driver' = cuLaunchKernel via ctypes "
            "with TensorRT's argument order; 'cupy' = the same PTX through cupy.RawModule.",
            out_dir=args.out,
        )
        print(f"wrote {md}")
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""TensorRT for ``diagcompile::diag_linear``: a Quick Deploy Plugin, a torch-TensorRT converter, ``build_engine``.

UNVERIFIED: TensorRT cannot be installed on our machines (its PyPI packages are stubs that download from
NVIDIA's index; the GPU machine has no network), so no line that touches ``tensorrt`` / ``torch_tensorrt`` has
ever run. What *is* verified is the part of the AOT path that does not need TensorRT:

* ``compile_forward_ptx`` compiles the Triton forward kernel to PTX exactly as the plugin's ``aot_impl`` does
  (on any machine: ``triton.compile`` with an explicit ``GPUTarget`` needs no GPU), removes Triton's two hidden
  scratch-pointer parameters, and the result assembles with ``ptxas`` (CPU tests);
* ``launch_config`` computes the grid, block, shared memory and int scalars the ``aot_impl`` hands to TensorRT,
  from the same code path, with plain ints or with TensorRT-like symbolic sizes (CPU tests);
* ``benchmarks/gpu_verify_aot.py`` loads that PTX with the CUDA driver on an H100 and launches it with those
  parameters, comparing with ``ops/reference.py`` (to be run on the GPU machine).

The plugin (``diagcompile::DiagLinear``, the ``op_type`` of ``to_onnx(mode="plugin")`` nodes):

* inputs ``x (..., N_in)``, ``values (k, D)``, ``offsets (k,)`` int32, ``bias (N_out,)`` (zeros when the layer
  has none); attributes ``out_features``, ``in_features``; output ``(..., N_out)`` in ``x``'s dtype;
* ``@trtp.impl`` (JIT): calls ``torch.ops.diagcompile.diag_linear`` on TensorRT's stream;
* ``@trtp.aot_impl``: the Triton forward kernel as PTX, launched by TensorRT without Python. TensorRT passes
  kernel arguments as (input pointers, extra int32 scalars, output pointers) [TensorRT ``aot_impl`` docs], so
  the kernel's parameters are ordered ``x, values, offsets, bias, <scalars>, y`` (``AOTSpec`` in
  ``ops/triton_kernels.py``). torch-TensorRT's newest AOT example orders them (inputs, outputs, scalars) and
  pads four int32 zeros for Triton's hidden scratch pointers instead of removing them: if a TensorRT version
  behaves that way, this is the first thing to check.
"""

# No `from __future__ import annotations` here: tensorrt.plugin inspects the plugin functions' annotations
# as classes (issubclass(annotation, TensorDesc)); postponed (string) annotations would break registration.
import ast
import functools
import logging
import operator
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from diagcompile._files import atomic_write, check_output_path

__all__ = [
    "AOTKernel",
    "LaunchConfig",
    "PLUGIN_ID",
    "TensorRTUnavailableError",
    "build_engine",
    "compile_forward_ptx",
    "eval_size_expr",
    "is_available",
    "launch_config",
    "register_plugin",
    "register_torch_tensorrt_converter",
    "strip_triton_scratch_params",
    "zero_bias",
]

log = logging.getLogger(__name__)

PLUGIN_NAMESPACE = "diagcompile"
PLUGIN_NAME = "DiagLinear"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class TensorRTUnavailableError(ImportError):
    """``tensorrt`` (or ``torch_tensorrt``) is not installed, or too old for Quick Deploy Plugins."""


def is_available() -> bool:
    """Whether ``tensorrt.plugin`` (TensorRT >= 10.9, with AOT plugins) can be imported."""
    try:
        _import_trt()
    except TensorRTUnavailableError:
        return False
    return True


def _import_trt() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise TensorRTUnavailableError(
            "diagcompile.export.tensorrt needs TensorRT >= 10.9 with its Python plugin module (tensorrt.plugin): "
            "install it from NVIDIA (pip install tensorrt, which downloads from pypi.nvidia.com). "
            "Without TensorRT, export ONNX with diagcompile.export.to_onnx and build the engine elsewhere."
        ) from e
    if not hasattr(trtp, "aot_impl"):
        raise TensorRTUnavailableError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no tensorrt.plugin.aot_impl; AOT plugins need >= 10.9"
        )
    return trt, trtp


# ----------------------------------------------------------------------------------------------------
# Size expressions: the kernel's int scalars, for plain ints and for TensorRT's symbolic sizes
# ----------------------------------------------------------------------------------------------------
_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}


def _apply(op_type: type, a: Any, b: Any) -> Any:
    fn = _BINOPS[op_type]
    if isinstance(a, int) and not isinstance(b, int):
        # TensorRT's ShapeExpr/SymInt32 define +, -, *, // but no reflected operators: keep the symbol left.
        if op_type in (ast.Add, ast.Mult):
            return fn(b, a)
        a = type(b)(a)
    return fn(a, b)


def eval_size_expr(expr: str, env: Mapping[str, Any]) -> Any:
    """Evaluate an integer expression such as ``"N_in"`` or ``"(M + 15) // 16"`` over ``env``.

    Only int literals, names from ``env`` and ``+ - * //`` are allowed (what TensorRT's symbolic sizes
    support); values may be ints or symbolic expressions.
    """
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"size expression {expr!r} does not parse: {e}") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise ValueError(f"size expression {expr!r}: unknown name {node.id!r}; known: {sorted(env)}")
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _apply(type(node.op), ev(node.left), ev(node.right))
        raise ValueError(f"size expression {expr!r}: only ints, names and + - * // are allowed")

    return ev(tree.body)


def _size_env(M: Any, n_out: int, n_in: int, k: Any) -> dict[str, Any]:
    env = {"M": M, "N_out": n_out, "N_in": n_in, "k": k, "D": min(n_out, n_in), "P": max(n_out, n_in)}
    env.update({"N_OUT": n_out, "N_IN": n_in, "n_out": n_out, "n_in": n_in, "K": k})
    return env


# ----------------------------------------------------------------------------------------------------
# The forward kernel as PTX (exactly what the aot_impl returns)
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AOTKernel:
    """A compiled forward kernel plus what is needed to launch it.

    Attributes:
        name: PTX entry name. ptx: the PTX text (Triton's hidden scratch parameters removed).
        arch: compute capability it was compiled for (e.g. 90). num_warps, shared_mem: launch needs.
        n_inputs / scalar_args / n_outputs: the parameter layout, ``(inputs, int scalars, outputs)``.
        grid: ``grid(M) -> (gx, gy, gz)`` from the kernel's ``AOTSpec``.
    """

    name: str
    ptx: str
    arch: int
    num_warps: int
    shared_mem: int
    n_inputs: int
    scalar_args: tuple[str, ...]
    n_outputs: int
    grid: Callable[[Any], tuple[Any, Any, Any]]


@dataclass(frozen=True)
class LaunchConfig:
    """Grid, block, dynamic shared memory and the int32 scalar arguments of one launch."""

    grid: tuple[Any, Any, Any]
    block: tuple[int, int, int]
    shared_mem: int
    scalars: tuple[Any, ...]


_PARAM_LIST = re.compile(r"\.visible\s+\.entry\s+(?P<name>[\w$]+)\s*\((?P<params>[^)]*)\)", re.S)


def strip_triton_scratch_params(ptx: str, kernel_name: str, n_params: int) -> str:
    """Remove the parameters Triton appends after the kernel's own ``n_params`` (its global and profile
    scratch pointers), so that the PTX entry takes exactly the arguments TensorRT passes.

    Raises:
        RuntimeError: the entry is missing, has fewer parameters, or its body reads a removed parameter.
    """
    match = next((m for m in _PARAM_LIST.finditer(ptx) if m.group("name") == kernel_name), None)
    if match is None:
        raise RuntimeError(f"PTX has no entry {kernel_name!r}")
    params = [p.strip() for p in match.group("params").split(",") if p.strip()]
    if len(params) < n_params:
        raise RuntimeError(f"PTX entry {kernel_name} has {len(params)} parameters, expected at least {n_params}")
    body = ptx[match.end() :]
    for extra in params[n_params:]:
        pname = extra.split()[-1]
        if re.search(rf"\b{re.escape(pname)}\b", body):
            raise RuntimeError(
                f"PTX entry {kernel_name} reads its hidden parameter {pname} (Triton scratch memory), which "
                f"TensorRT's AOT launch does not provide"
            )
    if len(params) == n_params:
        return ptx
    joined = ",\n\t".join(params[:n_params])
    return ptx[: match.start("params")] + "\n\t" + joined + "\n" + ptx[match.end("params") :]


def _device_arch() -> int:
    if not torch.cuda.is_available():
        raise ValueError("compile_forward_ptx: no CUDA device to take the architecture from; pass arch=90 (H100)")
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def _check_abi(fn: Any, signature: Mapping[str, str], spec: Any) -> tuple[int, int]:
    """The kernel must take (4 input pointers, int scalars, 1 output pointer, constexprs...)."""
    runtime = [n for n in fn.arg_names if signature.get(n, "constexpr") != "constexpr"]
    kinds = ["ptr" if signature[n].startswith("*") else "int" for n in runtime]
    n_scalars = len(spec.scalar_args)
    expected = ["ptr"] * 4 + ["int"] * n_scalars + ["ptr"]
    if kinds != expected:
        raise ValueError(
            f"AOT kernel {fn.__name__}: runtime parameters {list(zip(runtime, kinds))} do not match TensorRT's "
            f"AOT order (x, values, offsets, bias, {n_scalars} int scalars, y)"
        )
    return 4, 1


def compile_forward_ptx(
    dtype: torch.dtype,
    out_features: int,
    in_features: int,
    *,
    arch: int | None = None,
    spec: Any | None = None,
) -> AOTKernel:
    """Compile the Triton forward kernel to PTX the way the plugin's ``aot_impl`` does.

    Args:
        dtype: float32, float16 or bfloat16 (the layer's dtype).
        out_features / in_features: the layer shape.
        arch: compute capability (``90`` for H100); default: the current CUDA device's.
        spec: the kernel's ``AOTSpec``; default ``diagcompile.ops.triton_kernels.aot_forward_spec(...)``.
            (fields ``fn``, ``signature``, ``constexprs``, ``num_warps``, ``num_stages``, ``scalar_args``,
            ``grid``).
    """
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"the AOT kernel supports {list(_TRITON_DTYPES)}, got {dtype}")
    import triton
    from triton.backends.compiler import GPUTarget

    if spec is None:
        from diagcompile.ops.triton_kernels import aot_forward_spec

        spec = aot_forward_spec(dtype, out_features, in_features)
    arch = arch if arch is not None else _device_arch()
    fn = spec.fn
    constexprs = dict(spec.constexprs)
    # ASTSource wants every parameter typed, in the kernel's order; constexprs are typed "constexpr".
    signature = {n: spec.signature.get(n, "constexpr") for n in fn.arg_names}
    n_in, n_out = _check_abi(fn, signature, spec)
    # The real spec carries Triton's alignment attributes (16-byte divisibility of the pointers), without which
    # the values loads are not vectorized; a bare spec (tests' private kernel) gets a plain ASTSource.
    if hasattr(spec, "ast_source"):
        src = spec.ast_source()
    else:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"kernel {md.name} needs Triton scratch memory, which TensorRT's AOT launch cannot provide")
    n_params = n_in + len(spec.scalar_args) + n_out
    ptx = strip_triton_scratch_params(compiled.asm["ptx"], md.name, n_params)
    return AOTKernel(
        name=md.name,
        ptx=ptx,
        arch=arch,
        num_warps=md.num_warps,
        shared_mem=md.shared,
        n_inputs=n_in,
        scalar_args=tuple(spec.scalar_args),
        n_outputs=n_out,
        grid=spec.grid,
    )


def launch_config(kernel: AOTKernel, M: Any, out_features: int, in_features: int, k: Any) -> LaunchConfig:
    """The launch the AOT plugin describes to TensorRT, for ``M`` rows (int or symbolic) and ``k`` diagonals."""
    env = _size_env(M, out_features, in_features, k)
    grid = tuple(kernel.grid(M))
    if len(grid) != 3:
        raise ValueError(f"AOTSpec.grid must return (gx, gy, gz), got {grid!r}")
    scalars = tuple(eval_size_expr(e, env) for e in kernel.scalar_args)
    return LaunchConfig(grid=grid, block=(kernel.num_warps * 32, 1, 1), shared_mem=kernel.shared_mem, scalars=scalars)


# ----------------------------------------------------------------------------------------------------
# The Quick Deploy Plugin (UNVERIFIED: needs TensorRT)
# ----------------------------------------------------------------------------------------------------
def _maybe_int(e: Any) -> Any:
    """A constant TensorRT size as a Python int (compile-time constant); anything else unchanged."""
    try:
        if not getattr(e, "is_fake", False) and e.is_constant:
            return int(e.constant_value())
    except (AttributeError, RuntimeError, TypeError):
        pass
    return e


def _plugin_functions(trt: Any, trtp: Any) -> dict[str, Callable[..., Any]]:
    """The plugin's ``register`` / ``autotune`` / ``impl`` / ``aot_impl`` functions, in registration order.

    Built against the ``tensorrt`` and ``tensorrt.plugin`` modules passed in; their annotations are real
    classes, which ``tensorrt.plugin`` checks (tensor arguments first, then attributes, then ``outputs`` and
    ``stream``/``tactic``; ``aot_impl`` must annotate its 4-tuple return).
    """
    to_torch = {trt.float32: torch.float32, trt.float16: torch.float16}
    if hasattr(trt, "bfloat16"):
        to_torch[trt.bfloat16] = torch.bfloat16

    def describe(
        x: trtp.TensorDesc,
        values: trtp.TensorDesc,
        offsets: trtp.TensorDesc,
        bias: trtp.TensorDesc,
        out_features: int,
        in_features: int,
    ) -> tuple[trtp.TensorDesc]:
        y = x.like()  # same dtype and leading dims; last dim N_out
        y.shape_expr[x.ndim - 1] = out_features
        return (y,)

    def formats(
        x: trtp.TensorDesc,
        values: trtp.TensorDesc,
        offsets: trtp.TensorDesc,
        bias: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        # x, values, bias and y share one float type; offsets stay int32.
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, INT32, FP32|FP16, FP32|FP16", "LINEAR")]

    def run(
        x: trtp.Tensor,
        values: trtp.Tensor,
        offsets: trtp.Tensor,
        bias: trtp.Tensor,
        out_features: int,
        in_features: int,
        outputs: tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        # JIT: our op (Triton on CUDA) on TensorRT's stream, written into TensorRT's output buffer.
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in (x, values, offsets, bias)]
            y = torch.ops.diagcompile.diag_linear(*args, out_features)
            torch.as_tensor(outputs[0], device="cuda").copy_(y)

    def aot(
        x: trtp.TensorDesc,
        values: trtp.TensorDesc,
        offsets: trtp.TensorDesc,
        bias: trtp.TensorDesc,
        out_features: int,
        in_features: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        # AOT: the Triton forward kernel as PTX; sizes stay symbolic so one engine serves every batch size.
        kernel = compile_forward_ptx(to_torch[x.dtype], out_features, in_features)
        M = x.shape_expr[0]
        for i in range(1, x.ndim - 1):  # rows = product of x's leading dims
            M = M * x.shape_expr[i]
        k = _maybe_int(values.shape_expr[0])
        cfg = launch_config(kernel, M, out_features, in_features, k)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = cfg.grid
        params.block_x, params.block_y, params.block_z = cfg.block
        params.shared_mem = cfg.shared_mem
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in cfg.scalars])
        return kernel.name, kernel.ptx, params, extra

    return {"register": describe, "autotune": formats, "impl": run, "aot_impl": aot}


@functools.cache
def register_plugin() -> None:
    """Register ``diagcompile::DiagLinear`` with ``tensorrt.plugin`` (idempotent). UNVERIFIED.

    Call this (``build_engine`` does) before TensorRT parses a plugin-form ONNX file.
    """
    trt, trtp = _import_trt()
    for kind, fn in _plugin_functions(trt, trtp).items():
        getattr(trtp, kind)(PLUGIN_ID)(fn)
    log.info("registered TensorRT plugin %s (JIT + AOT)", PLUGIN_ID)


# TensorRT DataType names of the float types a diagonal layer's values can have.
_TRT_FLOAT_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16}


def zero_bias(out_features: int, values: Any) -> torch.Tensor:
    """The ``(out_features,)`` zero bias the plugin gets for a layer without one, in the dtype of ``values``.

    ``values`` is what the torch-TensorRT converter receives: a ``torch.Tensor`` (a frozen weight) or a
    TensorRT ``ITensor`` (whose ``dtype`` is a ``trt.DataType``). The plugin's inputs share one type, so a
    float32 bias next to float16 values would not build. The ``ITensor`` branch is UNVERIFIED (no TensorRT here).
    """
    if isinstance(values, torch.Tensor):
        dtype = values.dtype
    else:
        name = getattr(values.dtype, "name", str(values.dtype)).rsplit(".", 1)[-1]
        dtype = _TRT_FLOAT_DTYPES.get(name, torch.float32)
    return torch.zeros(out_features, dtype=dtype)


@functools.cache
def register_torch_tensorrt_converter() -> None:
    """Teach torch-TensorRT to lower ``diagcompile::diag_linear`` to the plugin (AOT). UNVERIFIED.

    ``torch_tensorrt``'s own ``generate_plugin`` cannot be used: it names the plugin after the torch op and
    evaluates our fake kernel with every size symbolic and every tensor float, which our shape checks reject.
    """
    try:
        from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter
        from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor
    except ImportError as e:
        raise TensorRTUnavailableError("register_torch_tensorrt_converter needs torch_tensorrt >= 2.12") from e
    _, trtp = _import_trt()
    register_plugin()

    @dynamo_tensorrt_converter(torch.ops.diagcompile.diag_linear.default, supports_dynamic_shapes=True)
    def _convert(ctx, target, args, kwargs, name):
        x, values, offsets, bias, out_features = args
        in_features = int(x.shape[-1])
        if tuple(bias.shape) == (0,):  # no bias (a torch tensor or a TensorRT ITensor): the plugin takes zeros
            bias = zero_bias(int(out_features), values)
        inputs = [get_trt_tensor(ctx, t, f"{name}_{i}") for i, t in enumerate((x, values, offsets, bias))]
        plugin = trtp.op.diagcompile.DiagLinear(*inputs, out_features=int(out_features), in_features=in_features)
        layer = ctx.net.add_plugin(plugin, aot=True)
        layer.name = f"[{target}]-[{name}]"
        return layer.get_output(0)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike | None = None,
    *,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 256,
    fp16: bool = False,
) -> bytes:
    """Build a TensorRT engine from a ``to_onnx`` file (either mode). UNVERIFIED.

    Plugin-form files are parsed without their local functions, so every ``DiagLinear`` node becomes the
    plugin (``aot=1`` nodes use the PTX implementation). Each input's dim 0 gets the profile
    ``min_batch / opt_batch / max_batch``. Returns the serialized engine (also written to ``engine_path``).
    """
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    if engine_path is not None:  # before the minutes-long build, not at the final rename
        check_output_path(engine_path, "build_engine")
    trt, _ = _import_trt()
    import onnx

    from diagcompile.export.onnx import count_plugin_nodes, strip_local_functions

    model = onnx.load(onnx_path)
    if count_plugin_nodes(model):
        register_plugin()
        model = strip_local_functions(model)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rest = tuple(t.shape)[1:]
        profile.set_shape(t.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    data = bytes(engine)
    if engine_path is not None:
        with atomic_write(engine_path, "build_engine") as tmp:
            tmp.write_bytes(data)
    return data

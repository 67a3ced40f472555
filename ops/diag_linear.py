"""The op contract: ``diagcompile::diag_linear`` and its two gradient ops.

Three opaque ``torch.library`` ops (defined with the low-level API, see "Registration"), so that compiled
graphs, ``torch.export`` programs and ONNX see exactly one node per layer and the backward graph is made of
our ops too (except where the ``diagcompile`` backend compiles a small CPU layer inline as
``diag_linear_composite``, ``passes/inline.py``):

* ``diag_linear(x, values, offsets, bias, out_features) -> y``           ``(..., N_in) -> (..., N_out)``
* ``diag_linear_dx(dy, values, offsets, in_features) -> dx``             ``(..., N_out) -> (..., N_in)``
* ``diag_linear_dv(dy, x, offsets) -> dvalues``                          ``-> (k, D)``

Schema rules (the TensorRT plugin generator accepts nothing else): tensors first, then only ints; no
Optional, no lists. "No bias" is an empty ``bias`` tensor (``numel() == 0``); the bias is added in the
kernel epilogue. ``offsets`` is int32 (``OFFSET_DTYPE``); the public functional converts at the boundary
and validates contents there. These ops check shapes with ``torch._check`` only: they trust the caller.

Each op is differentiable through the others (the three are closed under differentiation), so double
backward works:

* ``y = diag_linear(x, V)``:  ``dx = diag_linear_dx(dy, V)``, ``dV = diag_linear_dv(dy, x)``, ``db = sum dy``
* ``dx = diag_linear_dx(dy, V)``: ``d(dy) = diag_linear(g, V)``, ``dV = diag_linear_dv(dy, g)``
* ``dV = diag_linear_dv(dy, x)``: ``d(dy) = diag_linear(x, G)``, ``dx = diag_linear_dx(dy, G)``

Implementations: one function per op for every device, which asks ``ops/dispatch.py`` for a path
(kernel / dense / reference) from the shapes alone. Every path checks the same preconditions (shapes,
dtypes, int offsets; on the CPU also distinct offsets in ``[0, P)``) and returns the same results up to
rounding, with one exception: non-finite inputs. A NaN or inf in ``x`` (or ``dy``) reaches only the outputs
its kept diagonals connect it to on the kernel and reference paths, but every output on the dense path (and
in ``diag_linear_composite``, which the ``diagcompile`` backend compiles in place of small CPU layers' op
calls), whose GEMM multiplies the structural zeros of ``W`` too (``0 * NaN = NaN``, as ``nn.Linear`` on the
dense ``W`` would). Which outputs turn NaN can therefore depend on the batch size.

``call_diag_linear`` is how the user API calls the forward op. In plain eager it runs the same
implementation and autograd formulas without the dispatcher's Python layers (~40 us a call on a slow CPU);
under compile, export, any dispatch or torch-function mode, a tensor subclass or the profiler it is the op
call itself; under functorch transforms and forward AD it is the op call inside an autograd.Function that
torch.func accepts and that carries forward-mode (jvp) formulas. The ops have vmap rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.utils.flop_counter import register_flop_formula

from diagcompile.ops import dispatch, reference

__all__ = ["diag_linear_op", "diag_linear_dx_op", "diag_linear_dv_op", "call_diag_linear", "diag_linear_composite"]


def _rows(t: Tensor) -> int:
    n = 1
    for s in t.shape[:-1]:
        n *= s
    return n


def _empty_bias(like: Tensor) -> Tensor:
    return like.new_empty(0)


# ---- triton-kernels: dense-path helpers. A device's kernel provider may offer one-launch `to_dense` /
# `extract_diagonals` (the Triton provider does: W written once, coalesced, instead of the reference's
# index tensors + memset + scatter, ~10x the bytes on a 4096x14336 layer); otherwise use the reference.
def _provider_fn(t: Tensor, name: str):
    mod = dispatch.kernel_module(t.device.type)
    fn = getattr(mod, name, None) if mod is not None else None
    return fn if fn is not None and mod.supports(t.dtype) else None


def _dense_weight(values: Tensor, offsets: Tensor, n_out: int, n_in: int) -> Tensor:
    fn = _provider_fn(values, "to_dense")
    return fn(values, offsets, n_out, n_in) if fn else reference.to_dense(values, offsets, n_out, n_in)


def _diagonals_of(g: Tensor, offsets: Tensor, dtype: torch.dtype) -> Tensor:
    fn = _provider_fn(g, "extract_diagonals")
    return fn(g, offsets, dtype) if fn else reference.extract_diagonals(g, offsets).to(dtype)


# ---- end triton-kernels


def _own(y: Tensor) -> Tensor:
    """``y`` as a tensor that is not a view (same storage, no copy), for an output autograd will record.

    The implementations reshape their 2-D result, which makes a view of a tensor made inside the op; autograd
    refuses in-place ops on such an output of a custom op or ``autograd.Function`` (``nn.ReLU(inplace=True)``,
    ``y += residual``). ``detach()`` shares the storage without the view relation (``_unsafe_view`` does too,
    at ~10x the cost here). Tensors made inside an op have no history to lose.
    """
    return y if y._base is None else y.detach()


def _check_inputs(
    op: str, a: Tensor, b: Tensor, offsets: Tensor, P: int, path: str, bias: Tensor | None = None
) -> None:
    """The op's preconditions every path must meet alike, checked where it costs no device sync.

    One dtype: the kernel would mix them and the dense path raise, so the answer would depend on the batch
    size. Offsets distinct and in ``[0, P)``: the kernel path checks its own (``cpu_kernels``); on the CPU the
    others are checked here (a duplicate is summed by a kernel but written once by a dense scatter, and the
    reference wraps an out-of-range one). On an accelerator they stay the caller's promise: checking them
    would cost a device sync per call; ``diagcompile.diag_linear`` and ``DiagLinear`` validate them.
    """
    if not a.is_floating_point():
        raise TypeError(f"diagcompile::{op}: the inputs must be floating point, got {a.dtype}")
    if offsets.dtype != torch.int32 and offsets.dtype != torch.int64:
        raise TypeError(f"diagcompile::{op}: offsets must be int32 (or int64), got {offsets.dtype}")
    if a.dtype != b.dtype or (bias is not None and bias.numel() > 0 and bias.dtype != a.dtype):
        got = f"{a.dtype} and {b.dtype}" + (f" (bias {bias.dtype})" if bias is not None and bias.numel() else "")
        raise TypeError(f"diagcompile::{op}: the floating inputs must share one dtype, got {got}")
    if path != "kernel" and offsets.is_cpu:
        from diagcompile.ops import cpu_kernels

        cpu_kernels.check_offsets(offsets, P)


def _check_layer(op: str, values: Tensor, offsets: Tensor, n_out: int, n_in: int, bias: Tensor | None = None) -> None:
    """The shapes every path must agree on (the reference path would otherwise drop an extra offset, or
    broadcast a ``(1, N_out)`` bias that backward then refuses): integer comparisons, no sync."""
    # Written for the eager hot path (a few us per call matter on small layers): one .shape read per tensor.
    if n_out < 1 or n_in < 1:
        raise ValueError(f"diagcompile::{op}: a layer needs N_out, N_in >= 1, got {n_out}x{n_in}")
    D = n_out if n_out < n_in else n_in
    vs, os = values.shape, offsets.shape
    if len(vs) != 2 or vs[1] != D or os != vs[:1]:
        raise ValueError(
            f"diagcompile::{op}: a {n_out}x{n_in} layer needs values (k, {D}) and offsets (k,), got values "
            f"{tuple(vs)} and offsets {tuple(os)}"
        )
    if bias is not None and bias.shape != (n_out,) and bias.numel() > 0:
        raise ValueError(f"diagcompile::{op}: bias must be ({n_out},) or empty, got {tuple(bias.shape)}")


def _features(op: str, t: Tensor, name: str) -> int:
    """``t.shape[-1]``, the feature width of an ``(..., N)`` operand of the raw op or its fake kernel: a 0-d tensor
    is refused by name (``shape[-1]`` would raise a bare ``IndexError: tuple index out of range``)."""
    if t.dim() == 0:
        raise ValueError(f"diagcompile::{op}: {name} must be (..., features), got a 0-d tensor")
    return t.shape[-1]


def _check_fake(offsets: Tensor, *tensors: Tensor) -> None:
    """Fake-kernel checks shared by the three ops: int offsets, and one device (an empty bias aside).

    A meta tensor among CPU ones sends the call to the fake kernel, whose ``new_empty`` allocates on the first
    tensor's device: without the device check the op would return uninitialized CPU memory."""
    torch._check(offsets.dtype in (torch.int32, torch.int64), lambda: f"offsets must be int32, got {offsets.dtype}")
    tensors = (*tensors, offsets)
    dev = tensors[0].device
    devices = {t.device for t in tensors[1:] if t.device != dev and t.numel() != 0}
    torch._check(not devices, lambda: f"all tensors must be on one device, got {dev} and {sorted(map(str, devices))}")


# ----------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------
# The ops are defined with torch.library's low-level API rather than ``torch.library.custom_op``: the same
# schema, tags, fake kernel, autograd formulas and vmap rules, without custom_op's Python layers around each
# call (its autograd kernel's redispatch and a second Python kernel behind it): ~16 us less per call on this
# project's CPU (a small layer's raw op call: 52-54 -> 36-38 us of CPU time; the dispatcher's own Python call
# remains). Every call that does not go through ``call_diag_linear``'s direct path - compiled graphs, ``.pt2``
# programs, backward graphs, the raw op - pays it once per layer.
_LIB = torch.library.Library("diagcompile", "FRAGMENT")  # noqa: TOR901 - kept alive for the process
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
# The backends whose kernel is the CompositeExplicitAutograd one below, with nothing (a mode, a subclass,
# functionalization) between it and the autograd kernel: there the autograd kernel calls it directly.
_DIRECT = (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA)


def _define(
    schema: str,
    kernel: Callable[..., Tensor],
    fake: Callable[..., Tensor],
    setup_context: Callable[..., None],
    backward: Callable[..., tuple],
) -> torch._ops.OpOverload:
    """Define ``diagcompile::<schema>`` with one kernel for every device, a fake kernel and an autograd formula.

    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, grad)`` are what ``register_autograd`` takes;
    the autograd kernel is ours so that it can call ``kernel`` itself where a redispatch would reach it. (So a
    CPU/CUDA kernel registered over ours with ``torch.library.register_kernel`` is not supported: outside
    ``inference_mode`` the direct call bypasses it. The implementation is chosen by ``ops/dispatch.py``.)
    """
    name = schema.split("(", 1)[0]
    _LIB.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"diagcompile::{name}", fake, lib=_LIB)
    op = getattr(torch.ops.diagcompile, name).default

    def below_autograd(keyset: torch._C.DispatchKeySet, args: tuple) -> Tensor:
        below = keyset & _BELOW_AUTOGRAD
        # Below autograd either way: torch's own ops inside the kernel must not see autograd (forward-AD duals
        # would otherwise get tangents on the dense path and none on the kernel path).
        with torch._C._AutoDispatchBelowAutograd():
            if below.highestPriorityTypeId() in _DIRECT:
                return kernel(*args)
            return op.redispatch(below, *args)

    # The combined forward(ctx, ...) form: see _DiagLinearFunction. (torch.func transforms refuse it on the raw
    # op, as they refuse custom_op's generated Function; the user API routes them through _FuncDiagLinear.) The
    # keyset rides last, so ctx.needs_input_grad[i] is the op's argument i, as the formulas expect. Built with
    # type() so that the backward node is named after the op (diag_linear_dxBackward, ...).
    def forward(ctx, *args_and_keyset):
        args, keyset = args_and_keyset[:-1], args_and_keyset[-1]
        out = below_autograd(keyset, args)
        setup_context(ctx, args, out)
        return out

    def backward_with_keyset(ctx, *grads):
        return (*backward(ctx, *grads), None)

    Function = type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_with_keyset)},
    )

    def autograd_kernel(keyset: torch._C.DispatchKeySet, *args: object) -> Tensor:
        if torch.is_grad_enabled():
            for a in args:
                if isinstance(a, Tensor) and a.requires_grad:
                    return Function.apply(*args, keyset)
        return below_autograd(keyset, args)

    _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)
    return op


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
def _fwd_impl(x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor, out_features: int) -> Tensor:
    n_in = x.shape[-1]
    flat = x.dim() == 2  # the common 2-D call skips two reshapes (~1 us each on a small layer)
    x2 = x if flat else x.reshape(-1, n_in)
    dev = x.device.type
    path = dispatch.path_for("fwd", dev, x.dtype, x2.shape[0], out_features, n_in, values.shape[0])
    _check_inputs("diag_linear", x, values, offsets, max(out_features, n_in), path, bias)
    if path == "kernel":
        y = dispatch.kernel_module(dev).forward(x2, values, offsets, bias, out_features)
    elif path == "dense":
        W = _dense_weight(values, offsets, out_features, n_in)
        y = F.linear(x2, W, bias if bias.numel() > 0 else None)
    else:
        y = reference.diag_linear_ref(x2, values, offsets, bias, out_features)
    return y if flat else y.reshape(*x.shape[:-1], out_features)


def _fwd_kernel(x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor, out_features: int) -> Tensor:
    """``y = x @ to_dense(values, offsets).T + bias``. ``x``: ``(..., N_in)``; returns ``(..., N_out)``."""
    # Shapes are checked here, where the raw op is called; call_diag_linear's callers validated them.
    _check_layer("diag_linear", values, offsets, out_features, _features("diag_linear", x, "x"), bias)
    return _own(_fwd_impl(x, values, offsets, bias, out_features))


def _fwd_fake(x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor, out_features: int) -> Tensor:
    torch._check(values.dim() == 2, lambda: f"values must be 2-D (k, D), got {values.dim()}-D")
    torch._check(offsets.dim() == 1, lambda: "offsets must be 1-D (k,)")
    torch._check(values.shape[0] == offsets.shape[0], lambda: "values and offsets disagree on k")
    n_in = _features("diag_linear", x, "x")
    torch._check(values.shape[1] == min(out_features, n_in), lambda: "values.shape[1] != min(N_out, N_in)")
    torch._check(
        bias.numel() == 0 or (bias.dim() == 1 and bias.shape[0] == out_features), lambda: "bias must be (N_out,)"
    )
    torch._check(out_features >= 1, lambda: "out_features must be >= 1")
    _check_fake(offsets, x, values, bias)
    return x.new_empty((*x.shape[:-1], out_features))


def _fwd_setup(ctx, inputs, output) -> None:
    x, values, offsets, bias, out_features = inputs
    # Only what the backward reads, as torch's own linear saves: dx needs values, dV needs x. A frozen layer (values
    # without grad) fed an input that requires grad would otherwise keep every call's input alive until backward.
    need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(x if need_v else None, values if need_x else None, offsets)
    ctx.in_features = x.shape[-1]
    ctx.out_features = out_features
    ctx.has_bias = bias.numel() > 0
    ctx.bias_dtype = bias.dtype


def _fwd_backward(ctx, dy: Tensor):
    x, values, offsets = ctx.saved_tensors
    dx = dv = db = None
    if ctx.needs_input_grad[0]:
        dx = _call_dx(dy, values, offsets, ctx.in_features)
    if ctx.needs_input_grad[1]:
        dv = _call_dv(dy, x, offsets)
    if ctx.needs_input_grad[3] and ctx.has_bias:
        # Reduce in float32 so a bf16 bias gradient over many rows does not lose precision.
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        db = dy.reshape(-1, ctx.out_features).sum(0, dtype=acc).to(ctx.bias_dtype)
    return dx, dv, None, db, None


diag_linear_op = _define(
    "diag_linear(Tensor x, Tensor values, Tensor offsets, Tensor bias, SymInt out_features) -> Tensor",
    _fwd_kernel,
    _fwd_fake,
    _fwd_setup,
    _fwd_backward,
)


# ----------------------------------------------------------------------------------------------------
# Input gradient
# ----------------------------------------------------------------------------------------------------
def _dx_impl(dy: Tensor, values: Tensor, offsets: Tensor, in_features: int) -> Tensor:
    n_out = dy.shape[-1]
    flat = dy.dim() == 2
    dy2 = dy if flat else dy.reshape(-1, n_out)
    dev = dy.device.type
    path = dispatch.path_for("dx", dev, dy.dtype, dy2.shape[0], n_out, in_features, values.shape[0])
    _check_inputs("diag_linear_dx", dy, values, offsets, max(n_out, in_features), path)
    if path == "kernel":
        dx = dispatch.kernel_module(dev).input_grad(dy2, values, offsets, in_features)
    elif path == "dense":
        dx = dy2 @ _dense_weight(values, offsets, n_out, in_features)
    else:
        dx = reference.diag_linear_dx_ref(dy2, values, offsets, in_features)
    return dx if flat else dx.reshape(*dy.shape[:-1], in_features)


def _dx_kernel(dy: Tensor, values: Tensor, offsets: Tensor, in_features: int) -> Tensor:
    """``dx = dy @ to_dense(values, offsets)``. ``dy``: ``(..., N_out)``; returns ``(..., N_in)``."""
    _check_layer("diag_linear_dx", values, offsets, _features("diag_linear_dx", dy, "dy"), in_features)
    return _own(_dx_impl(dy, values, offsets, in_features))


def _dx_fake(dy: Tensor, values: Tensor, offsets: Tensor, in_features: int) -> Tensor:
    torch._check(values.dim() == 2 and offsets.dim() == 1, lambda: "values must be (k, D), offsets (k,)")
    n_out = _features("diag_linear_dx", dy, "dy")
    torch._check(values.shape[1] == min(n_out, in_features), lambda: "values.shape[1] != min(N_out, N_in)")
    torch._check(values.shape[0] == offsets.shape[0], lambda: "values and offsets disagree on k")
    torch._check(in_features >= 1, lambda: "in_features must be >= 1")
    _check_fake(offsets, dy, values)
    return dy.new_empty((*dy.shape[:-1], in_features))


def _dx_setup(ctx, inputs, output) -> None:
    dy, values, offsets, in_features = inputs
    ctx.save_for_backward(dy, values, offsets)


def _dx_backward(ctx, g: Tensor):
    dy, values, offsets = ctx.saved_tensors
    d_dy = d_values = None
    if ctx.needs_input_grad[0]:
        d_dy = call_diag_linear(g, values, offsets, _empty_bias(values), dy.shape[-1])
    if ctx.needs_input_grad[1]:
        d_values = _call_dv(dy, g, offsets)
    return d_dy, d_values, None, None


diag_linear_dx_op = _define(
    "diag_linear_dx(Tensor dy, Tensor values, Tensor offsets, SymInt in_features) -> Tensor",
    _dx_kernel,
    _dx_fake,
    _dx_setup,
    _dx_backward,
)


# ----------------------------------------------------------------------------------------------------
# Values gradient
# ----------------------------------------------------------------------------------------------------
def _dv_impl(dy: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
    n_out, n_in = dy.shape[-1], x.shape[-1]
    dy2 = dy if dy.dim() == 2 else dy.reshape(-1, n_out)
    x2 = x if x.dim() == 2 else x.reshape(-1, n_in)
    dev = x.device.type
    path = dispatch.path_for("dv", dev, x.dtype, x2.shape[0], n_out, n_in, offsets.shape[0])
    _check_inputs("diag_linear_dv", dy, x, offsets, max(n_out, n_in), path)
    if path == "kernel":
        return dispatch.kernel_module(dev).values_grad(dy2, x2, offsets)
    if path == "dense":
        # dY^T X on the vendor GEMM, then read the k diagonals out of the (N_out, N_in) result. CUDA GEMMs
        # accumulate low precision in float32 themselves; on the CPU upcast explicitly.
        a, b = dy2.t(), x2
        if dev == "cpu" and x.dtype not in (torch.float32, torch.float64):
            a, b = a.float(), b.float()
        return _diagonals_of(torch.mm(a, b), offsets, x.dtype)
    return reference.diag_linear_dv_ref(dy2, x2, offsets)


def _dv_kernel(dy: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
    """``dV[j, t] = sum_m dy[m, row(j, t)] * x[m, col(j, t)]``. Returns ``(k, D)`` in ``x.dtype``."""
    n_out, n_in = _features("diag_linear_dv", dy, "dy"), _features("diag_linear_dv", x, "x")
    if dy.shape[:-1] != x.shape[:-1] or offsets.dim() != 1:
        raise ValueError(
            f"diagcompile::diag_linear_dv: dy {tuple(dy.shape)} and x {tuple(x.shape)} must share their leading "
            f"dims, offsets must be 1-D (got {tuple(offsets.shape)})"
        )
    # As the other two ops: a zero width divided by zero in the kernel path's dispatch, failed in the
    # reference's reshape and returned an empty (k, 0) on the dense path.
    if n_out < 1 or n_in < 1:
        raise ValueError(f"diagcompile::diag_linear_dv: a layer needs N_out, N_in >= 1, got {n_out}x{n_in}")
    return _dv_impl(dy, x, offsets)


def _dv_fake(dy: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
    n_out, n_in = _features("diag_linear_dv", dy, "dy"), _features("diag_linear_dv", x, "x")
    torch._check(offsets.dim() == 1, lambda: "offsets must be 1-D (k,)")
    torch._check(dy.dim() == x.dim(), lambda: "dy and x must share their leading dims")
    for i in range(dy.dim() - 1):
        torch._check(dy.shape[i] == x.shape[i], lambda: "dy and x must share their leading dims")
    _check_fake(offsets, dy, x)
    return x.new_empty((offsets.shape[0], min(n_out, n_in)))


def _dv_setup(ctx, inputs, output) -> None:
    dy, x, offsets = inputs
    ctx.save_for_backward(dy, x, offsets)


def _dv_backward(ctx, g: Tensor):
    dy, x, offsets = ctx.saved_tensors
    d_dy = d_x = None
    if ctx.needs_input_grad[0]:
        d_dy = call_diag_linear(x, g, offsets, _empty_bias(g), dy.shape[-1])
    if ctx.needs_input_grad[1]:
        d_x = _call_dx(dy, g, offsets, x.shape[-1])
    return d_dy, d_x, None


diag_linear_dv_op = _define(
    "diag_linear_dv(Tensor dy, Tensor x, Tensor offsets) -> Tensor", _dv_kernel, _dv_fake, _dv_setup, _dv_backward
)


# ----------------------------------------------------------------------------------------------------
# FLOP formulas (torch.utils.flop_counter.FlopCounterMode; without them the layers count as zero)
# ----------------------------------------------------------------------------------------------------
# Each op is one multiply-add per stored value per row of activations: 2 * M * k * D, as a dense layer of
# k * D nonzeros would be (the bias is not counted, as torch counts none for addmm's). Shapes only.
@register_flop_formula([diag_linear_op.overloadpacket, diag_linear_dx_op.overloadpacket])
def _fwd_dx_flops(rows_shape, values_shape, *args, out_shape=None, **kwargs) -> int:
    """``diag_linear(x, values, ...)`` and ``diag_linear_dx(dy, values, ...)``: rows of ``x`` / ``dy``."""
    return 2 * math.prod(rows_shape[:-1]) * values_shape[0] * values_shape[1]


@register_flop_formula(diag_linear_dv_op.overloadpacket)
def _dv_flops(dy_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(dy_shape[:-1]) * out_shape[0] * out_shape[1]


# ----------------------------------------------------------------------------------------------------
# The eager call path
# ----------------------------------------------------------------------------------------------------
# In eager mode a call through torch.ops passes the dispatcher and our Python autograd kernel (see
# "Registration"): ~16 us per call on a slow CPU, about what a small layer's kernel takes. Where nothing
# but autograd could observe the call, we run the same implementation and the same autograd formulas
# directly. Everything else - torch.compile,
# torch.export, jit tracing, fake tensors, make_fx and any other dispatch or torch-function mode, functorch
# transforms, forward AD, tensor subclasses, the profiler - still sees exactly one op call.
def _plain_eager(*tensors: Tensor) -> bool:
    """Whether a call on ``tensors`` is unobservable except through autograd (see the section comment)."""
    # is_compiling first: Dynamo folds it to True and never reaches the C queries it could not trace.
    if torch.compiler.is_compiling():
        return False
    for t in tensors:  # a loop, not all(genexpr): this runs on every call
        if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
            return False
        if torch._C._functorch.is_legacy_batchedtensor(t):  # autograd.grad(is_grads_batched=True) and friends
            return False
    return (
        torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._functorch.peek_interpreter_stack() is None
        and torch._C._get_tracing_state() is None
        and not torch._C._autograd._profiler_enabled()
        # Inside a forward-AD level the direct call would let torch's own ops (dense, reference paths) carry
        # tangents that the op does not: keep the op's behaviour there too.
        and _forward_ad._current_level < 0
    )


def _needs_graph(*tensors: Tensor) -> bool:
    """Whether autograd records a graph through a call on ``tensors`` (grad mode on and one requires grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t.requires_grad:
            return True
    return False


class _DiagLinearFunction(torch.autograd.Function):
    """``diag_linear`` with the op's own implementation and autograd formula, minus the dispatcher."""

    # The combined forward(ctx, ...) form: a separate setup_context makes every apply() bind its arguments
    # through inspect.signature, which costs as much as a small layer's kernel.
    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor, out_features: int) -> Tensor:
        y = _own(_fwd_impl(x, values, offsets, bias, out_features))
        _fwd_setup(ctx, (x, values, offsets, bias, out_features), y)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        return _fwd_backward(ctx, dy)


# ----------------------------------------------------------------------------------------------------
# Transforms: torch.func (grad / vjp / jacrev / jacfwd / hessian / vmap) and forward-mode AD
# ----------------------------------------------------------------------------------------------------
# The op's autograd Function runs inside the dispatcher, where torch.func cannot see it, so torch.func.grad
# through the raw op fails inside torch (as it does for custom_op: pytorch/pytorch#168393, #179652, open in
# torch 2.13), and the op has no
# forward-mode formula (torch would give a zero tangent, silently). Under a transform or with a dual input
# the user API goes through these Functions instead: the same ops forward, the same formulas backward, and
# jvp formulas, which are op calls too because each op is linear in each of its tensor arguments:
#   d diag_linear(x, V) = diag_linear(dx, V) + diag_linear(x, dV) (+ db)
#   d diag_linear_dx(dy, V) = diag_linear_dx(d dy, V) + diag_linear_dx(dy, dV)
#   d diag_linear_dv(dy, x) = diag_linear_dv(d dy, x) + diag_linear_dv(dy, dx)
# The vmap rules (below) make vmap-of-grad (per-sample gradients) run the ops batched.
def _ad_levels(*tensors: Tensor) -> tuple[int, bool]:
    """``(forward-mode levels, reverse-mode transform present)`` around a call on ``tensors``: functorch's
    ``Jvp`` / ``Grad`` interpreters, plus one forward level for a dual input of ``torch.autograd.forward_ad``.
    ``vmap`` and ``functionalize`` alone count as neither: the ops' vmap rules and functionalization handle
    the op call itself."""
    fwd, rev = 0, False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        for i in retrieve_all_functorch_interpreters():
            key = i.key()
            fwd += key == TransformType.Jvp
            rev = rev or key == TransformType.Grad
    elif _forward_ad._current_level >= 0:  # (functorch's own jvp shows as Jvp above; its tensors have no dual)
        for t in tensors:
            if torch._C._functorch.is_legacy_batchedtensor(t):
                # torch.autograd.functional's vectorize=True batches with the legacy vmap, whose tensors have no
                # dual to read; the op would give them a zero tangent.
                raise NotImplementedError(
                    "diag_linear under forward-mode AD with legacy batching (torch.autograd.functional with "
                    "strategy='forward-mode', vectorize=True) is not supported: use torch.func.jacfwd / jvp"
                )
            if _forward_ad.unpack_dual(t).tangent is not None:
                fwd += 1
                break
    return fwd, rev


def diag_linear_composite(
    x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor, out_features: int, *, check_offsets: bool = False
) -> Tensor:
    """The forward op's math as plain torch ops, ``F.linear(x, to_dense(values, offsets), bias)``, with the
    op's arguments (an empty ``bias`` for none): differentiable by every transform, and traceable, so a
    compiled graph can hold it in place of the op call (``dispatch.inline_in_graph``).

    ``check_offsets``: assert, as the op does on the CPU, that the offsets are distinct and in ``[0, P)``
    (``to_dense`` would wrap or overwrite silently), with ``torch._assert_async``, which compiled graphs keep.
    """
    n_in = x.shape[-1]
    if check_offsets and offsets.shape[0] > 0:
        P = max(out_features, n_in)
        idx = offsets.long()
        counts = torch.zeros(P, dtype=torch.int32, device=idx.device)
        counts = counts.index_add(0, idx.clamp(0, P - 1), torch.ones_like(idx, dtype=torch.int32))
        ok = (idx.min() >= 0) & (idx.max() < P) & (counts.max() <= 1)
        torch._assert_async(ok, f"diag_linear: offsets must be distinct and lie in [0, P={P})")
    W = reference.to_dense(values, offsets, out_features, n_in)
    return F.linear(x, W, bias if bias.numel() > 0 else None)


def _transformed(x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor, out_features: int) -> Tensor | None:
    """The forward call under autodiff transforms, or ``None`` where the op call itself is right."""
    fwd, rev = _ad_levels(x, values, bias)
    if fwd >= 2:
        # torch never differentiates an autograd.Function's jvp at an outer forward level: forward-over-forward
        # (jvp of jvp, jacfwd of jacfwd) would silently lose its mixed terms. Exact, if dense, instead.
        return diag_linear_composite(x, values, offsets, bias, out_features)
    if fwd or rev:
        return _FuncDiagLinear.apply(x, values, offsets, bias, out_features)
    return None


def _needs_function(*tensors: Tensor) -> bool:
    """Whether a gradient op call must go through its ``_Func*`` Function (see ``_ad_levels``)."""
    if torch.compiler.is_compiling():
        return False
    fwd, rev = _ad_levels(*tensors)
    return bool(fwd or rev)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


class _FuncDiagLinear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor, out_features: int) -> Tensor:
        return torch.ops.diagcompile.diag_linear(x, values, offsets, bias, out_features)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _fwd_setup(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3])
        ctx.out_shape = output.shape

    backward = staticmethod(_fwd_backward)

    @staticmethod
    def jvp(ctx, tx, tv, _toffsets, tb, _tout):
        x, values, offsets = ctx.saved_tensors
        none, n = _empty_bias(values), ctx.out_features
        t = _add(
            call_diag_linear(tx, values, offsets, none, n) if tx is not None else None,
            call_diag_linear(x, tv, offsets, none, n) if tv is not None else None,
        )
        if tb is not None and ctx.has_bias:
            t = _add(t, tb.expand(ctx.out_shape))
        return t if t is not None else x.new_zeros(ctx.out_shape)


class _FuncDiagLinearDx(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(dy: Tensor, values: Tensor, offsets: Tensor, in_features: int) -> Tensor:
        return torch.ops.diagcompile.diag_linear_dx(dy, values, offsets, in_features)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _dx_setup(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3])
        ctx.out_shape, ctx.in_features = output.shape, inputs[3]

    backward = staticmethod(_dx_backward)

    @staticmethod
    def jvp(ctx, tdy, tv, _toffsets, _tin):
        dy, values, offsets = ctx.saved_tensors
        t = _add(
            _call_dx(tdy, values, offsets, ctx.in_features) if tdy is not None else None,
            _call_dx(dy, tv, offsets, ctx.in_features) if tv is not None else None,
        )
        return t if t is not None else dy.new_zeros(ctx.out_shape)


class _FuncDiagLinearDv(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(dy: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
        return torch.ops.diagcompile.diag_linear_dv(dy, x, offsets)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _dv_setup(ctx, inputs, output)
        ctx.save_for_forward(*inputs)
        ctx.out_shape = output.shape

    backward = staticmethod(_dv_backward)

    @staticmethod
    def jvp(ctx, tdy, tx, _toffsets):
        dy, x, offsets = ctx.saved_tensors
        t = _add(
            _call_dv(tdy, x, offsets) if tdy is not None else None,
            _call_dv(dy, tx, offsets) if tx is not None else None,
        )
        return t if t is not None else x.new_zeros(ctx.out_shape)


def _vmap_rule(op, n_tensors: int, fold: bool):
    """A vmap rule for ``op`` (tensors first, then ints). Only the first tensor batched, and ``fold``: the
    batch becomes leading rows of that tensor (one op call; ``diag_linear`` and ``_dx`` take ``(..., N)``).
    Otherwise (batched weights, or ``diag_linear_dv``, whose rows are summed): one op call per batch element,
    what torch's fallback would do, without its per-call "please file an issue" warning."""

    def rule(info, in_dims, *args):
        tensors, rest = args[:n_tensors], args[n_tensors:]
        dims = in_dims[:n_tensors]
        if fold and all(d is None for d in dims[1:]):
            return op(tensors[0].movedim(dims[0], 0), *tensors[1:], *rest), 0
        if info.batch_size == 0:  # no member to run: the shape and dtype of one from the op's fake kernel
            member = [
                t.to("meta") if d is None else t.new_empty([s for j, s in enumerate(t.shape) if j != d], device="meta")
                for t, d in zip(tensors, dims)
            ]
            out = op(*member, *rest)
            return torch.empty((0, *out.shape), dtype=out.dtype, device=tensors[0].device), 0
        outs = [
            op(*(t if d is None else t.select(d, i) for t, d in zip(tensors, dims)), *rest)
            for i in range(info.batch_size)
        ]
        return torch.stack(outs), 0

    return rule


torch.library.register_vmap("diagcompile::diag_linear", _vmap_rule(diag_linear_op, 4, fold=True))
torch.library.register_vmap("diagcompile::diag_linear_dx", _vmap_rule(diag_linear_dx_op, 3, fold=True))
torch.library.register_vmap("diagcompile::diag_linear_dv", _vmap_rule(diag_linear_dv_op, 3, fold=False))


def call_diag_linear(x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor, out_features: int) -> Tensor:
    """``torch.ops.diagcompile.diag_linear(x, values, offsets, bias, out_features)``, cheaper in plain eager.

    Same arguments, result bits and gradients as the op (``x``: ``(..., N_in)`` -> ``(..., N_out)``), for
    arguments of consistent shapes: in plain eager it trusts them (``diagcompile.diag_linear`` and
    ``DiagLinear`` validate them; the raw op checks them itself). In plain eager (``_plain_eager``) it skips
    the dispatcher; anywhere else - compile, export, modes, subclasses,
    the profiler - it is the op call itself, so graphs and traces hold one ``diag_linear`` node as before.
    Under a functorch transform (``torch.func.grad`` / ``vmap`` / ``jacfwd`` ...) or with a forward-AD dual
    input it goes through ``_FuncDiagLinear``, which gives the op's gradients there and a forward-mode formula
    (the raw op would fail inside torch, or return a zero tangent).
    """
    if not _plain_eager(x, values, offsets, bias):
        # Under torch.compile the op call itself (torch.func transforms inside a compiled function are not
        # routed: there is no cheap, traceable way to see them).
        if not torch.compiler.is_compiling():
            y = _transformed(x, values, offsets, bias, out_features)
            if y is not None:
                return y
        return torch.ops.diagcompile.diag_linear(x, values, offsets, bias, out_features)
    if _needs_graph(x, values, bias):
        return _DiagLinearFunction.apply(x, values, offsets, bias, out_features)
    return _fwd_impl(x, values, offsets, bias, out_features)


def _call_dx(dy: Tensor, values: Tensor, offsets: Tensor, in_features: int) -> Tensor:
    # Direct only where no graph is recorded (a plain backward); a double backward goes through the op.
    if _plain_eager(dy, values, offsets) and not _needs_graph(dy, values):
        return _dx_impl(dy, values, offsets, in_features)
    if _needs_function(dy, values):
        return _FuncDiagLinearDx.apply(dy, values, offsets, in_features)
    return torch.ops.diagcompile.diag_linear_dx(dy, values, offsets, in_features)


def _call_dv(dy: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
    if _plain_eager(dy, x, offsets) and not _needs_graph(dy, x):
        return _dv_impl(dy, x, offsets)
    if _needs_function(dy, x):
        return _FuncDiagLinearDv.apply(dy, x, offsets)
    return torch.ops.diagcompile.diag_linear_dv(dy, x, offsets)

"""The op contract: ``diagcompile::diag_linear`` and its two gradient ops.

Three opaque ``torch.library.custom_op``s, so that compiled graphs, ``torch.export`` programs and ONNX
see exactly one node per layer and the backward graph is made of our ops too:

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
(kernel / dense / reference) from the shapes alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diagcompile.ops import dispatch, reference

__all__ = ["diag_linear_op", "diag_linear_dx_op", "diag_linear_dv_op"]


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


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("diagcompile::diag_linear", mutates_args=())
def diag_linear_op(x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor, out_features: int) -> Tensor:
    """``y = x @ to_dense(values, offsets).T + bias``. ``x``: ``(..., N_in)``; returns ``(..., N_out)``."""
    n_in = x.shape[-1]
    x2 = x.reshape(-1, n_in)
    p = dispatch.Problem("fwd", x.device.type, x.dtype, x2.shape[0], out_features, n_in, values.shape[0])
    path = dispatch.choose_path(p)
    if path == "kernel":
        y = dispatch.kernel_module(p.device_type).forward(x2, values, offsets, bias, out_features)
    elif path == "dense":
        W = _dense_weight(values, offsets, out_features, n_in)
        y = F.linear(x2, W, bias if bias.numel() > 0 else None)
    else:
        y = reference.diag_linear_ref(x2, values, offsets, bias, out_features)
    return y.reshape(*x.shape[:-1], out_features)


@diag_linear_op.register_fake
def _(x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor, out_features: int) -> Tensor:
    torch._check(values.dim() == 2, lambda: f"values must be 2-D (k, D), got {values.dim()}-D")
    torch._check(offsets.dim() == 1, lambda: "offsets must be 1-D (k,)")
    torch._check(values.shape[0] == offsets.shape[0], lambda: "values and offsets disagree on k")
    torch._check(values.shape[1] == min(out_features, x.shape[-1]), lambda: "values.shape[1] != min(N_out, N_in)")
    torch._check(bias.numel() == 0 or bias.numel() == out_features, lambda: "bias must have out_features entries")
    return x.new_empty((*x.shape[:-1], out_features))


def _fwd_setup(ctx, inputs, output) -> None:
    x, values, offsets, bias, out_features = inputs
    ctx.save_for_backward(x, values, offsets)
    ctx.out_features = out_features
    ctx.has_bias = bias.numel() > 0
    ctx.bias_dtype = bias.dtype


def _fwd_backward(ctx, dy: Tensor):
    x, values, offsets = ctx.saved_tensors
    dx = dv = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.diagcompile.diag_linear_dx(dy, values, offsets, x.shape[-1])
    if ctx.needs_input_grad[1]:
        dv = torch.ops.diagcompile.diag_linear_dv(dy, x, offsets)
    if ctx.needs_input_grad[3] and ctx.has_bias:
        # Reduce in float32 so a bf16 bias gradient over many rows does not lose precision.
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        db = dy.reshape(-1, ctx.out_features).sum(0, dtype=acc).to(ctx.bias_dtype)
    return dx, dv, None, db, None


diag_linear_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ----------------------------------------------------------------------------------------------------
# Input gradient
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("diagcompile::diag_linear_dx", mutates_args=())
def diag_linear_dx_op(dy: Tensor, values: Tensor, offsets: Tensor, in_features: int) -> Tensor:
    """``dx = dy @ to_dense(values, offsets)``. ``dy``: ``(..., N_out)``; returns ``(..., N_in)``."""
    n_out = dy.shape[-1]
    dy2 = dy.reshape(-1, n_out)
    p = dispatch.Problem("dx", dy.device.type, dy.dtype, dy2.shape[0], n_out, in_features, values.shape[0])
    path = dispatch.choose_path(p)
    if path == "kernel":
        dx = dispatch.kernel_module(p.device_type).input_grad(dy2, values, offsets, in_features)
    elif path == "dense":
        dx = dy2 @ _dense_weight(values, offsets, n_out, in_features)
    else:
        dx = reference.diag_linear_dx_ref(dy2, values, offsets, in_features)
    return dx.reshape(*dy.shape[:-1], in_features)


@diag_linear_dx_op.register_fake
def _(dy: Tensor, values: Tensor, offsets: Tensor, in_features: int) -> Tensor:
    torch._check(values.dim() == 2 and offsets.dim() == 1, lambda: "values must be (k, D), offsets (k,)")
    torch._check(values.shape[1] == min(dy.shape[-1], in_features), lambda: "values.shape[1] != min(N_out, N_in)")
    return dy.new_empty((*dy.shape[:-1], in_features))


def _dx_setup(ctx, inputs, output) -> None:
    dy, values, offsets, in_features = inputs
    ctx.save_for_backward(dy, values, offsets)


def _dx_backward(ctx, g: Tensor):
    dy, values, offsets = ctx.saved_tensors
    d_dy = d_values = None
    if ctx.needs_input_grad[0]:
        d_dy = torch.ops.diagcompile.diag_linear(g, values, offsets, _empty_bias(values), dy.shape[-1])
    if ctx.needs_input_grad[1]:
        d_values = torch.ops.diagcompile.diag_linear_dv(dy, g, offsets)
    return d_dy, d_values, None, None


diag_linear_dx_op.register_autograd(_dx_backward, setup_context=_dx_setup)


# ----------------------------------------------------------------------------------------------------
# Values gradient
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("diagcompile::diag_linear_dv", mutates_args=())
def diag_linear_dv_op(dy: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
    """``dV[j, t] = sum_m dy[m, row(j, t)] * x[m, col(j, t)]``. Returns ``(k, D)`` in ``x.dtype``."""
    n_out, n_in = dy.shape[-1], x.shape[-1]
    dy2, x2 = dy.reshape(-1, n_out), x.reshape(-1, n_in)
    p = dispatch.Problem("dv", x.device.type, x.dtype, x2.shape[0], n_out, n_in, offsets.shape[0])
    path = dispatch.choose_path(p)
    if path == "kernel":
        return dispatch.kernel_module(p.device_type).values_grad(dy2, x2, offsets)
    if path == "dense":
        # dY^T X on the vendor GEMM, then read the k diagonals out of the (N_out, N_in) result. CUDA GEMMs
        # accumulate low precision in float32 themselves; on the CPU upcast explicitly.
        a, b = dy2.t(), x2
        if x.device.type == "cpu" and x.dtype not in (torch.float32, torch.float64):
            a, b = a.float(), b.float()
        return _diagonals_of(torch.mm(a, b), offsets, x.dtype)
    return reference.diag_linear_dv_ref(dy2, x2, offsets)


@diag_linear_dv_op.register_fake
def _(dy: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
    torch._check(offsets.dim() == 1, lambda: "offsets must be 1-D (k,)")
    return x.new_empty((offsets.shape[0], min(dy.shape[-1], x.shape[-1])))


def _dv_setup(ctx, inputs, output) -> None:
    dy, x, offsets = inputs
    ctx.save_for_backward(dy, x, offsets)


def _dv_backward(ctx, g: Tensor):
    dy, x, offsets = ctx.saved_tensors
    d_dy = d_x = None
    if ctx.needs_input_grad[0]:
        d_dy = torch.ops.diagcompile.diag_linear(x, g, offsets, _empty_bias(g), dy.shape[-1])
    if ctx.needs_input_grad[1]:
        d_x = torch.ops.diagcompile.diag_linear_dx(dy, g, offsets, x.shape[-1])
    return d_dy, d_x, None


diag_linear_dv_op.register_autograd(_dv_backward, setup_context=_dv_setup)

"""Functional form of the diagonal-sparse linear layer, and the validation every public entry point uses.

The ops in ``diagcompile.ops`` trust their inputs; this module is the Python boundary where bad input is
turned into a ``TypeError`` / ``ValueError`` that names the problem, before it can reach a kernel.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from diagcompile.ops import OFFSET_DTYPE, call_diag_linear, diag_shape

__all__ = ["diag_linear", "canonical_offsets", "check_sparsity"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The device types without an autocast mode (meta, lazy, ...), asked once at import: torch 2.11's Dynamo cannot
# trace ``torch.amp.is_autocast_available`` (a C builtin; 2.13's can), so asking it per call broke a compiled graph
# at every layer there (an error under ``fullgraph=True``). ``torch.is_autocast_enabled(device_type)`` traces, but
# raises for these. A list of those without, not of those with: a PrivateUse1 backend renamed after this import
# (``torch.utils.rename_privateuse1_backend``) still gets its autocast.
_NO_AUTOCAST_DEVICE_TYPES = frozenset(
    d
    for d in ("meta", "lazy", "opengl", "opencl", "ideep", "hip", "fpga", "vulkan", "ve")
    if not torch.amp.is_autocast_available(d)
)


def _inspectable(t: Tensor) -> bool:
    """Whether ``t``'s data can be read: not while tracing (compile, export) and not for fake/meta tensors."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def check_sparsity(sparsity: float, out_features: int, in_features: int, *, where: str = "") -> None:
    """Raise ``ValueError`` unless ``sparsity`` is in ``[0, 1 - 1/P]`` for this layer shape."""
    from diagcompile.ops import k_from_sparsity

    try:
        k_from_sparsity(out_features, in_features, sparsity)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{where}: {e}" if where else str(e)) from None


_OTHER_INTS = (torch.int8, torch.int16, torch.uint8, torch.uint16, torch.uint32, torch.uint64)


def canonical_offsets(
    offsets: Tensor | Sequence[int],
    out_features: int,
    in_features: int,
    *,
    check_contents: bool = True,
    where: str = "offsets",
) -> Tensor:
    """Validate ``offsets`` for an ``out_features x in_features`` layer and return them as 1-D int32.

    Accepts an integer tensor or numpy array (int32 or int64, converted) or a sequence of ints. Raises
    ``TypeError`` for a non-integer dtype, ``ValueError`` for a wrong rank, k outside ``[1, P]``, values outside
    ``[0, P)``, duplicates, or an order that is not ascending. Content checks are skipped while tracing.
    """
    P, _ = diag_shape(out_features, in_features)
    if not isinstance(offsets, Tensor):
        if hasattr(offsets, "__array__") and not isinstance(offsets, Sequence):
            offsets = torch.as_tensor(offsets)  # a numpy array; its dtype is checked below like a tensor's
            if offsets.dtype in _OTHER_INTS:  # any integer array (np.int8 ... np.uint64) as int64
                offsets = offsets.to(torch.int64)
        elif isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence):
            raise TypeError(
                f"{where} must be an integer tensor, array or sequence of ints, got {type(offsets).__name__}"
            )
        elif not all(isinstance(o, numbers.Integral) and not isinstance(o, bool) for o in offsets):
            raise TypeError(f"{where} must contain only ints, got {[type(o).__name__ for o in offsets][:5]}")
        else:
            offsets = torch.tensor([int(o) for o in offsets], dtype=torch.int64)
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{where} must be int32 or int64, got {offsets.dtype}")
    if offsets.dim() != 1:
        raise ValueError(f"{where} must be 1-D (k,), got shape {tuple(offsets.shape)}")
    k = offsets.shape[0]
    if not 1 <= k <= P:
        raise ValueError(
            f"{where} has k={k} diagonals but a {out_features}x{in_features} layer has P={P} candidates "
            f"(need 1 <= k <= P)"
        )
    # Unchecked contents are the caller's promise, but the int32 cast below must not turn a broken one into a valid
    # one (2**32 + 1 -> 1) that the op, which range-checks int64 offsets on the CPU before any cast, would refuse:
    # on the CPU (no device sync) an int64 tensor's range is checked even then.
    wraps = offsets.dtype != OFFSET_DTYPE and offsets.is_cpu
    if (check_contents or wraps) and _inspectable(offsets):
        o = offsets.detach()
        if not check_contents:  # vmap refuses .item() on its batched tensors: the range is that of the one below
            while torch._C._functorch.is_batchedtensor(o):
                o = torch._C._functorch.get_unwrapped(o)
        o = o.to("cpu", torch.int64)
        lo, hi = int(o.min()), int(o.max())
        if lo < 0 or hi >= P:
            bad = o[(o < 0) | (o >= P)][:5].tolist()
            raise ValueError(f"{where} out of range: {bad} not in [0, P={P}) for a {out_features}x{in_features} layer")
        if check_contents and k > 1:
            d = o[1:] - o[:-1]
            if bool((d == 0).any()) or o.unique().numel() != k:
                dup = o[o.bincount().gt(1)[o]].unique()[:5].tolist() if lo >= 0 else []
                raise ValueError(f"{where} are duplicated: {dup} appear more than once")
            if bool((d < 0).any()):
                i = int((d < 0).nonzero()[0])
                raise ValueError(
                    f"{where} must be sorted ascending, but {where}[{i}]={int(o[i])} > "
                    f"{where}[{i + 1}]={int(o[i + 1])}; sort them (and permute the rows of values the same way)"
                )
    return offsets if offsets.dtype == OFFSET_DTYPE else offsets.to(OFFSET_DTYPE)


def _autocast(x: Tensor, values: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Cast like autocast casts ``F.linear``: every floating input but float64 to the autocast dtype.

    The op has no autocast rule of its own (``torch.library.register_autocast`` casts to one fixed dtype, while
    autocast's dtype is chosen per region), so the functional applies the region's policy before the call.
    """
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(x), cast(values), (cast(bias) if isinstance(bias, Tensor) else bias)


def diag_linear(
    x: Tensor,
    values: Tensor,
    offsets: Tensor,
    bias: Tensor | None,
    out_features: int,
    *,
    in_features: int | None = None,
    check_offsets: bool = True,
) -> Tensor:
    """``y = x @ W.T + bias`` for the diagonal-sparse ``W = to_dense(values, offsets)``.

    Args:
        x: ``(..., N_in)``, float16 / bfloat16 / float32 / float64.
        values: ``(k, D)`` with ``D = min(N_out, N_in)``, same dtype and device as ``x``.
        offsets: ``(k,)`` int32 or int64, distinct, sorted, in ``[0, P)`` with ``P = max(N_out, N_in)``.
        bias: ``(N_out,)`` or ``None``.
        out_features: ``N_out``.
        in_features: ``N_in``, checked against ``x.shape[-1]`` when given. Without it ``N_in`` is read from
            ``x``, and for a wide layer (``D = N_out``) an ``x`` of another width that still fits the offsets
            cannot be told from a right one: pass it wherever ``x`` comes from elsewhere.
        check_offsets: validate the contents of ``offsets`` (a device sync on GPU). ``DiagLinear`` passes
            ``False``: it validates its offsets buffer whenever the buffer changes.

    Under ``torch.autocast`` the floating inputs (but float64) are cast to the region's dtype first, as for
    ``F.linear``.

    Returns:
        ``(..., N_out)`` in ``x.dtype``; accumulation is float32 (float64 for float64).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a Tensor, got {type(values).__name__}")
    if not isinstance(offsets, Tensor):
        raise TypeError(f"offsets must be a Tensor, got {type(offsets).__name__}")
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"out_features must be a positive int, got {out_features!r}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (k, D), got shape {tuple(values.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16/bfloat16/float32/float64, got {x.dtype}")
    dev = x.device.type
    if dev not in _NO_AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(dev):
        x, values, bias = _autocast(x, values, bias)
    if x.dtype != values.dtype:
        raise TypeError(f"dtype mismatch: x is {x.dtype} but values is {values.dtype}")
    if x.device != values.device or offsets.device != values.device:
        raise ValueError(f"device mismatch: x on {x.device}, values on {values.device}, offsets on {offsets.device}")
    n_in_given = in_features is not None
    if not n_in_given:
        pass
    elif isinstance(in_features, bool) or not isinstance(in_features, int):
        raise TypeError(f"in_features must be an int or None, got {in_features!r}")
    elif x.shape[-1] != in_features:
        raise ValueError(f"shape mismatch: x has last dim {x.shape[-1]} but in_features={in_features}")
    in_features = x.shape[-1]
    if in_features < 1:
        raise ValueError(f"x has last dim 0 (in_features must be >= 1), got shape {tuple(x.shape)}")
    P, D = diag_shape(out_features, in_features)
    if values.shape[1] != D:
        raise ValueError(
            f"shape mismatch: values is {tuple(values.shape)} but a {out_features}x{in_features} layer "
            f"(x.shape[-1]={in_features}) needs values of shape (k, {D}); is x's last dim in_features?"
        )
    if offsets.dim() != 1 or offsets.shape[0] != values.shape[0]:
        raise ValueError(
            f"shape mismatch: values has k={values.shape[0]} rows but offsets has shape {tuple(offsets.shape)}"
        )
    if check_offsets or offsets.dtype != OFFSET_DTYPE or not 1 <= offsets.shape[0] <= P:
        # Validates (raising with the message) or converts; a trusted int32 buffer of a valid k needs neither.
        # (the message's wording is built only here: this function runs on every layer call)
        where = "offsets" if n_in_given else f"offsets (N_in={in_features}, read from x.shape[-1])"
        offsets = canonical_offsets(offsets, out_features, in_features, check_contents=check_offsets, where=where)
    if bias is None:
        bias = values.new_empty(0)
    else:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
        if bias.shape != (out_features,):
            raise ValueError(f"shape mismatch: bias is {tuple(bias.shape)}, expected ({out_features},)")
        if bias.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: x is {x.dtype} but bias is {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"device mismatch: x on {x.device}, bias on {bias.device}")
    return call_diag_linear(x, values, offsets, bias, out_features)

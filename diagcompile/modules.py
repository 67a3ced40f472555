"""``DiagLinear``: a linear layer whose weight lives on ``k`` of its ``P`` wrapped diagonals."""

from __future__ import annotations

import numbers
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.utils import parametrize
from torch.utils.weak import WeakIdKeyDictionary

from diagcompile.functional import _inspectable, canonical_offsets, check_sparsity, diag_linear
from diagcompile.ops import (
    OFFSET_DTYPE,
    diag_shape,
    evenly_spaced_offsets,
    extract_diagonals,
    k_from_sparsity,
    to_dense,
    topk_offsets,
)
from diagcompile.ops.reference import diagonal_indices

__all__ = ["DiagLinear"]


def _seen_key(t: Tensor) -> tuple[int, int]:
    """What says a checked offsets tensor is unchanged: its in-place version and its storage (``.data =``).

    An inference tensor (a layer built or copied under ``torch.inference_mode()``) has no version counter, and
    reading it raises: there the storage alone is the key, so an in-place edit made under inference mode is
    not re-checked (``set_offsets`` and ``load_state_dict`` validate what they write either way).
    """
    return (-1 if t.is_inference() else t._version, t.data_ptr())


# Offsets tensors a traced graph has checked, by identity (a Tensor's == is elementwise, so not a WeakKeyDictionary).
_TRACED_SEEN: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _traced_diag_linear(
    x: Tensor, values: Tensor, offsets: Tensor, bias: Tensor | None, out_features: int, in_features: int
) -> Tensor:
    """``DiagLinear.forward`` as a ``torch.fx.symbolic_trace`` graph holds it: ``(..., in_features) ->
    (..., out_features)``, one call_function node (a leaf, ``fx.wrap`` below) fed the layer's tensors by get_attr
    nodes, instead of being traced into, where the functional's checks would meet a Proxy.

    The graph never calls the layer, so the layer's once-per-version offsets check is made here (a content check
    costs ~0.1 ms per layer on the CPU, and a device sync on a GPU); ``x``'s width is checked on every call.
    """
    plain = _inspectable(offsets) and not torch._C._functorch.is_functorch_wrapped_tensor(offsets)
    seen = plain and _TRACED_SEEN.get(offsets) == _seen_key(offsets)
    y = diag_linear(x, values, offsets, bias, out_features, in_features=in_features, check_offsets=not seen)
    if plain and not seen:
        _TRACED_SEEN[offsets] = _seen_key(offsets)
    return y


torch.fx.wrap("_traced_diag_linear")


# Appended to an invalid-offsets error: the usual way to get one without touching the buffer.
_UNSET_OFFSETS = (
    " (if the layer was built on the meta device and materialized with to_empty(), its offsets are uninitialized "
    "memory, which reset_parameters() does not draw: load a state_dict, or layer.set_offsets(...), e.g. "
    "diagcompile.ops.evenly_spaced_offsets(out_features, in_features, layer.k), first)"
)


def not_scriptable(module: nn.Module) -> str:
    """Why ``torch.jit.script`` refuses a diagonal layer, and what to use instead."""
    return (
        f"{type(module).__name__} does not support torch.jit.script (TorchScript's compiler cannot read its "
        f"Python type annotations or its custom op's Python paths); use torch.jit.trace, or better torch.export "
        f"(diagcompile.export.export_program), and load either after `import diagcompile`, which registers the op"
    )


def _caller_of_load_state_dict() -> int:
    """The ``stacklevel``, for a warning raised in ``_load_from_state_dict``, of the first frame outside this file
    and torch's ``nn.Module``: ``load_state_dict`` recurses once per level of nesting, so no fixed level points at
    the user's call."""
    skip = {__file__, nn.modules.module.__file__}
    frame, level = sys._getframe(2), 2  # level 1 is the caller of this function, where warnings.warn runs
    while frame is not None and frame.f_code.co_filename in skip:
        frame, level = frame.f_back, level + 1
    return level


class DiagLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` (``out_features x in_features``) kept on ``k`` wrapped diagonals.

    Diagonal ``p`` holds ``W[t, (t + p) mod N_in]`` (wide/square) or ``W[(t + p) mod N_out, t]`` (tall) for
    ``t < D = min(N_out, N_in)``; there are ``P = max(N_out, N_in)`` candidates.

    Args:
        in_features: ``N_in``.
        out_features: ``N_out``.
        bias: learn an additive bias.
        sparsity: target fraction of zero weights in ``[0, 1 - 1/P]``; sets
            ``k = max(1, ceil(floor((1 - s) N_out N_in) / D))``. Ignored when ``offsets`` is given.
        offsets: the diagonals to keep, distinct and sorted in ``[0, P)``. Default: ``offset_init``.
        offset_init: ``"random"`` (distinct offsets from torch's RNG) or ``"even"`` (evenly spaced).

    Attributes:
        values: ``(k, D)`` parameter. bias: ``(N_out,)`` parameter or ``None``. offsets: ``(k,)`` int32 buffer.

    Shapes:
        input ``(..., N_in)`` -> output ``(..., N_out)``.

    Fresh values are drawn like ``nn.Linear`` (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) but with each output
    row's *real* fan-in (its number of stored entries), so activations keep the dense layer's scale.
    """

    __constants__ = ["in_features", "out_features"]
    in_features: int
    out_features: int
    offsets: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        sparsity: float = 0.9,
        offsets: Tensor | Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        offset_init: Literal["random", "even"] = "random",
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        # Plain ints (numpy ints are Integral too): they go into reprs, state_dict metadata and export graphs.
        self.in_features, self.out_features = in_features, out_features = int(in_features), int(out_features)
        P, D = diag_shape(out_features, in_features)
        if offsets is None:
            check_sparsity(sparsity, out_features, in_features, where="DiagLinear")
            k = k_from_sparsity(out_features, in_features, sparsity)
            if offset_init == "random":
                offsets = torch.randperm(P)[:k].sort().values.to(OFFSET_DTYPE)
            elif offset_init == "even":
                offsets = evenly_spaced_offsets(out_features, in_features, k)
            else:
                raise ValueError(f"offset_init must be 'random' or 'even', got {offset_init!r}")
        offsets = canonical_offsets(offsets, out_features, in_features)
        self.register_buffer("offsets", offsets.to(device=device))
        self.values = nn.Parameter(torch.empty(offsets.numel(), D, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Number of stored diagonals."""
        return self.offsets.numel()

    @property
    def density(self) -> float:
        """``k / P``: the fraction of weights stored."""
        return self.k / max(self.in_features, self.out_features)

    @property
    def sparsity(self) -> float:
        """``1 - density``."""
        return 1.0 - self.density

    def row_fan_in(self) -> Tensor:
        """Stored entries per output row, ``(N_out,)`` int64: constant ``k`` for wide layers, 0..k for tall."""
        rows, _ = diagonal_indices(self.out_features, self.in_features, self.offsets)
        rows = rows.reshape(-1)
        # index_add_, not bincount: bincount has no meta kernel, and layers are built on meta for deferred init.
        return torch.zeros(self.out_features, dtype=torch.int64, device=rows.device).index_add_(
            0, rows, torch.ones_like(rows)
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw values ``U(-1/sqrt(f), 1/sqrt(f))`` with ``f`` the fan-in of each entry's output row.

        The offsets are kept (they are structure, not drawn here). After ``to_empty()`` of a layer built on the meta
        device they are uninitialized memory: the deferred-init idiom (``to_empty``, ``reset_parameters``, then
        ``load_state_dict``) loads them; without a load, give the layer offsets (``set_offsets``), or its forward
        refuses them."""
        rows, _ = diagonal_indices(self.out_features, self.in_features, self.offsets)
        fan_in = self.row_fan_in().to(self.values.device, torch.float32)
        mean_fan = max(1.0, self.k * min(self.in_features, self.out_features) / self.out_features)
        # Rows without any entry (tall layers at high sparsity) only matter for the bias: use the mean fan-in.
        fan_in = torch.where(fan_in > 0, fan_in, torch.full_like(fan_in, mean_fan))
        bound = fan_in.rsqrt()
        u = torch.rand(self.values.shape, device=self.values.device, dtype=torch.float32) * 2 - 1
        self.values.copy_(u * bound[rows.to(self.values.device)])
        if self.bias is not None:
            ub = torch.rand(self.out_features, device=self.bias.device, dtype=torch.float32) * 2 - 1
            self.bias.copy_(ub * bound)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features) -> (..., out_features)``."""
        if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1] != self.in_features:
            raise ValueError(
                f"shape mismatch: input has last dim {x.shape[-1]} "
                f"but this DiagLinear has in_features={self.in_features}"
            )
        if type(self) is DiagLinear:
            # nn.Module.__getattr__ costs ~1 us per attribute; the dicts are where it would look. A subclass, a
            # parametrization or FSDP (each swaps the class) takes the general attribute lookup.
            # An attribute that is not (or no longer) registered, e.g. a plain ``bias = None``, is looked up as usual.
            p, b = self._parameters, self._buffers
            values = p["values"] if "values" in p else self.values
            bias = p["bias"] if "bias" in p else self.bias
            offsets = b["offsets"] if "offsets" in b else self.offsets
        else:
            values, bias, offsets = self.values, self.bias, self.offsets
        if not torch.compiler.is_compiling():
            seen = self.__dict__.get("_offsets_seen")
            if seen is None or seen[0] is not offsets or seen[1] != _seen_key(offsets):
                self._check_offsets(offsets, values)
        if isinstance(x, torch.fx.Proxy):
            # symbolic_trace records this call; the graph module runs it with whatever its get_attr nodes hold then.
            return _traced_diag_linear(x, values, offsets, bias, self.out_features, self.in_features)
        return diag_linear(x, values, offsets, bias, self.out_features, check_offsets=False)

    def _check_offsets(self, offsets: Tensor, values: Tensor) -> None:
        """Validate the offsets buffer once per object and version, and remember it.

        The forward trusts ``offsets`` (a content check costs a device sync on a GPU), and ``set_offsets`` and
        ``load_state_dict`` validate what they store; but a buffer can also be assigned (``layer.offsets = t``),
        edited in place, swapped by ``functional_call`` or left uninitialized by ``to_empty``. Invalid offsets
        would make the dense and reference paths wrap silently (and the kernel raise), so a changed buffer is
        checked here before it is used.
        """
        if not isinstance(offsets, Tensor):
            raise TypeError(f"DiagLinear.offsets must be a Tensor, got {type(offsets).__name__}")
        if torch._C._functorch.is_functorch_wrapped_tensor(offsets):
            self._check_wrapped_offsets(offsets)
            return
        try:
            canonical_offsets(offsets, self.out_features, self.in_features, where="DiagLinear.offsets")
        except ValueError as e:
            raise ValueError(f"{e}{_UNSET_OFFSETS}") from None
        if offsets.shape[0] != values.shape[0]:
            raise ValueError(
                f"DiagLinear.offsets has k={offsets.shape[0]} diagonals but values has {values.shape[0]} rows"
            )
        # Not remembered while jit.trace runs: its sanity check traces the module again, and a second trace
        # that skipped this check would record the attribute reads in another order ("graphs differed").
        if offsets.device.type != "meta" and not is_fake(offsets) and not torch.jit.is_tracing():
            # Plain attribute (not a buffer): not in state_dict, and recomputed after a copy or a load.
            # The storage is held (detach() shares it) so that no new one can take its address meanwhile.
            self.__dict__["_offsets_seen"] = (offsets, _seen_key(offsets), offsets.detach())

    def _check_wrapped_offsets(self, offsets: Tensor) -> None:
        """``_check_offsets`` for a buffer that torch.func wrapped (``functional_call`` under ``grad`` / ``vmap``:
        per-sample gradients, ``stack_module_state`` ensembles). Its data is the tensor underneath, one row of
        offsets per member when batched; nothing is cached (a wrapper lives for one call)."""
        base = offsets
        while torch._C._functorch.is_functorch_wrapped_tensor(base):
            base = torch._C._functorch.get_unwrapped(base)
        if base.dim() == 1:
            canonical_offsets(base, self.out_features, self.in_features, where="DiagLinear.offsets")
            return
        # Batched: where the batch dim sits is the transform's business; the range and dtype are checked here,
        # and the op checks each member's offsets on the CPU paths.
        P, _ = diag_shape(self.out_features, self.in_features)
        if base.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"DiagLinear.offsets must be int32 or int64, got {base.dtype}")
        if base.numel() and not (int(base.min()) >= 0 and int(base.max()) < P):
            raise ValueError(f"DiagLinear.offsets out of range: not in [0, P={P}) for this layer")

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not plain attributes (parameters and buffers go through here too).
        if name == "weight":
            raise AttributeError(
                "DiagLinear has no dense 'weight': it stores 'values' (k, D) and 'offsets' (k,); to_dense() builds "
                "the (out_features, in_features) W. Code that reads a linear's .weight directly (a tied head, "
                "F.linear(x, fc.weight), fc.weight.T @ x) cannot use a DiagLinear in its place: exclude that "
                "layer (sparsify_'s filter_fn) or change the code to call the layer"
            )
        if (
            name == "values"
            # Dynamo traces this method when compiled code reads .values: is_compiling() folds to True there, and
            # sys._getframe would be a graph break.
            and not torch.compiler.is_compiling()
            and sys._getframe(1).f_code is parametrize.register_parametrization.__code__
        ):
            # register_parametrization reads the tensor first, then applies the parametrization's right_inverse to
            # it, deletes it, swaps the class and stores the parametrization in a ModuleDict, whose .values()
            # method makes the name "values" impossible there: it failed at that last step, with the layer broken.
            # Refused here, at the read, before anything changes. (An exact DiagLinear's forward does not come
            # through __getattr__; a subclass's pays one frame lookup per read of values.)
            raise TypeError(
                f"{type(self).__name__}.values cannot be parametrized with torch.nn.utils.parametrize (so neither "
                f"with torch.nn.utils.parametrizations.weight_norm / spectral_norm / orthogonal): torch keeps "
                f"parametrizations in a ModuleDict, whose .values() method the name collides with. The layer is "
                f"unchanged. The hook-based torch.nn.utils.weight_norm / spectral_norm(layer, name='values') and "
                f"torch.nn.utils.prune work; they act on the (k, D) values, not on the dense (out, in) weight"
            )
        return super().__getattr__(name)

    def to_dense(self) -> Tensor:
        """The dense ``(out_features, in_features)`` weight (zeros off the stored diagonals); differentiable."""
        return to_dense(self.values, self.offsets, self.out_features, self.in_features)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function: weight ``to_dense()`` (zeros off the diagonals), the bias
        copied; same device, dtype and ``requires_grad``. For a runtime without diagcompile's op, or to go on
        training densely (``from_dense`` goes back; ``values``/``offsets`` carry no dense state_dict keys)."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=self.values.dtype
        )
        linear.weight = nn.Parameter(self.to_dense(), requires_grad=self.values.requires_grad)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        linear.train(self.training)
        return linear

    @torch.no_grad()
    def set_offsets(self, offsets: Tensor | Sequence[int], values: Tensor | None = None) -> None:
        """Replace the stored diagonals (same ``k``) in place, with new ``values`` (default: zeros)."""
        offsets = canonical_offsets(offsets, self.out_features, self.in_features)
        if offsets.numel() != self.k:
            raise ValueError(f"set_offsets keeps k fixed: got {offsets.numel()} offsets, layer has k={self.k}")
        # Check everything before changing anything: a failed call leaves the layer as it was.
        if values is not None:
            if not isinstance(values, Tensor):
                raise TypeError(f"set_offsets: values must be a Tensor, got {type(values).__name__}")
            if values.shape != self.values.shape:
                raise ValueError(
                    f"set_offsets: values must have the layer's shape (k, D) = {tuple(self.values.shape)}, "
                    f"got {tuple(values.shape)}"
                )
        self.offsets.copy_(offsets.to(self.offsets.device))
        self.values.copy_(values if values is not None else torch.zeros_like(self.values))

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        sparsity: float = 0.9,
        offsets: Tensor | Sequence[int] | None = None,
    ) -> DiagLinear:
        """Keep ``k`` diagonals of a dense ``nn.Linear``: the ``k`` of largest L2 norm, or ``offsets``.

        The kept entries are bit-exact copies of ``linear.weight``; the bias is copied. The result has the
        weight's device and dtype.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear (or subclass), got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"from_dense: weight must be 2-D, got shape {tuple(weight.shape)}")
        n_out, n_in = weight.shape
        if offsets is None:
            check_sparsity(sparsity, n_out, n_in, where=f"from_dense({n_out}x{n_in})")
            offsets = topk_offsets(weight, k_from_sparsity(n_out, n_in, sparsity))
        offsets = canonical_offsets(offsets, n_out, n_in).to(weight.device)
        values = extract_diagonals(weight, offsets)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls._assemble(
            values,
            offsets,
            bias,
            n_out,
            n_in,
            requires_grad=linear.weight.requires_grad,
            bias_requires_grad=linear.bias is not None and linear.bias.requires_grad,
        )

    @classmethod
    def _assemble(
        cls,
        values: Tensor,
        offsets: Tensor,
        bias: Tensor | None,
        out_features: int,
        in_features: int,
        *,
        requires_grad: bool = True,
        bias_requires_grad: bool | None = None,
    ) -> DiagLinear:
        """Build a layer around given tensors without drawing random values (no RNG consumed).

        ``requires_grad`` applies to ``values``, ``bias_requires_grad`` (default: the same) to the bias: a
        frozen weight with a trainable bias must stay so.
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("offsets", offsets.to(OFFSET_DTYPE))
        self.values = nn.Parameter(values.contiguous(), requires_grad=requires_grad)
        if bias_requires_grad is None:
            bias_requires_grad = requires_grad
        self.bias = nn.Parameter(bias, requires_grad=bias_requires_grad) if bias is not None else None
        return self

    # ------------------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # The layer's (out, in) goes into the metadata torch keeps beside the tensors (saved by torch.save, and
        # loadable with weights_only=True): a bias-free 37->100 layer and a 100->37 one have tensors of the
        # same shapes, (k, 37) and (k,), so the tensors alone cannot tell a transposed load from a right one.
        meta = getattr(destination, "_metadata", None)
        if meta is not None and prefix[:-1] in meta:
            meta[prefix[:-1]]["features"] = (self.out_features, self.in_features)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        where = prefix[:-1] or "the layer"
        saved = local_metadata.get("features")
        if saved is not None and tuple(saved) != (self.out_features, self.in_features):
            error_msgs.append(
                f"{where}: saved from a DiagLinear with in_features={saved[1]}, "
                f"out_features={saved[0]}, loaded into one with in_features={self.in_features}, "
                f"out_features={self.out_features}"
            )
            return
        key = prefix + "offsets"
        # The values, or what prune / weight_norm / spectral_norm(name="values") keep in their place (values_orig,
        # values_g, ...): the layer's own names, so the check costs nothing per key of a large state_dict.
        own = [n for n in (*self._parameters, *self._buffers) if n == "values" or n.startswith("values_")]
        has_values = prefix + "values" in state_dict or any(prefix + n in state_dict for n in own)
        has_offsets = key in state_dict
        if not has_values and prefix + "weight" in state_dict:
            # A warning, not an error: torch passes strict=True here whatever the caller asked for, and a
            # strict=False load may skip this layer on purpose. A strict load still fails on the missing keys.
            n_out_in = tuple(getattr(state_dict[prefix + "weight"], "shape", ()))
            warnings.warn(
                f"{where}: the state_dict holds a dense weight {n_out_in} (an nn.Linear checkpoint) for this "
                f"DiagLinear, which stores values and offsets: the layer is not loaded. Load the checkpoint into the "
                f"dense model, then convert (sparsify_ with the same filter_fn, or DiagLinear.from_dense); "
                f"DiagLinear.to_linear() goes the other way",
                stacklevel=_caller_of_load_state_dict(),
            )
        if has_offsets:
            # Older checkpoints may hold int64 offsets; validate and normalize before the copy.
            try:
                state_dict[key] = canonical_offsets(state_dict[key], self.out_features, self.in_features, where=key)
            except (TypeError, ValueError) as e:
                error_msgs.append(str(e))
                return
            k = state_dict[key].numel()
            if not has_values and not self._holds_offsets(state_dict[key]):
                # Offsets without values (strict=False) would move this layer's values onto other diagonals, a
                # silently other function. (Values without offsets are the parameters-only checkpoint of an EMA
                # or a trainable-only save: torch's missing_keys reports them, as for any module.)
                error_msgs.append(
                    f"{where}: the state_dict has {key} but no {prefix}values, and its offsets differ from this "
                    f"layer's: loading them alone would move the layer's values onto other diagonals (also with "
                    f"strict=False); load the layer's values with them"
                )
                return
            if k != self.k:
                # torch reports two size mismatches (values, offsets) without saying what they mean.
                P, _ = diag_shape(self.out_features, self.in_features)
                error_msgs.append(
                    f"{where}: the state_dict holds k={k} diagonals (sparsity {1 - k / P:.4g}), "
                    f"this {self.out_features}x{self.in_features} DiagLinear has k={self.k} "
                    f"(sparsity {self.sparsity:.4g}): "
                    f"build the layer from the checkpoint's own offsets, DiagLinear({self.in_features}, "
                    f"{self.out_features}, offsets=state_dict[{key!r}])"
                )
                # and on to torch's own report (its size mismatches, and whatever else is missing or unexpected)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _holds_offsets(self, offsets: Tensor) -> bool:
        """Whether ``offsets`` (canonical) are the ones this layer holds (``False`` where they cannot be read)."""
        mine = self._buffers.get("offsets")
        if not isinstance(mine, Tensor) or mine.shape != offsets.shape:
            return False
        return _inspectable(mine) and _inspectable(offsets) and torch.equal(offsets.to(mine.device), mine)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this first: without it the scripting compiler fails on this module's annotations
        # with "Unknown type annotation: 'Tensor' at", which does not say that scripting is the problem.
        raise TypeError(not_scriptable(self))

    def extra_repr(self) -> str:
        P, _ = diag_shape(self.out_features, self.in_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}/{P} diagonals, "
            f"sparsity={self.sparsity:.4f}, bias={self.bias is not None}"
        )

"""``DynaDiagLinear``: a linear layer that learns *which* ``k`` of its ``P`` diagonals to keep (DynaDiag).

The layer holds ``C`` candidate diagonals (``C = P``: every candidate, as the paper; ``C = ceil(c k) < P``:
a candidate pool, sparse-to-sparse) with values ``V`` ``(C, D)``, importances ``alpha`` ``(C,)`` and the
candidates' offsets ``candidate_offsets`` ``(C,)`` (sorted). Every forward:

1. relaxed top-k: ``alpha~ = relax(alpha, k, T)`` in ``[0, 1]`` (``diagcompile.dst.relax``),
2. active set: the candidates with ``alpha~ > active_eps``, plus the current top-``k`` (so at least ``k``),
3. ``y = diag_linear(x, g * alpha~[a] * V[a], offsets[a], bias)`` through ``torch.ops.diagcompile.diag_linear``:
   the op's ``dV`` gives the gradient of both ``V`` and ``alpha`` (by the chain rule through the product).
   ``g = 1`` (``soft_scale="none"``, the paper) or ``g = sqrt(k / sum(alpha~[a]^2))`` (``"rms"``, no gradient):
   ``sum alpha~^2 = k`` for the hard top-k, so ``g`` keeps the layer's output scale at that of its final
   ``k``-diagonal form while ``alpha~`` is spread; at ``alpha~ = k/P`` everywhere it undoes the ``k/P`` that
   otherwise shrinks the layer (and, Adam's step on ``V`` being scale-free, its learning) at the start.

``freeze_()`` hardens it: ``keep_idx`` = the hard top-``k`` of ``alpha`` (ties to the smaller offset), and with
``fold=True`` ``V[keep] <- g * alpha~[keep] * V[keep]`` so the function does not jump. From then on the forward
uses exactly those ``k`` rows (scale 1) and only ``V`` (and the bias) train. ``alpha`` stays in the graph
with an exactly zero gradient (``alpha * 0``): a ``DistributedDataParallel`` reducer built before the freeze
still expects a gradient for it every step, and with its momentum zeroed at the freeze by
``DiagSparsifier`` no optimizer moves it.

Shapes never change (``V``, ``alpha``, the buffers), so DDP buckets, optimizer state and checkpoints stay
valid across topology updates; ``to_diag_linear()`` makes the compact ``DiagLinear`` (``k x D``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diagcompile.dst.config import SOFT_SCALES
from diagcompile.dst.relax import hard_topk, relax
from diagcompile.functional import diag_linear
from diagcompile.modules import DiagLinear, not_scriptable
from diagcompile.ops import OFFSET_DTYPE, diag_shape, extract_diagonals

__all__ = ["DynaDiagLinear"]


class DynaDiagLinear(nn.Module):
    """Linear layer ``(..., N_in) -> (..., N_out)`` whose weight lives on ``k`` learned diagonals.

    Args:
        in_features, out_features: layer shape; ``P = max``, ``D = min`` of the two.
        k: diagonals kept after the freeze (``1 <= k <= P``).
        candidate_offsets: ``(C,)`` the candidates held (``k <= C <= P``), distinct; sorted here.
            Default ``arange(P)``: every candidate.
        values: ``(C, D)`` initial values (rows follow ``candidate_offsets``' sorted order).
        alpha: ``(C,)`` initial importances.
        bias: ``(N_out,)`` parameter or ``None``; kept as the same object (so optimizer groups stay valid).
        relaxation: ``"threshold"`` or ``"softmax_clamp"``.
        temperature: initial ``T``.
        active_eps: forward threshold on ``alpha~``.
        soft_scale: ``"none"`` or ``"rms"``: the soft phase's gain ``g`` (module doc).

    Attributes:
        values: ``(C, D)`` parameter. alpha: ``(C,)`` parameter. bias: ``(N_out,)`` parameter or ``None``.
        candidate_offsets: ``(C,)`` int32 buffer. keep_idx: ``(k,)`` int64 buffer (rows kept after the freeze).
        frozen_flag: ``()`` uint8 buffer. temperature: ``()`` float64 buffer (set by ``DiagSparsifier``).
    """

    candidate_offsets: Tensor
    keep_idx: Tensor
    frozen_flag: Tensor
    temperature: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        k: int,
        values: Tensor,
        alpha: Tensor,
        bias: nn.Parameter | None = None,
        candidate_offsets: Tensor | None = None,
        *,
        relaxation: str = "threshold",
        temperature: float = 1.0,
        active_eps: float = 1e-4,
        soft_scale: str = "none",
    ) -> None:
        super().__init__()
        P, D = diag_shape(out_features, in_features)
        if not 1 <= k <= P:
            raise ValueError(f"k={k} must be in [1, P={P}] for a {out_features}x{in_features} layer")
        device = values.device
        if candidate_offsets is None:
            candidate_offsets = torch.arange(P, device=device)
        cand = candidate_offsets.to(device, torch.int64)
        C = cand.numel()
        if cand.dim() != 1 or not k <= C <= P:
            raise ValueError(f"candidate_offsets must be 1-D with k={k} <= C <= P={P} entries, got {tuple(cand.shape)}")
        if C > 0 and (int(cand.min()) < 0 or int(cand.max()) >= P or cand.unique().numel() != C):
            raise ValueError(f"candidate_offsets must be distinct and in [0, {P})")
        if values.shape != (C, D) or alpha.shape != (C,):
            raise ValueError(
                f"values must be ({C}, {D}) and alpha ({C},), got {tuple(values.shape)} and {tuple(alpha.shape)}"
            )
        if relaxation not in ("threshold", "softmax_clamp"):
            raise ValueError(f"relaxation must be 'threshold' or 'softmax_clamp', got {relaxation!r}")
        if soft_scale not in SOFT_SCALES:
            raise ValueError(f"soft_scale must be one of {SOFT_SCALES}, got {soft_scale!r}")
        order = torch.argsort(cand)
        self.in_features, self.out_features, self.k = in_features, out_features, k
        self.relaxation, self.active_eps, self.soft_scale = relaxation, float(active_eps), soft_scale
        self.values = nn.Parameter(values.detach()[order].clone().contiguous())
        self.alpha = nn.Parameter(alpha.detach()[order].clone().to(values.dtype))
        self.bias = bias
        self.register_buffer("candidate_offsets", cand[order].to(OFFSET_DTYPE))
        self.register_buffer("keep_idx", torch.arange(k, device=device, dtype=torch.int64))
        self.register_buffer("frozen_flag", torch.zeros((), device=device, dtype=torch.uint8))
        self.register_buffer("temperature", torch.tensor(float(temperature), device=device, dtype=torch.float64))
        self._frozen = False

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        k: int,
        candidate_offsets: Tensor | None = None,
        *,
        alpha_init: float | None = None,
        alpha_init_noise: float = 0.0,
        rescale_init: bool = True,
        relaxation: str = "threshold",
        temperature: float = 1.0,
        active_eps: float = 1e-4,
        soft_scale: str = "none",
    ) -> DynaDiagLinear:
        """Build from a dense ``nn.Linear``: the candidates' values are its diagonals (bit-exact, or times
        ``sqrt(P / k)`` with ``rescale_init``), the bias is the same ``Parameter`` object.

        ``alpha`` starts at ``alpha_init`` (default ``1 / P``, the paper's) plus ``N(0, alpha_init_noise^2)``
        noise from torch's global RNG. With every candidate, ``rescale_init`` and ``soft_scale="rms"`` the layer
        starts as the dense layer itself (``g * (k / P) * sqrt(P / k) = 1`` with ``g = sqrt(P / k)``).

        ``values`` and ``alpha`` require a gradient exactly when ``linear.weight`` does: a frozen linear stays
        frozen, diagonals and their selection alike (the bias keeps its own flag).
        """
        W = linear.weight.detach()
        n_out, n_in = W.shape
        P, _ = diag_shape(n_out, n_in)
        if candidate_offsets is None:
            candidate_offsets = torch.arange(P, device=W.device)
        cand = torch.sort(candidate_offsets.to(W.device, torch.int64)).values
        values = extract_diagonals(W, cand)
        if rescale_init:
            values = values * math.sqrt(P / k)
        a0 = 1.0 / P if alpha_init is None else float(alpha_init)
        alpha = torch.full((cand.numel(),), a0, dtype=torch.float32)
        if alpha_init_noise > 0:
            alpha = alpha + alpha_init_noise * torch.randn(cand.numel())
        layer = cls(
            n_in,
            n_out,
            k,
            values.to(W.dtype),
            alpha.to(device=W.device, dtype=W.dtype),
            linear.bias,
            cand,
            relaxation=relaxation,
            temperature=temperature,
            active_eps=active_eps,
            soft_scale=soft_scale,
        )
        layer.values.requires_grad_(linear.weight.requires_grad)
        layer.alpha.requires_grad_(linear.weight.requires_grad)
        return layer

    # ------------------------------------------------------------------------------------------------
    @property
    def num_candidates(self) -> int:
        """``C``: candidate diagonals held (``P`` in faithful mode)."""
        return self.candidate_offsets.numel()

    @property
    def is_pool(self) -> bool:
        """Whether the layer holds a pool of fewer than ``P`` candidates (sparse-to-sparse)."""
        return self.num_candidates < max(self.in_features, self.out_features)

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def _diagcompile_not_exportable(self) -> str | None:
        """Read by ``diagcompile.export``, which refuses a layer still soft with this message."""
        if self.frozen:
            return None
        return (
            "it is a DynaDiagLinear of dynamic sparse training in progress (soft: its active diagonals depend "
            "on alpha). Call DiagSparsifier.finalize() first: it gives the compact DiagLinear layers that export"
        )

    # A Python mirror of frozen_flag: the frozen forward must not sync on a device buffer. The buffer can be
    # written without this module knowing (an EMA or SWA copy updated with buffer.copy_, a hand-rolled
    # load): eager forwards re-read it when it is another tensor or its in-place version moved (~0.3 us).
    # A compiled forward cannot: it reads the mirror, which Dynamo guards on; train() and eval() re-read the
    # buffer, so a compiled copy whose buffers were written follows after model.eval() (or .train()).
    @property
    def _frozen(self) -> bool:
        if not torch.compiler.is_compiling() and self._frozen_seen != self._flag_key():
            self._read_frozen_flag()
        return self._frozen_mirror

    @_frozen.setter
    def _frozen(self, value: bool) -> None:
        self.frozen_flag.fill_(int(value))
        self._read_frozen_flag()

    def _read_frozen_flag(self) -> None:
        """Set the mirror from the buffer (one device sync; none on the meta device, which has no values)."""
        flag = self.frozen_flag
        self._frozen_mirror = flag.device.type != "meta" and bool(flag.item())
        self._frozen_seen = self._flag_key()

    def train(self, mode: bool = True) -> DynaDiagLinear:
        self._read_frozen_flag()
        return super().train(mode)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Pickles from before the mirror had its own fields hold a plain "_frozen" (now a property).
        state.pop("_frozen", None)
        super().__setstate__(state)
        self._read_frozen_flag()

    def _flag_key(self) -> tuple[int, int]:
        flag = self.frozen_flag
        try:
            return id(flag), flag._version
        except RuntimeError:  # an inference tensor has no version counter (only written under inference_mode)
            return id(flag), -1

    def set_temperature(self, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature.fill_(float(temperature))

    def alpha_tilde(self) -> Tensor:
        """``(C,)`` relaxed weights at the current temperature (differentiable in ``alpha``).

        After the freeze: 1 on ``keep_idx``, 0 elsewhere (no gradient).
        """
        if self._frozen:
            at = torch.zeros_like(self.alpha.detach())
            return at.index_fill_(0, self.keep_idx, 1.0)
        return relax(self.relaxation, self.alpha, self.k, float(self.temperature))

    @torch.no_grad()
    def soft_gain(self) -> float:
        """The soft phase's current gain ``g`` (module doc): 1 for ``soft_scale="none"`` and once frozen."""
        if self._frozen or self.soft_scale != "rms":
            return 1.0
        at = self.alpha_tilde()
        return float(self._gain(at.index_select(0, self._active_rows(at))))

    def current_topk(self) -> Tensor:
        """``(k,)`` rows (ascending) of the hard top-k: ``keep_idx`` once frozen, else top-k of ``alpha``."""
        return self.keep_idx if self._frozen else hard_topk(self.alpha, self.k)

    def kept_offsets(self) -> Tensor:
        """``(k,)`` int32 offsets of the current hard top-k, sorted."""
        return self.candidate_offsets.index_select(0, self.current_topk())

    # ------------------------------------------------------------------------------------------------
    def _active(self) -> tuple[Tensor, Tensor]:
        """Rows and their scales for this forward: ``(idx (a,) int64 ascending, scale (a,))``."""
        if self._frozen:
            # Exactly 1, but through alpha so that alpha receives an (exactly zero) gradient; see module doc.
            return self.keep_idx, self.alpha.index_select(0, self.keep_idx) * 0.0 + 1.0
        at = self.alpha_tilde()
        idx = self._active_rows(at)
        scale = at.index_select(0, idx)
        return idx, (scale * self._gain(scale) if self.soft_scale == "rms" else scale)

    @torch.no_grad()
    def _active_rows(self, at: Tensor) -> Tensor:
        """``(a,)`` ascending rows with ``alpha~ > active_eps``, plus the hard top-``k`` (so ``a >= k``)."""
        mask = at.detach() > self.active_eps
        # Top-k of alpha, not of alpha~: saturated alpha~ tie at 1.0 in float32, alpha does not.
        mask[hard_topk(self.alpha, self.k)] = True
        return mask.nonzero().squeeze(1)

    def _gain(self, scale: Tensor) -> Tensor:
        """``()`` ``g = sqrt(k / sum(scale^2))`` of the active ``alpha~`` (``soft_scale="rms"``), no gradient:
        ``alpha`` learns which candidates matter, not how spread ``alpha~`` is. The skipped candidates
        (``alpha~ <= active_eps``) would add less than ``C * eps^2`` to the sum."""
        return torch.sqrt(self.k / scale.detach().double().square().sum()).to(scale.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features) -> (..., out_features)``."""
        if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1] != self.in_features:
            raise ValueError(
                f"shape mismatch: input has last dim {x.shape[-1]} "
                f"but this DynaDiagLinear has in_features={self.in_features}"
            )
        idx, scale = self._active()
        v = self.values.index_select(0, idx) * scale.unsqueeze(1)
        offsets = self.candidate_offsets.index_select(0, idx)
        return diag_linear(x, v, offsets, self.bias, self.out_features, check_offsets=False)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def freeze_(self, fold: bool = True, keep_idx: Tensor | None = None) -> Tensor:
        """Harden to the top-``k`` (or the given ``keep_idx`` rows); returns the ``(k,)`` kept rows.

        With ``fold`` the kept values are multiplied by their current scale ``g * alpha~`` (computed exactly as
        the last forward did), so the output changes only by the contribution of the dropped candidates.
        """
        if self._frozen:
            return self.keep_idx
        at = self.alpha_tilde().detach() * self.soft_gain()  # the g the last forward used (1 for "none")
        keep = hard_topk(self.alpha, self.k) if keep_idx is None else keep_idx.to(self.keep_idx.device)
        if fold:
            rows = self.values.index_select(0, keep) * at.index_select(0, keep).unsqueeze(1)
            self.values.index_copy_(0, keep, rows)
        self.keep_idx.copy_(keep)
        self._frozen = True
        return self.keep_idx

    def to_diag_linear(self) -> DiagLinear:
        """The compact ``DiagLinear`` (``k x D`` values, sorted offsets) computing what this layer computes
        after the freeze (freeze first). The bias is the same ``Parameter`` object."""
        if not self._frozen:
            raise RuntimeError("to_diag_linear() needs a frozen layer: call freeze_() first")
        keep = self.keep_idx
        layer = DiagLinear._assemble(
            self.values.detach().index_select(0, keep).clone(),
            self.candidate_offsets.index_select(0, keep).clone(),
            None,
            self.out_features,
            self.in_features,
            requires_grad=self.values.requires_grad,
        )
        layer.bias = self.bias
        return layer

    # ------------------------------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._read_frozen_flag()  # also for torch.compile, which skips the version check

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(not_scriptable(self))  # see DiagLinear.__prepare_scriptable__

    def extra_repr(self) -> str:
        P, _ = diag_shape(self.out_features, self.in_features)
        mode = f"pool={self.num_candidates}" if self.is_pool else "faithful"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}/{P} diagonals, "
            f"{mode}, relaxation={self.relaxation}, soft_scale={self.soft_scale}, frozen={self._frozen}, "
            f"bias={self.bias is not None}"
        )

"""Frozen configuration for one-shot sparsification (``sparsify_``)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

__all__ = ["DiagSparsityConfig"]


@dataclass(frozen=True)
class DiagSparsityConfig:
    """How ``sparsify_`` turns ``nn.Linear`` layers into ``DiagLinear``.

    Attributes:
        sparsity: target sparsity per layer, in ``[0, 1)``; each layer must also allow it
            (at most ``1 - 1/P`` for its shape), else ``sparsify_`` names the layer in a ``ValueError``.
        selection: which diagonals to keep: ``"topk"`` (largest L2 norm of the dense weight, the default),
            ``"even"`` (evenly spaced offsets) or ``"random"`` (torch's RNG).
        only_marked: convert only linears marked with ``mark_sparse`` (default: every ``nn.Linear`` the
            ``filter_fn`` accepts). A mark's own sparsity/offsets always win over this config.
    """

    sparsity: float = 0.9
    selection: Literal["topk", "even", "random"] = "topk"
    only_marked: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, numbers.Real):
            raise TypeError(f"DiagSparsityConfig.sparsity must be a float, got {type(self.sparsity).__name__}")
        object.__setattr__(self, "sparsity", float(self.sparsity))  # a numpy scalar stays out of reprs and JSON
        if math.isnan(self.sparsity) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"DiagSparsityConfig.sparsity={self.sparsity} must be in [0, 1)")
        if self.selection not in ("topk", "even", "random"):
            raise ValueError(f"DiagSparsityConfig.selection={self.selection!r} must be 'topk', 'even' or 'random'")
        if not isinstance(self.only_marked, bool):
            raise TypeError("DiagSparsityConfig.only_marked must be a bool")

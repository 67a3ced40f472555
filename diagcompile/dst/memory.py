"""``memory_report``: bytes of parameters and optimizer state, per module."""

from __future__ import annotations

import torch
from torch import nn

from diagcompile.dst.optim import state_bytes

__all__ = ["memory_report"]


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, dict[str, int]]:
    """Bytes held for training, per module that directly owns parameters, plus a ``"__total__"`` row.

    Each row is ``{"params": ..., "optimizer_state": ..., "total": ...}``. A parameter shared by several
    modules is counted once (at the first module that owns it). Buffers and activations are not counted;
    neither is the transient ``(P, D)`` probe a topology update accumulates (see ``DiagSparsifier``).
    """
    report: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    for fqn, module in model.named_modules():
        p_bytes = s_bytes = 0
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            p_bytes += p.numel() * p.element_size()
            s_bytes += state_bytes(optimizer, p)
        if p_bytes or s_bytes:
            report[fqn] = {"params": p_bytes, "optimizer_state": s_bytes, "total": p_bytes + s_bytes}
    report["__total__"] = {
        key: sum(row[key] for row in report.values()) for key in ("params", "optimizer_state", "total")
    }
    return report

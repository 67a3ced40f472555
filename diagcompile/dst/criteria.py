"""Which diagonals: probe scores, and the pure decision rules of the topology updates.

Every rule is a deterministic function of its tensor arguments (stable sorts; ties go to the smaller
offset or row), so all DDP ranks that see the same scores decide the same thing, and a resumed run
decides what the uninterrupted run decided.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diagcompile.dst.relax import hard_topk
from diagcompile.ops import OFFSET_DTYPE

__all__ = ["probe_dv", "probe_scores", "drop_grow", "refresh_pool", "row_sources"]


def probe_dv(dy: Tensor, x: Tensor, num_candidates: int) -> Tensor:
    """``dL/dV`` of *every* candidate diagonal on one batch: ``(P, D)``, the diagonal-restricted ``dY^T X``.

    Args:
        dy: ``(..., N_out)`` gradient of the loss w.r.t. the layer output.
        x: ``(..., N_in)`` the layer input.
        num_candidates: ``P = max(N_out, N_in)``.

    One ``diag_linear_dv`` over ``arange(P)``: the op's dispatch computes it as a dense ``dY^T X`` at large
    batch (one dense-cost product, once per update), with the diagonal kernel at small batch. ``dy`` and ``x``
    may differ in dtype (under autocast a layer's input is float32 and its output's gradient bfloat16): both
    are promoted to a common dtype first.
    """
    dtype = torch.promote_types(dy.dtype, x.dtype)
    all_offsets = torch.arange(num_candidates, device=x.device, dtype=OFFSET_DTYPE)
    return torch.ops.diagcompile.diag_linear_dv(dy.to(dtype), x.to(dtype), all_offsets)


def probe_scores(dv: Tensor) -> Tensor:
    """``(P,)`` float32 probe score of each candidate: ``||dV_p||_2`` (RigL's gradient magnitude, per diagonal)."""
    return dv.float().norm(dim=1)


def row_sources(old_offsets: Tensor, new_offsets: Tensor, num_candidates: int) -> Tensor:
    """``(len(new),)`` int64: the row of each new offset in ``old_offsets``, or ``-1`` if it is new."""
    pos = torch.full((num_candidates,), -1, dtype=torch.int64, device=old_offsets.device)
    pos[old_offsets.to(torch.int64)] = torch.arange(old_offsets.numel(), device=old_offsets.device)
    return pos[new_offsets.to(torch.int64)]


def _check_finite(scores: Tensor) -> None:
    # A NaN sorts past the -inf that excludes kept diagonals: one would be grown a second time.
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(
            "probe scores must be finite: a NaN or inf score would grow an offset that is already kept "
            "(DiagSparsifier skips the update of a layer whose gradient overflowed)"
        )


def drop_grow(offsets: Tensor, weight_norms: Tensor, scores: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """One DiagHeur (RigL-on-diagonals) update: drop ``n`` diagonals of smallest ``||V_j||``, grow ``n``.

    The ``n`` grown are the offsets with the largest probe ``scores`` among those not kept after the drop
    (a just-dropped diagonal may be regrown: it then keeps its values and optimizer state, as RigL does).

    Args:
        offsets: ``(k,)`` current offsets (sorted, distinct).
        weight_norms: ``(k,)`` ``||V_j||`` of each current diagonal.
        scores: ``(P,)`` probe scores of every candidate.
        n: how many to replace, ``0 <= n <= k``.

    Returns:
        ``(new_offsets (k,) int32 sorted, src (k,) int64)`` with ``src[i]`` the old row of ``new_offsets[i]``
        or ``-1`` for a grown diagonal (values and optimizer state start at 0).
    """
    k, P = offsets.numel(), scores.numel()
    if not 0 <= n <= k:
        raise ValueError(f"n={n} must be in [0, k={k}]")
    _check_finite(scores)
    off = offsets.to(torch.int64)
    by_norm = torch.sort(weight_norms.detach().double(), stable=True).indices  # ascending: weakest first
    kept = off[by_norm[n:]]
    s = scores.detach().double().clone()
    s[kept] = -torch.inf
    grown = torch.sort(-s, stable=True).indices[:n]
    new = torch.sort(torch.cat([kept, grown])).values
    return new.to(OFFSET_DTYPE), row_sources(off, new, P)


def refresh_pool(candidates: Tensor, alpha: Tensor, k: int, scores: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """One DynaDiag pool refresh: swap ``n`` weak pool members for the best-scoring non-members.

    The current hard top-``k`` of ``alpha`` is never swapped out. Of the other members, the ``n`` with the
    smallest ``alpha`` leave; the ``n`` non-members with the largest probe ``scores`` enter (``n`` is capped
    by the number of non-members).

    Args:
        candidates: ``(C,)`` current pool offsets (sorted).
        alpha: ``(C,)`` their importances.
        k: diagonals kept at the freeze.
        scores: ``(P,)`` probe scores.
        n: requested swaps, ``0 <= n <= C - k``.

    Returns:
        ``(new_candidates (C,) int32 sorted, src (C,) int64)``; ``src = -1`` marks a newcomer.
    """
    C, P = candidates.numel(), scores.numel()
    if not 0 <= n <= C - k:
        raise ValueError(f"n={n} must be in [0, C - k = {C - k}]")
    _check_finite(scores)
    n = min(n, P - C)
    cand = candidates.to(torch.int64)
    protected = torch.zeros(C, dtype=torch.bool, device=cand.device)
    protected[hard_topk(alpha, k)] = True
    others = (~protected).nonzero().squeeze(1)
    weakest = others[torch.sort(alpha.detach()[others].double(), stable=True).indices[:n]]
    stay = torch.ones(C, dtype=torch.bool, device=cand.device)
    stay[weakest] = False
    s = scores.detach().double().clone()
    s[cand] = -torch.inf
    incoming = torch.sort(-s, stable=True).indices[:n]
    new = torch.sort(torch.cat([cand[stay], incoming])).values
    return new.to(OFFSET_DTYPE), row_sources(cand, new, P)

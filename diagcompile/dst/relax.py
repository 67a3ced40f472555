"""Relaxed top-k: soft weights ``alpha~`` in ``[0, 1]`` over ``C`` candidate diagonals from importances ``alpha``.

Two relaxations (both invariant to adding a constant to ``alpha``; both order-preserving, so the hard top-k
of ``alpha`` is the hard top-k of ``alpha~``):

``softmax_clamp`` (DynaDiag, Eq. 5, and the authors' code)
    ``alpha~ = clamp(k * softmax(alpha / T), 0, 1)``. It sums to ``k`` only while no entry is clamped. As
    ``T`` falls, softmax concentrates on the largest few ``alpha``: they clamp at 1 while the rest go to 0,
    so ``sum alpha~`` collapses from ``k`` towards 1 (top-1). Clamped entries get no gradient.

``threshold`` (default)
    ``alpha~_i = sigmoid((alpha_i - tau) / T)`` with the threshold ``tau`` solved so that
    ``sum_i alpha~_i = k`` exactly, at every ``T``. As ``T -> 0`` it tends to the hard top-k indicator (and
    to ``k / C`` everywhere as ``T -> inf``), so annealing ``T`` moves smoothly from dense-ish to exactly
    ``k`` diagonals. The gradient treats ``tau`` as the implicit function of ``alpha`` it is: from
    ``sum sigmoid((alpha - tau) / T) = k``, ``d tau / d alpha_j = s_j / sum(s)`` with
    ``s = alpha~ (1 - alpha~)``, so

        ``d alpha~_i / d alpha_j = s_i / T * (delta_ij - s_j / sum(s))``,

    the plain sigmoid Jacobian projected so that ``sum alpha~`` stays ``k``: raising one candidate lowers
    the others. It costs O(C). (Detaching ``tau`` would drop the projection and let gradient steps push
    ``sum alpha~`` away from ``k`` only to be undone by the next solve.)

``tau`` is found in float64 on the CPU by safeguarded Newton (bisection fallback) from a cold start, so
it is a deterministic function of ``(alpha, k, T)`` alone: no warm-start state that would make a resumed
run differ in the last bits from an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["softmax_clamp", "threshold", "threshold_tau", "relax", "boundary_alpha", "hard_topk"]

# Solve sum(alpha~) = k to this relative accuracy in float64 (the float32 cast adds ~1e-7 relative).
_TAU_RTOL = 1e-12
_TAU_MAX_ITER = 200


def softmax_clamp(alpha: Tensor, k: int, temperature: float) -> Tensor:
    """The paper's ``clamp(k * softmax(alpha / T), 0, 1)``. ``alpha``: ``(C,)`` -> ``(C,)``."""
    return torch.clamp(k * torch.softmax(alpha / temperature, dim=0), 0.0, 1.0)


def threshold_tau(alpha: Tensor, k: int, temperature: float) -> float:
    """The ``tau`` with ``sum_i sigmoid((alpha_i - tau) / T) = k`` (``-inf`` when ``k >= C``).

    ``f(tau) = sum sigmoid((alpha - tau) / T)`` decreases from ``C`` to 0; with
    ``c = logit(k / C)``, ``f(min(alpha) - T c) >= k >= f(max(alpha) - T c)`` brackets the root. Newton
    steps that leave the bracket (or stall) are replaced by bisection.
    """
    # numpy: ~10 tiny vector ops per iteration, where torch's per-op overhead would dominate.
    a = alpha.detach().to("cpu", torch.float64).reshape(-1).numpy()
    C = a.size
    if k >= C:
        return -math.inf
    T = float(temperature)
    c = math.log(k / (C - k))
    lo, hi = float(a.min()) - T * c, float(a.max()) - T * c
    tau = min(max(float(a.mean()) - T * c, lo), hi)
    prev = math.inf
    for _ in range(_TAU_MAX_ITER):
        # sigmoid(z) = (1 + tanh(z / 2)) / 2: no overflow for any z
        sig = 0.5 * (1.0 + np.tanh((0.5 / T) * (a - tau)))
        f = float(sig.sum()) - k
        if abs(f) <= _TAU_RTOL * k:
            break
        if f > 0:  # too much mass: raise the threshold
            lo = tau
        else:
            hi = tau
        if hi - lo <= 4 * math.ulp(max(1.0, abs(tau))):
            break
        slope = float((sig * (1.0 - sig)).sum()) / T  # -f'(tau) > 0
        step_ok = slope > 0 and abs(f) < 0.5 * prev
        nxt = tau + f / slope if slope > 0 else math.nan
        if not step_ok or not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        prev = abs(f)
        tau = nxt
    return tau


class _Threshold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, alpha: Tensor, k: int, temperature: float, tau: float) -> Tensor:
        at64 = torch.sigmoid((alpha.detach().double() - tau) / temperature)
        ctx.save_for_backward(at64)
        ctx.temperature = temperature
        return at64.to(alpha.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (at64,) = ctx.saved_tensors
        s = at64 * (1.0 - at64)
        gs = grad.double() * s
        # sum(s) underflows to 0 only when every candidate is saturated: then every gradient is ~0 too.
        total = s.sum().clamp_min(torch.finfo(torch.float64).tiny)
        g_alpha = (gs - s * (gs.sum() / total)) / ctx.temperature
        return g_alpha.to(grad.dtype), None, None, None


def threshold(alpha: Tensor, k: int, temperature: float, tau: float | None = None) -> Tensor:
    """``sigmoid((alpha - tau) / T)`` with ``sum = k``; differentiable with the implicit-``tau`` gradient.

    Args:
        alpha: ``(C,)``.
        k: target sum, ``1 <= k <= C``; ``k == C`` gives all ones (no gradient).
        temperature: ``T > 0``.
        tau: a precomputed ``threshold_tau(alpha, k, T)`` (else solved here).

    Returns:
        ``(C,)`` in ``alpha.dtype``, computed in float64.
    """
    if k >= alpha.numel():
        return torch.ones_like(alpha) + 0.0 * alpha  # keeps alpha in the graph with a zero gradient
    if tau is None:
        tau = threshold_tau(alpha, k, temperature)
    return _Threshold.apply(alpha, k, float(temperature), float(tau))


def relax(name: str, alpha: Tensor, k: int, temperature: float) -> Tensor:
    """Dispatch on the relaxation name (``"threshold"`` or ``"softmax_clamp"``)."""
    if name == "threshold":
        return threshold(alpha, k, temperature)
    if name == "softmax_clamp":
        return softmax_clamp(alpha, k, temperature)
    raise ValueError(f"unknown relaxation {name!r}; expected 'threshold' or 'softmax_clamp'")


def boundary_alpha(name: str, alpha: Tensor, k: int, temperature: float) -> float:
    """The ``alpha`` a newcomer needs for ``alpha~ = 1/2`` under the current others (ignoring its own effect).

    ``threshold``: ``tau``. ``softmax_clamp``: ``a`` with ``k exp(a/T) / sum exp(alpha/T) = 1/2``.
    """
    if name == "threshold":
        tau = threshold_tau(alpha, k, temperature)
        return float(alpha.detach().min()) if math.isinf(tau) else tau
    if name == "softmax_clamp":
        a = alpha.detach().double()
        return float(temperature * (torch.logsumexp(a / temperature, 0) - math.log(2 * k)))
    raise ValueError(f"unknown relaxation {name!r}")


def hard_topk(alpha: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest ``alpha``, ascending; ties go to the smaller index (deterministic)."""
    order = torch.sort(-alpha.detach(), stable=True).indices[:k]
    return torch.sort(order).values

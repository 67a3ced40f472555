"""The pure decision rules of the mask-based baselines (RigL, SRigL, N:M with SR-STE / decaying masks).

Every function here is a deterministic function of its tensor arguments: rankings use stable sorts in
float64, so ties go to the smaller flat index (row-major), all DDP ranks that see the same scores decide the
same thing, and a resumed run decides what the uninterrupted run decided. Nothing here touches modules or
optimizers (``diagcompile.dst.baselines`` does), so each rule is tested on its own.

Layout: a weight is ``(N_out, N_in)`` (``nn.Linear``); a *neuron* is an output row, its *fan-in* the number of
active entries in that row. N:M groups are ``M`` consecutive entries of a row (along the input dimension, the
layout 2:4 sparse tensor cores use for ``x W^T``).

References (see ``/work/shared/research/baselines.md``): RigL (Evci et al., ICML 2020), SRigL (Lasby et al.,
ICLR 2024), SR-STE (Zhou et al., ICLR 2021), decaying masks (Kao et al., arXiv 2209.07617) and PGF's
MDGF/SDGF (Bambhaniya et al., arXiv 2402.04744).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "erk_nnz",
    "random_mask",
    "random_fan_in_mask",
    "rigl_drop_grow",
    "srigl_update",
    "SRiglDecision",
    "srigl_fan_in",
    "choose_nm",
    "nm_mask",
    "structure_decay_frames",
    "frame_at",
    "mask_decay_beta",
]


def _desc_order(scores: Tensor) -> Tensor:
    """Indices sorting ``scores`` (any shape, last dim) descending; ties keep index order (stable)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def _top_flat(scores: Tensor, n: int) -> Tensor:
    """A boolean mask (shape of ``scores``) of its ``n`` largest finite entries (stable ties)."""
    flat = scores.reshape(-1)
    n = min(n, int(torch.isfinite(flat).sum()))
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if n > 0:
        out[_desc_order(flat)[:n]] = True
    return out.view(scores.shape)


def _row_ranks(scores: Tensor) -> Tensor:
    """``(R, C)`` int64: the rank of each entry within its row when sorted descending (0 = largest; stable)."""
    order = _desc_order(scores)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


# ----------------------------------------------------------------------------------------------------
# Layer-wise budgets and initial masks
# ----------------------------------------------------------------------------------------------------
def erk_nnz(shapes: Sequence[tuple[int, int]], budgets: Sequence[int], power: float = 1.0) -> list[int]:
    """Redistribute a total non-zero budget over layers with Erdos-Renyi-Kernel densities (RigL, §B3).

    Layer ``l`` gets density ``d_l = eps * r_l`` with ``r_l = ((N_out + N_in) / (N_out * N_in)) ** power``
    (ERK equals ER for linear layers), ``eps`` solved so the non-zeros add up to ``sum(budgets)``. A layer whose
    density would exceed 1 is made dense and ``eps`` re-solved (RigL's loop: the layer of largest ``r_l`` first).

    Args:
        shapes: ``(N_out, N_in)`` of each layer.
        budgets: the non-zeros each layer would get with uniform sparsity; only their sum matters.
        power: ERK's exponent (1.0 in RigL).

    Returns:
        Non-zeros per layer, ``floor(d_l * N_out * N_in)`` (at least 1), so the total is at most the budget.
    """
    if len(shapes) != len(budgets):
        raise ValueError(f"erk_nnz: {len(shapes)} shapes but {len(budgets)} budgets")
    sizes = [o * i for o, i in shapes]
    raw = [((o + i) / (o * i)) ** power for o, i in shapes]
    total = sum(budgets)
    dense: set[int] = set()
    while True:
        rest = [j for j in range(len(shapes)) if j not in dense]
        if not rest:
            break
        eps = (total - sum(sizes[j] for j in dense)) / sum(raw[j] * sizes[j] for j in rest)
        over = [j for j in rest if eps * raw[j] > 1.0]
        if not over:
            break
        top = max(raw[j] for j in over)
        dense.update(j for j in over if raw[j] == top)
    return [sizes[j] if j in dense else max(1, math.floor(eps * raw[j] * sizes[j])) for j in range(len(shapes))]


def random_mask(n_out: int, n_in: int, nnz: int, generator: torch.Generator | None = None) -> Tensor:
    """``(n_out, n_in)`` bool with ``nnz`` active entries drawn uniformly without replacement (RigL's init)."""
    if not 0 <= nnz <= n_out * n_in:
        raise ValueError(f"nnz={nnz} must be in [0, {n_out * n_in}]")
    mask = torch.zeros(n_out * n_in, dtype=torch.bool)
    mask[torch.randperm(n_out * n_in, generator=generator)[:nnz]] = True
    return mask.view(n_out, n_in)


def random_fan_in_mask(n_out: int, n_in: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``(n_out, n_in)`` bool with exactly ``k`` active entries per row, chosen independently per row (SRigL)."""
    if not 0 <= k <= n_in:
        raise ValueError(f"fan-in k={k} must be in [0, n_in={n_in}]")
    ranks = _row_ranks(torch.rand(n_out, n_in, generator=generator).double())
    return ranks < k


# ----------------------------------------------------------------------------------------------------
# RigL
# ----------------------------------------------------------------------------------------------------
def rigl_drop_grow(mask: Tensor, weight: Tensor, grad: Tensor, n: int) -> Tensor:
    """One RigL update of an unstructured mask: drop ``n`` active weights of smallest ``|W|``, grow ``n``.

    The ``n`` grown are the positions with the largest ``|grad|`` (the dense gradient) among those inactive
    *after* the drop, so a just-dropped weight may be regrown (then it keeps its value, RigL's
    ``reinit_when_same=False``). The number of active entries is unchanged.

    Args:
        mask: ``(N_out, N_in)`` bool, the current mask.
        weight, grad: ``(N_out, N_in)``: the weights and the dense gradient of the loss.
        n: how many to replace, ``0 <= n <= mask.sum()``.

    Returns:
        The new ``(N_out, N_in)`` bool mask.
    """
    n_active = int(mask.sum())
    if not 0 <= n <= n_active:
        raise ValueError(f"n={n} must be in [0, active={n_active}]")
    neg = torch.tensor(-math.inf, dtype=torch.float64, device=mask.device)
    keep = _top_flat(torch.where(mask, weight.detach().abs().double(), neg), n_active - n)
    grow = _top_flat(torch.where(keep, neg, grad.detach().abs().double()), n)
    return keep | grow


# ----------------------------------------------------------------------------------------------------
# SRigL
# ----------------------------------------------------------------------------------------------------
class SRiglDecision:
    """The result of ``srigl_update``: the new ``mask``, the ``ablated`` neurons, the fan-in ``k``, and the
    ablation threshold ``theta`` that was applied (``0`` when ablation was off)."""

    __slots__ = ("mask", "ablated", "k", "theta")

    def __init__(self, mask: Tensor, ablated: Tensor, k: int, theta: int) -> None:
        self.mask, self.ablated, self.k, self.theta = mask, ablated, k, theta


def srigl_fan_in(target_nnz: int, n_in: int, alive: int) -> int:
    """SRigL's constant fan-in with ``alive`` neurons: ``min(N_in, floor(target_nnz / alive))``."""
    return min(n_in, target_nnz // max(alive, 1))


def srigl_update(
    mask: Tensor,
    weight: Tensor,
    grad: Tensor,
    *,
    fraction: float,
    target_nnz: int,
    gamma_sal: float,
    ablation: bool,
) -> SRiglDecision:
    """One SRigL update (digest §A4): saliency, neuron ablation, constant fan-in, drop by ``|W|``, grow by ``|G|``.

    1. ``n_prune = floor(fraction * n_ones)``, ``n_keep = n_ones - n_prune`` (if fewer than ``n_keep`` active
       weights are non-zero, all non-zeros are kept and ``n_prune`` grows accordingly).
    2. Salient = the layer's top-``n_keep`` by ``|W|`` union its top-``n_prune`` by ``|G|`` (any position);
       ``c_i`` = salient entries of neuron ``i``.
    3. ``theta = max(1, floor(gamma_sal * k0))`` with ``k0 = floor(target_nnz / N_out)`` (``gamma_sal >= 1`` is
       an absolute count); safeguard: the ``n_min = ceil(target_nnz / N_in)`` most salient neurons always
       survive (``theta`` is lowered to the ``n_min``-th largest ``c_i``), so the fan-in never exceeds ``N_in``.
       Neurons with ``c_i < theta`` are ablated (every update anew: an ablated neuron can come back).
    4. ``k = min(N_in, floor(target_nnz / alive))``.
    5. Drop: keep the layer's top-``n_keep`` active weights by ``|W|`` outside ablated neurons, then truncate
       every neuron to its ``k`` largest ``|W|`` (the reference truncates by sorting the boolean row, which
       keeps arbitrary survivors; we rank by ``|W|``).
    6. Grow: every alive neuron with fewer than ``k`` is filled up to ``k`` with its inactive positions of
       largest ``|G|`` (just-dropped positions included: they then keep their value).

    Deviation from the digest: ``n_min`` uses ``ceil`` (the reference's ``floor`` can leave fewer neurons alive
    than ``target_nnz / N_in``, i.e. a fan-in above ``N_in``, which the reference then cannot realise).

    Args:
        mask: ``(N_out, N_in)`` bool current mask.
        weight, grad: ``(N_out, N_in)`` weights and dense gradient.
        fraction: the decayed drop fraction ``f(t)``.
        target_nnz: the layer's non-zero budget (before ablation).
        gamma_sal: the ablation threshold ``gamma_sal`` (SRigL's ``min_salient_weights_per_neuron``).
        ablation: ``False`` disables ablation (SRigL "w/o ablation"; also for protected layers such as heads).

    Returns:
        An ``SRiglDecision``: every alive row of the new mask has exactly ``k`` active entries, ablated rows 0.
    """
    n_out, n_in = mask.shape
    w = weight.detach().abs().double()
    g = grad.detach().abs().double()
    neg = torch.tensor(-math.inf, dtype=torch.float64, device=mask.device)
    n_ones = int(mask.sum())
    n_prune = int(math.floor(fraction * n_ones))
    n_keep = n_ones - n_prune
    nonzero = int((mask & (w != 0)).sum())
    if nonzero < n_keep:
        n_keep, n_prune = nonzero, n_ones - nonzero

    theta = 0
    ablated = torch.zeros(n_out, dtype=torch.bool, device=mask.device)
    if ablation:
        salient = _top_flat(torch.where(mask, w, neg), n_keep) | _top_flat(g, n_prune)
        counts = salient.sum(1)
        k0 = target_nnz // n_out
        theta = int(gamma_sal) if gamma_sal >= 1 else max(1, math.floor(gamma_sal * k0))
        n_min = min(n_out, math.ceil(target_nnz / n_in))
        if n_min > 0:
            theta = min(theta, int(torch.sort(counts, descending=True).values[n_min - 1]))
        ablated = counts < theta
    alive = n_out - int(ablated.sum())
    k = srigl_fan_in(target_nnz, n_in, alive)

    live = mask & ~ablated[:, None]
    kept = _top_flat(torch.where(live, w, neg), n_keep)
    kept &= _row_ranks(torch.where(kept, w, neg)) < k
    need = (k - kept.sum(1)).clamp_min(0).masked_fill(ablated, 0)
    grow = _row_ranks(torch.where(kept, neg, g)) < need[:, None]
    return SRiglDecision(kept | grow, ablated, k, theta)


# ----------------------------------------------------------------------------------------------------
# N:M
# ----------------------------------------------------------------------------------------------------
def choose_nm(n_in: int, density: float, max_m: int = 32, m: int | None = None) -> tuple[int, int]:
    """The ``(N, M)`` whose density ``N / M`` is closest to ``density`` for a layer of fan-in ``n_in``.

    ``M`` ranges over the divisors of ``n_in`` in ``[2, max_m]`` (or is ``m`` when given; it must divide
    ``n_in``); ``N = clamp(round(density * M), 1, M)``; the smallest ``|N / M - density|`` wins, ties go to the
    smaller ``M`` (finer groups, closer to what sparse tensor cores accelerate). E.g. density 0.1016 (90%
    sparsity in diagonal units) on fan-in 64 or 768 gives 3:32 (0.09375).

    Raises:
        ValueError: ``n_in < 2``, ``m`` does not divide ``n_in``, or no divisor of ``n_in`` lies in ``[2, max_m]``.
    """
    if n_in < 2:
        raise ValueError(f"N:M sparsity needs a fan-in of at least 2, got {n_in}")
    if m is not None:
        if m < 2 or n_in % m:
            raise ValueError(f"N:M group size M={m} must be >= 2 and divide the fan-in {n_in}")
        candidates = [m]
    else:
        candidates = [c for c in range(2, min(max_m, n_in) + 1) if n_in % c == 0]
        if not candidates:
            # An explicit nm_m must divide the fan-in too, so it cannot help; only a larger nm_max_m can, and only if
            # the fan-in has a divisor below itself (a group as wide as the whole row is not an N:M pattern).
            larger = next((c for c in range(max_m + 1, n_in) if n_in % c == 0), None)
            wider = f", or allow groups of {larger} with nm_max_m={larger}" if larger is not None else ""
            raise ValueError(
                f"no N:M group size M in [2, {max_m}] divides the fan-in {n_in} (an explicit nm_m must divide it too), "
                f"so this layer cannot be N:M sparse: exclude it (filter_fn) or change its fan-in{wider}"
            )
    best: tuple[float, int, int] | None = None
    for c in candidates:
        n = min(c, max(1, math.floor(density * c + 0.5)))
        err = abs(n / c - density)
        if best is None or err < best[0] - 1e-12:
            best = (err, n, c)
    assert best is not None
    return best[1], best[2]


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """``(N_out, N_in)`` bool: in every group of ``m`` consecutive inputs of a row, the ``n`` largest ``|W|``.

    Ties go to the earlier input (stable sort), so the mask is the same on every device and rank.
    """
    n_out, n_in = weight.shape
    if n_in % m or not 1 <= n <= m:
        raise ValueError(f"N:M = {n}:{m} does not fit a fan-in of {n_in} (need M | N_in and 1 <= N <= M)")
    groups = weight.detach().abs().reshape(n_out, n_in // m, m)
    if n == m:
        return torch.ones(n_out, n_in, dtype=torch.bool, device=weight.device)
    ranks = _row_ranks(groups.reshape(-1, m)).view_as(groups)
    return (ranks < n).reshape(n_out, n_in)


def structure_decay_frames(n: int, m: int) -> list[int]:
    """SDGF's stepwise schedule of ``N`` (PGF "sparsify"): ``M-1, ceil(M/2), ceil(M/4), ..., N``.

    Strictly decreasing, every entry ``> n`` except the last. 1:8 gives ``[7, 4, 2, 1]``; 2:4 gives ``[3, 2]``;
    3:32 gives ``[31, 16, 8, 4, 3]``.
    """
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= N <= M, got {n}:{m}")
    frames = [m - 1] if m - 1 > n else []
    j = 1
    while math.ceil(m / 2**j) > n:
        v = math.ceil(m / 2**j)
        if not frames or v < frames[-1]:
            frames.append(v)
        j += 1
    return frames + [n]


def frame_at(step: int, num_frames: int, end: int) -> int:
    """Index of the equal-length frame of ``[0, end)`` holding ``step``; the last frame from then on."""
    if end <= 0:
        return num_frames - 1
    return min(num_frames - 1, step * num_frames // end)


def mask_decay_beta(step: int, shape: str, c: float, end: int) -> float:
    """MDGF's soft-mask value of the pruned weights at ``step``: ``exp(-c t)`` or ``max(0, 1 - c t)``; 0 from ``end``.

    ``end`` starts the binary phase (PGF's fine-tune phase: the mask is forced hard).
    """
    if step >= end:
        return 0.0
    if shape == "exponential":
        return math.exp(-c * step)
    if shape == "linear":
        return max(0.0, 1.0 - c * step)
    raise ValueError(f"unknown mask decay shape {shape!r}")

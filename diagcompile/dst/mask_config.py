"""``MaskConfig``: the frozen, validated configuration of the mask-based baselines (``MaskSparsifier``).

A sibling of ``DSTConfig`` rather than an extension of it: the diagonal methods and the mask baselines share
the scheduling fields (``total_steps``, ``sparsity``, ``update_every``, ``drop_fraction``, ``update_end``, with
the same names, meanings and RigL defaults) but little else, and one dataclass holding both sets of
options would accept (and silently ignore) half of its fields for any given method. ``make_sparsifier``
(``diagcompile.dst.baselines``) picks the right config and sparsifier from a method name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from diagcompile.dst._validate import (
    FieldChecker,
    check_schedule_fields,
    config_from_dict,
    refuse_other_methods_options,
)

__all__ = ["MaskConfig", "MASK_METHODS", "NM_METHODS", "DISTRIBUTIONS", "BUDGETS", "METHOD_ONLY"]

NM_METHODS = ("nm-srste", "nm-mask-decay", "nm-structure-decay")
MASK_METHODS = ("rigl", "srigl") + NM_METHODS
DISTRIBUTIONS = ("uniform", "erk")
BUDGETS = ("diagonal", "floor")
MASK_DECAY_SHAPES = ("exponential", "linear")
MASK_DECAY_GRADS = ("scaled", "ste")
#: The fields only some methods read (field -> those methods). As with ``DSTConfig``'s ``DYNADIAG_ONLY``, another
#: method refuses a value other than the default (which it cannot tell from no value), so an option that would
#: do nothing is not silently recorded as if it were used. Not listed, so every method accepts them: the
#: schedule (``update_every``, ``drop_fraction``, ``update_end``: shared with ``DSTConfig`` and set across
#: methods by sweeps), ``budget`` and ``sparsity`` (every method's density), and ``seed`` (the CLI passes its
#: run seed to every mask method; only RigL/SRigL draw random masks). ``distribution`` has its own check.
METHOD_ONLY: dict[str, tuple[str, ...]] = {
    "erk_power": ("rigl", "srigl"),
    "rescale_init": ("rigl", "srigl"),
    "ablation": ("srigl",),
    "gamma_sal": ("srigl",),
    "no_ablation": ("srigl",),
    "nm_m": NM_METHODS,
    "nm_n": NM_METHODS,
    "nm_max_m": NM_METHODS,
    "srste_lambda": ("nm-srste",),
    "mask_decay_shape": ("nm-mask-decay",),
    "mask_decay_c": ("nm-mask-decay",),
    "mask_decay_grad": ("nm-mask-decay",),
}


@dataclass(frozen=True)
class MaskConfig:
    """How ``MaskSparsifier`` trains mask-sparse ``nn.Linear`` layers (the baselines DynaDiag is compared with).

    Steps are *optimizer* steps: ``MaskSparsifier.step()`` is called once after each ``optimizer.step()``.

    Attributes:
        total_steps: length of the run in optimizer steps; fractions below are of this.
        method:
            * ``"rigl"``: unstructured masks; every ``update_every`` steps until ``update_end``, drop the
              ``f(t)`` fraction of active weights of smallest ``|W|``, grow as many of largest dense ``|grad|``.
            * ``"srigl"``: RigL with a constant fan-in per output neuron and dynamic neuron ablation.
            * ``"nm-srste"``: dense weights, an N:M mask recomputed from ``|W|`` at every forward, SR-STE
              backward (straight-through plus ``srste_lambda * W`` on the pruned weights).
            * ``"nm-mask-decay"``: as above but the pruned weights are scaled by ``beta(t)`` (1 -> 0; MDGF) in
              the forward instead of being zeroed.
            * ``"nm-structure-decay"``: hard N:M masks whose ``N`` steps down ``(M-1):M -> M/2:M -> ... -> N:M``
              over equal frames of ``[0, update_end)`` (SDGF stepwise), straight-through backward.
        sparsity: target sparsity of every selected layer (a ``mark_sparse`` mark's sparsity overrides it under
            ``distribution="uniform"``; ``"erk"`` sets each layer's density itself, so it refuses a mark whose
            sparsity differs from this one).

        update_every: RigL/SRigL ``Delta T``: steps between topology updates (100).
        drop_fraction: RigL/SRigL ``alpha``: the fraction of active weights replaced at an update, decayed by
            ``f(t) = drop_fraction / 2 * (1 + cos(pi * t / T_end))`` (0.3).
        update_end: ``T_end`` as a fraction of ``total_steps`` (0.75). RigL/SRigL: no topology update from
            then on. ``nm-mask-decay``: ``beta`` is 0 from then on (PGF's binary fine-tune phase).
            ``nm-structure-decay``: the frames divide ``[0, T_end)``; the target N:M holds from the last frame on.

        distribution: RigL/SRigL layer-wise densities: ``"uniform"`` (every layer at ``sparsity``; the default,
            so every layer has the same non-zero count as the diagonal methods' layer) or ``"erk"``
            (Erdos-Renyi-Kernel, the same total budget redistributed: ``d_l`` proportional to
            ``((N_out + N_in) / (N_out N_in)) ** erk_power``). N:M methods are uniform by construction.
        erk_power: ERK's exponent (1.0).
        budget: a layer's non-zero budget at ``sparsity``: ``"diagonal"`` (default) = the non-zeros of the
            DynaDiag/DiagHeur layer at the same sparsity, ``k_from_sparsity(N_out, N_in, s) * min(N_out, N_in)``
            (so the comparison is at identical parameter counts; requires ``s <= 1 - 1/P``), or ``"floor"`` =
            RigL's ``floor((1 - s) * N_out * N_in)`` (any ``s`` that leaves a weight; SRigL needs one per neuron
            under either budget, ``s <= 1 - 1/N_in``). N:M methods take ``N / M`` closest to this density.
        rescale_init: RigL/SRigL: multiply each row of the masked dense init by ``sqrt(N_in / fan_in_row)`` so
            every neuron has the scale of ``nn.Linear``'s init at its *sparse* fan-in (the same rule as
            ``DSTConfig.rescale_init`` for diagonals; SRigL's reference re-draws a fan-in-scaled normal).
            ``False`` keeps the masked dense init as is (RigL's "mask a dense init").
        seed: seed of the initial random masks (RigL/SRigL); ``None`` draws from torch's global RNG.

        ablation: SRigL neuron ablation on (SRigL "w/ ablation", the paper's method) or off. An ablated neuron
            loses all its weights but keeps its bias, which trains on, so it is a *constant* unit: it outputs
            ``act(bias)``, not zero, whatever the input, and the next layer receives that constant from it. To
            slice ablated neurons away (e.g. for a condensed export), fold their constant output into the next
            layer's bias first, ``b_next += W_next[:, j] * act(b_j)``, then drop row ``j`` of this layer and
            column ``j`` of the next (valid where the next linear reads the activation directly: no norm or
            residual in between).
        gamma_sal: SRigL's ablation threshold ``gamma_sal`` (``min_salient_weights_per_neuron``): a neuron is
            ablated when fewer than ``max(1, floor(gamma_sal * k0))`` of its weights are salient (``k0`` the
            fan-in before ablation; an ablated neuron is a constant unit, see ``ablation``); ``>= 1`` is an absolute
            count. 0.3 (CNNs; the paper used 0.95 for ViT).
        no_ablation: fully-qualified names of layers never ablated, in addition to the model's output layer
            (the classifier / LM head: ablating its neurons removes classes), which is always protected when
            it is sparsified: the last ``nn.Linear`` the forward runs before the first update (the last one
            registered if no forward ran), whatever the order the modules were registered in.

        nm_m: N:M group size ``M`` for every layer (must divide every selected fan-in); ``None`` picks, per layer,
            the divisor ``M <= nm_max_m`` of the fan-in whose best ``N / M`` is closest to the target density
            (ties: smaller ``M``). ``nm_n``: ``N`` (needs ``nm_m``; the density is then ``N / M``, so ``sparsity``
            must be ``1 - N / M``, refused otherwise, and ``budget`` is unused); ``None`` = ``round(density * M)``.
        nm_max_m: largest automatic ``M`` (32, the PGF ViT setting's 1:32).
        srste_lambda: SR-STE's ``lambda_W`` (2e-4): gradient ``+= lambda_W * (1 - E) * W`` on pruned weights.
        mask_decay_shape: MDGF ``beta(t)``: ``"exponential"`` ``exp(-c t)`` (PGF's best) or ``"linear"``
            ``max(0, 1 - c t)`` (Kao et al.'s decay).
        mask_decay_c: MDGF's ``c`` per optimizer step; ``None`` = ``10 / T_end`` for exponential (``beta`` about
            4.5e-5 at ``T_end``, as PGF's ``c = 1e-4`` over ~1e5 steps) and ``1 / T_end`` for linear.
        mask_decay_grad: the gradient reaching a pruned weight under mask decay: ``"scaled"`` (default) =
            ``beta(t) * dL/dW~``, the exact derivative of the forward (Kao et al.'s JAX/AQT semantics: the flow
            of gradient to pruned weights decays with the mask); ``"ste"`` = ``dL/dW~`` unscaled (PGF's PyTorch
            code: straight-through).
    """

    total_steps: int
    method: Literal["rigl", "srigl", "nm-srste", "nm-mask-decay", "nm-structure-decay"] = "rigl"
    sparsity: float = 0.9

    update_every: int = 100
    drop_fraction: float = 0.3
    update_end: float = 0.75

    distribution: Literal["uniform", "erk"] = "uniform"
    erk_power: float = 1.0
    budget: Literal["diagonal", "floor"] = "diagonal"
    rescale_init: bool = True
    seed: int | None = None

    ablation: bool = True
    gamma_sal: float = 0.3
    no_ablation: tuple[str, ...] = ()

    nm_m: int | None = None
    nm_n: int | None = None
    nm_max_m: int = 32
    srste_lambda: float = 2e-4
    mask_decay_shape: Literal["exponential", "linear"] = "exponential"
    mask_decay_c: float | None = None
    mask_decay_grad: Literal["scaled", "ste"] = "scaled"

    def __post_init__(self) -> None:
        c = FieldChecker(self, "MaskConfig")
        check_schedule_fields(c, MASK_METHODS)
        c.need_choice("distribution", DISTRIBUTIONS)
        c.need_real("erk_power", 0.0, math.inf, hi_open=True)
        c.need_choice("budget", BUDGETS)
        c.need_bool("rescale_init")
        c.need_int("seed", -(2**63), optional=True)
        c.need_bool("ablation")
        c.need_real("gamma_sal", 0.0, math.inf, hi_open=True)
        if isinstance(self.no_ablation, str) or not isinstance(self.no_ablation, (tuple, list)):
            raise c.bad("no_ablation", "must be a tuple of layer names", TypeError)
        if not all(isinstance(n, str) for n in self.no_ablation):
            raise c.bad("no_ablation", "must hold only str layer names", TypeError)
        object.__setattr__(self, "no_ablation", tuple(self.no_ablation))  # lists (JSON, CLI) -> tuple
        c.need_int("nm_m", 2, optional=True)
        c.need_int("nm_n", 1, optional=True)
        if self.nm_n is not None:
            if self.nm_m is None:
                raise c.bad("nm_n", "needs nm_m (N:M fixes both)")
            if self.nm_n > self.nm_m:
                raise c.bad("nm_n", f"must be <= nm_m={self.nm_m}")
        c.need_int("nm_max_m", 2)
        c.need_real("srste_lambda", 0.0, math.inf, hi_open=True)
        c.need_choice("mask_decay_shape", MASK_DECAY_SHAPES)
        if self.mask_decay_c is not None:
            c.need_real("mask_decay_c", 0.0, math.inf, lo_open=True, hi_open=True)
        c.need_choice("mask_decay_grad", MASK_DECAY_GRADS)
        if self.method in NM_METHODS and self.distribution != "uniform":
            raise c.bad("distribution", f"must be 'uniform' for {self.method} (N:M fixes every layer's density)")
        refuse_other_methods_options(c, self.method, METHOD_ONLY)
        if self.nm_n is not None and self.nm_m is not None:
            # An explicit N:M fixes the density: a different sparsity would be recorded (metrics, tables) as the
            # one trained while every layer trains at N / M.
            implied = 1.0 - self.nm_n / self.nm_m
            if not math.isclose(self.sparsity, implied, rel_tol=0.0, abs_tol=1e-6):
                raise c.bad(
                    "sparsity",
                    f"contradicts nm_n={self.nm_n}, nm_m={self.nm_m}, which train every layer at sparsity "
                    f"1 - {self.nm_n}/{self.nm_m} = {implied:.6g}: pass sparsity={implied!r} with them, or leave "
                    f"nm_n out (nm_m alone keeps M, and N follows from sparsity)",
                )

    # ------------------------------------------------------------------------------------------------
    @property
    def is_nm(self) -> bool:
        """Whether the method is one of the N:M family (dense weights, mask recomputed from ``|W|``)."""
        return self.method in NM_METHODS

    @property
    def update_end_step(self) -> int:
        """``T_end`` in optimizer steps: ``round(update_end * total_steps)``."""
        return int(round(self.update_end * self.total_steps))

    @property
    def decay_c(self) -> float:
        """MDGF's ``c`` per step (``mask_decay_c`` or its default from ``T_end``)."""
        if self.mask_decay_c is not None:
            return float(self.mask_decay_c)
        end = max(self.update_end_step, 1)
        return (10.0 if self.mask_decay_shape == "exponential" else 1.0) / end

    def to_dict(self) -> dict[str, Any]:
        """Plain python (str/int/float/bool/None/tuple) for checkpoints loadable with ``weights_only=True``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskConfig:
        """Inverse of ``to_dict``; unknown keys raise ``ValueError``."""
        return config_from_dict(cls, d, "MaskConfig")

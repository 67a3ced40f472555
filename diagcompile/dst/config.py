"""``DSTConfig``: the frozen, validated configuration of a dynamic sparse training run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from diagcompile.dst._validate import (
    FieldChecker,
    check_schedule_fields,
    config_from_dict,
    is_real,
    refuse_other_methods_options,
)

__all__ = [
    "DSTConfig",
    "METHODS",
    "DYNADIAG_ONLY",
    "DIAGHEUR_ONLY",
    "RELAXATIONS",
    "TEMPERATURE_SCHEDULES",
    "OFFSET_INITS",
    "SOFT_SCALES",
]

METHODS = ("dynadiag", "diagheur")
RELAXATIONS = ("threshold", "softmax_clamp")
TEMPERATURE_SCHEDULES = ("cosine", "linear", "exponential", "constant")
OFFSET_INITS = ("random", "even", "topk")
SOFT_SCALES = ("none", "rms")  # DynaDiagLinear.soft_scale
#: Fields only ``dynadiag`` reads; ``diagheur`` refuses a value other than the default (which it cannot tell
#: from no value), so an option that would do nothing is not silently recorded as if it were used.
DYNADIAG_ONLY = (
    "relaxation",
    "temperature_schedule",
    "temperature_start",
    "temperature_end",
    "freeze_at",
    "fold_at_freeze",
    "alpha_lr",
    "alpha_l1",
    "alpha_init",
    "alpha_init_noise",
    "active_eps",
    "soft_scale",
    "pool",
)
#: Fields only ``diagheur`` reads (dynadiag's topology stops changing at its freeze); refused likewise.
DIAGHEUR_ONLY = ("update_end",)


@dataclass(frozen=True)
class DSTConfig:
    """How ``DiagSparsifier`` trains diagonal-sparse layers.

    Steps are *optimizer* steps: ``DiagSparsifier.step()`` is called once after each ``optimizer.step()``.

    Attributes:
        total_steps: length of the run in optimizer steps; fractions below are of this.
        method: ``"dynadiag"`` (learned importance ``alpha`` over candidate diagonals, relaxed top-k, hard
            freeze) or ``"diagheur"`` (RigL on whole diagonals, sparse from step 0).
        sparsity: target sparsity of every converted layer; ``k = k_from_sparsity(N_out, N_in, sparsity)``.
            Which layers are converted is the sparsifier's ``filter_fn``; once any linear is marked with
            ``mark_sparse``, only the marked ones are, each at its mark's sparsity (the others stay dense).

        update_every: ``Delta T``: steps between topology updates (diagheur drop/grow, dynadiag pool refresh).
        drop_fraction: RigL's ``alpha``: the fraction of the ``k`` diagonals (diagheur) or of the ``c*k - k``
            non-selected pool members (dynadiag pool) replaced at an update, decayed by
            ``f(t) = drop_fraction / 2 * (1 + cos(pi * t / t_end))``.
        update_end: diagheur: fraction of ``total_steps`` after which the topology stops changing (RigL's
            ``T_end``). dynadiag pool refreshes stop at the freeze instead.
        offset_init: initial diagonals of diagheur layers and initial pool members of dynadiag pool layers:
            ``"random"`` (torch's RNG), ``"even"`` (evenly spaced) or ``"topk"`` (largest L2 norm of the dense
            weight the layer replaces).
        rescale_init: multiply the dense weight's diagonals by ``sqrt(P / k)`` when they become the initial
            values, so each output row has the scale of ``nn.Linear``'s init at its *sparse* fan-in (as
            ``DiagLinear`` draws it). ``False`` copies the dense weight as is.

        relaxation: dynadiag's relaxed top-k: ``"threshold"`` (``sigmoid((alpha - tau) / T)`` with ``tau``
            solved so the weights sum to ``k``; default) or ``"softmax_clamp"`` (the paper's Eq. 5,
            ``clamp(k * softmax(alpha / T), 0, 1)``, which collapses towards top-1 at low ``T``).
        temperature_schedule: ``"cosine"``, ``"linear"``, ``"exponential"`` (geometric) or ``"constant"``,
            per optimizer step from ``temperature_start`` at step 0 to ``temperature_end`` at the last step
            before the freeze (so the freeze folds the ``alpha~`` of ``T_end``), constant after.
        temperature_start, temperature_end: ``T`` at step 0 and on the last soft step (> 0).
        freeze_at: when dynadiag hardens to exactly ``k`` diagonals: a ``float`` in ``[0, 1]`` is a fraction of
            ``total_steps``, an ``int`` in ``[0, total_steps]`` an absolute step. ``0`` freezes at construction
            (a static top-k of the initial ``alpha``, values as initialised: no fold).
        fold_at_freeze: fold ``alpha~`` into the kept values at the freeze so the function is continuous
            (``V <- alpha~ * V``). ``False`` reproduces the paper's code: ``alpha~`` jumps to 1 on the top-k.
        alpha_lr: learning rate of the ``alpha`` parameter group (which has no weight decay).
        alpha_l1: weight of the optional ``l1(alpha)`` term returned by ``regularization_loss()``.
        alpha_init: initial ``alpha`` of every candidate; ``None`` uses the paper's ``1 / P``.
        alpha_init_noise: std of Gaussian noise added to the initial ``alpha`` (torch's RNG) so ties between
            candidates break reproducibly; ``0`` disables it.
        active_eps: dynadiag's forward computes with the candidates whose ``alpha~ > active_eps`` (and always
            the current top-``k``); the others contribute less than ``active_eps * |V|`` and are skipped.
        soft_scale: dynadiag's soft-phase gain: ``"none"`` (the paper: the layer computes ``alpha~ * V``) or
            ``"rms"`` (``g * alpha~ * V`` with ``g = sqrt(k / sum(alpha~^2))``, no gradient through ``g``). While
            ``alpha~`` is spread (``k/P`` everywhere at the start) the paper's layer is ``sqrt(P/k)``-times too
            small in output scale and learns up to ``P/k`` times slower (Adam's step on ``V`` is scale-free);
            ``g`` restores the scale of the final ``k``-diagonal layer and tends to 1 as ``alpha~`` hardens, and
            the freeze folds it. A faithful layer then starts as the dense layer it replaces, so DST of a
            trained model starts from that model's function. On digits it changed the final accuracy by less
            than the seed noise (``benchmarks/results/dst_soft_phase_rms*.md``, ``dst_soft_phase_e120_rms.md``).
        pool: ``None``: every layer holds values for all ``P`` candidates (faithful to the paper). A number
            ``c >= 1``: hold at most ``ceil(c * k)`` candidates, refreshed every ``update_every`` steps before
            the freeze from probe scores (sparse-to-sparse; memory proportional to density). A refresh keeps
            the current top-``k`` and swaps the ``floor(f(t) (C - k))`` members of smallest ``alpha`` for the
            non-members of largest probe score ``||dV_p||``; newcomers start with values 0, zero optimizer
            state and ``alpha`` at the current boundary (``alpha~ = 1/2``: ``tau`` for ``threshold``).
    """

    total_steps: int
    method: Literal["dynadiag", "diagheur"] = "dynadiag"
    sparsity: float = 0.9

    update_every: int = 100
    drop_fraction: float = 0.3
    update_end: float = 0.75
    offset_init: Literal["random", "even", "topk"] = "random"
    rescale_init: bool = True

    relaxation: Literal["threshold", "softmax_clamp"] = "threshold"
    temperature_schedule: Literal["cosine", "linear", "exponential", "constant"] = "cosine"
    temperature_start: float = 1.0
    temperature_end: float = 0.001
    freeze_at: float | int = 0.5
    fold_at_freeze: bool = True
    alpha_lr: float = 0.01
    alpha_l1: float = 0.0
    alpha_init: float | None = None
    alpha_init_noise: float = 1e-3
    active_eps: float = 1e-4
    soft_scale: Literal["none", "rms"] = "none"
    pool: float | None = None

    def __post_init__(self) -> None:
        c = FieldChecker(self, "DSTConfig")
        check_schedule_fields(c, METHODS)
        c.need_choice("offset_init", OFFSET_INITS)
        c.need_bool("rescale_init")
        c.need_choice("relaxation", RELAXATIONS)
        c.need_choice("temperature_schedule", TEMPERATURE_SCHEDULES)
        c.need_real("temperature_start", 0.0, math.inf, lo_open=True, hi_open=True)
        c.need_real("temperature_end", 0.0, math.inf, lo_open=True, hi_open=True)
        if isinstance(self.freeze_at, bool) or not is_real(self.freeze_at):
            raise c.bad("freeze_at", "must be a float fraction of total_steps or an int step", TypeError)
        c.normalize("freeze_at")  # a numpy integer is a step, a numpy float a fraction, as their plain kinds
        if isinstance(self.freeze_at, int):
            if not 0 <= self.freeze_at <= self.total_steps:
                raise c.bad("freeze_at", f"(an absolute step) must be in [0, total_steps={self.total_steps}]")
        elif math.isnan(self.freeze_at) or not 0.0 <= self.freeze_at <= 1.0:
            raise c.bad("freeze_at", "(a fraction of total_steps) must be in [0.0, 1.0]; pass an int for a step")
        c.need_bool("fold_at_freeze")
        c.need_real("alpha_lr", 0.0, math.inf, hi_open=True)
        c.need_real("alpha_l1", 0.0, math.inf, hi_open=True)
        if self.alpha_init is not None:
            c.need_real("alpha_init", -math.inf, math.inf, lo_open=True, hi_open=True)
        c.need_real("alpha_init_noise", 0.0, math.inf, hi_open=True)
        c.need_real("active_eps", 0.0, 0.5, hi_open=True)
        c.need_choice("soft_scale", SOFT_SCALES)
        if self.pool is not None:
            c.need_real("pool", 1.0, math.inf, hi_open=True)
        applies = {**dict.fromkeys(DYNADIAG_ONLY, ("dynadiag",)), **dict.fromkeys(DIAGHEUR_ONLY, ("diagheur",))}
        refuse_other_methods_options(c, self.method, applies)

    # ------------------------------------------------------------------------------------------------
    @property
    def freeze_step(self) -> int:
        """The optimizer step at which dynadiag hardens (``round(freeze_at * total_steps)`` for a fraction)."""
        if isinstance(self.freeze_at, int):
            return self.freeze_at
        return int(round(self.freeze_at * self.total_steps))

    @property
    def update_end_step(self) -> int:
        """The step after which topology updates stop: diagheur ``update_end``, dynadiag the freeze."""
        if self.method == "diagheur":
            return int(round(self.update_end * self.total_steps))
        return self.freeze_step

    def to_dict(self) -> dict[str, Any]:
        """Plain python (str/int/float/bool/None) for checkpoints loadable with ``weights_only=True``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DSTConfig:
        """Inverse of ``to_dict``; unknown keys raise ``ValueError``."""
        return config_from_dict(cls, d, "DSTConfig")

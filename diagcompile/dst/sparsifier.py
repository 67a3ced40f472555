"""``DiagSparsifier``: dynamic sparse training of diagonal layers, driven like an optimizer.

Usage (single process or DDP)::

    model = build_model()                                               # plain nn.Linear layers
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)   # no state yet
    sparsifier = DiagSparsifier(model, optimizer, DSTConfig(total_steps=T, method="dynadiag"),
                                filter_fn=lambda m, fqn: fqn != "head")
    # (DDP: torch.distributed initialized, construct the sparsifier first, then wrap in DDP.)
    # (LR schedulers: create them after the sparsifier, which adds the ``alpha`` param group; one created
    #  before it is refused, since it would not know the new group.)
    for x, y in loader:
        loss = loss_fn(model(x), y) + sparsifier.regularization_loss()
        loss.backward()
        optimizer.step()
        sparsifier.step()          # after every optimizer.step()
        optimizer.zero_grad()
    model = sparsifier.finalize()  # compact DiagLinear (k x D) everywhere, for inference and export

Construction converts the selected ``nn.Linear`` layers in place (``dynadiag``: ``DynaDiagLinear``;
``diagheur``: ``DiagLinear``) and rewires the optimizer: each dense weight is replaced in its param group by
the new values (same hyper-parameters); the importances ``alpha`` get their own group (``alpha_lr``, no
weight decay); biases are kept as the same ``Parameter`` objects. A frozen linear (``weight.requires_grad``
False) is converted too and stays frozen: its values (and ``alpha``) do not require a gradient and its topology
is not updated (dynadiag: it is hardened at construction, as with ``freeze_at=0``, to the top-k of its initial
``alpha``). Its weight may be in the optimizer or not: with the usual idiom, an optimizer built over the
trainable parameters only (``[p for p in model.parameters() if p.requires_grad]``), the frozen layer's values
(and ``alpha``) stay out of the optimizer, as its weight was (logged at INFO). A *trainable* weight missing from
the optimizer is refused (it would never train). To keep a frozen linear dense, exclude it with ``filter_fn``.

Probe scores without extra work for the caller: a topology update at step ``t`` needs ``dL/dV`` of every
candidate diagonal on the batch of step ``t``. On (and only on) the steps whose ``sparsifier.step()`` will
update the topology, a forward hook on each layer that needs it captures the input ``x`` and registers a
hook on the output that, during backward, adds ``diag_linear_dv(dy, x, arange(P))`` (a ``(P, D)`` float32
buffer, the size of the dense weight) to the layer's probe. Gradient accumulation (several
forward/backward per optimizer step) sums naturally. ``sparsifier.step()`` ranks candidates by
``||dV_p||`` and frees the buffers. So the only requirement is the order forward -> backward ->
``optimizer.step()`` -> ``sparsifier.step()``.

Distributed: with an initialized process group (or ``process_group=``), the constructor broadcasts the
initial layers from rank 0, probe ``dV`` buffers are all-reduced (mean: the gradient on the global batch)
before ranking, and every decision (new offsets, pool members, kept rows at the freeze) is broadcast from
rank 0, so every rank ends every update with identical offsets. ``alpha`` and ``V`` gradients are averaged
by DDP itself.

Checkpoints: the topology lives in the model's buffers (``offsets``, ``candidate_offsets``, ``keep_idx``,
``frozen_flag``, ``temperature``); ``state_dict()`` holds the step counter, the config and per-layer
statistics (tensors and plain python only: ``torch.load(weights_only=True)`` reads it). No decision uses
randomness after construction, so model + optimizer + sparsifier state (+ the data order) resume
bit-for-bit. Load order after building a fresh model, optimizer and sparsifier: any.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diagcompile.dst._base import FilterFn, SparsifierBase, select_linears
from diagcompile.dst.config import DSTConfig
from diagcompile.dst.criteria import drop_grow, probe_dv, probe_scores, refresh_pool
from diagcompile.dst.layers import DynaDiagLinear
from diagcompile.dst.optim import (
    add_alpha_group,
    check_in_optimizer,
    find_group,
    remap_rows_,
    remove_alpha_group,
    remove_param_,
    replace_param_,
    transfer_rows_,
    zero_state_,
)
from diagcompile.dst.relax import boundary_alpha, hard_topk
from diagcompile.dst.schedules import TemperatureSchedule
from diagcompile.functional import check_sparsity
from diagcompile.marking import get_sparse_mark
from diagcompile.modules import DiagLinear
from diagcompile.ops import (
    OFFSET_DTYPE,
    diag_shape,
    evenly_spaced_offsets,
    extract_diagonals,
    k_from_sparsity,
    topk_offsets,
)

__all__ = ["DiagSparsifier"]

logger = logging.getLogger("diagcompile.dst")

# 2: each layer's values take the weight's place in its param group (they were appended to it before): an
# optimizer state saved with a version-1 sparsifier state is laid out differently and would load into the
# wrong parameters.
_STATE_VERSION = 2
#: The scheduled freeze warns when it drops more than this share of a layer's alpha~ mass: most of it, i.e.
#: alpha~ never hardened (a temperature left high). Short runs and near-ties at the top-k boundary drop up to
#: ~20% (the CLI's 12-step test runs: 10-17%) and are normal; a fully soft layer drops ~1 - k/P.
_FREEZE_WARN_SHARE = 0.5


@dataclass
class _Layer:
    """Book-keeping for one converted layer."""

    fqn: str
    kind: str  # "dynadiag" | "diagheur"
    module: nn.Module
    n_out: int
    n_in: int
    k: int
    probe: Tensor | None = None
    offsets_changed: int = 0
    offsets_changed_total: int = 0
    updates: int = 0
    last_kept: Tensor | None = None
    handle: Any = None
    #: False for a frozen layer whose weight the optimizer was not given: its parameters stay out of it
    in_optimizer: bool = True

    @property
    def P(self) -> int:
        return diag_shape(self.n_out, self.n_in)[0]

    @property
    def D(self) -> int:
        return diag_shape(self.n_out, self.n_in)[1]

    @property
    def needs_probe(self) -> bool:
        return self.kind == "diagheur" or self.module.is_pool


class _ProbeHook:
    """The forward hook that captures a layer's probe ``dV`` on armed steps (see the module docstring).

    A module-level class rather than a closure so that a model under DST can be pickled (``torch.save(model)``,
    ``copy.deepcopy``). A copy is inert: the sparsifier trains the original model, so the copy's hook must not
    add its gradients to the original's probes (nor drag the sparsifier and optimizer into the pickle).
    """

    def __init__(self, sparsifier: DiagSparsifier, rec: _Layer) -> None:
        self.sparsifier: DiagSparsifier | None = sparsifier
        self.rec: _Layer | None = rec

    def __getstate__(self) -> dict[str, Any]:
        return {"sparsifier": None, "rec": None}

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        sp, rec = self.sparsifier, self.rec
        if sp is None or rec is None or not sp._armed or not torch.is_grad_enabled() or not output.requires_grad:
            return
        if not rec.module.values.requires_grad:
            return  # a frozen layer's topology is not updated (DiagSparsifier._topology_may_change)
        x = inputs[0].detach()

        def on_grad(dy: Tensor) -> None:
            with torch.no_grad():
                dv = probe_dv(dy.detach(), x, rec.P).float()
                rec.probe = dv if rec.probe is None else rec.probe.add_(dv)

        output.register_hook(on_grad)


class DiagSparsifier(SparsifierBase):
    """Dynamic sparse training of diagonal-sparse layers (DynaDiag or DiagHeur); see the module docstring.

    Args:
        model: the model; its selected ``nn.Linear`` layers are converted in place. Not yet DDP-wrapped.
        optimizer: built over ``model.parameters()`` and not stepped yet (no state), or ``None`` (no rewiring:
            useful for inference-only experiments; training with an optimizer the sparsifier does not know
            warns at the first topology update, since grown rows would keep another row's optimizer state).
        config: a ``DSTConfig``.
        filter_fn: ``filter_fn(module, fqn) -> bool`` rejects linears (keep heads/embeddings dense). Default
            selection: the ``mark_sparse``-marked linears if any are marked, else every ``nn.Linear``
            (except the internal projections of ``nn.MultiheadAttention``, which it reads by attribute: left
            dense with a warning).
        process_group: the group to keep in sync (default: the default group when initialized).

    Raises:
        TypeError: wrong argument types.
        ValueError: the optimizer has state or an LR scheduler already (dynadiag), a selected weight is tied, a
            selected trainable weight is not in the optimizer (a frozen one may be left out), a layer cannot
            reach its sparsity, a ``mark_sparse`` mark carries explicit offsets under dynadiag, or ``model`` is
            itself a linear / already DDP-wrapped. Every check runs before the model or the optimizer is changed.
    """

    _name = "DiagSparsifier"
    _config_cls = DSTConfig
    _fresh_optimizer_why = "it replaces the dense weights in the param groups"
    _initial_topology = "the initial diagonals"
    _fresh_state_blocks = "swap the dense weights for their diagonals in it"
    _tied_why = "converting it would untie them"
    _regrown = "diagonals"
    _finalized_layers = "compact DiagLinear"
    config: DSTConfig

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: DSTConfig,
        filter_fn: FilterFn | None = None,
        *,
        process_group: Any = None,
    ) -> None:
        self._init_common(model, optimizer, config, process_group)
        # T reaches temperature_end on the last soft step (freeze_step - 1): the freeze then folds the alpha~
        # that the last forward actually used at T_end.
        self._temperature = TemperatureSchedule(
            config.temperature_schedule,
            config.temperature_start,
            config.temperature_end,
            max(config.freeze_step - 1, 0),
        )

        # Validate everything first (every layer's k, its place in the optimizer, the scheduler check): an error
        # must leave the model and the optimizer as they were.
        selected = select_linears(model, filter_fn, self._name, self._tied_why)
        plans = [(fqn, linear, *self._layer_k(fqn, linear)) for fqn, linear in selected]
        self._check_optimizer(plans)
        self._warned_no_optimizer = False
        self._warned_freeze = False
        self._layers: list[_Layer] = [self._convert(*plan) for plan in plans]
        if not self._layers:
            warnings.warn("DiagSparsifier: no nn.Linear was selected; nothing will be sparse", stacklevel=2)
        if config.method == "dynadiag":
            alphas = [(rec.fqn, rec.module.alpha) for rec in self._layers if rec.in_optimizer]
            add_alpha_group(optimizer, [a for _, a in alphas], config.alpha_lr, [f"{f}.alpha" for f, _ in alphas])
        self._broadcast_initial_state()
        if config.method == "dynadiag":
            for rec in self._layers:
                rec.module.set_temperature(self._temperature(0))
            # Nothing has been trained whose function a fold would preserve, and folding the initial alpha~
            # (~ k/P for every candidate) would shrink the kept values P/k-fold below their init. A frozen layer
            # (values without gradient) freezes now too: its alpha cannot learn, and annealing or folding it
            # later would change a layer the caller froze.
            for rec in self._layers:
                if config.freeze_step == 0 or not rec.module.values.requires_grad:
                    self._freeze(rec, fold=False)
        for rec in self._layers:
            rec.last_kept = self._kept_offsets(rec).clone()
            if rec.needs_probe:
                # First in line: the probe needs the layer's own output, before a user's hook (carried over from
                # the replaced linear) can change it.
                rec.handle = rec.module.register_forward_hook(_ProbeHook(self, rec), prepend=True)
        self._armed = self._updates.is_update_step(1)
        if any(rec.needs_probe for rec in self._layers):
            self._warn_if_no_updates()
        logger.info(
            "DiagSparsifier(%s): %d layers, world size %d%s",
            config.method,
            len(self._layers),
            self._world,
            "".join(f"\n  {r.fqn}: {r.n_out}x{r.n_in} k={r.k}/{r.P} {r.module.extra_repr()}" for r in self._layers),
        )

    # ------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------
    def _layer_k(self, fqn: str, linear: nn.Linear) -> tuple[int, Tensor | None]:
        n_out, n_in = linear.weight.shape
        mark = get_sparse_mark(linear)
        if mark is not None and mark.offsets is not None:
            if self.config.method == "dynadiag":
                # Using only their count would silently train other diagonals than the ones marked.
                raise ValueError(
                    f"DiagSparsifier: layer '{fqn}' is marked with explicit offsets, but dynadiag learns its own "
                    "diagonals; explicit offsets are honoured by method='diagheur' (with update_end=0.0 they "
                    "stay fixed). Mark it with a sparsity instead, or use diagheur."
                )
            offsets = mark.resolve_offsets(linear.weight)
            return offsets.numel(), offsets
        sparsity = mark.sparsity if mark is not None else self.config.sparsity
        check_sparsity(sparsity, n_out, n_in, where=f"DiagSparsifier: layer '{fqn}' ({n_out}x{n_in})")
        return k_from_sparsity(n_out, n_in, sparsity), None

    def _check_optimizer(self, plans: list[tuple[str, nn.Linear, int, Tensor | None]]) -> None:
        """The optimizer checks of the construction, before anything changes (``replace_param_`` and
        ``add_alpha_group`` would otherwise fail or misbehave half-way through the layers)."""
        opt = self.optimizer
        if opt is None:
            return
        for fqn, linear, _, _ in plans:
            if not linear.weight.requires_grad and find_group(opt, linear.weight) is None:
                continue  # a frozen layer the optimizer was not given (the usual way to freeze): it stays out
            check_in_optimizer(opt, linear.weight, fqn, "DiagSparsifier")
        if self.config.method == "dynadiag" and any("initial_lr" in g for g in opt.param_groups):
            # torch's LR schedulers set initial_lr on every group when created; one made now holds a learning rate
            # per group and fails later ("zip() argument 2 is shorter ...") once the alpha group is added.
            raise ValueError(
                "DiagSparsifier: the optimizer already has an LR scheduler (its param groups carry 'initial_lr'): "
                "create the scheduler after DiagSparsifier, which adds the alpha param group (dynadiag)"
            )

    def _initial_offsets(self, weight: Tensor, count: int) -> Tensor:
        n_out, n_in = weight.shape
        P, _ = diag_shape(n_out, n_in)
        init = self.config.offset_init
        if init == "random":
            return torch.randperm(P)[:count].sort().values.to(weight.device, OFFSET_DTYPE)
        if init == "even":
            return evenly_spaced_offsets(n_out, n_in, count, device=weight.device)
        return topk_offsets(weight, count)

    def _convert(self, fqn: str, linear: nn.Linear, k: int, mark_offsets: Tensor | None) -> _Layer:
        cfg = self.config
        W = linear.weight.detach()
        n_out, n_in = W.shape
        P, _ = diag_shape(n_out, n_in)
        if cfg.method == "diagheur":
            offsets = mark_offsets if mark_offsets is not None else self._initial_offsets(W, k)
            values = extract_diagonals(W, offsets)
            if cfg.rescale_init:
                values = values * math.sqrt(P / k)
            new: nn.Module = DiagLinear._assemble(
                values.contiguous(), offsets, None, n_out, n_in, requires_grad=linear.weight.requires_grad
            )
            new.bias = linear.bias
        else:
            C = P if cfg.pool is None else min(P, math.ceil(cfg.pool * k))
            candidates = None if C == P else self._initial_offsets(W, C)
            new = DynaDiagLinear.from_linear(
                linear,
                k,
                candidates,
                alpha_init=cfg.alpha_init,
                alpha_init_noise=cfg.alpha_init_noise,
                rescale_init=cfg.rescale_init,
                relaxation=cfg.relaxation,
                temperature=cfg.temperature_start,
                active_eps=cfg.active_eps,
                soft_scale=cfg.soft_scale,
            )
        new.train(linear.training)
        # _check_optimizer let a weight outside the optimizer through only when frozen: nothing to rewire then
        in_optimizer = self.optimizer is None or find_group(self.optimizer, linear.weight) is not None
        if in_optimizer:
            replace_param_(self.optimizer, linear.weight, [new.values], [f"{fqn}.values"])
        else:
            logger.info(
                "DiagSparsifier: layer '%s' is frozen (weight.requires_grad=False) and its weight is not in the "
                "optimizer: converted with frozen values, which stay out of the optimizer",
                fqn,
            )
        self._set_module(fqn, new)
        return _Layer(fqn, cfg.method, new, n_out, n_in, k, in_optimizer=in_optimizer)

    # ------------------------------------------------------------------------------------------------
    # Distributed helpers
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _broadcast_initial_state(self) -> None:
        if self._world <= 1:
            return
        for rec in self._layers:
            self._agree(*(p.data for p in rec.module.parameters()), *rec.module.buffers())

    def _topology_may_change(self, rec: _Layer) -> bool:
        """Whether ``rec``'s topology is updated now: not for a frozen layer (its values would be dropped and
        regrown at zero, never to train). Warns once when training runs without the optimizer."""
        values = rec.module.values
        if not values.requires_grad:
            return False
        if self.optimizer is None and values.grad is not None and not self._warned_no_optimizer:
            self._warned_no_optimizer = True
            warnings.warn(
                "DiagSparsifier was built with optimizer=None but its layers are being trained (their values have "
                "gradients): a topology update moves the rows of the values but not their optimizer state, so a "
                "grown diagonal keeps the momentum of the one it replaced. Pass the optimizer to DiagSparsifier "
                "(None is for inference-only use).",
                stacklevel=5,  # the caller of step() (through _update_diagheur and its no_grad wrapper)
            )
        return True

    def _reduced_scores(self, rec: _Layer) -> Tensor | None:
        """``(P,)`` probe scores of the global batch, or ``None`` if no rank captured a probe."""
        dv = self._mean_over_ranks(rec.probe, (rec.P, rec.D), rec.module.values.device)
        if dv is None:
            warnings.warn(
                f"DiagSparsifier: no probe gradient was captured for '{rec.fqn}' at step {self._step + 1} "
                "(was forward/backward run through it before sparsifier.step()?); its topology update is skipped",
                stacklevel=3,
            )
            return None
        scores = probe_scores(dv)
        if not bool(torch.isfinite(scores).all()):
            # Mixed precision: GradScaler skipped this step's optimizer step (its gradients overflowed); the
            # scores would rank candidates by inf/NaN. Every rank sees the same reduced scores, so all skip.
            self._nonfinite.append(rec.fqn)
            return None
        return scores

    # ------------------------------------------------------------------------------------------------
    # Probe capture
    # ------------------------------------------------------------------------------------------------
    def _clear_probes(self) -> None:
        for rec in self._layers:
            rec.probe = None

    # ------------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------------
    @property
    def layers(self) -> dict[str, nn.Module]:
        """The converted layers by fully-qualified name."""
        return {rec.fqn: rec.module for rec in self._layers}

    def step(self) -> None:
        """Advance one optimizer step: topology update / pool refresh / freeze when due, then the temperature.

        Warns:
            UserWarning: once, at the first call beyond ``config.total_steps`` (the schedule is over: the topology
                and the temperature no longer change).
        """
        self._check_live("step")
        self._warn_if_past_end()
        if self._step == 0:
            self._before_first_step()
        t = self._step + 1
        cfg = self.config
        if cfg.method == "diagheur":
            if self._updates.is_update_step(t):
                self._update_diagheur(t)
        else:
            if self._updates.is_update_step(t):
                self._refresh_pools(t)
            if t == cfg.freeze_step:
                self._warn_if_freeze_drops_mass(t)
                self._freeze_all()
            T = self._temperature(t)
            for rec in self._layers:
                if not rec.module.frozen:
                    rec.module.set_temperature(T)
            self._track_churn()
        self._step = t
        self._clear_probes()
        self._armed = self._updates.is_update_step(t + 1)

    def _kept_offsets(self, rec: _Layer) -> Tensor:
        return rec.module.offsets if isinstance(rec.module, DiagLinear) else rec.module.kept_offsets()

    def _track_churn(self) -> None:
        for rec in self._layers:
            kept = self._kept_offsets(rec)
            if rec.last_kept is not None:
                changed = int((~torch.isin(kept, rec.last_kept)).sum())
                if changed:
                    rec.offsets_changed = changed
                    rec.offsets_changed_total += changed
            rec.last_kept = kept.clone()

    @torch.no_grad()
    def _update_diagheur(self, t: int) -> None:
        for rec in self._layers:
            n = self._updates.count_at(t, rec.k)
            if n == 0 or not self._topology_may_change(rec):
                continue
            scores = self._reduced_scores(rec)
            if scores is None:
                continue
            layer = rec.module
            norms = layer.values.detach().float().norm(dim=1)
            new_offsets, src = drop_grow(layer.offsets, norms, scores, n)
            new_offsets, src = new_offsets.to(layer.offsets.device), src.to(layer.offsets.device)
            self._agree(new_offsets, src)
            remap_rows_(layer.values, src, self.optimizer, fill=0.0)
            layer.offsets.copy_(new_offsets)
            rec.offsets_changed = int((src < 0).sum())
            rec.offsets_changed_total += rec.offsets_changed
            rec.updates += 1
            rec.last_kept = layer.offsets.clone()
            logger.debug("step %d: %s drop/grow n=%d, %d new offsets", t, rec.fqn, n, rec.offsets_changed)
        self._warn_nonfinite(t, "probe gradient")

    @torch.no_grad()
    def _refresh_pools(self, t: int) -> None:
        for rec in self._layers:
            layer = rec.module
            if not layer.is_pool or layer.frozen:
                continue
            n = self._updates.count_at(t, layer.num_candidates - rec.k)
            if n == 0 or not self._topology_may_change(rec):
                continue
            scores = self._reduced_scores(rec)
            if scores is None:
                continue
            a_new = boundary_alpha(layer.relaxation, layer.alpha, rec.k, float(layer.temperature))
            new_cand, src = refresh_pool(layer.candidate_offsets, layer.alpha, rec.k, scores, n)
            new_cand, src = new_cand.to(layer.values.device), src.to(layer.values.device)
            self._agree(new_cand, src)
            remap_rows_(layer.values, src, self.optimizer, fill=0.0)
            remap_rows_(layer.alpha, src, self.optimizer, fill=a_new)
            layer.candidate_offsets.copy_(new_cand)
            rec.updates += 1
            logger.debug("step %d: %s pool refresh: %d newcomers", t, rec.fqn, int((src < 0).sum()))
        self._warn_nonfinite(t, "probe gradient")

    def _dropped_shares(self) -> dict[str, float]:
        """Per layer not yet frozen: the share of its ``alpha~`` mass that a freeze now (hard top-k) drops."""
        diag = self.diagnostics()
        return {
            fqn: d["mass_outside_topk"] / max(d["sum_alpha_tilde"], 1e-12) for fqn, d in diag.items() if not d["frozen"]
        }

    def _warn_if_freeze_drops_mass(self, t: int) -> None:
        """Warn (once per sparsifier) when the scheduled freeze at step ``t`` drops more than
        ``_FREEZE_WARN_SHARE`` of a layer's ``alpha~`` mass: ``alpha~`` did not harden (a temperature that stays
        high, a schedule too short for ``alpha`` to separate), so the freeze changes the model's function
        as a premature ``finalize()`` would (``_warn_if_soft``), with no warning from there."""
        if self._warned_freeze:
            return
        share = self._dropped_shares()
        bad = {fqn: v for fqn, v in share.items() if v > _FREEZE_WARN_SHARE}
        if not bad:
            return
        self._warned_freeze = True
        worst = max(bad, key=bad.__getitem__)
        cfg = self.config
        warnings.warn(
            f"{self._name}: the freeze at step {t} drops up to {100 * bad[worst]:.1f}% of a layer's alpha~ mass "
            f"('{worst}'); {len(bad)} layer(s) drop more than {100 * _FREEZE_WARN_SHARE:.0f}%: "
            + ", ".join(f"'{fqn}' {100 * v:.1f}%" for fqn, v in bad.items())
            + f". alpha~ had not hardened (temperature {cfg.temperature_schedule} from {cfg.temperature_start:g} "
            f"to {cfg.temperature_end:g}), so the hard top-k changes the model's function (expect a loss jump). "
            f"Lower temperature_end, use a decaying temperature_schedule, or freeze later (freeze_at) (warned once)",
            stacklevel=3,  # the caller of step()
        )

    def _warn_if_soft(self) -> None:
        """Warn, with the ``alpha~`` mass a hard top-k drops, when finalize freezes layers that are still soft."""
        share = self._dropped_shares()
        if not share:
            return
        worst = max(share, key=share.__getitem__)
        warnings.warn(
            f"{self._name}.finalize() after {self._step} step() call(s), before DynaDiag's freeze at step "
            f"{self.config.freeze_step} (total_steps={self.config.total_steps}): {len(share)} layer(s) are still "
            f"soft, and the hard top-k drops up to {100 * share[worst]:.1f}% of a layer's alpha~ mass "
            f"('{worst}'), so the finalized model computes a different function (expect lower accuracy). "
            f"Call step() once per optimizer.step() and set total_steps to the number of optimizer steps "
            f"(not micro-batches), or set freeze_at earlier",
            stacklevel=4,  # the caller of finalize() (through finalize and its no_grad wrapper)
        )

    @torch.no_grad()
    def _freeze(self, rec: _Layer, fold: bool) -> bool:
        """Freeze ``rec``'s layer; whether it was not frozen yet."""
        layer = rec.module
        if layer.frozen:
            return False
        keep = hard_topk(layer.alpha, rec.k)
        self._agree(keep)
        layer.freeze_(fold=fold, keep_idx=keep)
        # alpha keeps a zero gradient (see DynaDiagLinear); with zero momentum no optimizer moves it.
        zero_state_(self.optimizer, layer.alpha)
        return True

    @torch.no_grad()
    def _freeze_all(self, fold: bool | None = None) -> None:
        fold = self.config.fold_at_freeze if fold is None else fold
        froze = sum(self._freeze(rec, fold) for rec in self._layers)
        if froze:  # not from a finalize() after the scheduled freeze: nothing froze then
            logger.info("step %d: dynadiag freeze: %d layers now train values only", self._step + 1, froze)

    # ------------------------------------------------------------------------------------------------
    # Loss term, diagnostics
    # ------------------------------------------------------------------------------------------------
    def regularization_loss(self) -> Tensor:
        """``alpha_l1 * sum |alpha|`` over the layers not yet frozen (a zero tensor when off)."""
        self._check_live("regularization_loss")
        params = [rec.module.alpha for rec in self._layers if rec.kind == "dynadiag" and not rec.module.frozen]
        device = params[0].device if params else next(iter(self.model.parameters()), torch.zeros(())).device
        if self.config.alpha_l1 == 0 or not params:
            return torch.zeros((), device=device)
        return self.config.alpha_l1 * sum(p.abs().sum() for p in params)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Per layer (by fqn): ``k``, ``k_eff`` (candidates with ``alpha~ > active_eps``, the ones the forward
        computes with), ``k_half`` (``alpha~ >= 1/2``), ``sum_alpha_tilde``, ``mass_outside_topk`` (the part of
        ``sum_alpha_tilde`` outside the hard top-k: what a freeze now would drop), ``temperature``, ``soft_gain``
        (dynadiag's ``g``; 1 unless ``soft_scale="rms"``), ``candidates``
        (``C``), ``offsets_changed`` (hard top-k offsets changed by the most recent change; total in
        ``offsets_changed_total``), ``updates``, ``frozen`` (0/1), ``memory_bytes`` (parameters + optimizer
        state). DiagHeur layers are hard masks: ``k_eff = sum_alpha_tilde = k``, ``temperature = 0``, and
        ``frozen`` once the updates have ended.
        """
        out: dict[str, dict[str, float]] = {}
        for rec in self._layers:
            layer = rec.module
            d: dict[str, float] = {"k": float(rec.k), "P": float(rec.P)}
            if isinstance(layer, DynaDiagLinear):
                at = layer.alpha_tilde().detach().double()
                top = at.index_select(0, layer.current_topk())
                d.update(
                    k_eff=float((at > layer.active_eps).sum()),
                    k_half=float((at >= 0.5).sum()),
                    sum_alpha_tilde=float(at.sum()),
                    mass_outside_topk=float(at.sum() - top.sum()),
                    temperature=0.0 if layer.frozen else float(layer.temperature),
                    soft_gain=layer.soft_gain(),
                    candidates=float(layer.num_candidates),
                    frozen=float(layer.frozen),
                )
            else:
                d.update(
                    k_eff=float(rec.k),
                    k_half=float(rec.k),
                    sum_alpha_tilde=float(rec.k),
                    mass_outside_topk=0.0,
                    temperature=0.0,
                    soft_gain=1.0,
                    candidates=float(rec.k),
                    frozen=float(self._step >= self._updates.end),
                )
            d.update(
                offsets_changed=float(rec.offsets_changed),
                offsets_changed_total=float(rec.offsets_changed_total),
                updates=float(rec.updates),
                memory_bytes=float(self._layer_bytes(rec)),
            )
            out[rec.fqn] = d
        return out

    def log(self, level: int = logging.INFO) -> dict[str, dict[str, float]]:
        """Log ``diagnostics()`` (one line per layer on the ``diagcompile.dst`` logger) and return them."""
        diag = self.diagnostics()
        for fqn, d in diag.items():
            logger.log(
                level,
                "step %d %s: k=%d k_eff=%d k_half=%d sum_alpha~=%.4g T=%.4g changed=%d (total %d) frozen=%d mem=%dB",
                self._step,
                fqn,
                d["k"],
                d["k_eff"],
                d["k_half"],
                d["sum_alpha_tilde"],
                d["temperature"],
                d["offsets_changed"],
                d["offsets_changed_total"],
                d["frozen"],
                d["memory_bytes"],
            )
        return diag

    # ------------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, config and per-layer statistics: tensors and plain python only.

        The topology itself is in the model's buffers (save ``model.state_dict()`` next to this).
        """
        return {
            "version": _STATE_VERSION,
            "kind": "diag",
            "step": self._step,
            "finalized": self._finalized,
            "config": self.config.to_dict(),
            "layers": {
                rec.fqn: {
                    "kind": rec.kind,
                    "k": rec.k,
                    "offsets_changed": rec.offsets_changed,
                    "offsets_changed_total": rec.offsets_changed_total,
                    "updates": rec.updates,
                    "last_kept": None if rec.last_kept is None else rec.last_kept.detach().cpu().clone(),
                }
                for rec in self._layers
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()`` into a sparsifier built the same way (same model, config).

        Raises ``ValueError`` naming what differs (config fields, layers, k).
        """
        self._check_live("load_state_dict")
        kind = state_dict.get("kind", "diag")  # states saved before the key existed are DiagSparsifier states
        if kind != "diag":
            of = {"mask": "it is a MaskSparsifier state"}.get(kind, f"kind {kind!r}")
            raise ValueError(f"not a DiagSparsifier state ({of})")
        if state_dict.get("version") == 1:
            raise ValueError(
                "this DiagSparsifier state was saved by an earlier diagcompile (state version 1), which put each "
                "layer's values at the end of its optimizer param group; this version puts them in the weight's "
                "place, so an optimizer state saved with it would load into the wrong parameters. Finish that run "
                "with the diagcompile that started it, or start it over"
            )
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported DiagSparsifier state version {state_dict.get('version')!r}")
        if state_dict.get("finalized"):
            raise ValueError("this state was saved after finalize(); it cannot resume training")
        self._check_saved_config(self.config.to_dict(), dict(state_dict["config"]))
        saved = state_dict["layers"]
        here = {rec.fqn: rec for rec in self._layers}
        self._check_saved_layers(saved, here)
        for fqn, s in saved.items():
            rec = here[fqn]
            if s["kind"] != rec.kind or s["k"] != rec.k:
                raise ValueError(f"layer '{fqn}': saved {s['kind']} k={s['k']}, here {rec.kind} k={rec.k}")
        for fqn, s in saved.items():
            rec = here[fqn]
            rec.offsets_changed = int(s["offsets_changed"])
            rec.offsets_changed_total = int(s["offsets_changed_total"])
            rec.updates = int(s["updates"])
            lk = s["last_kept"]
            rec.last_kept = None if lk is None else lk.to(self._kept_offsets(rec).device)
        self._step = int(state_dict["step"])
        if self.config.method == "dynadiag":
            T = self._temperature(self._step)
            for rec in self._layers:
                rec.module.set_temperature(T)
        self._clear_probes()
        self._armed = self._updates.is_update_step(self._step + 1)

    # ------------------------------------------------------------------------------------------------
    # Finalize
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self, *, drop_alpha_group: bool = False) -> nn.Module:
        """Replace every DST layer by a compact ``DiagLinear`` (``k x D`` values, sorted offsets); return the model.

        Unfrozen DynaDiag layers are frozen first (hard top-k, folded). The optimizer, if any, follows: each
        layer's values are replaced by the compact ones with the kept rows of their state, and ``alpha``
        leaves the optimizer, so training can continue (fine-tuning) on the compact model. Hooks are removed;
        the sparsifier cannot step afterwards.

        Args:
            drop_alpha_group: also remove DynaDiag's (now empty) alpha param group, so the optimizer has the
                layout of one built afresh over the finalized model and its ``state_dict`` loads into such a
                one (fine-tuning resumed in a new process). Off by default: LR schedulers made before this
                call hold one value per group and most (LambdaLR, CyclicLR, ReduceLROnPlateau, ...) then fail;
                make them anew after it.

        DDP: dynadiag layers are replaced (new parameters, fewer buffers), so a ``DistributedDataParallel``
        wrapper made before ``finalize()`` cannot fine-tune the result (the ranks desync): wrap the finalized
        model in a fresh one (``ddp = DDP(ddp.module, ...)``). DiagHeur layers are kept as they are (the
        same ``DiagLinear`` objects), so its wrapper stays valid.

        Warns:
            UserWarning: DynaDiag layers were still soft (``step()`` was called fewer than ``freeze_step``
                times: ``total_steps`` larger than the optimizer steps run, or ``step()`` never called), so the
                hard top-k drops part of their ``alpha~`` mass and the model's function changes; the warning
                says how much.
            UserWarning: layers were replaced while ``torch.distributed`` is in use (a process group): a DDP
                wrapper made before ``finalize()`` must be replaced by a fresh one to fine-tune.
        """
        self._check_live("finalize")
        if self.config.method == "dynadiag":
            self._warn_if_soft()
            self._freeze_all()
        swapped = False
        for rec in self._layers:
            if rec.handle is not None:
                rec.handle.remove()
                rec.handle = None
            layer = rec.module
            if not isinstance(layer, DynaDiagLinear):
                continue
            compact = layer.to_diag_linear()
            compact.train(layer.training)
            if rec.in_optimizer:
                transfer_rows_(self.optimizer, layer.values, compact.values, layer.keep_idx)
            remove_param_(self.optimizer, layer.alpha)
            self._set_module(rec.fqn, compact)
            rec.module = compact
            swapped = True
        if drop_alpha_group and self.config.method == "dynadiag":
            remove_alpha_group(self.optimizer)
        self._finalized = True
        self._clear_probes()
        if swapped:
            self._warn_rewrap_ddp()
        return self.model

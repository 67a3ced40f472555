"""The baselines DynaDiag is measured against, behind the same API as ``DiagSparsifier``; and ``make_sparsifier``.

``MaskSparsifier`` trains ``nn.Linear`` layers under element masks (no diagonal kernel: the layers stay dense
matrices whose pruned entries are zero, as in the papers' own implementations)::

    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)          # fresh: no state yet
    sp = make_sparsifier(model, optimizer, "srigl", sparsity=0.9, total_steps=T, filter_fn=not_head)
    # (DDP: torch.distributed initialized, construct the sparsifier first, then wrap in DDP.)
    for x, y in loader:
        loss = loss_fn(model(x), y) + sp.regularization_loss()         # always 0 here (kept for the contract)
        loss.backward()
        optimizer.step()
        sp.step()                                                      # after every optimizer.step()
        optimizer.zero_grad()
    model = sp.finalize()             # plain nn.Linear layers with the pruned weights zeroed

Methods (``MaskConfig.method``; algorithms and defaults from the research digest of baselines):

* ``rigl`` / ``srigl`` (sparse-to-sparse, simulated with masks). The weights, their gradients and their
  optimizer state are kept masked: a hook on each weight masks its gradient during backward, and
  ``step()`` re-masks the weights and per-element optimizer state after the optimizer step (the reference
  PyTorch code does both). On the steps whose ``step()`` updates the topology (every ``update_every`` until
  ``T_end``) the same hook also captures the *dense* gradient (summed over the backward passes of that step,
  all-reduced over DDP ranks) that ranks the candidates to grow; no other step pays for it. As in the
  reference PyTorch trainers (not TF RigL), the optimizer step of an update step happens first and the
  topology update after it. New connections start at 0 with zero optimizer state; a weight dropped and
  regrown in the same update keeps its value and state. SRigL's ablated neurons lose their weights but keep
  a trained bias: constant units, not zero outputs (``MaskConfig.ablation`` says how to slice them away).
* ``nm-srste`` / ``nm-mask-decay`` / ``nm-structure-decay`` (dense-to-sparse: dense weights and optimizer
  state are kept). Every forward computes the N:M mask ``E`` of ``|W|`` (groups of ``M`` along the input
  dimension) and uses ``W * (E + beta (1 - E))`` (``beta = 0`` except under mask decay); see
  ``MaskConfig`` for the backward of each method. ``step()`` advances ``beta`` / the structure-decay frame
  and counts mask flips (SR-STE's "sparse architecture divergence").

Distributed: with an initialized process group, construction broadcasts every selected layer (weights,
bias, mask) from rank 0; dense gradients are all-reduced (mean) before ranking and every new mask (and
SRigL's ablated set) is broadcast from rank 0, so all ranks hold identical masks. N:M masks are functions
of the weights, which DDP keeps identical.

Checkpoints: the masks, ablated sets, fan-ins and statistics live in ``state_dict()`` (tensors and plain
python: ``torch.load(weights_only=True)`` reads it); ``model.state_dict()`` keeps the plain ``nn.Linear``
keys (``weight``, ``bias``). Nothing after construction draws random numbers, so model + optimizer +
sparsifier state resume bit-for-bit on CPU. Load order after building a fresh model, optimizer and
sparsifier: any.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diagcompile.dst._base import FilterFn, SparsifierBase, select_linears
from diagcompile.dst.config import METHODS as DST_METHODS
from diagcompile.dst.config import DSTConfig
from diagcompile.dst.mask_config import MASK_METHODS, MaskConfig
from diagcompile.dst.mask_rules import (
    choose_nm,
    erk_nnz,
    frame_at,
    mask_decay_beta,
    nm_mask,
    random_fan_in_mask,
    random_mask,
    rigl_drop_grow,
    srigl_fan_in,
    srigl_update,
    structure_decay_frames,
)
from diagcompile.dst.optim import _row_state_tensors, check_in_optimizer
from diagcompile.dst.sparsifier import DiagSparsifier
from diagcompile.functional import check_sparsity
from diagcompile.marking import get_sparse_mark
from diagcompile.ops import k_from_sparsity, kept_entries

__all__ = ["MaskSparsifier", "MaskedLinear", "make_sparsifier", "make_config", "config_class", "SPARSIFIER_METHODS"]

logger = logging.getLogger("diagcompile.dst")

_STATE_VERSION = 1

#: Every method ``make_sparsifier`` accepts: the diagonal methods, then the mask baselines.
SPARSIFIER_METHODS: tuple[str, ...] = tuple(DST_METHODS) + tuple(MASK_METHODS)


# ----------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------
class _NMWeight(torch.autograd.Function):
    """``W~ = W * s`` with ``s = E + beta (1 - E)``; backward ``dW = dW~ * (s or 1) + lam (1 - E) W``."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, keep: Tensor, beta: Tensor, lam: float, scaled: bool) -> Tensor:
        scale = torch.where(keep, torch.ones((), dtype=weight.dtype, device=weight.device), beta.to(weight.dtype))
        ctx.lam, ctx.scaled = lam, scaled
        ctx.save_for_backward(weight if lam else None, keep, scale if scaled else None)
        return weight * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, keep, scale = ctx.saved_tensors
        dw = grad * scale if ctx.scaled else grad
        if ctx.lam:
            dw = dw + ctx.lam * weight.masked_fill(keep, 0)
        return dw, None, None, None, None


class MaskedLinear(nn.Linear):
    """An ``nn.Linear`` trained under a mask by ``MaskSparsifier``; same parameters, same state-dict keys.

    ``mode="hard"`` (RigL, SRigL): the forward is ``F.linear``; the sparsifier keeps ``weight`` zero outside
    ``mask``. ``mode="nm"``: the forward recomputes the ``nm_n:nm_m`` mask ``E`` of ``|weight|`` and uses
    ``weight * (E + beta (1 - E))``; the backward is straight-through (``grad_scaled=False``) or the exact
    derivative (``True``), plus ``srste_lambda * (1 - E) * weight``.

    Buffers (not in ``state_dict``: ``MaskSparsifier.state_dict()`` holds them): ``mask`` ``(N_out, N_in)`` bool
    (hard: the topology; nm: the mask of the last ``MaskSparsifier.step()``) and ``beta`` (0-dim float32).
    """

    def __init__(
        self,
        linear: nn.Linear,
        mode: str,
        nm: tuple[int, int] = (0, 0),
        srste_lambda: float = 0.0,
        grad_scaled: bool = False,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a new weight
        if mode not in ("hard", "nm"):
            raise ValueError(f"MaskedLinear mode must be 'hard' or 'nm', got {mode!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        w = linear.weight
        self.register_buffer("mask", torch.ones(w.shape, dtype=torch.bool, device=w.device), persistent=False)
        self.register_buffer("beta", torch.zeros((), dtype=torch.float32, device=w.device), persistent=False)
        self.mode = mode
        self.nm_n, self.nm_m = nm
        self.srste_lambda, self.grad_scaled = float(srste_lambda), bool(grad_scaled)
        self.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., N_in) -> (..., N_out)``."""
        if self.mode == "nm":
            keep = nm_mask(self.weight, self.nm_n, self.nm_m)
            w = _NMWeight.apply(self.weight, keep, self.beta, self.srste_lambda, self.grad_scaled)
            return F.linear(x, w, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if self.mode == "nm":
            return f"{base}, {self.nm_n}:{self.nm_m}, beta={float(self.beta):.3g}"
        return f"{base}, density={float(self.mask.float().mean()):.4f}"


def _plain_linear(layer: MaskedLinear) -> nn.Linear:
    """A plain ``nn.Linear`` holding the same ``Parameter`` objects (no new allocation)."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    out.weight = layer.weight
    out.bias = layer.bias
    out.train(layer.training)
    return out


class _HeadWatch:
    """The forward hook of ``MaskSparsifier._watch_head``: tells the sparsifier which linear just ran.

    A copy or a pickle of the model (an EMA copy, ``torch.save(model)``) gets an inert hook: the watch is the
    sparsifier's own model's, and a closure could not be pickled at all.
    """

    __slots__ = ("sparsifier", "fqn")

    def __init__(self, sparsifier: MaskSparsifier | None, fqn: str) -> None:
        self.sparsifier, self.fqn = sparsifier, fqn

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.sparsifier is None:
            return
        # torch.utils.checkpoint re-runs the forwards during backward, the last segment first: those calls say
        # nothing about the forward's order. (is_compiling first: Dynamo cannot trace the C query; a compiled
        # backward does not call module hooks.)
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            return
        self.sparsifier._last_linear = self.fqn

    def __reduce__(self) -> tuple:
        return (_HeadWatch, (None, self.fqn))

    def __deepcopy__(self, memo: dict) -> _HeadWatch:
        return _HeadWatch(None, self.fqn)


# ----------------------------------------------------------------------------------------------------
# The sparsifier
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """Book-keeping for one masked layer."""

    fqn: str
    #: the training layer; after finalize() it is out of the model, but its mask stays readable (diagnostics)
    masked: MaskedLinear
    target_nnz: int
    protected: bool = False  # SRigL: never ablated (heads)
    fan_in: int = 0  # SRigL's constant fan-in k
    ablated: Tensor | None = None  # SRigL: (N_out,) bool
    nm: tuple[int, int] = (0, 0)  # the target N:M
    frames: list[int] = field(default_factory=list)  # N per structure-decay frame (else [N])
    dense_grad: Tensor | None = None
    ever: Tensor | None = None  # union of all masks so far (ITOP)
    changed: int = 0
    changed_total: int = 0
    updates: int = 0
    handle: Any = None
    #: the layer in the model: ``masked`` while training, the plain ``nn.Linear`` after ``finalize()``
    module: nn.Linear = field(init=False)

    def __post_init__(self) -> None:
        self.module = self.masked

    @property
    def shape(self) -> tuple[int, int]:
        return self.masked.out_features, self.masked.in_features


class MaskSparsifier(SparsifierBase):
    """RigL, SRigL and N:M (SR-STE, mask decay, structure decay) training of ``nn.Linear`` layers.

    The same contract as ``DiagSparsifier`` (see the module docstring), so a training harness swaps one for
    the other by method name (``make_sparsifier``).

    Args:
        model: the model; its selected ``nn.Linear`` layers become ``MaskedLinear`` (same parameters, same
            state-dict keys). Not yet DDP-wrapped.
        optimizer: built over ``model.parameters()`` and not stepped yet (no state), or ``None`` (the
            sparsifier then manages no optimizer state: for inference-only use or a stateless optimizer;
            training with another optimizer warns at the first ``step()``).
        config: a ``MaskConfig``.
        filter_fn: ``filter_fn(module, fqn) -> bool`` rejects linears (keep heads/embeddings dense). Default
            selection: the ``mark_sparse``-marked linears if any are marked (their mark's sparsity applies),
            else every ``nn.Linear`` (except the internal projections of ``nn.MultiheadAttention``, left dense
            with a warning).
        process_group: the group to keep in sync (default: the default group when initialized).

    Raises:
        TypeError: wrong argument types.
        ValueError: the optimizer has state, a selected weight is tied, frozen (``requires_grad=False``) or not
            in the optimizer, a layer cannot reach its sparsity / N:M pattern, a mark carries explicit diagonal
            offsets (or, with ``distribution="erk"``, a sparsity other than ``config.sparsity``), or ``model`` is
            itself a linear / already DDP-wrapped. Every check runs before any layer changes.
    """

    _name = "MaskSparsifier"
    _config_cls = MaskConfig
    _fresh_optimizer_why = "the masks must apply to the optimizer state from the start"
    _initial_topology = "the initial random masks"
    _fresh_state_blocks = "apply its weight masks to the optimizer state from the first step"
    _tied_why = "masking it would also prune the entries the other module(s) use"
    _regrown = "connections"
    _finalized_layers = "plain nn.Linear"
    config: MaskConfig

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: MaskConfig,
        filter_fn: FilterFn | None = None,
        *,
        process_group: Any = None,
    ) -> None:
        self._init_common(model, optimizer, config, process_group)

        plans = self._plan(model, filter_fn)  # validates everything before any layer changes
        gen = None if config.seed is None else torch.Generator().manual_seed(config.seed)
        self._layers: list[_Layer] = [self._convert(*plan, gen) for plan in plans]
        if not self._layers:
            warnings.warn("MaskSparsifier: no nn.Linear was selected; nothing will be sparse", stacklevel=2)
        self._broadcast_initial_state()
        self._set_schedule(0)
        for rec in self._layers:
            if config.is_nm:
                rec.masked.mask.copy_(self._nm_mask_now(rec))
            rec.ever = rec.masked.mask.clone()
            if not config.is_nm:
                rec.handle = rec.masked.weight.register_hook(self._make_grad_hook(rec))
        self._armed = not config.is_nm and self._updates.is_update_step(1)
        if not config.is_nm and self._layers:
            self._warn_if_no_updates()
        self._head: str | None = None  # SRigL: the output layer, decided at the first update
        self._last_linear: str | None = None
        self._head_hooks: list[Any] = []
        if config.method == "srigl" and config.ablation and self._layers:
            self._watch_head(model)
        logger.info(
            "MaskSparsifier(%s): %d layers, world size %d%s",
            config.method,
            len(self._layers),
            self._world,
            "".join(f"\n  {r.fqn}: {r.module.extra_repr()} target_nnz={r.target_nnz}" for r in self._layers),
        )

    # ------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------
    def _watch_head(self, model: nn.Module) -> None:
        """Record which ``nn.Linear`` runs last in the forward: SRigL never ablates that layer's neurons.

        Ablating an output neuron of the classifier / LM head removes a class, so the head is protected. It is
        the last linear the forward *runs*, not the last one registered: a head defined before the body, or an
        ``nn.MultiheadAttention`` registered after the head (whose ``out_proj`` its forward never calls), would
        make the registration order name a hidden layer and leave the head unprotected. One attribute write per
        linear call until the first update decides (``_decide_head``) and removes the hooks.
        """
        # Fallback if no forward ran before the first update: the last linear registered, MHA's internals aside.
        inner = {f"{fqn}.out_proj" for fqn, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
        self._fallback_head = None
        for fqn, m in model.named_modules():
            if isinstance(m, nn.Linear):
                self._head_hooks.append(m.register_forward_hook(_HeadWatch(self, fqn)))
                if fqn not in inner:
                    self._fallback_head = fqn

    def _decide_head(self) -> None:
        """Fix the protected output layer (once) and stop watching the forward."""
        if self._head is None:
            self._head = self._last_linear or self._fallback_head or ""
        self._unwatch_head()
        for rec in self._layers:
            if rec.fqn == self._head:
                rec.protected = True

    def _unwatch_head(self) -> None:
        for h in self._head_hooks:
            h.remove()
        self._head_hooks = []

    def _plan(self, model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, nn.Linear, int, tuple, bool]]:
        cfg = self.config
        selected = select_linears(model, filter_fn, self._name, self._tied_why, stacklevel=4)  # (through _plan)
        shapes, budgets = [], []
        for fqn, linear in selected:
            n_out, n_in = linear.weight.shape
            mark = get_sparse_mark(linear)
            if mark is not None and mark.offsets is not None:
                raise ValueError(
                    f"MaskSparsifier: layer '{fqn}' is marked with explicit diagonal offsets, which only the "
                    f"diagonal methods can honour ({cfg.method} learns element masks)"
                )
            s = mark.sparsity if mark is not None else cfg.sparsity
            where = f"MaskSparsifier: layer '{fqn}' ({n_out}x{n_in})"
            if cfg.is_nm and cfg.nm_n is not None:
                nnz = n_out * n_in * cfg.nm_n // cfg.nm_m  # an explicit N:M fixes the density; sparsity is unused
            elif cfg.budget == "diagonal":
                try:
                    check_sparsity(s, n_out, n_in, where=where)
                except ValueError as e:
                    raise ValueError(f"{e}. {_diagonal_budget_limit(cfg, n_out, n_in)}") from None
                nnz = k_from_sparsity(n_out, n_in, s) * min(n_out, n_in)
            else:
                if not 0.0 <= s < 1.0:
                    raise ValueError(f"{where}: sparsity={s} must be in [0, 1)")
                nnz = kept_entries(n_out * n_in, s)
                if nnz < 1:
                    raise ValueError(f"{where}: sparsity={s} leaves no weight (budget='floor')")
            if not linear.weight.requires_grad:
                # Refused rather than skipped: a layer the caller selected (or marked) silently left dense would be
                # a wrong answer, and the masks need a gradient hook on the weight.
                raise ValueError(
                    f"MaskSparsifier: the weight of '{fqn}' has requires_grad=False (a frozen layer), which a mask "
                    "method cannot train; exclude the layer with filter_fn"
                )
            check_in_optimizer(self.optimizer, linear.weight, fqn, "MaskSparsifier")
            shapes.append((n_out, n_in))
            budgets.append(nnz)
        if cfg.distribution == "erk" and selected:
            # ERK sets every layer's density itself (from the total budget): a mark's own sparsity would be ignored.
            own = [
                f"'{fqn}' ({mark.sparsity:g})"
                for fqn, linear in selected
                if (mark := get_sparse_mark(linear)) is not None and mark.sparsity != cfg.sparsity
            ]
            if own:
                raise ValueError(
                    f"MaskSparsifier: distribution='erk' redistributes the total budget over the layers, so it would "
                    f"ignore the per-layer sparsity of the mark_sparse marks on {', '.join(own)} (sparsity="
                    f"{cfg.sparsity:g}); use distribution='uniform' to train every layer at its mark's sparsity, or "
                    f"drop the per-layer sparsities (mark those layers at sparsity={cfg.sparsity:g}, the config's) "
                    f"to let ERK set the densities"
                )
            budgets = erk_nnz(shapes, budgets, cfg.erk_power)

        module_names = {fqn for fqn, _ in model.named_modules()}
        unknown = sorted(set(cfg.no_ablation) - module_names)
        if unknown:
            raise ValueError(f"MaskConfig.no_ablation names modules the model does not have: {unknown}")
        # The output layer is protected too; which layer that is, the first forward tells (_watch_head).
        protected = set(cfg.no_ablation)

        plans = []
        for (fqn, linear), (n_out, n_in), nnz in zip(selected, shapes, budgets):
            where = f"MaskSparsifier: layer '{fqn}' ({n_out}x{n_in})"
            nm: tuple[int, int] = (0, 0)
            if cfg.method == "srigl" and nnz // n_out < 1:
                raise ValueError(f"{where}: a budget of {nnz} weights leaves no constant fan-in for {n_out} neurons")
            if cfg.is_nm:
                try:
                    if cfg.nm_n is not None and cfg.nm_m is not None:
                        choose_nm(n_in, 0.5, m=cfg.nm_m)  # validates M against the fan-in
                        nm = (cfg.nm_n, cfg.nm_m)
                    else:
                        nm = choose_nm(n_in, nnz / (n_out * n_in), cfg.nm_max_m, cfg.nm_m)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                target = nnz / (n_out * n_in)
                if cfg.nm_n is None and abs(nm[0] / nm[1] - target) > 0.2 * target:
                    # The closest N:M can be far from the requested density (1:4 for 90%): a results table
                    # filed under the requested sparsity would mislead.
                    warnings.warn(
                        f"{where}: the closest N:M pattern to density {target:.4f} is {nm[0]}:{nm[1]} (density "
                        f"{nm[0] / nm[1]:.4f}); this layer trains at that density. Allow a larger M (nm_max_m, "
                        f"nm_m) to get closer",
                        stacklevel=4,
                    )
            plans.append((fqn, linear, nnz, nm, fqn in protected))
        return plans

    def _convert(
        self, fqn: str, linear: nn.Linear, nnz: int, nm: tuple[int, int], protected: bool, gen: torch.Generator | None
    ) -> _Layer:
        cfg = self.config
        n_out, n_in = linear.weight.shape
        if cfg.is_nm:
            frames = structure_decay_frames(*nm) if cfg.method == "nm-structure-decay" else [nm[0]]
            new = MaskedLinear(
                linear,
                "nm",
                (frames[0], nm[1]),
                srste_lambda=cfg.srste_lambda if cfg.method == "nm-srste" else 0.0,
                grad_scaled=cfg.method == "nm-mask-decay" and cfg.mask_decay_grad == "scaled",
            )
            rec = _Layer(fqn, new, nnz, protected, nm=nm, frames=frames)
        else:
            new = MaskedLinear(linear, "hard")
            rec = _Layer(fqn, new, nnz, protected)
            if cfg.method == "srigl":
                rec.fan_in = nnz // n_out
                mask = random_fan_in_mask(n_out, n_in, rec.fan_in, gen)
                rec.ablated = torch.zeros(n_out, dtype=torch.bool, device=linear.weight.device)
            else:
                mask = random_mask(n_out, n_in, nnz, gen)
            mask = mask.to(linear.weight.device)
            new.mask.copy_(mask)
            with torch.no_grad():
                w = linear.weight
                if cfg.rescale_init:
                    fan = mask.sum(1, keepdim=True).to(torch.float64)
                    scale = torch.where(fan > 0, (n_in / fan.clamp_min(1)).sqrt(), torch.zeros_like(fan))
                    w.mul_(scale.to(w.dtype))
                w.masked_fill_(~mask, 0)
        self._set_module(fqn, new)
        return rec

    # ------------------------------------------------------------------------------------------------
    # Distributed helpers
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _broadcast_initial_state(self) -> None:
        if self._world <= 1:
            return
        for rec in self._layers:
            self._agree(*(p.data for p in rec.masked.parameters()), rec.masked.mask)

    def _reduced_grad(self, rec: _Layer) -> Tensor | None:
        """The dense gradient of the global batch (mean over ranks), or ``None`` if no rank captured one."""
        w = rec.masked.weight
        g = self._mean_over_ranks(rec.dense_grad, tuple(w.shape), w.device)
        if g is None:
            warnings.warn(
                f"MaskSparsifier: no dense gradient was captured for '{rec.fqn}' at step {self._step + 1} (was "
                "forward/backward run through it before sparsifier.step()?); its topology update is skipped",
                stacklevel=3,
            )
            return None
        if not bool(torch.isfinite(g).all()):  # GradScaler skipped the step: growth would rank inf/NaN
            self._nonfinite.append(rec.fqn)
            return None
        return g

    # ------------------------------------------------------------------------------------------------
    # Gradient capture and masking
    # ------------------------------------------------------------------------------------------------
    def _make_grad_hook(self, rec: _Layer) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            if self._armed:
                with torch.no_grad():
                    d = grad.detach().float()
                    rec.dense_grad = d.clone() if rec.dense_grad is None else rec.dense_grad.add_(d)
            return grad.masked_fill(~rec.masked.mask, 0)

        return hook

    @torch.no_grad()
    def _mask_param_(self, rec: _Layer, mask: Tensor, zero: Tensor | None = None) -> None:
        """Zero the weight, its gradient and its per-element optimizer state outside ``mask`` (and on ``zero``)."""
        off = ~mask if zero is None else (~mask | zero)
        w = rec.masked.weight
        w.masked_fill_(off, 0)
        if w.grad is not None:
            w.grad.masked_fill_(off, 0)
        for _, t in _row_state_tensors(self.optimizer, w):
            t.masked_fill_(off, 0)

    def _clear_grads(self) -> None:
        for rec in self._layers:
            rec.dense_grad = None

    # ------------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------------
    @property
    def layers(self) -> dict[str, nn.Module]:
        """The masked layers by fully-qualified name (after ``finalize()``: the plain ``nn.Linear`` layers)."""
        return {rec.fqn: rec.module for rec in self._layers}

    def _nm_n_at(self, rec: _Layer, step: int) -> int:
        if self.config.method != "nm-structure-decay":
            return rec.nm[0]
        return rec.frames[frame_at(step, len(rec.frames), self.config.update_end_step)]

    def _nm_mask_now(self, rec: _Layer) -> Tensor:
        return nm_mask(rec.masked.weight, rec.masked.nm_n, rec.masked.nm_m)

    def _set_schedule(self, step: int) -> None:
        """N:M: ``beta`` and the structure-decay ``N`` that the forward after ``step`` steps uses."""
        cfg = self.config
        if not cfg.is_nm:
            return
        beta = 0.0
        if cfg.method == "nm-mask-decay":
            beta = mask_decay_beta(step, cfg.mask_decay_shape, cfg.decay_c, cfg.update_end_step)
        for rec in self._layers:
            rec.masked.beta.fill_(beta)
            rec.masked.nm_n = self._nm_n_at(rec, step)

    def step(self) -> None:
        """Advance one optimizer step: re-mask (RigL/SRigL), topology update when due / N:M schedule."""
        self._check_live("step")
        self._warn_if_past_end()
        if self._step == 0:
            self._before_first_step()
            self._warn_if_optimizer_unknown()
        t = self._step + 1
        if self.config.is_nm:
            self._set_schedule(t)
            self._track_nm(t)
        else:
            for rec in self._layers:
                self._mask_param_(rec, rec.masked.mask)
            if self._updates.is_update_step(t):
                self._update(t)
        self._step = t
        self._clear_grads()
        self._armed = not self.config.is_nm and self._updates.is_update_step(t + 1)

    def _warn_if_optimizer_unknown(self) -> None:
        """Warn (at the first step) when built with ``optimizer=None`` but the layers are being trained."""
        if self.optimizer is not None or not any(rec.masked.weight.grad is not None for rec in self._layers):
            return
        what = (
            "finalize() cannot zero the pruned weights' optimizer state"
            if self.config.is_nm
            else "a regrown connection keeps the stale optimizer state (momentum, Adam moments) of its last "
            "active period, and dropped ones keep theirs"
        )
        warnings.warn(
            f"MaskSparsifier was built with optimizer=None but its layers are being trained (their weights have "
            f"gradients): {what}. Pass the optimizer you train with to the sparsifier (build the optimizer "
            f"first; None is for inference-only use or a stateless optimizer such as SGD without momentum).",
            stacklevel=3,
        )

    @torch.no_grad()
    def _track_nm(self, t: int) -> None:
        for rec in self._layers:
            new = self._nm_mask_now(rec)
            rec.changed = int((new != rec.masked.mask).sum())
            rec.changed_total += rec.changed
            rec.masked.mask.copy_(new)
            rec.ever |= new

    @torch.no_grad()
    def _update(self, t: int) -> None:
        cfg = self.config
        if self._head_hooks:
            self._decide_head()
        for rec in self._layers:
            layer = rec.masked
            old = layer.mask.clone()
            if cfg.method == "rigl":
                n = self._updates.count_at(t, int(old.sum()))
                if n == 0:
                    continue
                grad = self._reduced_grad(rec)
                if grad is None:
                    continue
                new = rigl_drop_grow(old, layer.weight, grad, n)
                self._agree(new)
            else:
                grad = self._reduced_grad(rec)
                if grad is None:
                    continue
                dec = srigl_update(
                    old,
                    layer.weight,
                    grad,
                    fraction=self._updates.fraction_at(t),
                    target_nnz=rec.target_nnz,
                    gamma_sal=cfg.gamma_sal,
                    ablation=cfg.ablation and not rec.protected,
                )
                new, ablated = dec.mask, dec.ablated
                self._agree(new, ablated)
                rec.ablated = ablated
                rec.fan_in = srigl_fan_in(rec.target_nnz, layer.in_features, int((~ablated).sum()))
            grown = new & ~old
            # New connections: weight 0, optimizer state 0 (already so, since inactive entries are re-masked every
            # step; explicit so that the rule does not rest on that).
            self._mask_param_(rec, new, zero=grown)
            layer.mask.copy_(new)
            rec.ever |= new
            rec.changed = int(grown.sum())
            rec.changed_total += rec.changed
            rec.updates += 1
            logger.debug("step %d: %s %d connections regrown", t, rec.fqn, rec.changed)
        self._warn_nonfinite(t, "dense gradient")

    # ------------------------------------------------------------------------------------------------
    # Loss term, diagnostics
    # ------------------------------------------------------------------------------------------------
    def regularization_loss(self) -> Tensor:
        """A zero tensor: no baseline adds a loss term (SR-STE's decay acts on the gradient). Kept so that the
        training loop is the same for every sparsifier."""
        self._check_live("regularization_loss")
        device = next(iter(self.model.parameters()), torch.zeros(())).device
        return torch.zeros((), device=device)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Per layer (by fqn), as floats:

        * ``nnz`` / ``numel`` / ``density``: active entries of the current hard mask (N:M: of the mask the next
          forward uses), ``target_nnz`` / ``target_density``: the budget (N:M: ``N / M`` of the target pattern).
        * ``active_neurons`` (rows with an active entry), ``fan_in_min`` / ``fan_in_max`` (over active rows),
          ``fan_in`` (SRigL's constant ``k``; N:M: the current ``N * N_in / M``; RigL: the mean).
        * ``nm_n`` / ``nm_m`` (current ``N`` and ``M``; 0 for RigL/SRigL), ``beta`` (mask decay).
        * ``mask_changed`` (connections regrown by the last update; N:M: mask entries flipped by the last
          step), ``mask_changed_total``, ``updates``, ``itop`` (fraction of entries ever active: the
          in-time over-parameterization rate), ``frozen`` (1 once the topology no longer changes).
        * ``memory_bytes``: parameters + optimizer state (dense: the masks only simulate sparsity).
        """
        cfg = self.config
        out: dict[str, dict[str, float]] = {}
        for rec in self._layers:
            layer = rec.masked
            n_out, n_in = rec.shape
            mask = layer.mask
            rows = mask.sum(1)
            active = rows > 0
            d: dict[str, float] = {
                "nnz": float(mask.sum()),
                "numel": float(mask.numel()),
                "density": float(mask.sum()) / mask.numel(),
                "target_nnz": float(rec.target_nnz),
                "target_density": rec.target_nnz / mask.numel() if not cfg.is_nm else rec.nm[0] / rec.nm[1],
                "active_neurons": float(active.sum()),
                "fan_in_min": float(rows[active].min()) if bool(active.any()) else 0.0,
                "fan_in_max": float(rows.max()),
            }
            if cfg.method == "srigl":
                d["fan_in"] = float(rec.fan_in)
            elif cfg.is_nm:
                d["fan_in"] = float(layer.nm_n * n_in // layer.nm_m)
            else:
                d["fan_in"] = float(rows.double().mean())
            d.update(
                nm_n=float(layer.nm_n if cfg.is_nm else 0),
                nm_m=float(layer.nm_m if cfg.is_nm else 0),
                beta=float(layer.beta),
                mask_changed=float(rec.changed),
                mask_changed_total=float(rec.changed_total),
                updates=float(rec.updates),
                itop=float(rec.ever.sum()) / rec.ever.numel() if rec.ever is not None else 0.0,
                frozen=float(self._frozen()),
                memory_bytes=float(self._layer_bytes(rec)),
            )
            out[rec.fqn] = d
        return out

    def _frozen(self) -> bool:
        if self.config.is_nm:
            return False  # N:M masks follow |W| at every step
        last = (self._updates.end - 1) // self._updates.every * self._updates.every  # the last update step
        return last <= 0 or self._step >= last

    def log(self, level: int = logging.INFO) -> dict[str, dict[str, float]]:
        """Log ``diagnostics()`` (one line per layer on the ``diagcompile.dst`` logger) and return them."""
        diag = self.diagnostics()
        for fqn, d in diag.items():
            logger.log(
                level,
                "step %d %s: density=%.4f (target %.4f) active_neurons=%d fan_in=%g changed=%d (total %d) itop=%.3f",
                self._step,
                fqn,
                d["density"],
                d["target_density"],
                d["active_neurons"],
                d["fan_in"],
                d["mask_changed"],
                d["mask_changed_total"],
                d["itop"],
            )
        return diag

    # ------------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counter, config, and per layer the mask, SRigL's ablated set and fan-in, and statistics.

        Tensors and plain python only. Save ``model.state_dict()`` (the weights) next to this.
        """
        return {
            "version": _STATE_VERSION,
            "kind": "mask",
            "step": self._step,
            "finalized": self._finalized,
            "config": self.config.to_dict(),
            "head": self._head,  # SRigL's protected output layer, once decided
            "layers": {
                rec.fqn: {
                    "shape": list(rec.shape),
                    "target_nnz": rec.target_nnz,
                    "nm": list(rec.nm),
                    "mask": rec.masked.mask.detach().cpu().clone(),
                    "ever": rec.ever.detach().cpu().clone(),
                    "ablated": None if rec.ablated is None else rec.ablated.detach().cpu().clone(),
                    "fan_in": rec.fan_in,
                    "changed": rec.changed,
                    "changed_total": rec.changed_total,
                    "updates": rec.updates,
                }
                for rec in self._layers
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()`` into a sparsifier built the same way (same model, config).

        Raises ``ValueError`` naming what differs (config fields, layers, shapes, budgets).
        """
        self._check_live("load_state_dict")
        if state_dict.get("kind") == "diag":
            raise ValueError("not a MaskSparsifier state (it is a DiagSparsifier state)")
        if state_dict.get("version") != _STATE_VERSION or state_dict.get("kind") != "mask":
            raise ValueError(
                f"not a MaskSparsifier state (version {state_dict.get('version')!r}, kind {state_dict.get('kind')!r})"
            )
        if state_dict.get("finalized"):
            raise ValueError("this state was saved after finalize(); it cannot resume training")
        self._check_saved_config(self.config.to_dict(), MaskConfig.from_dict(dict(state_dict["config"])).to_dict())
        saved = state_dict["layers"]
        here = {rec.fqn: rec for rec in self._layers}
        self._check_saved_layers(saved, here)
        for fqn, s in saved.items():
            rec = here[fqn]
            if (
                list(s["shape"]) != list(rec.shape)
                or s["target_nnz"] != rec.target_nnz
                or list(s["nm"]) != list(rec.nm)
            ):
                raise ValueError(
                    f"layer '{fqn}': saved shape {s['shape']} budget {s['target_nnz']} N:M {s['nm']}, here "
                    f"{list(rec.shape)} budget {rec.target_nnz} N:M {list(rec.nm)}"
                )
        for fqn, s in saved.items():
            rec = here[fqn]
            dev = rec.masked.weight.device
            rec.masked.mask.copy_(s["mask"].to(dev))
            rec.ever = s["ever"].to(dev).clone()
            rec.ablated = None if s["ablated"] is None else s["ablated"].to(dev).clone()
            rec.fan_in = int(s["fan_in"])
            rec.changed, rec.changed_total, rec.updates = int(s["changed"]), int(s["changed_total"]), int(s["updates"])
        self._step = int(state_dict["step"])
        if state_dict.get("head") is not None and self._head_hooks:
            self._head = str(state_dict["head"])
            self._decide_head()
        self._set_schedule(self._step)
        self._clear_grads()
        self._armed = not self.config.is_nm and self._updates.is_update_step(self._step + 1)

    # ------------------------------------------------------------------------------------------------
    # Finalize
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> nn.Module:
        """Apply the final hard masks and put plain ``nn.Linear`` layers back; return the model.

        RigL/SRigL: the current mask. N:M: the target ``N:M`` mask of ``|W|`` (whatever the decay reached).
        The pruned weights and their optimizer state are zeroed; the layers keep the same ``Parameter``
        objects, so the optimizer stays valid (but nothing keeps pruned weights at zero any more if training
        continues). Hooks are removed; the sparsifier cannot step afterwards.

        DDP: the layers are replaced (the masks' buffers leave the model), so a ``DistributedDataParallel``
        wrapper made before ``finalize()`` cannot fine-tune the result (it fails inside its reducer): wrap the
        finalized model in a fresh one (``ddp = DDP(ddp.module, ...)``).

        Warns:
            UserWarning: layers were replaced while ``torch.distributed`` is in use (a process group): a DDP
                wrapper made before ``finalize()`` must be replaced by a fresh one to fine-tune.
        """
        self._check_live("finalize")
        self._unwatch_head()
        for rec in self._layers:
            if rec.handle is not None:
                rec.handle.remove()
                rec.handle = None
            layer = rec.masked
            if self.config.is_nm:
                layer.nm_n = rec.nm[0]
                layer.mask.copy_(self._nm_mask_now(rec))
            self._mask_param_(rec, layer.mask)
            plain = _plain_linear(layer)
            self._set_module(rec.fqn, plain)
            rec.module = plain
        self._finalized = True
        self._clear_grads()
        if self._layers:
            self._warn_rewrap_ddp()
        return self.model


def _diagonal_budget_limit(cfg: MaskConfig, n_out: int, n_in: int) -> str:
    """Why a mask method's layer is limited to the diagonal methods' sparsities, and what ``budget="floor"``
    allows instead (the end of the error for a sparsity beyond ``1 - 1/P``)."""
    why = (
        f"The limit is the diagonal methods' because budget='diagonal' (the default) gives {cfg.method} the "
        f"non-zero count of the DynaDiag/DiagHeur layer at the same sparsity (identical parameter counts)"
    )
    if cfg.method == "srigl":
        return (
            f"{why}; budget='floor' would not go further for SRigL, whose constant fan-in keeps at least one weight "
            f"per neuron with either budget: sparsity <= 1 - 1/N_in = {1 - 1 / n_in:.6g} here"
        )
    if cfg.method == "rigl":
        return (
            f"{why}; budget='floor' (RigL's floor((1 - s) * N_out * N_in) weights) allows any sparsity that leaves "
            f"at least one weight: up to 1 - 1/(N_out * N_in) = {1 - 1 / (n_out * n_in):.6g} here"
        )
    return (
        f"{why}; budget='floor' (floor((1 - s) * N_out * N_in) weights) accepts any sparsity that leaves at least "
        f"one weight, but the N:M pattern closest to it is no sparser than 1:M (M <= nm_max_m={cfg.nm_max_m})"
    )


# ----------------------------------------------------------------------------------------------------
# One entry point for every method
# ----------------------------------------------------------------------------------------------------
def config_class(method: str) -> type[DSTConfig] | type[MaskConfig]:
    """The config class of a method: ``DSTConfig`` (dynadiag, diagheur) or ``MaskConfig`` (the baselines)."""
    if method in DST_METHODS:
        return DSTConfig
    if method in MASK_METHODS:
        return MaskConfig
    raise ValueError(f"unknown sparse training method {method!r}; choose one of {', '.join(SPARSIFIER_METHODS)}")


#: The config fields ``make_config`` / ``make_sparsifier`` take as arguments, never as ``options``.
RESERVED_OPTIONS = ("method", "sparsity", "total_steps")


def make_config(method: str, sparsity: float, total_steps: int, /, **options: Any) -> DSTConfig | MaskConfig:
    """The validated config ``make_sparsifier`` builds for ``method`` (``config_class(method)``) from ``options``;
    an option that config does not have, or one of ``RESERVED_OPTIONS`` (given as arguments), raises
    ``ValueError`` naming it and the valid ones."""
    cls = config_class(method)
    reserved = [k for k in RESERVED_OPTIONS if k in options]
    if reserved:
        raise ValueError(
            f"option(s) {reserved} are set by make_config's own argument(s) of that name (method={method!r}, "
            f"sparsity={sparsity!r}, total_steps={total_steps!r}), not as options"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        valid = sorted(names - set(RESERVED_OPTIONS))
        raise ValueError(f"option(s) {unknown} do not apply to method {method!r} ({cls.__name__}); valid: {valid}")
    return cls(total_steps=total_steps, method=method, sparsity=sparsity, **options)


def make_sparsifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    method: str,
    sparsity: float,
    total_steps: int,
    filter_fn: FilterFn | None = None,
    *,
    process_group: Any = None,
    **options: Any,
) -> DiagSparsifier | MaskSparsifier:
    """Build the sparsifier of any method in ``SPARSIFIER_METHODS`` with the shared contract.

    ``dynadiag``/``diagheur`` give a ``DiagSparsifier`` (``DSTConfig``); ``rigl``, ``srigl``, ``nm-srste``,
    ``nm-mask-decay``, ``nm-structure-decay`` give a ``MaskSparsifier`` (``MaskConfig``). ``options`` are further
    fields of that config (e.g. ``update_every=50``, ``distribution="erk"``, ``pool=2.0``); one that the method's
    config does not have raises ``ValueError`` naming it (``config_class(method)`` tells which apply).
    """
    config = make_config(method, sparsity, total_steps, **options)
    if isinstance(config, DSTConfig):
        return DiagSparsifier(model, optimizer, config, filter_fn, process_group=process_group)
    return MaskSparsifier(model, optimizer, config, filter_fn, process_group=process_group)

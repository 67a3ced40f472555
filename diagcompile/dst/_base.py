"""What ``DiagSparsifier`` and ``MaskSparsifier`` share: argument checks, layer selection, rank agreement,
state-dict consistency checks. Private: the two public classes keep their own APIs and state formats.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from diagcompile.dst.optim import state_bytes
from diagcompile.dst.schedules import UpdateSchedule
from diagcompile.marking import get_sparse_mark

logger = logging.getLogger(__name__)

__all__: list[str] = []

FilterFn = Callable[[nn.Module, str], bool]


def world_size(group: Any) -> int:
    """The size of ``group`` (the default group when ``None``); 1 without an initialized process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialized")
        return 1
    return dist.get_world_size(group)


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def select_linears(
    model: nn.Module, filter_fn: FilterFn | None, who: str, tied_why: str, stacklevel: int = 3
) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers a sparsifier converts: those ``replaceable_linears`` allows (not
    ``nn.MultiheadAttention``'s own projections, not subclasses that override ``forward``), passing
    ``filter_fn``, and only the ``mark_sparse``-marked ones if any is marked. Tied weights raise ``ValueError``
    (``who``: the sparsifier the message names; ``tied_why``: what converting a tied weight would do); so do a
    selected uninitialized ``nn.LazyLinear`` or parametrized linear and a marked linear that cannot be replaced,
    and one that would be selected but cannot is named in a warning (one warning for the ``nn.MultiheadAttention``
    modules, whose projections are never candidates, unless ``filter_fn`` rejects their ``out_proj`` or some
    linear is marked; ``stacklevel``: the warnings' ``stacklevel``, 3 when called by the sparsifier's
    constructor)."""
    from diagcompile.api import replaceable_linears

    layers, skipped = replaceable_linears(model)
    linears = [(fqn, m) for fqn, m in layers if fqn != ""]
    if filter_fn is not None:
        linears = [(fqn, m) for fqn, m in linears if filter_fn(m, fqn)]
    any_marked = any(get_sparse_mark(m) is not None for _, m in linears)
    if any_marked:
        unmarked = [fqn for fqn, m in linears if get_sparse_mark(m) is None]
        linears = [(fqn, m) for fqn, m in linears if get_sparse_mark(m) is not None]
        if unmarked:
            logger.info("some linears are sparse-marked, so only those are converted; dense: %s", ", ".join(unmarked))
    left: dict[str, str] = {}
    attention: list[str] = []  # the nn.MultiheadAttention modules whose projections would be candidates
    for fqn, why in skipped.items():
        m = model.get_submodule(fqn)
        if get_sparse_mark(m) is not None:
            raise ValueError(f"the sparse-marked linear '{fqn}' cannot be converted: {why}")
        if any_marked or (filter_fn is not None and not filter_fn(m, fqn)):
            continue
        parent_fqn = fqn.rpartition(".")[0]
        if isinstance(model.get_submodule(parent_fqn), nn.MultiheadAttention):
            attention.append(parent_fqn)
            continue
        left[fqn] = why
    if left:
        warnings.warn(
            "left dense: " + "; ".join(f"'{fqn}' ({why})" for fqn, why in left.items()),
            stacklevel=stacklevel,
        )
    if attention:
        n = len(attention)
        warnings.warn(
            f"{who}: {4 * n} attention projections (query, key, value, output) of {n} nn.MultiheadAttention "
            f"module(s) stay dense: {', '.join(repr(a or '<model>') for a in attention)}. nn.MultiheadAttention "
            f"holds its query/key/value projections as bare parameters (the fused in_proj_weight, or "
            f"q/k/v_proj_weight when kdim or vdim differ), not nn.Linear layers, and reads out_proj.weight directly "
            f"instead of calling out_proj, so none of them can be converted. To sparsify attention, build it from "
            f"nn.Linear projections; to silence this, exclude the out_proj with filter_fn",
            stacklevel=stacklevel,
        )
    for fqn, m in linears:
        _check_plain_weight(fqn, m, who)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for fqn, m in linears:
        names = owners.get(id(m.weight), [])
        if len(names) > 1:
            raise ValueError(
                f"{who}: the weight of '{fqn}' is shared with {[n for n in names if n != fqn + '.weight']}"
                f" (tied weights); {tied_why}. Exclude it with filter_fn."
            )
    return linears


def _check_plain_weight(fqn: str, m: nn.Linear, who: str) -> None:
    """Refuse a selected linear whose ``weight`` is not a plain materialized ``Parameter``: every later step
    (its shape, its place in the optimizer, the swap or the mask) would fail with a message about something
    else (torch's "Can't access the shape of an uninitialized parameter", or "not in any param group")."""
    from torch.nn.utils import parametrize

    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        raise ValueError(
            f"{who}: '{fqn}' is an uninitialized nn.LazyLinear (its weight has no shape until the first forward): "
            f"run one forward pass through the model before building the optimizer and {who}, so that it becomes "
            f"a plain nn.Linear, or exclude it with filter_fn"
        )
    if parametrize.is_parametrized(m):
        names = sorted(m.parametrizations.keys())
        raise ValueError(
            f"{who}: '{fqn}' is parametrized ({', '.join(names)}: e.g. weight_norm or spectral_norm), so its weight "
            f"is recomputed from other parameters at every forward and is not a parameter {who} can convert; remove "
            f'the parametrization first (torch.nn.utils.parametrize.remove_parametrizations(m, "weight")), or '
            f"exclude it with filter_fn"
        )
    if not isinstance(m.weight, nn.Parameter):
        raise ValueError(
            f"{who}: the weight of '{fqn}' is a {type(m.weight).__name__}, not an nn.Parameter (the old "
            f"torch.nn.utils.weight_norm recomputes it in a forward pre-hook): remove what computes it "
            f"(torch.nn.utils.remove_weight_norm(m)), or exclude it with filter_fn"
        )


def _sharded_by(model: nn.Module) -> tuple[str, str] | None:
    """``(where, what)`` of the first sign that ``model`` is sharded: a legacy FSDP wrapper
    (``FullyShardedDataParallel``), a module ``fully_shard`` (FSDP2) was applied to, or a ``DTensor`` parameter
    (FSDP2, tensor parallelism); ``None`` if there is none. Looks only if torch.distributed's FSDP / DTensor
    modules were imported (none of these can exist otherwise), so it imports nothing."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    dtensor = sys.modules.get("torch.distributed.tensor")
    if fsdp is not None:
        fsdp1, fsdp2 = getattr(fsdp, "FullyShardedDataParallel", ()), getattr(fsdp, "FSDPModule", ())
        for fqn, m in model.named_modules():
            if isinstance(m, fsdp1):
                return (fqn or "<model>", "a FullyShardedDataParallel wrapper")
            if isinstance(m, fsdp2):
                return (fqn or "<model>", "sharded by fully_shard (FSDP2)")
    if dtensor is not None and hasattr(dtensor, "DTensor"):
        for name, p in model.named_parameters():
            if isinstance(p, dtensor.DTensor):
                return (name, "a DTensor parameter (FSDP2 / tensor parallelism)")
    return None


def _never_stepped(state: Any) -> bool:
    """Whether an optimizer's per-parameter state is the one some optimizers (Adagrad) make in ``__init__``."""
    step = state.get("step") if isinstance(state, dict) else None
    return step is not None and float(step) == 0


class SparsifierBase:
    """The common skeleton of the sparsifiers. Subclasses set the class attributes below."""

    #: the public class name that messages use
    _name: str
    #: the config class the constructor accepts
    _config_cls: type
    #: why the optimizer must have no state yet (ends the constructor's error message)
    _fresh_optimizer_why: str
    #: what a run without topology updates trains (_warn_if_no_updates)
    _initial_topology: str
    #: what an optimizer that makes its state in its constructor (Adagrad) keeps the sparsifier from doing
    #: ("... so {name} cannot {this}")
    _fresh_state_blocks: str
    #: what converting a tied weight would do ("... (tied weights); {this}")
    _tied_why: str
    #: what a topology update regrows (its optimizer state restarts at zero): "diagonals", "connections"
    _regrown: str
    #: what the layers are after ``finalize()`` (in the error of a call after it)
    _finalized_layers: str

    config: Any
    _layers: list[Any]

    def _init_common(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, config: Any, process_group: Any
    ) -> None:
        """Check the constructor's arguments and set the state every sparsifier starts from."""
        name = self._name
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, self._config_cls):
            raise TypeError(f"config must be a {self._config_cls.__name__}, got {type(config).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if optimizer is not None:
            self._refuse_optimizer_kind(optimizer)
        if optimizer is not None and len(optimizer.state) > 0:
            if all(_never_stepped(st) for st in optimizer.state.values()):
                raise ValueError(
                    f"{type(optimizer).__name__} creates its state in its constructor (before any step), so {name} "
                    f"cannot {self._fresh_state_blocks}; use an optimizer that creates state at its first step (SGD, "
                    f"Adam, AdamW, RMSprop, ...)"
                )
            raise ValueError(
                f"the optimizer already has state: construct {name} before the first optimizer.step() "
                f"({self._fresh_optimizer_why})"
            )
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(f"construct {name} on the bare model, then wrap it in DistributedDataParallel")
        self._refuse_sharded(model)
        if isinstance(model, nn.Linear):
            raise ValueError("model is a single nn.Linear, which cannot be converted in place: wrap it in a module")
        self.model, self.optimizer, self.config = model, optimizer, config
        self._group = process_group
        self._world = world_size(process_group)
        # torch.distributed in use (even one process): the model is most likely trained through a
        # DistributedDataParallel wrapper, which finalize() leaves stale when it replaces layers (_warn_rewrap_ddp).
        self._distributed = process_group is not None or _dist_initialized()
        self._step = 0
        self._finalized = False
        self._armed = False
        self._warned_past_end = False
        self._nonfinite: list[str] = []  # layers whose update this step skipped: gradients not finite
        self._updates = UpdateSchedule(config.update_every, config.update_end_step, config.drop_fraction)

    def _warn_nonfinite(self, t: int, what: str) -> None:
        """One warning for the layers whose update at step ``t`` was skipped because their reduced ``what`` was
        not finite (an overflow: GradScaler skips such optimizer steps, and growth would rank inf/NaN)."""
        if self._nonfinite:
            names = ", ".join(f"'{f}'" for f in self._nonfinite)
            self._nonfinite = []
            warnings.warn(
                f"{self._name}: at step {t} the {what} is not finite (an overflow, as when GradScaler skips a "
                f"step) for {names}: their topology update is skipped",
                stacklevel=5,  # the caller of step() (through the update method and its no_grad wrapper)
            )

    def _warn_if_no_updates(self) -> None:
        """Warn when the schedule leaves no topology update (``update_every`` at or past the updates' end)."""
        u = self._updates
        if u.every >= u.end:
            # DynaDiag's pool refreshes end at its freeze; the other methods' updates at update_end.
            cfg = self.config
            end = "freeze_at" if getattr(cfg, "method", None) == "dynadiag" else "update_end"
            warnings.warn(
                f"{self._name}: update_every={u.every} but topology updates end before step {u.end} "
                f"({end}={getattr(cfg, end)} of total_steps={cfg.total_steps}): no update happens, so this run "
                f"trains {self._initial_topology} only; lower update_every",
                stacklevel=3,
            )

    def _refuse_sharded(self, model: nn.Module) -> None:
        """Refuse a model sharded by FSDP (``FullyShardedDataParallel``, ``fully_shard``) or holding ``DTensor``
        parameters: from the constructor, and from the first ``step()`` (a model sharded after the sparsifier
        was built; in a real loop its forward or backward often fails inside FSDP first, on the CPU at a
        numpy-viewed storage FSDP cannot resize, so the README promises only the constructor's check). Topology
        updates index, move and zero rows of each layer's *whole* weight and of its optimizer state, identically
        on every rank; sharded parameters hold a slice per rank, so each step would fail inside a DTensor op or
        FSDP with a message about something else."""
        found = _sharded_by(model)
        if found is None:
            return
        where, what = found
        raise ValueError(
            f"{self._name} cannot train a sharded model: '{where}' is {what}. Its topology updates move and zero "
            f"rows of each layer's whole weight and optimizer state on every rank, which sharded parameters do not "
            f"hold. FSDP / fully_shard and DTensor parameters are not supported: train with DistributedDataParallel "
            f"(construct {self._name} on the bare model, build the optimizer over it, then wrap the model)"
        )

    def _refuse_optimizer_kind(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse, before anything changes, the optimizers that a topology update would silently break.

        Regrown rows / connections restart with zero optimizer state, which is right only for an optimizer
        whose fresh per-element state is zero. Checked against ``torch.optim`` (2.13): Adam, AdamW, NAdam,
        RAdam, Adamax, Adadelta, RMSprop, ASGD (``ax``; its ``eta``/``mu`` are per-parameter scalars),
        SparseAdam and Muon start theirs at zero, and SGD's momentum buffer starts as the first gradient, which
        a zeroed buffer also gives (with ``dampening=0``). ``ZeroRedundancyOptimizer`` is refused: it holds each
        rank's parameters and state in a local optimizer the surgery cannot see. Rprop's ``step_size`` starts at
        ``lr``: refused here, with LBFGS (one curvature history across all parameters). Adagrad
        (``initial_accumulator_value``) is refused for making its state in its constructor, Adafactor's factored
        state at the first ``step()`` (``_check_optimizer_state``).
        """
        name = self._name
        zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
        if zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer):
            raise ValueError(
                f"{name} cannot train with ZeroRedundancyOptimizer: each rank steps its share of the parameters, "
                f"and keeps their optimizer state, in a local optimizer (its .optim) that {name} cannot reach: "
                f"parameters it swaps in would be stepped by no rank, and regrown {self._regrown} would keep stale "
                f"optimizer state; use a torch.optim optimizer (under DistributedDataParallel: one per rank over all "
                f"the parameters)"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                f"{name} cannot train with torch.optim.LBFGS: LBFGS keeps one flat curvature history over all its "
                f"parameters, which a topology update or the swap of a layer invalidates, and it allows one param "
                f"group only; use a first-order optimizer (SGD, Adam, AdamW, RMSprop, ...)"
            )
        if isinstance(optimizer, torch.optim.Rprop):
            raise ValueError(
                f"{name} cannot train with torch.optim.Rprop: its fresh per-weight state is not zero (each weight's "
                f"step_size starts at lr), while {name} restarts the optimizer state of regrown {self._regrown} at "
                f"zero, so regrown {self._regrown} could not start fresh (a zero step size never moves them); use "
                f"SGD, Adam, AdamW, RMSprop, ..."
            )

    def _warn_rewrap_ddp(self) -> None:
        """From ``finalize()``, when it replaced layers: warn, if ``torch.distributed`` is in use, that a
        ``DistributedDataParallel`` wrapper made before ``finalize()`` cannot fine-tune the finalized model.

        DDP records the parameters and buffers at construction (its reducer's buckets, the buffers it
        broadcasts); training on through it after a swap desyncs the ranks or fails inside the reducer. The
        sparsifier is given the bare model, so it cannot see the wrapper: a process group is the sign of one.
        """
        if not self._distributed:
            return
        warnings.warn(
            f"{self._name}.finalize() replaced the model's sparse layers ({self._finalized_layers} now), but a "
            f"DistributedDataParallel wrapper made before finalize() still holds the old parameters and buffers: "
            f"training on through it desyncs the ranks or fails inside DDP's reducer. To fine-tune the finalized "
            f"model, wrap it in a fresh DistributedDataParallel, e.g. ddp = DDP(ddp.module, ...) (warned because "
            f"torch.distributed is in use; inference needs no wrapper)",
            stacklevel=4,  # the caller of finalize() (through finalize and its no_grad wrapper)
        )

    def _before_first_step(self) -> None:
        """What ``step()`` checks once, at the first step, before anything changes: a model sharded since the
        sparsifier was built, and the optimizer's per-parameter state (which only exists after its first step)."""
        self._refuse_sharded(self.model)
        self._check_optimizer_state()

    def _check_optimizer_state(self) -> None:
        """After the first ``optimizer.step()``: each DST layer's optimizer state must be shaped like its
        parameter (updates and ``finalize()`` move it row by row), so a factored optimizer (Adafactor) fails at
        step 1 with the reason, not at its first update or at the end of the run in ``finalize()``."""
        from diagcompile.dst.optim import _row_state_tensors

        for rec in self._layers:
            for p in rec.module.parameters(recurse=False):
                _row_state_tensors(self.optimizer, p)

    def _set_module(self, fqn: str, new: nn.Module) -> None:
        """Put ``new`` in place of the submodule ``fqn`` of the model (``diagcompile.api.swap_module``), with the
        user's forward/backward hooks and train/eval mode of the module it replaces (``diagcompile.api.carry_over``;
        the sparsifier removes its own hooks before it swaps a layer it hooked)."""
        from diagcompile.api import carry_over, swap_module

        carry_over(self.model.get_submodule(fqn), new)
        swap_module(self.model, fqn, new)

    # ------------------------------------------------------------------------------------------------
    # Distributed helpers
    # ------------------------------------------------------------------------------------------------
    def _src_rank(self) -> int:
        import torch.distributed as dist

        return 0 if self._group is None else dist.get_global_rank(self._group, 0)

    def _agree(self, *tensors: Tensor) -> None:
        """Overwrite each tensor with rank 0's copy (every rank then applies the same decision; bool tensors
        travel as uint8)."""
        if self._world <= 1:
            return
        import torch.distributed as dist

        for t in tensors:
            if t.dtype == torch.bool:
                u = t.to(torch.uint8)
                dist.broadcast(u, self._src_rank(), group=self._group)
                t.copy_(u.bool())
            else:
                dist.broadcast(t, self._src_rank(), group=self._group)

    def _mean_over_ranks(self, captured: Tensor | None, shape: tuple[int, ...], device: torch.device) -> Tensor | None:
        """The mean over ranks of a per-rank ``captured`` float32 buffer of ``shape`` (a rank that captured
        nothing contributes zeros), or ``None`` when no rank captured one."""
        have = torch.tensor([0.0 if captured is None else 1.0], device=device)
        if captured is None:
            captured = torch.zeros(shape, device=device, dtype=torch.float32)
        if self._world > 1:
            import torch.distributed as dist

            dist.all_reduce(captured, group=self._group)
            dist.all_reduce(have, group=self._group)
            captured = captured / self._world
        return None if float(have) == 0 else captured

    # ------------------------------------------------------------------------------------------------
    # Shared API
    # ------------------------------------------------------------------------------------------------
    def _check_live(self, what: str) -> None:
        if self._finalized:
            raise RuntimeError(f"{self._name}.{what}() after finalize(): the layers are {self._finalized_layers} now")

    def _warn_if_past_end(self) -> None:
        """Warn (once per sparsifier) when ``step()`` is called more than ``total_steps`` times: every schedule
        has ended by then, so the extra steps train silently with the final topology and settings, which usually
        means ``total_steps`` counts something else than the optimizer steps (epochs, or the steps of a shorter
        run the training was extended from)."""
        t, total = self._step + 1, self.config.total_steps
        if t <= total or self._warned_past_end:
            return
        self._warned_past_end = True
        warnings.warn(
            f"{self._name}.step() called for step {t}, beyond total_steps={total}: the schedule is over, so the "
            f"topology and the temperature / mask decay no longer change, and this step and later ones train with "
            f"the final settings. Set total_steps to the number of optimizer steps of the run (warned once)",
            stacklevel=3,  # the caller of step()
        )

    @property
    def step_count(self) -> int:
        """Completed optimizer steps (calls to ``step()``)."""
        return self._step

    def _layer_bytes(self, rec: Any) -> int:
        return sum(p.numel() * p.element_size() + state_bytes(self.optimizer, p) for p in rec.module.parameters())

    def _check_saved_config(self, mine: dict[str, Any], theirs: dict[str, Any]) -> None:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(
                f"{self._name}.load_state_dict: config differs in "
                + ", ".join(f"{k} (saved {theirs.get(k)!r}, here {mine.get(k)!r})" for k in diff)
            )

    def _check_saved_layers(self, saved: dict[str, Any], here: dict[str, Any]) -> None:
        if set(saved) != set(here):
            raise ValueError(
                f"{self._name}.load_state_dict: layers differ: saved-only {sorted(set(saved) - set(here))}, "
                f"here-only {sorted(set(here) - set(saved))}"
            )

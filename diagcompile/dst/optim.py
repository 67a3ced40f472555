"""Optimizer surgery: rewire parameter groups when layers are converted, move or zero rows of optimizer state.

Topology updates permute, keep and replace rows of a ``(rows, D)`` parameter (one row per diagonal). The
optimizer's per-element state (Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; SGD
``momentum_buffer``; anything else shaped like the parameter) must follow the rows, and rows that start
over must start with zero state (RigL). Scalar state (Adam's per-parameter ``step``) is left alone: it is
per parameter, not per row. State of any other shape cannot be remapped row-wise and raises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "remap_rows_",
    "zero_state_",
    "replace_param_",
    "transfer_rows_",
    "remove_param_",
    "add_alpha_group",
    "remove_alpha_group",
    "find_group",
    "check_in_optimizer",
    "state_bytes",
]


def find_group(optimizer: torch.optim.Optimizer, param: Tensor) -> dict | None:
    """The param group holding ``param`` (by identity), or ``None``."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def _row_state_tensors(optimizer: torch.optim.Optimizer | None, param: Tensor) -> list[tuple[str, Tensor]]:
    if optimizer is None or param not in optimizer.state:
        return []
    out = []
    for name, t in optimizer.state[param].items():
        if not isinstance(t, Tensor) or t.dim() == 0:
            continue  # per-parameter scalars: Adam's step counter
        if t.shape != param.shape:
            raise NotImplementedError(
                f"{type(optimizer).__name__} keeps optimizer state {name!r} of shape {tuple(t.shape)} for a parameter "
                f"of shape {tuple(param.shape)}: dynamic sparse training moves each diagonal's state rows with it, "
                f"so it needs state shaped like the parameter (SGD, Adam, AdamW, RMSprop, ...)"
            )
        out.append((name, t))
    return out


@torch.no_grad()
def remap_rows_(
    param: Tensor, src: Tensor, optimizer: torch.optim.Optimizer | None = None, fill: float | Tensor = 0.0
) -> None:
    """In place: ``param[i] <- param[src[i]]`` where ``src[i] >= 0``, else ``fill``; the same for its optimizer state.

    Rows taken from ``src`` keep their optimizer state; new rows (``src < 0``) get zero state whatever ``fill``.
    A pending ``param.grad`` follows the rows too (new rows: zero), so a topology update made before the
    ``optimizer.step()`` that consumes it does not hand a new row the gradient of the row it replaced.

    Args:
        param: ``(R, ...)`` parameter.
        src: ``(R,)`` int64: source row of each row, ``-1`` for a new row.
        optimizer: the optimizer holding ``param`` (its state, if any, is remapped too).
        fill: value of new rows in ``param``: a scalar, or ``(R, ...)`` tensor read where ``src < 0``.
    """
    if src.shape != (param.shape[0],):
        raise ValueError(f"src must have shape ({param.shape[0]},), got {tuple(src.shape)}")
    src = src.to(param.device, torch.int64)
    new = src < 0
    idx = src.clamp_min(0)
    shape = (-1,) + (1,) * (param.dim() - 1)
    keep = (~new).view(shape)
    fill_t = fill if isinstance(fill, Tensor) else torch.full_like(param, float(fill))
    param.copy_(torch.where(keep, param.index_select(0, idx), fill_t.to(param.dtype)))
    if param.grad is not None:
        param.grad.copy_(torch.where(keep, param.grad.index_select(0, idx), torch.zeros_like(param.grad)))
    for _, t in _row_state_tensors(optimizer, param):
        t.copy_(torch.where(keep, t.index_select(0, idx), torch.zeros_like(t)))


def check_in_optimizer(optimizer: torch.optim.Optimizer | None, weight: Tensor, fqn: str, who: str) -> None:
    """Raise ``ValueError`` naming layer ``fqn`` if ``weight`` is in no param group of ``optimizer`` (``None``:
    nothing to check). Sparsifiers call it for every selected layer before they change anything."""
    if optimizer is not None and find_group(optimizer, weight) is None:
        raise ValueError(
            f"{who}: the weight of '{fqn}' is not in any param group of the optimizer: build the optimizer over "
            f"model.parameters() before {who}, or exclude the layer with filter_fn"
        )


@torch.no_grad()
def zero_state_(optimizer: torch.optim.Optimizer | None, param: Tensor) -> None:
    """Zero every per-element state tensor of ``param`` (momentum, second moments); scalars are kept."""
    for _, t in _row_state_tensors(optimizer, param):
        t.zero_()


def replace_param_(
    optimizer: torch.optim.Optimizer | None, old: Tensor, new: Sequence[Tensor], names: Sequence[str] | None = None
) -> dict | None:
    """Swap ``old`` for the parameters ``new`` in ``old``'s param group (same hyper-parameters), at ``old``'s
    place: the group keeps the order of ``model.parameters()`` when a module's parameter is swapped for its
    replacement's, so an optimizer built afresh over the new model has the same layout (and loads this one's
    ``state_dict``).

    A group with names (torch >= 2.6: an optimizer built from ``model.named_parameters()``) gets ``names`` for
    ``new`` (default: ``old``'s name for a single new parameter).

    Returns the group (``None`` when there is no optimizer). Raises ``ValueError`` if ``old`` is in no group.
    """
    if optimizer is None:
        return None
    group = find_group(optimizer, old)
    if group is None:
        raise ValueError(
            "a converted layer's weight is not in any param group of the optimizer: build the optimizer over "
            "model.parameters() before DiagSparsifier, or exclude the layer with filter_fn"
        )
    at = next(i for i, p in enumerate(group["params"]) if p is old)
    # In place: an optimizer may hold the list itself (LBFGS keeps ``_params``), and a new list would leave it
    # stepping the old parameter while the new one never trains.
    group["params"][at : at + 1] = list(new)
    if "param_names" in group:
        if names is None:
            if len(new) != 1:
                raise ValueError("replace_param_: the group has param_names: give the names of the new parameters")
            names = [group["param_names"][at]]
        group["param_names"][at : at + 1] = list(names)
    optimizer.state.pop(old, None)
    return group


def add_alpha_group(
    optimizer: torch.optim.Optimizer | None, alphas: list[nn.Parameter], lr: float, names: Sequence[str] = ()
) -> None:
    """Put the importance parameters in their own group: ``lr``, no weight decay (other settings: defaults);
    ``names`` label them when the optimizer's groups have names (built from ``named_parameters()``).

    The group is added even when empty, so the number of groups does not depend on the model.
    """
    if optimizer is None:
        return
    group: dict = {"params": list(alphas), "lr": lr}
    if any("param_names" in g for g in optimizer.param_groups):
        group["param_names"] = list(names)
    if "weight_decay" in optimizer.defaults:
        group["weight_decay"] = 0.0
    if alphas:
        optimizer.add_param_group(group)
    else:
        # add_param_group rejects an empty list; fill in the defaults by hand.
        for name, default in optimizer.defaults.items():
            group.setdefault(name, default)
        optimizer.param_groups.append(group)
    group["diagcompile_alpha"] = True


def remove_alpha_group(optimizer: torch.optim.Optimizer | None) -> None:
    """Remove the (emptied) group ``add_alpha_group`` added, so the optimizer has the layout of one built over
    the finalized model. LR schedulers made before hold one value per group: most fail afterwards.

    The group is found by its mark wherever it is: groups the caller added after it (``add_param_group``) do not
    keep it in place, so that an optimizer built afresh over the finalized model with the same added groups has
    the same layout."""
    if optimizer is None:
        return
    groups = optimizer.param_groups
    for i, group in enumerate(groups):
        if group.get("diagcompile_alpha") and not group["params"]:
            del groups[i]
            return


def state_bytes(optimizer: torch.optim.Optimizer | None, param: Tensor) -> int:
    """Bytes of the optimizer state tensors held for ``param``."""
    if optimizer is None or param not in optimizer.state:
        return 0
    return sum(t.numel() * t.element_size() for t in optimizer.state[param].values() if isinstance(t, Tensor))


@torch.no_grad()
def transfer_rows_(optimizer: torch.optim.Optimizer | None, old: Tensor, new: Tensor, rows: Tensor) -> None:
    """Replace ``old`` by ``new`` (``new = old[rows]``) in its group; ``new``'s state is ``old``'s state rows.

    Scalar state (Adam's ``step``) is copied, so a compacted layer continues exactly where it was.
    """
    if optimizer is None:
        return
    state = {}
    if old in optimizer.state:
        row_tensors = dict(_row_state_tensors(optimizer, old))
        for name, t in optimizer.state[old].items():
            state[name] = (
                t.index_select(0, rows).clone() if name in row_tensors else (t.clone() if isinstance(t, Tensor) else t)
            )
    replace_param_(optimizer, old, [new])
    if state:
        optimizer.state[new] = state


def remove_param_(optimizer: torch.optim.Optimizer | None, param: Tensor) -> None:
    """Remove ``param`` and its state from the optimizer (its group stays, possibly empty)."""
    if optimizer is None:
        return
    group = find_group(optimizer, param)
    if group is not None:
        at = next(i for i, p in enumerate(group["params"]) if p is param)
        del group["params"][at]  # in place: see replace_param_
        if "param_names" in group:
            del group["param_names"][at]
    optimizer.state.pop(param, None)

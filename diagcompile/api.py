"""``sparsify_``: swap ``nn.Linear`` layers for ``DiagLinear`` in place (one-shot)."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from diagcompile.config import DiagSparsityConfig
from diagcompile.functional import check_sparsity
from diagcompile.marking import _LAZY, get_sparse_mark
from diagcompile.modules import DiagLinear
from diagcompile.ops import OFFSET_DTYPE, evenly_spaced_offsets, k_from_sparsity

__all__ = ["sparsify_", "replaceable_linears"]

FilterFn = Callable[[nn.Module, str], bool]


def replaceable_linears(model: nn.Module) -> tuple[list[tuple[str, nn.Linear]], dict[str, str]]:
    """The ``nn.Linear`` layers of ``model`` (subclasses included) that a diagonal layer can replace.

    Returns ``(layers, skipped)``: ``layers`` as ``(fqn, module)`` in ``named_modules`` order, and ``skipped``
    mapping the fqn of every other linear to why swapping it would break the model:

    * a child of ``nn.MultiheadAttention`` (its ``out_proj``): attention reads ``out_proj.weight`` directly and
      never calls the module, so a replacement without ``.weight`` fails at the first forward;
    * a subclass that overrides ``forward``: the replacement would silently drop what the override does.
    """
    mha_children = {
        f"{fqn}.{name}" if fqn else name
        for fqn, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for name, _ in m.named_children()
    }
    layers: list[tuple[str, nn.Linear]] = []
    skipped: dict[str, str] = {}
    for fqn, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if fqn in mha_children:
            skipped[fqn] = "nn.MultiheadAttention reads its out_proj.weight directly instead of calling it"
        elif type(m).forward is not nn.Linear.forward:
            skipped[fqn] = f"{type(m).__name__} overrides forward(), which the replacement layer would drop"
        else:
            layers.append((fqn, m))
    return layers, skipped


def _parent_and_name(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent_name, _, name = fqn.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), name


def swap_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``fqn`` (not ``""``) of ``model``.

    A linear of an ``nn.TransformerEncoderLayer`` is special: in eval mode the layer (and its
    ``nn.TransformerEncoder``, given a padding mask) takes torch's fused fast path, which reads
    ``linear1.weight`` / ``linear2.weight`` as dense matrices and never calls the linears, so a diagonal
    replacement fails there with ``AttributeError: ... no attribute 'weight'``. torch has no per-module switch
    for that path; the layer's ``activation_relu_or_gelu = 0`` (read only by the fast-path checks and the
    fused call, never by the regular forward) and the encoder's ``use_nested_tensor = False`` turn it off for
    these modules only, leaving ``torch.backends.mha`` alone for the rest of the program.
    """
    parent, name = _parent_and_name(model, fqn)
    setattr(parent, name, new)
    if isinstance(parent, nn.TransformerEncoderLayer) and not isinstance(new, nn.Linear):
        parent.activation_relu_or_gelu = 0
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder) and any(layer is parent for layer in m.layers):
                m.use_nested_tensor = False


# The per-module hook registries of ``nn.Module`` that a replacement takes over (``_forward_hooks_with_kwargs``,
# ``_forward_pre_hooks_with_kwargs`` and ``_forward_hooks_always_called`` hold flags keyed by the ids of the hooks
# in the first three; ``_backward_hooks`` holds full or old-style hooks, as ``_is_full_backward_hook`` says). The
# state-dict hooks (``_state_dict_hooks``, ``_load_state_dict_pre_hooks``, ...) stay behind on purpose: they are
# written for the replaced module's keys (``weight``), which a ``DiagLinear`` (``values``, ``offsets``) lacks.
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


#: Forward pre-hooks that recompute a dense ``weight`` (torch.nn.utils.prune, the old weight_norm / spectral_norm).
_WEIGHT_HOOKS = (BasePruningMethod, WeightNorm, SpectralNorm)


def carry_over(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward (pre-)hooks, backward (pre-)hooks and train/eval mode of ``old``, which it replaces.

    ``new`` takes ``old``'s hook dicts themselves, not copies: a ``RemovableHandle`` refers to the dict its hook
    was registered in, so ``handle.remove()`` on a handle obtained before the swap removes the hook from
    ``new``. Both modules then share these dicts (a hook registered on either later runs on both), which
    matters only to a caller who keeps using ``old``. Should ``new`` already have hooks of its own in a dict,
    it gets a merged copy instead (``old``'s hooks first), and handles to ``old``'s hooks no longer reach it; so
    does a dict holding a hook that recomputes the dense weight (``torch.nn.utils.prune``, the old
    ``weight_norm`` / ``spectral_norm``), which is left out, with a warning.
    State-dict hooks are not carried (see ``_HOOK_DICTS``).
    """
    dropped = []
    for attr in _HOOK_DICTS:
        hooks = old.__dict__.get(attr)
        if hooks is None:  # a torch without this registry
            continue
        kept = OrderedDict((i, h) for i, h in hooks.items() if not isinstance(h, _WEIGHT_HOOKS))
        dropped += [type(h).__name__ for h in hooks.values() if isinstance(h, _WEIGHT_HOOKS)]
        own = new.__dict__.get(attr)
        if own or len(kept) != len(hooks):
            new.__dict__[attr] = OrderedDict([*kept.items(), *(own or {}).items()])
        else:
            new.__dict__[attr] = hooks
    if dropped:
        # They recompute `weight` from attributes (weight_orig and weight_mask, weight_g and weight_v, ...) that
        # the DiagLinear does not have; the conversion used the weight they last computed.
        warnings.warn(
            f"dropped {', '.join(sorted(set(dropped)))} from the replaced linear: it recomputes a dense weight the "
            f"new {type(new).__name__} does not have; the layer was converted from its current weight",
            stacklevel=4,
        )
    if old.__dict__.get("_backward_hooks"):
        # Without the flag, torch would not run full backward hooks (register_full_backward_hook) at all.
        new._is_full_backward_hook = old._is_full_backward_hook
    # A fresh module is in train mode; inside a model in eval it would say so to anything that reads the flag
    # (hooks, a subclass, code checking ``all(not m.training for m in model.modules())``).
    new.train(old.training)


def _convert(linear: nn.Linear, config: DiagSparsityConfig, fqn: str) -> DiagLinear:
    n_out, n_in = linear.weight.shape
    mark = get_sparse_mark(linear)
    if mark is not None:
        offsets = mark.resolve_offsets(linear.weight)
        pinned = get_sparse_mark(linear.weight)
        if pinned is not None and pinned.offsets is not None and pinned.offsets != tuple(offsets.tolist()):
            # Either the model trained through the backend on the pinned diagonals (then they are the ones to
            # keep), or weights were loaded after a compile pinned the old ones (then the module's mark is right).
            warnings.warn(
                f"sparsify_: '{fqn or '<root>'}': its weight carries diagonals pinned by the diagcompile backend "
                f"that differ from its module's mark ({mark}); converting by the module's mark. If the model was "
                f"trained through the backend, call diagcompile.passes.pin_marks_(model) first to keep the "
                f"trained diagonals",
                stacklevel=4,
            )
        return DiagLinear.from_dense(linear, offsets=offsets)
    check_sparsity(config.sparsity, n_out, n_in, where=f"sparsify_: layer '{fqn or '<root>'}' ({n_out}x{n_in})")
    if config.selection == "topk":
        return DiagLinear.from_dense(linear, sparsity=config.sparsity)
    k = k_from_sparsity(n_out, n_in, config.sparsity)
    if config.selection == "even":
        offsets = evenly_spaced_offsets(n_out, n_in, k)
    else:
        offsets = torch.randperm(max(n_out, n_in))[:k].sort().values.to(OFFSET_DTYPE)
    return DiagLinear.from_dense(linear, offsets=offsets)


def sparsify_(
    model: nn.Module,
    config: DiagSparsityConfig | None = None,
    filter_fn: FilterFn | None = None,
) -> nn.Module:
    """Replace ``nn.Linear`` layers (and subclasses) of ``model`` by ``DiagLinear.from_dense`` in place.

    Linears that a swap would break (``replaceable_linears``: the ``out_proj`` of ``nn.MultiheadAttention``,
    subclasses that override ``forward``) stay dense with a warning naming them, or raise if sparse-marked.
    Each new layer keeps the replaced linear's train/eval mode and its forward/backward (pre-)hooks, whose
    handles keep working (``carry_over``); state-dict hooks, written for the dense ``weight``, are dropped. A
    linear with a parametrized weight (``weight_norm``, ...) is converted from its current weight, with a
    warning: the parametrization is not carried. Atomic: on any error, no layer has been swapped.

    Args:
        model: any module. If ``model`` itself is a selected ``nn.Linear`` it cannot be swapped in place;
            the new ``DiagLinear`` is returned instead.
        config: sparsity and offset selection (default ``DiagSparsityConfig()``: 90%, top-k by L2 norm).
            Linears marked with ``mark_sparse`` use their (module's) mark's sparsity/offsets; a differing pin
            the ``diagcompile`` backend left on the weight is named in a warning (``pin_marks_`` keeps it).
        filter_fn: ``filter_fn(module, fqn) -> bool`` selects linears (default: all, or only marked ones when
            ``config.only_marked``).

    Returns:
        ``model`` (or the replacement when ``model`` is a linear).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or is a single non-linear layer (e.g. ``nn.Conv2d``).
        ValueError: a selected layer cannot reach the sparsity, or shares (ties) its weight with another
            module (converting one copy would silently untie them), or a sparse-marked linear cannot be
            replaced.

    Example::

        model = sparsify_(model, DiagSparsityConfig(sparsity=0.9), filter_fn=lambda m, fqn: "mlp" in fqn)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify_ expects an nn.Module, got {type(model).__name__}")
    config = config if config is not None else DiagSparsityConfig()
    if not isinstance(config, DiagSparsityConfig):
        raise TypeError(f"config must be a DiagSparsityConfig, got {type(config).__name__}")

    def selected(m: nn.Module, fqn: str) -> bool:
        if filter_fn is not None:
            if not filter_fn(m, fqn):
                return False
        elif config.only_marked and get_sparse_mark(m) is None:
            return False
        return True

    if not isinstance(model, nn.Linear) and _is_leaf(model):
        raise TypeError(
            f"sparsify_ converts nn.Linear layers, but got a {type(model).__name__} with no nn.Linear inside"
        )
    layers, skipped = replaceable_linears(model)
    # One module registered at several places (nn.Sequential(lin, act, lin)) is replaced at each of them
    # (named_modules lists it once, under its first name): the selection must agree on all of its places.
    aliases: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(mod), []).append(name)
    for _, m in layers:
        picks = {a: selected(m, a) for a in aliases[id(m)]}
        if len(set(picks.values())) > 1:
            raise ValueError(
                f"sparsify_: one module is registered as {list(picks)}: selected at "
                f"{[a for a, v in picks.items() if v]} but not at {[a for a, v in picks.items() if not v]}; "
                f"one module cannot be both: select or reject all of its places (filter_fn)"
            )
    targets = [(fqn, m) for fqn, m in layers if selected(m, fqn)]
    lazy = [fqn or "<root>" for fqn, m in targets if isinstance(m.weight, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(f"sparsify_: {lazy}: {_LAZY}, or exclude them with filter_fn")
    kept = {fqn: why for fqn, why in skipped.items() if selected(model.get_submodule(fqn), fqn)}
    marked = [fqn for fqn in kept if get_sparse_mark(model.get_submodule(fqn)) is not None]
    if marked:
        # Asked for by name: leaving it dense would be a silent no.
        raise ValueError(
            "sparsify_: these sparse-marked linears cannot become DiagLinear: "
            + "; ".join(f"'{fqn or '<root>'}' ({kept[fqn]})" for fqn in marked)
        )
    if kept:
        warnings.warn(
            "sparsify_: left dense: " + "; ".join(f"'{fqn or '<root>'}' ({why})" for fqn, why in kept.items()),
            stacklevel=2,
        )
    if not targets:
        warnings.warn("sparsify_: no nn.Linear was selected; the model is unchanged", stacklevel=2)
    dropped = {
        fqn: ", ".join(f"{t}: {'+'.join(type(f).__name__ for f in fs)}" for t, fs in m.parametrizations.items())
        for fqn, m in targets
        if parametrize.is_parametrized(m)
    }
    if dropped:
        # The diagonals are taken from the weight the parametrization computes now (the function is kept); what
        # the parametrization would do during further training (weight_norm's g/v split, ...) is not.
        warnings.warn(
            "sparsify_: converted from the current parametrized weight, dropping the parametrization: "
            + "; ".join(f"'{fqn or '<root>'}' ({what})" for fqn, what in dropped.items()),
            stacklevel=2,
        )

    # Tied weights: the same Parameter reachable from more than one place. One module registered at several
    # places is not a tie (see above).
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for fqn, m in targets:
        own = {f"{a}.weight" if a else "weight" for a in aliases[id(m)]}
        others = [n for n in owners.get(id(m.weight), []) if n not in own]
        if others:
            raise ValueError(
                f"sparsify_: the weight of '{fqn or '<root>'}' is shared with {others} "
                f"(tied weights); converting it would untie them. Exclude it with filter_fn or untie it first."
            )

    # Convert every target before swapping any: a layer that cannot be converted (a sparsity its shape cannot
    # reach, ...) then raises with the model still unchanged, like the checks above.
    converted = [(fqn, m, _convert(m, config, fqn)) for fqn, m in targets]
    for fqn, old, new in converted:
        carry_over(old, new)
        if fqn == "":
            return new
        for alias in aliases[id(old)]:
            swap_module(model, alias, new)
    return model


def _is_leaf(m: nn.Module) -> bool:
    return next(iter(m.children()), None) is None

"""The one definition of a *sparse-marked* linear.

A mark says "this linear should become diagonal-sparse" without changing the model yet. ``sparsify_``,
the graph pass (``diagcompile.passes``), dynamic sparse training and export all read marks through
``get_sparse_mark`` and nothing else.

A mark is a frozen ``SparseMark`` stored on the ``nn.Linear`` *and* on its weight ``Parameter``: the module
attribute serves module walks and ``symbolic_trace`` graphs (``call_module``); the tensor attribute serves
graphs where only the weight survives (Dynamo's ``F.linear`` with the weight as an input, ``torch.export``'s
``aten.linear``). A bare 2-D ``Parameter`` used with ``F.linear`` can be marked directly.

``copy.deepcopy`` of a Parameter drops its Python attributes (torch rebuilds it from data), so a deep-copied
model keeps the module marks but loses the weight marks: ``sync_marks(model)`` restores them, and every
diagcompile entry point that works on graphs calls it first. A bare ``Parameter``'s mark has no module to be
restored from: it is lost by ``deepcopy`` (not by ``torch.save``/``torch.load``), and the copy then runs dense;
mark the copy again, or hold the weight in an ``nn.Linear``.

The two can differ: the ``diagcompile`` backend pins its top-k choice as explicit offsets on the *weight* (the
graphs follow the weight's mark, ``passes/README.md`` invariant 8), while the module keeps the mark it was given.
``get_sparse_mark(module)`` reads the module's: a pin made before new weights were loaded would otherwise decide
which diagonals ``sparsify_`` keeps. After training through the backend, ``pin_marks_(model)`` copies the pins
onto the modules (``sparsify_`` warns when it sees a pin that differs). A pin is undone when its linear loads
a weight of another lineage (``load_state_dict`` of a pretrained checkpoint; told by the entries off the pinned
diagonals, which training through the pin leaves alone but for a uniform weight decay): the next compile or
export resolves the top-k of the loaded values, as a fresh process would. Loads
that bypass the module's ``load_state_dict`` (a bare marked ``Parameter``, a tied weight stored under another
module's key, ``p.data.copy_``) are not seen: mark again after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from diagcompile.functional import canonical_offsets, check_sparsity
from diagcompile.ops import k_from_sparsity, topk_offsets

__all__ = [
    "SparseMark",
    "mark_sparse",
    "apply_sparse_mark",
    "unmark_sparse",
    "is_sparse_marked",
    "get_sparse_mark",
    "sync_marks",
]

_ATTR = "_diagcompile_sparse_mark"
# On a weight: (the mark ``pin_top_k`` put there, sampled positions off its diagonals, their values then).
_PIN = "_diagcompile_pin"
# On a marked linear: its load_state_dict pre-hook (``_unpin_on_load``) is registered.
_HOOKED = "_diagcompile_unpin_hook"


@dataclass(frozen=True)
class SparseMark:
    """What a marked linear should become.

    Attributes:
        sparsity: target sparsity; ``k = k_from_sparsity(N_out, N_in, sparsity)``.
        offsets: explicit diagonals (sorted, distinct) or ``None`` to keep the ``k`` of largest L2 norm of the
            dense weight at conversion time.
    """

    sparsity: float = 0.9
    offsets: tuple[int, ...] | None = None

    def resolve_offsets(self, weight: Tensor) -> Tensor:
        """The int32 offsets this mark selects for a dense ``(N_out, N_in)`` weight."""
        n_out, n_in = weight.shape
        if self.offsets is not None:
            return canonical_offsets(list(self.offsets), n_out, n_in).to(weight.device)
        return topk_offsets(weight.detach(), k_from_sparsity(n_out, n_in, self.sparsity))


_LAZY = (
    "an uninitialized nn.LazyLinear has no weight shape until its first forward: run one forward pass "
    "through the model first (it then becomes a plain nn.Linear)"
)


def _weight_of(target: nn.Module | Tensor, fn: str) -> Tensor:
    if isinstance(target, nn.Linear):
        if isinstance(target.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{fn}: {_LAZY}")
        return target.weight
    if isinstance(target, nn.Parameter) and target.dim() == 2:
        return target
    hint = ""
    if isinstance(target, Tensor) and not isinstance(target, nn.Parameter):
        # Typically ``m.weight`` of a parametrized linear (weight_norm, ...), recomputed on every access.
        hint = " (a plain tensor, such as the weight a parametrization computes, cannot keep a mark)"
    raise TypeError(
        f"{fn} expects an nn.Linear (or subclass) or a 2-D nn.Parameter used with F.linear, "
        f"got {type(target).__name__}"
        + (f" of shape {tuple(target.shape)}" if isinstance(target, Tensor) else "")
        + hint
    )


def mark_sparse(
    target: nn.Module | Tensor,
    sparsity: float = 0.9,
    offsets: Tensor | Sequence[int] | None = None,
) -> nn.Module | Tensor:
    """Mark a linear (or its 2-D weight parameter) to become diagonal-sparse; returns ``target``.

    Args:
        target: an ``nn.Linear`` or subclass, or a 2-D ``nn.Parameter`` used as an ``F.linear`` weight.
        sparsity: target sparsity in ``[0, 1 - 1/P]`` for this layer's shape.
        offsets: explicit diagonals instead (they fix ``k``; ``sparsity`` is then not used).

    Raises:
        TypeError: ``target`` is not a linear / 2-D parameter.
        ValueError: sparsity or offsets are invalid for this layer's shape, or the linear's weight is
            parametrized (``torch.nn.utils.parametrize``, e.g. ``weight_norm``).
    """
    if isinstance(target, nn.Module) and parametrize.is_parametrized(target, "weight"):
        # ``target.weight`` is then a new tensor computed on every access: a mark set on it is lost at once, and
        # no graph would see it (they see the parametrization's inputs).
        kinds = "+".join(type(f).__name__ for f in target.parametrizations["weight"])
        raise ValueError(
            f"mark_sparse: the weight of this {type(target).__name__} is parametrized ({kinds}), so it is "
            f"recomputed on every access and cannot keep a mark. Remove the parametrization first with "
            f'torch.nn.utils.parametrize.remove_parametrizations(m, "weight") (it keeps the current weight), '
            f"or use diagcompile.sparsify_, which converts from the current weight"
        )
    weight = _weight_of(target, "mark_sparse")
    n_out, n_in = weight.shape
    if offsets is not None:
        off = canonical_offsets(offsets, n_out, n_in, where="mark_sparse offsets")
        mark = SparseMark(sparsity=1.0 - off.numel() / max(n_out, n_in), offsets=tuple(off.tolist()))
    else:
        check_sparsity(sparsity, n_out, n_in, where=f"mark_sparse on a {n_out}x{n_in} linear")
        mark = SparseMark(sparsity=float(sparsity))
    setattr(weight, _ATTR, mark)
    if isinstance(target, nn.Module):
        target.__dict__[_ATTR] = mark
        if not target.__dict__.get(_HOOKED):
            target.register_load_state_dict_pre_hook(_unpin_on_load)
            target.register_load_state_dict_post_hook(_mark_loaded_weight)
            target.__dict__[_HOOKED] = True
    return target


def pin_top_k(weight: Tensor, offsets: Tensor) -> SparseMark:
    """Replace ``weight``'s top-k mark by the explicit ``offsets`` it resolved to; returns the new mark.

    The ``diagcompile`` backend does this when it first compiles a graph for the weight, so that recompiles,
    training steps and later conversions keep the diagonals it chose. Unlike a mark the user gave, the pin is
    undone when the weight's marked linear loads a weight of another lineage (``_unpin_on_load``). Internal to
    diagcompile.
    """
    mark_sparse(weight, offsets=offsets)
    pinned = weight.__dict__[_ATTR]
    weight.__dict__[_PIN] = (pinned, *_off_pin_sample(weight, pinned.offsets))
    return pinned


# How many entries off the pinned diagonals a pin remembers, to tell a weight of its own lineage when one is loaded.
_SAMPLE = 64


def _off_pin_sample(weight: Tensor, offsets: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Up to ``_SAMPLE`` flat positions of ``weight`` off the ``offsets`` diagonals (from an even spread over
    the matrix, no RNG, nothing of the matrix's size allocated), and their float64 values on the CPU."""
    n_out, n_in = weight.shape
    n = n_out * n_in
    flat = torch.linspace(0, n - 1, min(n, 8 * _SAMPLE), dtype=torch.float64).long().unique()
    r, c = flat // n_in, flat % n_in
    # The diagonal of each position (ops/reference.py): W[t, (t + p) % N_in] wide, W[(t + p) % N_out, t] tall.
    p = (c - r) % n_in if n_out <= n_in else (r - c) % n_out
    positions = flat[~torch.isin(p, torch.tensor(offsets, dtype=torch.int64))][:_SAMPLE]
    with torch.no_grad():
        values = weight.detach().reshape(-1)[positions.to(weight.device)].double().cpu()
    return positions, values


def _same_lineage(sample: Tensor, values: Tensor) -> bool:
    """Whether the off-pin entries ``values`` (a loaded weight's, at the sampled positions) are the pin-time
    ``sample`` scaled by a positive factor. Trained through the pin, those entries get no gradient: at most a
    weight decay shrinks them all alike. A checkpoint of another lineage (a pretrained model) has others."""
    if sample.numel() == 0:
        return True  # nothing off the diagonals (k = P): any pin is all of them
    a, b = sample, values.double().cpu()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return bool(na == nb)
    return bool((a @ b) / (na * nb) > 0.999)


def _unpin_on_load(module: nn.Module, state_dict: dict, prefix: str, *_: object) -> None:
    """``load_state_dict`` pre-hook of a marked linear: loading a weight of another lineage than the pinned one
    undoes the backend's pin of the module's top-k mark. Otherwise the diagonals picked from values about to be
    replaced (a random init, before a pretrained checkpoint was loaded) would stay, silently, in every later
    compile and export. The weight's own lineage (its earlier or later state: the best checkpoint, a rollback)
    keeps the pin: only the pinned diagonals learned, so a top-k of it could pick untrained ones."""
    mark = module.__dict__.get(_ATTR)
    weight = module._parameters.get("weight")
    new = state_dict.get(prefix + "weight")
    if mark is None or mark.offsets is not None or weight is None or not isinstance(new, Tensor):
        return
    if new.shape != weight.shape:  # the load will fail and leave the weight as it is
        return
    pin = weight.__dict__.get(_PIN)
    if pin is None or weight.__dict__.get(_ATTR) is not pin[0]:
        return  # no pin, or the user marked the weight since
    _, positions, sample = pin
    if not _same_lineage(sample, new.detach().reshape(-1)[positions.to(new.device)]):
        del weight.__dict__[_PIN]
        weight.__dict__[_ATTR] = mark


def _mark_loaded_weight(module: nn.Module, _incompatible: object) -> None:
    """``load_state_dict`` post-hook of a marked linear: ``assign=True`` put a new Parameter in place of the
    marked weight; it gets the module's mark (as ``sync_marks`` would), or the compiled model would run it
    dense."""
    mark = module.__dict__.get(_ATTR)
    weight = module._parameters.get("weight")
    if mark is not None and weight is not None and _ATTR not in weight.__dict__:
        weight.__dict__[_ATTR] = mark


def apply_sparse_mark(target: nn.Module | Tensor, mark: SparseMark) -> nn.Module | Tensor:
    """Put an existing ``mark`` (from ``get_sparse_mark``) on ``target``, validated for its shape like
    ``mark_sparse`` with the mark's offsets or sparsity; returns ``target``. For carrying marks across a copy."""
    if mark.offsets is not None:
        return mark_sparse(target, offsets=list(mark.offsets))
    return mark_sparse(target, sparsity=mark.sparsity)


def unmark_sparse(target: nn.Module | Tensor) -> nn.Module | Tensor:
    """Remove a mark (no-op if there is none); returns ``target``."""
    weight = _weight_of(target, "unmark_sparse")
    weight.__dict__.pop(_ATTR, None)
    if isinstance(target, nn.Module):
        target.__dict__.pop(_ATTR, None)
    return target


def get_sparse_mark(target: object) -> SparseMark | None:
    """The mark of a linear module or weight tensor, or ``None``. Never raises.

    For a linear, the module's own mark, else its weight's (see the module docstring for when they differ).
    """
    if isinstance(target, nn.Module):
        mark = target.__dict__.get(_ATTR)
        # A parametrized weight is recomputed on each access (costly here, and it never carries a mark).
        if mark is None and isinstance(target, nn.Linear) and not parametrize.is_parametrized(target, "weight"):
            mark = getattr(getattr(target, "weight", None), _ATTR, None)
        return mark
    if isinstance(target, torch.Tensor):
        return getattr(target, _ATTR, None)
    return None


def tensor_mark(weight: Tensor) -> SparseMark | None:
    """``get_sparse_mark`` of a tensor known to be one, in ~50 ns instead of ~230: the compile backend checks
    the marks of a graph's weights at every call. (Not exported: internal to diagcompile.)"""
    return weight.__dict__.get(_ATTR)


def is_sparse_marked(target: object) -> bool:
    """Whether ``target`` (a linear module or a weight tensor) carries a sparse mark."""
    return get_sparse_mark(target) is not None


def sync_marks(model: nn.Module) -> int:
    """Copy each marked linear's mark onto its weight where the weight has none (after ``deepcopy``, a
    ``load_state_dict(assign=True)``, a new Parameter). Returns how many weights it marked.

    A weight's own mark is kept: it is the one that wins (invariant 8), and after the ``diagcompile`` backend
    pinned its top-k choice there, the module's top-k mark re-resolved from trained values could pick other
    diagonals than the ones that were trained. To change a mark, call ``mark_sparse`` on the module.
    """
    n = 0
    for m in model.modules():
        mark = m.__dict__.get(_ATTR)
        if mark is not None and isinstance(m, nn.Linear) and getattr(m.weight, _ATTR, None) is None:
            setattr(m.weight, _ATTR, mark)
            n += 1
    return n

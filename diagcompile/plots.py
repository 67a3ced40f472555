"""Pictures that say more than tables: a layer's diagonal pattern and training curves.

matplotlib is imported inside each function (with the non-interactive Agg backend), so importing this
module costs nothing and works on headless machines. Every function writes a PNG and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diagcompile._files import atomic_write

__all__ = ["plot_diagonal_pattern", "plot_training_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_write(path, "plot") as tmp:  # tmp ends in .png, which savefig reads the format from
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
    return path


def plot_diagonal_pattern(layer: torch.nn.Module, path: str | os.PathLike, title: str = "") -> Path:
    """Heat map of ``|W|`` for a ``DiagLinear`` (zeros off its diagonals) with its offsets marked.

    The top panel is ``|W|`` (``N_out x N_in``, log colour scale) — the wrapped diagonals are visible as
    stripes; the bottom strip marks which of the ``P`` candidate offsets the layer keeps.
    """
    from diagcompile.modules import DiagLinear

    if not isinstance(layer, DiagLinear):
        raise TypeError(f"plot_diagonal_pattern needs a DiagLinear, got {type(layer).__name__}")
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    W = layer.to_dense().detach().float().abs().cpu()
    offsets = layer.offsets.detach().cpu().long()
    n_out, n_in = W.shape
    P = max(n_out, n_in)
    fig, (ax, strip) = plt.subplots(
        2, 1, figsize=(7.5, 7.0 * n_out / max(n_out, n_in) + 1.4), gridspec_kw={"height_ratios": [8, 1]}
    )
    # The colour scale from the finite non-zero entries: a diverged layer (NaN / inf weights) still plots, its
    # non-finite entries blank, instead of failing inside matplotlib on an infinite or NaN limit.
    nz = W[torch.isfinite(W) & (W > 0)]
    vmin = float(nz.min()) if nz.numel() else 1e-6
    vmax = float(nz.max()) if nz.numel() else 1.0
    shown = W.clone()
    shown[(shown == 0) | ~torch.isfinite(shown)] = float("nan")  # zeros (and NaN / inf) are white
    im = ax.imshow(
        shown,
        cmap="viridis",
        norm=LogNorm(vmin=max(vmin, vmax * 1e-4), vmax=vmax),
        aspect="auto",
        interpolation="nearest",
    )
    fig.colorbar(im, ax=ax, label="|W| (log scale; white = pruned)", fraction=0.04)
    orient = "tall: rows wrap" if n_out > n_in else "wide: columns wrap"
    ax.set_title(
        (title + "\n" if title else "") + f"{n_out}x{n_in} ({orient}): k={offsets.numel()} of P={P} diagonals, "
        f"sparsity {1 - offsets.numel() / P:.1%}"
    )
    ax.set_xlabel("input feature")
    ax.set_ylabel("output feature")
    kept = torch.zeros(P)
    kept[offsets] = 1
    strip.imshow(kept[None, :], cmap="Greys", aspect="auto", interpolation="nearest", vmin=0, vmax=1)
    strip.set_yticks([])
    strip.set_xlabel(f"offset p in [0, {P}): black = kept diagonal")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_training_curves(
    runs: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    metric: str = "acc",
    metric_label: str = "test accuracy (%)",
    markers: Sequence[tuple[str, int]] = (),
) -> Path:
    """Training loss and evaluation metric vs step for several runs (``{label: metrics_json_dict}``).

    ``markers`` are ``(label, step)`` vertical lines (e.g. DynaDiag's freeze).
    """
    if not any(m.get("curve") for m in runs.values()):
        raise ValueError("plot_training_curves: no run has a 'curve' (the metrics JSON of diagcompile.train)")
    plt = _pyplot()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for label, m in runs.items():
        curve = m.get("curve", [])
        steps = [c["step"] for c in curve]
        ax_loss.plot(steps, [c.get("train_loss") for c in curve], label=label)
        ax_metric.plot(steps, [c.get(metric) for c in curve], label=label)
    for label, step in markers:
        for ax in (ax_loss, ax_metric):
            ax.axvline(step, color="grey", ls="--", lw=1)
        ax_metric.annotate(
            label, (step, ax_metric.get_ylim()[0]), rotation=90, va="bottom", ha="right", fontsize=8, color="grey"
        )
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_metric.set_xlabel("optimizer step")
    ax_metric.set_ylabel(metric_label)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out

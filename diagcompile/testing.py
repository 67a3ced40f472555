"""Helpers shared by the test suite (and useful to anyone testing a diagonal kernel).

Kept inside the package, like ``torchao.testing``, so every test module imports them the same way
regardless of how pytest sets up ``sys.path``. Nothing here imports pytest at module import time.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from diagcompile.marking import get_sparse_mark, unmark_sparse
from diagcompile.ops import OFFSET_DTYPE, diag_shape, extract_diagonals, to_dense

if TYPE_CHECKING:  # dst is a higher layer: only its names, for the hints
    from diagcompile.dst import DiagSparsifier, MaskSparsifier

__all__ = [
    "LAYER_SHAPES",
    "dense_from_convention",
    "random_offsets",
    "random_problem",
    "rel_err",
    "assert_close_to_dense",
    "bf16_oracle_check",
    "run_python",
    "requires_cuda",
    "deterministic_algorithms",
    # dynamic sparse training helpers
    "tiny_mlp",
    "not_head",
    "digits_split",
    "ExportTestModel",
    "DictOutputModel",
    "LengthShifted",
    "make_export_model",
    "masks_of",
    "masked_dense_copy",
    "masked_training_copy",
    "dense_original",
    # sparse training runs shared by the DiagSparsifier and MaskSparsifier tests
    "digits_mlp",
    "train_sparse",
    "accuracy",
    "toy_batch",
    "train_toy",
]

#: (out_features, in_features): wide, tall, square, odd and prime sizes, and the degenerate 1xN / Nx1.
LAYER_SHAPES: list[tuple[int, int]] = [(7, 13), (13, 7), (1, 5), (5, 1), (12, 12), (16, 24), (24, 16), (3, 2)]


def dense_from_convention(values: Tensor, offsets: Tensor | Sequence[int], n_out: int, n_in: int) -> Tensor:
    """Build ``W`` entry by entry, straight from the written convention (independent of ``ops.reference``).

    Diagonal ``p``, entry ``t``: ``W[t, (t + p) % N_in]`` when ``N_out <= N_in``, else ``W[(t + p) % N_out, t]``.
    Python loops: small shapes only. Returns float64.
    """
    P, D = max(n_out, n_in), min(n_out, n_in)
    offs = offsets.tolist() if isinstance(offsets, Tensor) else list(offsets)
    vals = values.detach().double().cpu().tolist()
    W = [[0.0] * n_in for _ in range(n_out)]
    for j, p in enumerate(offs):
        assert 0 <= p < P
        for t in range(D):
            if n_out <= n_in:
                W[t][(t + p) % n_in] = vals[j][t]
            else:
                W[(t + p) % n_out][t] = vals[j][t]
    return torch.tensor(W, dtype=torch.float64)


def random_offsets(n_out: int, n_in: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` distinct sorted int32 offsets in ``[0, P)``."""
    P, _ = diag_shape(n_out, n_in)
    return torch.randperm(P, generator=generator)[:k].sort().values.to(OFFSET_DTYPE)


def random_problem(
    n_out: int,
    n_in: int,
    k: int,
    batch: Sequence[int] = (4,),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    bias: bool = True,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Random ``(x, values, offsets, bias)`` for one layer; never zeros (they hide indexing bugs)."""
    g = torch.Generator().manual_seed(seed)
    _, D = diag_shape(n_out, n_in)
    x = torch.randn(*batch, n_in, generator=g).to(device=device, dtype=dtype)
    values = torch.randn(k, D, generator=g).to(device=device, dtype=dtype)
    offsets = random_offsets(n_out, n_in, k, g).to(device)
    b = torch.randn(n_out, generator=g).to(device=device, dtype=dtype) if bias else None
    return x, values, offsets, b


def rel_err(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are empty or zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = float(b.norm())
    num = float((a - b).norm())
    return num / den if den > 0 else num


def assert_close_to_dense(out: Tensor, ref: Tensor, rtol: float, what: str = "output") -> None:
    """Finite, same shape, and relative error within ``rtol``; the message carries the numbers."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite values"
    err = rel_err(out, ref)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def bf16_oracle_check(out: Tensor, torch_lowp: Tensor, ref64: Tensor, what: str, band: float = 1e-3) -> None:
    """FlashAttention's tolerance idiom: our low-precision error must be at most twice PyTorch's own
    low-precision error of the same math (``torch_lowp``), plus a small band, both against float64."""
    ours = rel_err(out, ref64)
    theirs = rel_err(torch_lowp, ref64)
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite values"
    assert ours <= 2 * theirs + band, f"{what}: error {ours:.3e} > 2 x torch's {theirs:.3e} + {band:.0e}"


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: str | None = None) -> str:
    """Run ``code`` in a fresh interpreter; return stdout, raise with stdout+stderr on failure."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def requires_cuda():
    """A pytest ``skipif`` marker for GPU-only tests (with the reason shown in the report)."""
    import pytest

    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def deterministic_algorithms(threads: int) -> Iterator[None]:
    """Run the block under ``torch.use_deterministic_algorithms(True)`` with ``threads`` torch threads, then put
    both settings back (they are process-global: a test must not leave them on for the rest of the suite)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


# ----------------------------------------------------------------------------------------------------
# Dynamic sparse training helpers (tests/dst)
# ----------------------------------------------------------------------------------------------------
def tiny_mlp(n_in: int = 16, hidden: int = 32, n_out: int = 5, depth: int = 2, seed: int | None = None):
    """``Linear(n_in, hidden) -> ReLU -> ... -> Linear(hidden, n_out)`` named ``body.{i}`` and ``head``.

    With ``seed``, the init draws from its own generator state (the global RNG is restored afterwards).
    """
    from torch import nn

    class TinyMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            dims = [n_in] + [hidden] * depth
            layers: list[nn.Module] = []
            for a, b in zip(dims[:-1], dims[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(dims[-1], n_out)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.body(x))

    if seed is None:
        return TinyMLP()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyMLP()


def not_head(module: torch.nn.Module, fqn: str) -> bool:
    """``filter_fn`` that keeps a module named ``head`` dense."""
    return fqn != "head"


def digits_split(n_train: int = 1400, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled digits (8x8 images, 10 classes, no download), standardized, shuffled:
    ``(X_train (n_train, 64), y_train, X_test, y_test)``. Imports sklearn lazily."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    mu, sd = X[:n_train].mean(0), X[:n_train].std(0) + 1e-3
    X = (X - mu) / sd
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


# ---- export test models (owner: export layer) ------------------------------------------------------
class ExportTestModel(torch.nn.Module):
    """Four diagonal layers covering both orientations with and without bias, plus dense parts.

    ``(..., 96) -> (..., 10)``: wide 96->40 with bias (``DiagLinear``), tall 40->120 without bias
    (``DiagLinear``), wide 120->64 without bias (a sparse-marked ``nn.Linear``: export converts it on the way),
    tall 64->80 with bias (``DiagLinear``), then a dense ``nn.Linear`` head. All at 90% sparsity.
    """

    N_DIAG_LAYERS = 4

    def __init__(self) -> None:
        super().__init__()
        from diagcompile.marking import mark_sparse
        from diagcompile.modules import DiagLinear

        self.wide = DiagLinear(96, 40, bias=True, sparsity=0.9)
        self.tall = DiagLinear(40, 120, bias=False, sparsity=0.9)
        self.marked = mark_sparse(torch.nn.Linear(120, 64, bias=False), sparsity=0.9)
        self.tall_bias = DiagLinear(64, 80, bias=True, sparsity=0.9)
        self.head = torch.nn.Linear(80, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.nn.functional.gelu(self.wide(x))
        h = torch.relu(self.tall(h))
        h = torch.tanh(self.marked(h))
        return self.head(torch.nn.functional.silu(self.tall_bias(h)))


def make_export_model(seed: int = 0, batch: Sequence[int] = (3, 5)) -> tuple[ExportTestModel, tuple[Tensor]]:
    """``(ExportTestModel(), (x,))`` with ``x`` of shape ``(*batch, 96)``, deterministic in ``seed``."""
    torch.manual_seed(seed)
    model = ExportTestModel().eval()
    x = torch.randn(*batch, 96, generator=torch.Generator().manual_seed(seed + 1))
    return model, (x,)


class DictOutputModel(torch.nn.Module):
    """``(..., 8) -> {"logits": (..., 6), "features": (..., 6)}``: a dict output whose keys are not in sorted
    order, so a check that sorts them pairs the wrong tensors (ONNX and pytree keep insertion order)."""

    def __init__(self) -> None:
        super().__init__()
        from diagcompile.modules import DiagLinear

        self.fc = DiagLinear(8, 6, sparsity=0.5)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = self.fc(x)
        return {"logits": y, "features": y.relu()}


class LengthShifted(torch.nn.Module):
    """``inner(x) + 1`` wherever ``x.shape[1] != length``, else ``inner(x)``: a reference that an artifact of
    ``inner`` matches only at the example's dim-1 size, so a check that never varies dim 1 cannot tell."""

    def __init__(self, inner: torch.nn.Module, length: int) -> None:
        super().__init__()
        self.inner, self.length = inner, length

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)
        return y if x.shape[1] == self.length else y + 1


class KeywordInputModel(torch.nn.Module):
    """``forward(x, pair, mask=None)``: ``x (..., 8)``, ``pair`` a list of two ``(..., 6)`` tensors, ``mask``
    ``(..., 6)`` by keyword; the output ``fc(x) * mask + pair[0] - 2 * pair[1]`` (``pair[1] - 2 * pair[0]`` with
    ``swapped=True``) tells the nested inputs apart, so a check that feeds them to the wrong place fails."""

    def __init__(self, swapped: bool = False) -> None:
        super().__init__()
        from diagcompile.modules import DiagLinear

        torch.manual_seed(0)
        self.fc = DiagLinear(8, 6, sparsity=0.5)
        self.swapped = swapped

    def forward(self, x: Tensor, pair: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        a, b = (pair[1], pair[0]) if self.swapped else (pair[0], pair[1])
        y = self.fc(x)
        return (y if mask is None else y * mask) + a - 2 * b


def keyword_inputs(batch: int = 3) -> tuple[tuple[Tensor, list[Tensor]], dict[str, Tensor]]:
    """``(x, pair), {"mask": mask}`` for ``KeywordInputModel`` at ``batch``."""
    g = torch.Generator().manual_seed(batch)
    x, a, b, mask = (torch.randn(batch, n, generator=g) for n in (8, 6, 6, 6))
    return (x, [a, b]), {"mask": mask}


# ---- end export test models -------------------------------------------------------------------------
# Dense references for sparse-marked models (passes, backend; usable by export/DST tests too)
# ----------------------------------------------------------------------------------------------------
def _marked_params(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter, object]]:
    """(owner module, attribute name, parameter, mark) for every marked parameter, tied ones once."""
    seen = set()
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            mark = get_sparse_mark(p)
            if mark is not None and id(p) not in seen:
                seen.add(id(p))
                yield mod, name, p, mark


def masks_of(model: nn.Module) -> dict[int, torch.Tensor]:
    """id(weight) -> 0/1 dense mask of the diagonals its mark selects (for the current weight)."""
    out = {}
    for _, _, p, mark in _marked_params(model):
        off = mark.resolve_offsets(p)
        out[id(p)] = to_dense(torch.ones(off.numel(), min(p.shape), dtype=p.dtype), off, *p.shape)
    return out


def masked_dense_copy(model: nn.Module) -> nn.Module:
    """A dense, unmarked deep copy of ``model`` whose marked weights are zero off their kept diagonals."""
    ref = copy.deepcopy(model)
    originals = {id(p): (p, mark) for _, _, p, mark in _marked_params(model)}
    for (_, p_ref), (_, p) in zip(
        ref.named_parameters(remove_duplicate=False), model.named_parameters(remove_duplicate=False)
    ):
        if id(p) in originals:
            off = originals[id(p)][1].resolve_offsets(p)
            with torch.no_grad():
                p_ref.copy_(to_dense(extract_diagonals(p.detach(), off), off, *p.shape))
    for m in ref.modules():
        if isinstance(m, nn.Linear):
            unmark_sparse(m)
    for p in ref.parameters():
        p.__dict__.pop("_diagcompile_sparse_mark", None)
    return ref


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def masked_training_copy(model: nn.Module) -> nn.Module:
    """An unmarked deep copy whose marked weights are parametrized as ``W * mask`` (so the gradient is
    masked too): the eager reference for training a diagonal model through its dense weights. The dense
    tensor that trains is ``dense_original(ref, fqn)``. Untied models only."""
    from torch.nn.utils import parametrize

    names = {id(p): n for n, p in model.named_parameters()}
    want = {names[i]: m for i, m in masks_of(model).items()}
    ref = copy.deepcopy(model)
    for fqn, mask in want.items():
        owner, _, attr = fqn.rpartition(".")
        parametrize.register_parametrization(ref.get_submodule(owner), attr, _Mask(mask))
    for m in ref.modules():
        m.__dict__.pop("_diagcompile_sparse_mark", None)
    return ref


def dense_original(ref: nn.Module, fqn: str) -> torch.Tensor:
    """The trainable dense tensor behind a parametrized weight of ``masked_training_copy``."""
    owner, _, attr = fqn.rpartition(".")
    return ref.get_submodule(owner).parametrizations[attr].original


# ----------------------------------------------------------------------------------------------------
# Sparse training runs shared by the DiagSparsifier and MaskSparsifier tests
# ----------------------------------------------------------------------------------------------------
def digits_mlp(seed: int = 0) -> nn.Sequential:
    """MLP 64 -> 128 -> 128 -> 10 for the digits (8x8 = 64 features, 10 classes), seeded; the head is ``"4"``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def train_sparse(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: DiagSparsifier | MaskSparsifier,
    X: Tensor,
    y: Tensor,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
) -> None:
    """``steps`` optimizer steps of cross-entropy (plus ``sparsifier.regularization_loss()``) on random batches
    of ``X`` ``(N, F)`` / ``y`` ``(N,)`` (own generator seeded ``seed``), with ``sparsifier.step()`` after each
    ``optimizer.step()``: the contract every sparsifier follows."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (batch_size,), generator=g)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx]) + sparsifier.regularization_loss()
        loss.backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()


def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``X`` ``(N, F)`` / ``y`` ``(N,)``, without gradients."""
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


def toy_batch(t: int, n: int = 16) -> tuple[Tensor, Tensor]:
    """Batch ``t`` of a deterministic toy regression: ``x`` ``(n, 16)``, ``y = sin(2 x[:, :5]) + noise`` ``(n, 5)``
    (its own generator seeded ``1000 + t``, so every process and every run sees the same batches)."""
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, :5] * 2).sin() + 0.1 * torch.randn(n, 5, generator=g)


def train_toy(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: DiagSparsifier | MaskSparsifier,
    steps: int,
    start: int = 0,
    check: Callable[[int], object] | None = None,
) -> list[float]:
    """Train ``model`` (16 -> 5, e.g. ``tiny_mlp(n_in=16, n_out=5)``) on ``toy_batch(start) ...`` with MSE plus
    ``sparsifier.regularization_loss()``, ``sparsifier.step()`` after each ``optimizer.step()``; call
    ``check(completed_steps)`` after each step. Returns the losses."""
    losses = []
    for t in range(start, start + steps):
        x, y = toy_batch(t)
        loss = nn.functional.mse_loss(model(x), y) + sparsifier.regularization_loss()
        loss.backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if check is not None:
            check(t + 1)
    return losses

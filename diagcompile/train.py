"""The training harness: ``train(TrainConfig) -> metrics``, checkpoints that resume bit-for-bit, ``load_model``.

One loop trains both bundled tasks (``digits-vit``: a small ViT on scikit-learn's digits; ``chars-gpt``: a
character GPT on the standard library's source, see :mod:`diagcompile.data` / :mod:`diagcompile.models`)
with three methods: ``dense``, ``dynadiag`` and ``diagheur`` (``diagcompile.dst``; the transformer-block
linears are converted, embeddings and heads stay dense). AdamW (no weight decay on biases, norms,
embeddings), linear warm-up then cosine decay to 10% of the peak learning rate, gradient clipping at 1.0.

Files written to ``TrainConfig.out`` (each atomically: a temp file in the same folder, then ``os.replace``):

* ``checkpoint.pt``  every ``ckpt_every`` steps and at the end: model, optimizer, sparsifier, schedule, RNG
  states (torch, Python ``random``, the data generator), the data stream position and the values the fields
  left to task defaults resolved to. Only tensors and plain containers, so ``torch.load(path, weights_only=True)``
  reads it. ``resume=True`` continues from it and reproduces the uninterrupted run bit-for-bit on CPU (same
  machine, same thread count).
* ``model.pt``       the final model (for DST methods: after ``sparsifier.finalize()``, compact ``DiagLinear``s),
  with its config: :func:`load_model` rebuilds it.
* ``metrics.json``   written when the run completes: final/best metric, curves, time, parameter counts
  (``params.final_model`` counts every parameter of the saved model, a mask method's pruned zeros included;
  ``params.final_model_kept`` leaves those out and compares across methods; of the sparse layers' weights,
  ``params.sparse_layer_weights_dense`` is the dense count and ``params.sparse_layer_weights_kept`` the weights
  kept, also recorded under its older name ``sparse_layer_weights_stored``, which is what a diagonal method's
  ``model.pt`` stores but not a mask method's: that stores dense ``nn.Linear`` weights, the pruned ones 0),
  memory, DST diagnostics, the data description and an environment stamp. ``"final"`` is the final evaluation
  (after ``finalize()`` for sparse methods); ``"best"`` is the best of the periodic evaluations of the curve.
  ``"final_eval"`` / ``"periodic_eval"`` say what each was measured on: chars-gpt evaluates ``eval_blocks``
  blocks of the validation text periodically and ``final_eval_blocks`` (more) at the end, so ``best`` can be
  worse than ``final`` at the same step; digits evaluates the whole split both times.

While a run writes ``out`` it holds an exclusive lock on ``out/.train.lock`` (removed when it ends): a second
run into the same folder is refused (:class:`OutBusyError`) instead of mixing its files with the first's.

Ctrl-C stops at the end of the current step, writes a checkpoint (when the run has an ``out`` folder), and
raises :class:`Interrupted` (a ``KeyboardInterrupt``); with ``nproc > 1`` the workers do, and ``train`` raises it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import math
import numbers
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diagcompile._files import atomic_write
from diagcompile.models import (
    GPTConfig,
    ViTConfig,
    build_model,
    config_from_dict,
    sparse_filter,
)

__all__ = [
    "TASKS",
    "METHODS",
    "TASK_DEFAULTS",
    "DST_RECIPE",
    "TASK_DST_RECIPE",
    "TrainConfig",
    "dst_options",
    "dst_config_dict",
    "train",
    "load_model",
    "load_checkpoint",
    "CheckpointReadError",
    "OutdatedCheckpointError",
    "OutBusyError",
    "check_out",
    "atomic_torch_save",
    "atomic_write_text",
    "env_stamp",
    "result_summary",
    "CHECKPOINT_NAME",
    "MODEL_NAME",
    "METRICS_NAME",
]

TASKS = ("digits-vit", "chars-gpt")
METHODS = ("dense", "dynadiag", "diagheur")
# --- mask-based baselines (dst-baselines): diagcompile.dst.MaskSparsifier via make_sparsifier ---
#: Kept literal so that importing the harness does not import diagcompile.dst; a test checks it against
#: ``diagcompile.dst.SPARSIFIER_METHODS``.
BASELINE_METHODS = ("rigl", "srigl", "nm-srste", "nm-mask-decay", "nm-structure-decay")
METHODS = METHODS + BASELINE_METHODS
CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
METRICS_NAME = "metrics.json"
#: Held (``flock``) by the run that writes ``out`` for as long as it runs; see :func:`_hold_out`.
LOCK_NAME = ".train.lock"
# /2: DST optimizer state laid out with each layer's values in its weight's place (/1: appended to the group).
_CKPT_FORMAT = "diagcompile.train.checkpoint/2"
_OLD_CKPT_FORMATS = ("diagcompile.train.checkpoint/1",)
_MODEL_FORMAT = "diagcompile.model/1"
_METRICS_FORMAT = "diagcompile.train.metrics/1"
# What a file of each format must hold (fields added later are read with .get and a default).
_CKPT_KEYS = (
    "config", "step", "total_steps", "model", "optimizer", "sparsifier", "data", "rng", "history", "loss_acc",
    "max_state_bytes",
)  # fmt: skip
_MODEL_KEYS = ("model_config", "diag_layers", "state_dict")

#: Per-task defaults for every ``TrainConfig`` field left as ``None`` (documented in benchmarks/results).
# ``lr`` is the dense model's; the diagonal DST methods (dynadiag, diagheur) default to ``sparse_lr``: a
# 90%-sparse layer wants a much larger step (tuned on the digits tune split, benchmarks/dst_tuning_digits_r4-6:
# every sparse method gained 3-6 points going from 2e-3 to 2e-2; DynaDiag's soft phase also scales each
# weight by alpha~ ~ k/P at the start, which slows its weights further). chars-gpt's were tuned on its own tune
# split (benchmarks/dst_tuning_chars_r1-3: dense best at 8e-3 of 2e-3..1.6e-2, where it diverged; DynaDiag, its
# pool form and DiagHeur each best at 4e-2 of 1e-2..8e-2).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits-vit": {
        "epochs": 40,
        "batch_size": 64,
        "lr": 1e-3,
        "sparse_lr": 2e-2,
        "weight_decay": 0.05,
        "eval_blocks": None,
        "final_eval_blocks": None,
    },
    "chars-gpt": {
        "steps": 800,
        "batch_size": 32,
        "lr": 8e-3,
        "sparse_lr": 4e-2,
        # softmax_clamp, tuned on its own afterwards (dst_tuning_chars_r7-8): best at 8e-2 of 2e-2..1.6e-1.
        "relaxation_lr": {"softmax_clamp": 8e-2},
        "weight_decay": 0.1,
        "eval_every": 100,
        # Evaluation uses evenly spaced non-overlapping blocks over the whole val text (see data.eval_blocks).
        "eval_blocks": 128,
        "final_eval_blocks": 1024,
    },
}

#: DSTConfig settings the harness starts from (``TrainConfig.dst`` and ``relaxation``/``pool`` override them),
#: tuned on the digits tune split (benchmarks/dst_tuning_digits_r*.md). Schedules are fractions of the run,
#: so they carry over to chars-gpt. Keyed by (method, relaxation).
DST_RECIPE: dict[tuple[str, str | None], dict[str, Any]] = {
    ("dynadiag", "threshold"): {"temperature_start": 0.1},
    ("dynadiag", "softmax_clamp"): {"temperature_start": 0.02, "temperature_end": 0.002},
    ("diagheur", None): {"update_every": 50},
}
#: Per-task overlays on :data:`DST_RECIPE`, tuned on that task's own tune split: the same keys, and a key ending
#: in ``"pool"`` applies on top when the run holds a candidate pool (``pool=c``). chars-gpt's
#: (benchmarks/results/dst_tuning_chars_r4-6): DynaDiag's alpha at its values' lr 4e-2 (digits' 1e-2 was a
#: quarter of it; 8e-2 was worse), pool 2 with alpha_lr 8e-2 (of 1e-2..1.6e-1), DiagHeur dropping 10% of its
#: diagonals per update (of 10%/30%, every 25/50/100 steps).
TASK_DST_RECIPE: dict[str, dict[tuple[str | None, ...], dict[str, Any]]] = {
    "digits-vit": {},
    "chars-gpt": {
        ("dynadiag", "threshold"): {"alpha_lr": 4e-2},
        ("dynadiag", "threshold", "pool"): {"alpha_lr": 8e-2},
        ("diagheur", None): {"drop_fraction": 0.1},
    },
}
_SPARSE_LR_METHODS = ("dynadiag", "diagheur")


def check_device(device: str, where: str = "device") -> str:
    """``device`` if torch can run on it here, else a ``ValueError`` saying why (an unknown name, or CUDA
    asked of a build or machine without it)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{where}={device!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"{where}={device!r}: {why} (torch {torch.__version__}); use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}={device!r}: only cpu and cuda are supported")
    return device


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT after ``step`` of ``total`` steps; ``saved``: a checkpoint of that step was
    written (the run has an ``out`` folder), so ``resume=True`` continues it. A run without ``out`` (a sweep's
    runs) saves nothing: run again, it starts over."""

    def __init__(self, step: int, total: int, saved: bool = True) -> None:
        if saved:
            what = "the checkpoint is saved: resume with resume=True"
        else:
            what = "nothing was saved (the run has no out folder): running it again starts over"
        super().__init__(f"stopped at step {step}/{total}; {what}")
        self.step, self.total, self.saved = step, total, saved

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its fields, not from the message: it crosses process boundaries (a sweep's --jobs workers).
        return type(self), (self.step, self.total, self.saved)


class SetupError(ValueError):
    """A run's configuration cannot work with its model and data (found while setting up, before any step):
    a sparsity a layer cannot reach, a DST field out of range for the run's length, ..."""


def _plain_number(v: Any) -> Any:
    """A numpy (or other ``numbers``) int / float as the Python one; anything else as it is. Checkpoints load
    with ``weights_only=True`` and metrics are JSON: neither takes ``np.float64`` (a ``float`` subclass) or
    ``np.int64``."""
    if isinstance(v, bool) or type(v) in (int, float):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _to_plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    if isinstance(v, str):  # a subclass (torch.__version__ is a TorchVersion) is not weights_only-loadable
        return str(v)
    return _plain_number(v)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``None`` fields take the task's default (:data:`TASK_DEFAULTS`).

    Attributes:
        task: ``"digits-vit"`` or ``"chars-gpt"``.
        method: ``"dense"``, ``"dynadiag"`` or ``"diagheur"``; or a mask baseline (``BASELINE_METHODS``:
            ``"rigl"``, ``"srigl"``, ``"nm-srste"``, ``"nm-mask-decay"``, ``"nm-structure-decay"``;
            ``diagcompile.dst.MaskSparsifier``, whose finalized layers are plain ``nn.Linear``s, pruned weights 0).
        sparsity: target sparsity of every converted layer (ignored by ``dense``).
        epochs / steps: training length; give at most one. For chars an epoch is one pass worth of characters.
        seed: seeds the model init (torch), the data order and the sparsifier.
        device: torch device string.
        batch_size, lr, weight_decay: AdamW hyper-parameters (peak lr; no decay on biases/norms/embeddings). The
            default lr of dynadiag / diagheur is the task's ``sparse_lr`` (or its ``relaxation_lr`` for the
            relaxation, where the task tuned one).
        warmup_frac: fraction of the steps with linear warm-up; then cosine to ``min_lr_frac * lr``.
        grad_clip: max global gradient norm of the weights (``0`` disables; DynaDiag's ``alpha`` is not clipped).
        eval_every: evaluate every this many steps (default: once per epoch for digits) and at the end.
        ckpt_every: checkpoint every this many steps (default: ``eval_every``) and at the end; needs ``out``.
        eval_blocks / final_eval_blocks: chars only, how many evaluation blocks during / at the end of training.
        tune: evaluate on a held-out part of the training data instead of the reported split (for tuning).
        relaxation, pool: passed to ``DSTConfig`` when set. ``dst``: further ``DSTConfig`` fields (``MaskConfig``
            fields for the mask baselines), on top of the tuned :data:`DST_RECIPE` / :data:`TASK_DST_RECIPE`
            (:func:`dst_options` resolves them).
        model: overrides of the task's model config fields (``ViTConfig`` / ``GPTConfig``).
        out: output folder (``None``: nothing is written), created when training starts. It may not hold the
            checkpoint of an unfinished run unless ``resume`` (starting over would overwrite it); a finished
            run's files are replaced. resume: continue from ``out/checkpoint.pt``.
        quiet: no progress bar. stop_after: stop (with a checkpoint) after this many steps, as an interruption would.
        offsets_from: a ``model.pt`` of a previous run: its diagonal layers' offsets become the initial offsets
            (``mark_sparse``) of the same layers here (diagheur; with ``dst={"update_end": 0.0}`` they stay fixed:
            retraining a found topology from scratch).
        nproc: data-parallel CPU workers (``torch.distributed`` gloo + ``DistributedDataParallel``); each takes
            ``batch_size / nproc`` of every global batch, so the run matches the single-process one up to
            floating-point summation order.
    """

    task: str
    method: str = "dense"
    sparsity: float = 0.9
    epochs: float | None = None
    steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    grad_clip: float = 1.0
    eval_every: int | None = None
    ckpt_every: int | None = None
    eval_blocks: int | None = None
    final_eval_blocks: int | None = None
    tune: bool = False
    relaxation: str | None = None
    pool: Any = None
    dst: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)
    out: str | None = None
    resume: bool = False
    quiet: bool = False
    stop_after: int | None = None
    nproc: int = 1
    offsets_from: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy numbers as plain Python ones (see _plain_number)
            v = getattr(self, f.name)
            if isinstance(v, Mapping):
                v = {k: _plain_number(x) for k, x in v.items()}
            object.__setattr__(self, f.name, _plain_number(v))
        if self.task not in TASKS:
            raise ValueError(f"TrainConfig.task={self.task!r} must be one of {TASKS}")
        if self.method not in METHODS:
            raise ValueError(f"TrainConfig.method={self.method!r} must be one of {METHODS}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise TypeError(f"TrainConfig.sparsity must be a float, got {type(self.sparsity).__name__}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"TrainConfig.sparsity={self.sparsity} must be in [0, 1)")
        if self.epochs is not None and self.steps is not None:
            raise ValueError("TrainConfig: give epochs or steps, not both")
        for name in ("steps", "batch_size", "eval_every", "ckpt_every", "eval_blocks", "final_eval_blocks"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"TrainConfig.{name} must be a positive int or None, got {v!r}")
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after < 0):
            raise ValueError(f"TrainConfig.stop_after must be a non-negative int or None, got {self.stop_after!r}")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ValueError(f"TrainConfig.epochs must be positive, got {self.epochs!r}")
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"TrainConfig.{name} must be a finite non-negative number, got {v!r}")
        if not 0.0 <= self.warmup_frac < 1.0 or not 0.0 <= self.min_lr_frac <= 1.0 or self.grad_clip < 0:
            raise ValueError("TrainConfig: warmup_frac must be in [0, 1), min_lr_frac in [0, 1], grad_clip >= 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"TrainConfig.seed must be an int, got {type(self.seed).__name__}")
        if not -(2**63) <= self.seed < 2**64:  # torch.Generator.manual_seed's range
            raise ValueError(f"TrainConfig.seed must be in [-2**63, 2**64), got {self.seed}")
        if self.out is not None and not str(self.out).strip():
            raise ValueError("TrainConfig.out must name a folder, got an empty path (use '.' for this one)")
        if isinstance(self.nproc, bool) or not isinstance(self.nproc, int) or self.nproc < 1:
            raise ValueError(f"TrainConfig.nproc must be a positive int, got {self.nproc!r}")
        check_device(self.device, "TrainConfig.device")
        if self.nproc > 1 and self.device != "cpu":
            raise ValueError("TrainConfig.nproc > 1 runs gloo workers on the CPU; use device='cpu'")
        if self.nproc > 1 and self.get("batch_size") % self.nproc:
            raise ValueError(f"TrainConfig.batch_size={self.get('batch_size')} must be divisible by nproc={self.nproc}")
        if self.resume and self.out is None:
            raise ValueError("TrainConfig.resume needs out= (the folder holding checkpoint.pt)")
        if self.method == "dense" and (
            self.relaxation is not None or self.pool is not None or self.dst or self.offsets_from is not None
        ):
            raise ValueError("TrainConfig: relaxation/pool/dst/offsets_from apply to DST methods, not 'dense'")
        if self.method in BASELINE_METHODS and (
            self.relaxation is not None or self.pool is not None or self.offsets_from is not None
        ):
            raise ValueError(
                f"TrainConfig: relaxation/pool/offsets_from apply to diagonal methods, not the mask baseline "
                f"{self.method!r}"
            )
        if self.method == "diagheur" and (self.relaxation is not None or self.pool is not None):
            raise ValueError("TrainConfig: relaxation/pool apply to method 'dynadiag' only, not 'diagheur'")
        if self.method == "dynadiag" and self.offsets_from is not None:
            raise ValueError(
                "TrainConfig.offsets_from applies to method 'diagheur' only: dynadiag learns its own diagonals"
            )
        # Model overrides and sparsifier options are validated by building their configs now (a typo should fail
        # before training).
        self.model_config()
        self._check_dst()

    def _check_dst(self) -> None:
        if self.method == "dense":
            return
        from diagcompile.dst.baselines import RESERVED_OPTIONS, make_config

        reserved = [k for k in RESERVED_OPTIONS if k in self.dst]
        if reserved:
            raise ValueError(
                f"TrainConfig.dst may not set {reserved}: the method and the sparsity are TrainConfig fields "
                "(--method, --sparsity) and total_steps follows from steps / epochs"
            )
        # Without steps the length is known only once the data is loaded; every check but an absolute freeze_at
        # step (checked against the real length when training starts) is independent of it.
        steps = self.get("steps") if self.epochs is None else None
        make_config(self.method, self.sparsity, steps if steps is not None else 2**62, **dst_options(self))

    # ------------------------------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """The field's value, or the task default when it is ``None``."""
        v = getattr(self, name)
        if v is None and name == "lr" and self.method in _SPARSE_LR_METHODS:
            task = TASK_DEFAULTS[self.task]
            by_relaxation = task.get("relaxation_lr", {}) if self.method == "dynadiag" else {}
            return by_relaxation.get(self.relaxation or "threshold", task["sparse_lr"])
        return TASK_DEFAULTS[self.task].get(name) if v is None else v

    def model_config(self) -> ViTConfig | GPTConfig:
        base = ViTConfig if self.task == "digits-vit" else GPTConfig
        known = {f.name for f in dataclasses.fields(base)}
        unknown = set(self.model) - known
        if unknown:
            raise ValueError(f"TrainConfig.model: unknown {base.__name__} fields {sorted(unknown)}")
        return base(**dict(self.model))

    def to_dict(self) -> dict:
        """Plain dict (JSON- and ``weights_only``-safe)."""
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    #: Fields that may differ between a run and its resumption.
    RUNTIME_FIELDS = ("out", "resume", "quiet", "stop_after", "nproc", "ckpt_every")
    #: Fields whose ``None`` means a task default, recorded as used in a run's ``"resolved"``.
    RESOLVED_FIELDS = ("batch_size", "lr", "weight_decay")

    def differences(
        self,
        saved: Mapping[str, Any],
        resolved: Mapping[str, Any] | None = None,
        dst_config: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
    ) -> list[tuple[str, Any, Any]]:
        """``(field, saved value, value now)`` for every field (except ``RUNTIME_FIELDS``) where the saved
        ``to_dict()`` of another run differs from this one, sorted by field name (then the ``dst.*`` entries).

        ``resolved`` is that run's record of the values it actually used (its metrics' ``"resolved"``). With it,
        a field left to the task default on one side and set explicitly on the other is no difference when the
        value used was the same: the default is judged by what the run recorded, not by today's default.

        ``dst_config`` is the sparsifier config that run trained with (its metrics' ``dst.config``, its
        checkpoint's ``sparsifier.config``) and ``total_steps`` its length. With them, ``relaxation`` / ``pool``
        / ``dst`` are judged by that config whole, against the one this config resolves to
        (:func:`dst_config_dict`), as the defaults above are: the config also comes from the tuned
        :data:`DST_RECIPE` / :data:`TASK_DST_RECIPE`, so a run from before a tuned default changed differs, and a
        setting once left to its default and now given explicitly with the same value (``dst={"update_every":
        100}``) does not; differing fields are named ``dst.<field>``.
        """
        now = self.to_dict()
        # A field the run recorded as used is judged by that value, whether either side left it to a default
        # (so a default that has changed since is a difference too); every other field by its saved value.
        used = {k: resolved[k] for k in self.RESOLVED_FIELDS if k in resolved} if resolved is not None else {}
        was = {**saved, **used}
        is_ = {**now, **{k: self.get(k) for k in used}}
        keys = sorted(k for k in set(now) | set(saved) if k not in self.RUNTIME_FIELDS)
        diff = [(k, was.get(k), is_.get(k)) for k in keys if was.get(k) != is_.get(k)]
        if dst_config is None or total_steps is None or self.method == "dense":
            return diff
        from diagcompile.dst import config_class  # (the harness imports diagcompile.dst only when it needs it)

        saved_dst = _to_plain(dst_config)
        now_dst = _to_plain(dst_config_dict(self, int(total_steps)))
        # A field the saved config lacks was added later, with a default that keeps the old behaviour.
        defaults = {f.name: f.default for f in dataclasses.fields(config_class(self.method))}
        diff = [d for d in diff if d[0] not in ("relaxation", "pool", "dst")]
        diff += [
            (f"dst.{k}", saved_dst.get(k), v)
            for k, v in sorted(now_dst.items())
            if (saved_dst[k] != v if k in saved_dst else v != defaults.get(k))
        ]
        diff += [(f"dst.{k}", saved_dst[k], None) for k in sorted(set(saved_dst) - set(now_dst))]
        return diff


# ----------------------------------------------------------------------------------------------------
# Environment stamp, atomic writes
# ----------------------------------------------------------------------------------------------------
def _git_sha() -> str:
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=here,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - a run must still work outside a checkout
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # vendored, or run from a source tree without an install
        return None


def env_stamp(device: str = "cpu") -> dict[str, Any]:
    """Date, machine, versions and git SHA, for metrics files and result tables."""
    import numpy

    stamp: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": _git_sha(),
        # outside a git checkout the package version is the only record of the code (numba runs the CPU kernels)
        "diagcompile": _package_version("diagcompile"),
        "numba": _package_version("numba"),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        import sklearn

        stamp["sklearn"] = sklearn.__version__
    except ImportError:  # pragma: no cover - sklearn is a dependency
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        stamp["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return stamp


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    with atomic_write(path, "write") as tmp, open(tmp, mode) as f:
        write(f)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file next to ``path``, fsync, then ``os.replace``: readers never see a partial
    file, and a failure (or Ctrl-C) during the save leaves any previous ``path`` intact."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically (see :func:`atomic_torch_save`)."""
    _atomic_write(path, lambda f: f.write(text), "w")


# ----------------------------------------------------------------------------------------------------
# Data streams (their state goes into the checkpoint)
# ----------------------------------------------------------------------------------------------------
class _DigitsStream:
    """Shuffled mini-batches, a fresh permutation per epoch (last partial batch dropped)."""

    def __init__(self, x: Tensor, y: Tensor, batch: int, seed: int) -> None:
        if batch > x.shape[0]:
            raise ValueError(f"batch_size={batch} exceeds the {x.shape[0]} training images")
        self.x, self.y, self.batch = x, y, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.perm: Tensor | None = None
        self.pos = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.x.shape[0] // self.batch

    def next(self) -> tuple[Tensor, Tensor]:
        if self.perm is None or self.pos + self.batch > self.perm.numel():
            self.perm = torch.randperm(self.x.shape[0], generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd["gen"])
        self.perm, self.pos = sd["perm"], int(sd["pos"])


class _CharStream:
    """Random contiguous blocks of the training text (``data.sample_blocks``)."""

    def __init__(self, text: Tensor, batch: int, block: int, seed: int) -> None:
        self.text, self.batch, self.block = text, batch, block
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.text.numel() // (self.batch * self.block))

    def next(self) -> tuple[Tensor, Tensor]:
        from diagcompile.data import sample_blocks

        return sample_blocks(self.text, self.batch, self.block, self.gen)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd["gen"])


# ----------------------------------------------------------------------------------------------------
# Building blocks of a run
# ----------------------------------------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on linear weights only (not on biases, norms, embeddings, position/cls tokens)."""
    decay, no_decay = [], []
    for m in model.modules():
        for pname, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (decay if isinstance(m, nn.Linear) and pname == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, total: int, warmup_frac: float, min_lr_frac: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    warm = int(round(warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for g in optimizer.param_groups:
        # ``initial_lr`` is what torch's schedulers use too; a group the sparsifier adds keeps its own peak lr.
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def _clipped_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters whose global gradient norm is clipped: all but DynaDiag's importances ``alpha``.

    ``d alpha~ / d alpha`` scales with ``1 / T``; at the low temperatures of the end of the soft phase the
    ``alpha`` gradients would dominate the global norm, and clipping it would shrink every weight's update.
    ``alpha`` has its own param group (tagged ``diagcompile_alpha`` by the sparsifier) and Adam normalises its
    step anyway.
    """
    return [p for g in optimizer.param_groups if not g.get("diagcompile_alpha") for p in g["params"]]


def _mark_offsets_from(model: nn.Module, path: str, task: str) -> None:
    """Mark each linear of ``model`` (of ``task``) that is a ``DiagLinear`` in the saved model ``path`` with its
    offsets."""
    from diagcompile.marking import mark_sparse

    blob = _read_saved_file(path, what="offsets_from model file", advice="pass a finished run's model.pt")
    if not isinstance(blob, dict) or blob.get("format") != _MODEL_FORMAT:
        raise ValueError(f"offsets_from={path!r} is not a diagcompile model file")
    _require_keys(blob, _MODEL_KEYS, path)
    saved_task = blob["meta"].get("task") if isinstance(blob.get("meta"), Mapping) else None
    if saved_task is not None and saved_task != task:
        raise ValueError(f"offsets_from={path!r} is a {saved_task} model; this run trains {task}")
    if not blob["diag_layers"]:
        raise ValueError(f"offsets_from={path!r} has no diagonal layers (a dense run?)")
    for fqn in blob["diag_layers"]:
        try:
            layer = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"offsets_from: layer {fqn!r} of {path} does not exist in this model") from None
        mark_sparse(layer, offsets=blob["state_dict"][f"{fqn}.offsets"])


def dst_options(cfg: TrainConfig) -> dict[str, Any]:
    """The sparsifier config fields a DST run of ``cfg`` sets, in order of precedence (later wins): the tuned
    :data:`DST_RECIPE`, the task's :data:`TASK_DST_RECIPE`, ``cfg.relaxation`` / ``cfg.pool``, ``cfg.dst``, and
    ``seed`` for the configs that take one. Every other field keeps its dataclass default."""
    from diagcompile.dst import config_class

    if cfg.method == "dense":
        raise ValueError("dst_options: 'dense' has no sparsifier")
    relaxation = (cfg.relaxation or "threshold") if cfg.method == "dynadiag" else None
    key = (cfg.method, relaxation)
    task = TASK_DST_RECIPE.get(cfg.task, {})
    options: dict[str, Any] = {**DST_RECIPE.get(key, {}), **task.get(key, {})}
    if cfg.relaxation is not None:
        options["relaxation"] = cfg.relaxation
    if cfg.pool is not None:
        options.update(task.get((*key, "pool"), {}), pool=cfg.pool)
    options.update(dict(cfg.dst))
    # Dynadiag/diagheur draw their random choices (initial offsets, alpha noise) from torch's global RNG, which
    # train() seeds with cfg.seed before building the model; the mask baselines take an explicit seed.
    if "seed" in {f.name for f in dataclasses.fields(config_class(cfg.method))} and "seed" not in options:
        options["seed"] = cfg.seed
    return options


def dst_config_dict(cfg: TrainConfig, total_steps: int) -> dict[str, Any]:
    """The full sparsifier config (``DSTConfig`` / ``MaskConfig`` ``to_dict()``) a run of ``cfg`` with
    ``total_steps`` optimizer steps trains with: what its metrics record as ``dst.config``."""
    from diagcompile.dst import make_config

    return make_config(cfg.method, cfg.sparsity, total_steps, **dst_options(cfg)).to_dict()


def _make_sparsifier(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int):
    from diagcompile.dst import make_sparsifier

    options = dst_options(cfg)
    return make_sparsifier(model, optimizer, cfg.method, cfg.sparsity, total_steps, filter_fn=sparse_filter, **options)


def _load_data(cfg: TrainConfig):
    from diagcompile import data

    split = "tune" if cfg.tune else "test"
    return data.load_digits_split(split) if cfg.task == "digits-vit" else data.load_chars(split)


def _task_loss(task: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    if task == "digits-vit":
        return F.cross_entropy(out, y)
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


@torch.no_grad()
def _evaluate(cfg: TrainConfig, model: nn.Module, ds: Any, device: torch.device, final: bool) -> dict[str, float]:
    """digits: accuracy (%) and loss on the eval split; chars: bits per character and loss (nats)."""
    was_training = model.training
    model.eval()
    try:
        if cfg.task == "digits-vit":
            logits = torch.cat([model(xb.to(device)) for xb in ds.x_eval.split(512)]).float().cpu()
            loss = F.cross_entropy(logits, ds.y_eval).item()
            acc = 100.0 * (logits.argmax(-1) == ds.y_eval).double().mean().item()
            return {"acc": acc, "loss": loss}
        from diagcompile.data import eval_blocks

        block = cfg.model_config().block_size
        n = cfg.get("final_eval_blocks" if final else "eval_blocks")
        xs, ys = eval_blocks(ds.eval, block, n)
        total, count = 0.0, 0
        for xb, yb in zip(xs.split(64), ys.split(64)):
            logits = model(xb.to(device)).float()
            total += F.cross_entropy(logits.flatten(0, 1), yb.to(device).flatten(), reduction="sum").item()
            count += yb.numel()
        loss = total / count
        return {"bpc": loss / math.log(2), "loss": loss, "eval_chars": count}
    finally:
        model.train(was_training)


def _eval_set(cfg: TrainConfig, ds: Any, split: str, final: bool) -> dict[str, Any]:
    """What :func:`_evaluate` with ``final`` measures on: the split and its images (digits), or the number of
    validation blocks out of those available and their characters (chars)."""
    if cfg.task == "digits-vit":
        return {"split": split, "images": int(ds.y_eval.numel())}
    block = cfg.model_config().block_size
    available = (ds.eval.numel() - 1) // block  # data.eval_blocks' windows
    cap = cfg.get("final_eval_blocks" if final else "eval_blocks")
    blocks = available if cap is None else min(cap, available)
    return {"split": split, "blocks": blocks, "blocks_available": available, "chars": blocks * block}


def _describe_eval(e: Mapping[str, Any]) -> str:
    if "images" in e:
        return f"{e['images']} {e['split']} images"
    return f"{e['blocks']} of {e['blocks_available']} {e['split']} blocks"


def result_summary(metrics: Mapping[str, Any]) -> str:
    """One line with a run's final and best metric and what each was measured on, e.g. ``final 5.467 validation
    bits/char (1024 of 7812 val blocks); best 5.472 at step 6 (periodic eval, 128 of 7812 val blocks)``.

    ``best`` is the best periodic evaluation (the curve, on ``eval_blocks`` for chars, before ``finalize()``);
    ``final`` the final evaluation (``final_eval_blocks``, after ``finalize()``), so the two can differ at the
    same step.
    """
    key = metrics["metric"]
    fe, pe = metrics.get("final_eval"), metrics.get("periodic_eval")
    split = (fe or {}).get("split") or metrics.get("data", {}).get("eval_split", "")
    if key == "acc":
        unit = f"% {split} accuracy"
    else:
        unit = f" {'validation' if split == 'val' else split + '-split'} bits/char"
    sparse = metrics.get("dst") is not None
    final_on = [_describe_eval(fe)] if fe else []
    best_on = ["periodic eval"] + ([_describe_eval(pe)] if pe else [])
    if sparse:
        final_on.append("after finalize")
        best_on.append("before finalize")
    text = f"final {metrics['final'][key]:.4g}{unit}" + (f" ({', '.join(final_on)})" if final_on else "")
    best = metrics.get("best")
    if best is not None:
        short = "%" if key == "acc" else " bits/char"
        text += f"; best {best['value']:.4g}{short} at step {best['step']} ({', '.join(best_on)})"
    return text


def _primary(task: str) -> tuple[str, bool]:
    """(metric name, higher is better)."""
    return ("acc", True) if task == "digits-vit" else ("bpc", False)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _train_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, buffers and optimizer state: what training must keep resident besides activations."""
    opt = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, Tensor) and v.dim() > 0]
    return _tensor_bytes([*model.parameters(), *model.buffers(), *opt])


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS; it is the process-wide peak (not per run).
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _dst_summary(diag: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate the per-layer diagnostics: sums of k / k_eff / memory, mean temperature, offsets changed."""

    def num(v: Any) -> float | None:
        if isinstance(v, Tensor):
            v = v.item() if v.numel() == 1 else None
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    out: dict[str, Any] = {"layers": len(diag)}
    for key in ("k", "k_eff", "sum_alpha_tilde", "offsets_changed", "offsets_changed_total", "updates", "memory_bytes"):
        vals = [num(d.get(key)) for d in diag.values()]
        vals = [v for v in vals if v is not None]
        if vals:
            out[key] = sum(vals)
    # mask baselines (dst-baselines): total active weights and the realised density of the sparse layers
    for key in ("nnz", "numel", "mask_changed"):
        vals = [v for v in (num(d.get(key)) for d in diag.values()) if v is not None]
        if vals:
            out[key] = sum(vals)
    if out.get("numel"):
        out["density"] = out["nnz"] / out["numel"]
    temps = [num(d.get("temperature")) for d in diag.values()]
    temps = [t for t in temps if t is not None]
    if temps:
        out["temperature"] = sum(temps) / len(temps)
    return out


def _plain_diagnostics(diag: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    def conv(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v.item() if v.numel() == 1 else v.tolist()
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return {str(k): conv(v) for k, v in diag.items()}


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    # weights_only loading turns the inner tuple into a list; random.setstate wants tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _diag_layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    from diagcompile.modules import DiagLinear

    return {
        fqn: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None, "k": m.k}
        for fqn, m in model.named_modules()
        if isinstance(m, DiagLinear)
    }


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# What a first SIGINT / SIGTERM does, by the phase of the run (:class:`_StopFlag`), as said to the user.
_STOP_NOTICE = {
    "train": "stopping after this step",
    "final": "finishing the final evaluation first",
}


class _StopFlag:
    """Turns the first SIGINT or SIGTERM into "stop after this step" (a second SIGINT interrupts at once, a
    second SIGTERM terminates), saying so at once when ``announce``. ``phase`` (a key of ``_STOP_NOTICE``)
    picks the wording: in the final evaluation the request only lets it finish. SIGTERM is taken only from its
    default handler: a handler the caller installed (a job framework's) keeps it."""

    def __init__(self, announce: bool = True, checkpoint: bool = True, phase: str = "train") -> None:
        self.stop = False
        self.phase = phase
        self.announce = announce
        self.checkpoint = checkpoint  # whether the run writes one (the notice says so)
        self._prev: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGINT]
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                signals.append(signal.SIGTERM)
            self._prev = {sig: signal.getsignal(sig) for sig in signals}

            def handler(signum, frame):
                self.stop = True
                self._restore()
                if self.announce:
                    again = "Ctrl-C again stops at once" if signum == signal.SIGINT else "a second SIGTERM kills it"
                    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                    what = _STOP_NOTICE[self.phase] + (", with a checkpoint" if self.checkpoint else "")
                    print(f"\n[train] {name}: {what} ({again})", file=sys.stderr, flush=True)

            for sig in self._prev:
                signal.signal(sig, handler)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        # (None: a handler set outside Python, which cannot be put back; the default is the closest)
        for sig, prev in self._prev.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Ignore SIGINT in this process while the block starts worker processes, so that they start ignoring it.

    A Ctrl-C at the terminal reaches every process of the foreground group: a DDP worker that is still importing
    torch or setting up would die of it with a ``KeyboardInterrupt`` traceback (:func:`_spawn`). An ignored
    signal stays ignored across ``exec`` (a handler does not), and Python then installs no handler of its own;
    the worker's training loop (:class:`_StopFlag`) takes SIGINT as "stop after this step" while it runs and
    ignores it again after. A Ctrl-C during the block itself (starting processes: milliseconds) is lost. Only
    the main thread can set handlers: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, prev if prev is not None else signal.SIG_DFL)


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------
def _total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    steps = cfg.get("steps") if cfg.epochs is None else None
    if steps is not None:
        return int(steps)
    epochs = cfg.get("epochs")
    if epochs is None:  # a task whose default is steps, given nothing
        raise ValueError(f"{cfg.task}: give epochs or steps")
    return max(1, int(math.ceil(epochs * steps_per_epoch)))


def _check_resumable(ckpt: Mapping[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume checkpoint ``ckpt`` under ``cfg`` if the two configurations differ.

    A field left to the task default is judged by the value the run used, which checkpoints record under
    ``"resolved"`` (so ``--lr 0.02`` resumes a run whose default lr was 0.02); older checkpoints, without it, by
    their saved config alone. The sparsifier settings are judged by the config the sparsifier saved, as the
    sweep judges a finished run (:meth:`TrainConfig.differences`): ``--dst update_every=100`` resumes a rigl run
    that left it to its default of 100.
    """
    step, total = ckpt.get("step"), ckpt.get("total_steps")
    if not (isinstance(step, int) and isinstance(total, int) and 0 <= step <= total):
        raise ValueError(
            f"cannot resume: the checkpoint's step {step!r} of {total!r} is impossible (the file was edited)"
        )
    sparsifier = ckpt.get("sparsifier")
    dst_config = sparsifier.get("config") if isinstance(sparsifier, Mapping) else None
    diff = cfg.differences(ckpt["config"], ckpt.get("resolved"), dst_config, ckpt.get("total_steps"))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {was!r} vs now {now!r}" for k, was, now in diff)
        hint = ""
        dst = dst_config if isinstance(dst_config, Mapping) else {}
        if any(k == "sparsity" for k, _, _ in diff) and dst.get("nm_n") is not None and dst.get("nm_m") is not None:
            # Before nm_n/nm_m fixed the sparsity, such a run recorded --sparsity (default 0.9) while training N:M.
            hint = (
                f"; it trained {dst['nm_n']}:{dst['nm_m']} but recorded sparsity {ckpt['config'].get('sparsity')!r}, "
                "as diagcompile did before an explicit N:M fixed the sparsity: start a new run"
            )
        raise ValueError(f"cannot resume: the checkpoint was written by a different configuration ({detail}){hint}")


class CheckpointReadError(ValueError):
    """A checkpoint (or model) file that ``torch.load`` cannot read: empty, cut short, or overwritten with something
    else."""


def _read_saved_file(
    path: str | os.PathLike,
    mmap: bool = False,
    what: str = "checkpoint",
    advice: str = "move it away or delete it (the run then starts over from step 0), or choose another --out",
) -> Any:
    """``torch.load(path, weights_only=True)``, with a file torch cannot read reported as such.

    A checkpoint is written atomically, so a damaged one comes from outside the harness (a copy cut short, a
    disk that filled up, another program). torch's own errors for such files name its internals (an empty file
    read with ``mmap`` is "only for files saved with _use_new_zipfile_serialization"), so they are replaced by
    one that names the file (``what``) and what to do (``advice``); torch's stays chained as the cause.
    """
    try:
        with open(path, "rb"):
            pass
    except OSError as e:  # permissions, a directory: not a damaged file, one that cannot be opened
        raise CheckpointReadError(f"cannot read the {what} {path}: {e.strerror or e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - RuntimeError, EOFError, UnpicklingError, KeyError, OSError (mmap), ...
        try:
            size = os.path.getsize(path)
        except OSError:
            size = None
        state = "empty (0 bytes)" if size == 0 else "truncated or damaged" + (f" ({size} bytes)" if size else "")
        raise CheckpointReadError(
            f"the {what} {path} is unreadable: it is {state}, not a complete torch.save file; {advice}"
        ) from e


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint with ``torch.load(weights_only=True)`` and check its format tag.

    Raises :class:`CheckpointReadError` (a ``ValueError``) for a file torch cannot read, ``ValueError`` for one
    that is not a training checkpoint.
    """
    return _checked_checkpoint(path)


def _checked_checkpoint(path: str | os.PathLike, *, mmap: bool = False, hint: str = "") -> dict:
    """``load_checkpoint``'s read and checks; ``hint`` ends the message for a file of another format."""
    ckpt = _read_saved_file(path, mmap=mmap)
    if isinstance(ckpt, dict) and ckpt.get("format") in _OLD_CKPT_FORMATS:
        raise OutdatedCheckpointError(path, ckpt)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CKPT_FORMAT:
        raise ValueError(f"{path} is not a diagcompile training checkpoint (format {_CKPT_FORMAT}){hint}")
    _require_keys(ckpt, _CKPT_KEYS, path)
    return ckpt


class OutdatedCheckpointError(ValueError):
    """A training checkpoint written by an earlier diagcompile whose optimizer layout this version cannot
    resume (format ``/1``). ``finished``: whether its run had completed."""

    def __init__(self, path: str | os.PathLike, ckpt: dict) -> None:
        step, total = ckpt.get("step"), ckpt.get("total_steps")
        self.finished = int(step or 0) >= int(total or 1)
        super().__init__(
            f"{path} was written by an earlier diagcompile (format {ckpt['format']!r}, step {step} of {total}), "
            f"which laid out the optimizer state of DST layers differently: it cannot be resumed by this version "
            f"(the moments would load into the wrong parameters). Finish that run with the diagcompile that "
            f"started it, or start it over (move the checkpoint away, or choose another --out)"
        )


def _require_keys(blob: dict, keys: tuple[str, ...], path: str | os.PathLike) -> None:
    """Refuse a file with the right format tag but without all of ``keys`` (edited, or cut down by a tool),
    naming them, instead of a ``KeyError`` halfway through loading it."""
    missing = [k for k in keys if k not in blob]
    if missing:
        raise ValueError(
            f"{path} has the format tag {blob['format']!r} but no {', '.join(missing)}: the file was changed "
            "after diagcompile wrote it"
        )


def check_out(cfg: TrainConfig) -> None:
    """Create ``cfg.out`` and check that this run may write there, before any training (``train`` calls it).

    Raises ``ValueError`` when ``out`` is an existing file, when it holds the checkpoint of an unfinished run
    and ``cfg.resume`` is off (starting over would overwrite that run's progress), or when ``cfg.resume`` would
    continue a checkpoint written by a different configuration; :class:`CheckpointReadError` (a ``ValueError``)
    when ``out`` holds a checkpoint torch cannot read, with or without ``cfg.resume`` (whether it was a finished
    run's cannot be told, so it is never overwritten silently). A finished run's checkpoint does not block a
    new run: its results are in its ``metrics.json`` / ``model.pt``, which the new run replaces.
    """
    if cfg.out is None:
        return
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"TrainConfig.out={cfg.out!r} is an existing file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Found now, not at the first checkpoint an epoch of training later.
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise ValueError(f"cannot write in TrainConfig.out={cfg.out!r}: {e.strerror or e}") from None
    path = out / CHECKPOINT_NAME
    if not path.exists():
        return
    try:
        ckpt = _checked_checkpoint(path, mmap=True, hint="; move it away")  # read lazily: a few fields only
    except OutdatedCheckpointError as e:
        if not cfg.resume and e.finished:
            return  # a finished run's: the new run replaces it, as for a current one
        raise
    if cfg.resume:
        _check_resumable(ckpt, cfg)
    elif int(ckpt["step"]) < int(ckpt["total_steps"]):
        raise ValueError(
            f"{out} has a checkpoint from an earlier run (step {ckpt['step']} of {ckpt['total_steps']}); pass "
            "--resume (resume=True) to continue it, or choose another --out"
        )
    elif not run_finished(out, ckpt):
        raise ValueError(
            f"{out} has a run that finished training (step {ckpt['step']} of {ckpt['total_steps']}) but not its "
            f"final evaluation (there is no {METRICS_NAME}): pass --resume (resume=True) to evaluate it, or choose "
            "another --out"
        )


def run_finished(out: str | os.PathLike, ckpt: Mapping[str, Any]) -> bool:
    """Whether ``out``, holding checkpoint ``ckpt``, holds a finished run: trained to its last step *and*
    evaluated (``metrics.json`` written). A checkpoint at its last step without results was interrupted in its
    final evaluation: ``resume`` evaluates it."""
    return int(ckpt["step"]) >= int(ckpt["total_steps"]) and (Path(out) / METRICS_NAME).exists()


def saved_checkpoint(out: str | os.PathLike) -> str:
    """What ``out`` holds to resume from, for a message after an abrupt stop (never raises)."""
    path = Path(out) / CHECKPOINT_NAME
    try:
        ckpt = _checked_checkpoint(path, mmap=True)
        step, total = int(ckpt["step"]), int(ckpt["total_steps"])
    except Exception:  # noqa: BLE001 - none, or none this version can resume: nothing to offer
        return f"there is no checkpoint to resume in {out}"
    if run_finished(out, ckpt):  # stopped before this run replaced that one
        return f"nothing of this run was saved; the finished run in {out} is as it was"
    return f"the last checkpoint in {out} (step {step}/{total}) is intact: run the same command with --resume to " + (
        "continue" if step < total else "redo the final evaluation"
    )


def train(cfg: TrainConfig, *, progress: Callable[[int, int, dict], None] | None = None) -> dict[str, Any]:
    """Run one training job and return its metrics dict (also written to ``cfg.out/metrics.json``).

    ``progress(step, total, info)`` is called after every step (for callers with their own progress display;
    not with ``nproc > 1``). With ``cfg.nproc > 1`` the job runs in that many spawned gloo workers.
    ``check_out(cfg)`` runs first.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train expects a TrainConfig, got {type(cfg).__name__}")
    import torch.distributed as dist

    check_out(cfg)  # creates out and says what is wrong with it, before the lock file goes in
    # Every rank of a caller's process group calls train() on the same out: rank 0 holds it for them.
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    with _hold_out(cfg.out if rank == 0 else None):
        check_out(cfg)  # again, now that no other run can: one may have written its checkpoint meanwhile
        if cfg.nproc > 1:
            if not (dist.is_available() and dist.is_initialized()):
                return _spawn(cfg)
            if dist.get_world_size() != cfg.nproc:
                raise ValueError(f"nproc={cfg.nproc} but the process group has {dist.get_world_size()} ranks")
        return _train(cfg, progress)


class OutBusyError(ValueError):
    """Another process is training into the same ``out`` folder (it holds ``out/.train.lock``)."""


@contextlib.contextmanager
def _hold_out(out: str | os.PathLike | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/LOCK_NAME`` while the block runs; :class:`OutBusyError` at once if
    another process holds it (``None``: no folder, nothing to hold).

    Two runs into one ``out`` both pass :func:`check_out` while neither has written a checkpoint yet, then
    overwrite each other's checkpoint, ``model.pt`` and ``metrics.json`` (the last rename wins, file by file:
    a metrics file of one run beside the model of the other). The kernel drops the lock when its process dies,
    however it dies, so a killed run never blocks the next. The file is removed on release, while still locked;
    a process that opened it just before then finds, once it holds the lock, that the name now means another
    file (or none) and starts over on the current one, so two processes never hold locks on different files.
    On a file system without locks nothing is held. (This module is POSIX-only already: ``resource``.)
    """
    if out is None:
        yield
        return
    path = Path(out) / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise OutBusyError(
                f"another diagcompile train (process {holder or '?'}) is writing to {out}: wait for it to finish, "
                "or choose another --out"
            ) from None
        except OSError:  # a file system without locks: as without fcntl
            os.close(fd)
            fd = -1
            break
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # the file its holder removed on release: lock the one that now has the name
    if fd < 0:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for the message of a run refused meanwhile
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # (still locked: see above)
        os.close(fd)


def _spawn(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg`` in ``cfg.nproc`` spawned CPU workers; rank 0's metrics come back through a file.

    Ctrl-C: the workers (started ignoring SIGINT, see :func:`_children_ignore_sigint`) stop together after the
    current step and save the checkpoint, as a single process does, and this raises their :class:`Interrupted`.
    A terminal's Ctrl-C reaches them directly; this process forwards its own SIGINT too (a ``kill -INT`` of it
    alone), every second until they stop (one that arrived while they were still setting up went unheard;
    more than one is harmless). A second Ctrl-C here stops them at once (no checkpoint of the current step).
    """
    import torch.multiprocessing as mp

    threads = max(1, torch.get_num_threads() // cfg.nproc)
    with tempfile.TemporaryDirectory(prefix="diagcompile-ddp-") as td:
        result = os.path.join(td, "result.json")
        with _children_ignore_sigint():
            ctx = mp.start_processes(
                _worker,
                args=(cfg, os.path.join(td, "rendezvous"), result, threads),
                nprocs=cfg.nproc,
                join=False,
                start_method="spawn",
            )
        _join_workers(ctx)
        with open(result) as f:
            record = json.load(f)
    if "interrupted" in record:
        step, total = record["interrupted"]
        raise Interrupted(step, total, saved=cfg.out is not None)
    return record


def _join_workers(ctx: Any) -> None:
    """Wait for the workers of ``ctx`` (a torch ``ProcessContext``), passing Ctrl-C on as :func:`_spawn` says."""
    stopping = False

    def forward() -> None:
        for proc in ctx.processes:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        nonlocal stopping
        if stopping:
            raise KeyboardInterrupt
        stopping = True
        forward()

    main = threading.current_thread() is threading.main_thread()
    prev = signal.signal(signal.SIGINT, handler) if main else None
    prev_term = signal.signal(signal.SIGTERM, handler) if main else None  # a scheduler's stop: the same request
    try:
        while not ctx.join(timeout=1.0):
            if stopping:
                forward()
    except KeyboardInterrupt:  # the second Ctrl-C
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
        for proc in ctx.processes:
            proc.join()
        raise
    finally:
        if main:  # (None: a handler set outside Python, which cannot be put back; the default is the closest)
            signal.signal(signal.SIGINT, prev if prev is not None else signal.SIG_DFL)
            signal.signal(signal.SIGTERM, prev_term if prev_term is not None else signal.SIG_DFL)


def _worker(rank: int, cfg: TrainConfig, rendezvous: str, result: str, threads: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=cfg.nproc)
    try:
        try:
            record: dict[str, Any] = _train(cfg, None)
        except Interrupted as e:
            # torch's spawn wrapper swallows a KeyboardInterrupt (exit status 0): the parent learns of the stop,
            # and of its step, from the record.
            record = {"interrupted": [e.step, e.total]}
        if rank == 0:
            atomic_write_text(json.dumps(record, default=_json_default), result)
    finally:
        dist.destroy_process_group()


def _train(cfg: TrainConfig, progress: Callable[[int, int, dict], None] | None) -> dict[str, Any]:
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    t_start = time.perf_counter()
    device = torch.device(cfg.device)
    out = Path(cfg.out) if cfg.out is not None else None
    ckpt_path = out / CHECKPOINT_NAME if out is not None else None
    metric_name, higher_better = _primary(cfg.task)

    ds = _load_data(cfg)
    mcfg = cfg.model_config()
    try:  # what only the data can tell (a batch larger than the training set): the configuration's fault
        if cfg.task == "digits-vit":
            stream: _DigitsStream | _CharStream = _DigitsStream(ds.x_train, ds.y_train, cfg.get("batch_size"), cfg.seed)
        else:
            stream = _CharStream(ds.train, cfg.get("batch_size"), mcfg.block_size, cfg.seed)
        if cfg.get("batch_size") % world:
            raise ValueError(f"batch_size={cfg.get('batch_size')} must be divisible by nproc={world}")
    except ValueError as e:
        raise SetupError(str(e)) from e
    total = _total_steps(cfg, stream.steps_per_epoch)
    eval_every = cfg.get("eval_every") or (stream.steps_per_epoch if cfg.task == "digits-vit" else 100)
    ckpt_every = cfg.ckpt_every or eval_every

    # Model, optimizer, sparsifier: the same construction (and RNG use) on a fresh start and on resume.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(mcfg).to(device)
    dense_params = _count_params(model)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.get("weight_decay")), lr=cfg.get("lr"), betas=(0.9, 0.95))
    try:  # what only the model and the run length can tell: reported as the configuration's fault
        if cfg.offsets_from is not None:
            _mark_offsets_from(model, cfg.offsets_from, cfg.task)
        sparsifier = _make_sparsifier(cfg, model, optimizer, total) if cfg.method != "dense" else None
    except (TypeError, ValueError) as e:
        raise SetupError(str(e)) from e
    train_params_start = _count_params(model)

    step = 0
    history: dict[str, Any] = {"curve": [], "dst": [], "best": None, "train_s": 0.0, "eval_s": 0.0}
    loss_sum, loss_n = 0.0, 0
    max_state_bytes = 0
    max_dst_memory = 0
    resumed_from = None
    saved_step = None  # the step of the checkpoint on disk for this run, if any
    if cfg.resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        _check_resumable(ckpt, cfg)
        try:  # the same configuration built this model: a misfit means the file was changed
            if sparsifier is not None:
                sparsifier.load_state_dict(ckpt["sparsifier"])
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            stream.load_state_dict(ckpt["data"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointReadError(
                f"the checkpoint {ckpt_path} does not fit the model its configuration builds ({e}); the file was "
                "changed after diagcompile wrote it: move it away, or choose another --out"
            ) from e
        _set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        history = ckpt["history"]
        loss_sum, loss_n = float(ckpt["loss_acc"][0]), int(ckpt["loss_acc"][1])
        max_state_bytes = int(ckpt["max_state_bytes"])
        max_dst_memory = int(ckpt.get("max_dst_memory", 0))
        resumed_from = saved_step = step
        del ckpt
    elif cfg.resume and not cfg.quiet:
        print(f"[train] no checkpoint at {ckpt_path}; starting from step 0", file=sys.stderr)
    if not cfg.resume and out is not None and rank == 0:
        # A new run replaces a finished one (check_out allows nothing else here): from now on, not at its end,
        # so that an interrupted new run never leaves the old run's results looking like its own.
        for name in (METRICS_NAME, MODEL_NAME, CHECKPOINT_NAME):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()

    def save_checkpoint() -> None:
        nonlocal saved_step
        saved_step = step
        if ckpt_path is None or rank != 0:
            return
        atomic_torch_save(
            {
                "format": _CKPT_FORMAT,
                "config": cfg.to_dict(),
                # the values the None fields resolved to (plain python): what a resume is judged by
                "resolved": {k: cfg.get(k) for k in TrainConfig.RESOLVED_FIELDS},
                "model_config": mcfg.to_dict(),
                "step": step,
                "total_steps": total,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sparsifier": sparsifier.state_dict() if sparsifier is not None else None,
                "scheduler": {"step": step, "total": total, "warmup_frac": cfg.warmup_frac},
                "data": stream.state_dict(),
                "rng": _rng_state(),
                "history": history,
                "loss_acc": [loss_sum, loss_n],
                "max_state_bytes": max_state_bytes,
                "max_dst_memory": max_dst_memory,
            },
            ckpt_path,
        )

    # Data parallel: every rank draws the same global batch (same generator) and trains on its slice.
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)

    show_bar = rank == 0 and not cfg.quiet and progress is None and sys.stderr.isatty()
    log_lines = rank == 0 and not cfg.quiet and progress is None and not show_bar
    bar = None
    if show_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=f"{cfg.task} {cfg.method}", unit="step", dynamic_ncols=True)

    stop_at = total if cfg.stop_after is None else min(total, cfg.stop_after)
    model.train()
    with _StopFlag(announce=rank == 0 and not cfg.quiet, checkpoint=ckpt_path is not None) as flag:
        t_loop = time.perf_counter()
        while step < stop_at:
            x, y = stream.next()
            if world > 1:
                x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            x, y = x.to(device), y.to(device)
            lr = _set_lr(optimizer, _lr_factor(step, total, cfg.warmup_frac, cfg.min_lr_frac))
            loss = _task_loss(cfg.task, net, x, y)
            full = loss + sparsifier.regularization_loss() if sparsifier is not None else loss
            full.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(_clipped_params(optimizer), cfg.grad_clip)
            optimizer.step()
            if sparsifier is not None:
                sparsifier.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            agreed_stop = False
            if world > 1:
                # The logged loss is the global batch's; the stop must be agreed (a rank that stopped alone
                # would leave the others waiting in the next all-reduce).
                red = torch.tensor([loss.item(), float(flag.stop)], dtype=torch.float64)
                dist.all_reduce(red)
                lv, agreed_stop = red[0].item() / world, bool(red[1].item() > 0)
            else:
                lv = loss.item()
            if not math.isfinite(lv):
                raise FloatingPointError(f"training loss became {lv} at step {step} ({cfg.task}, {cfg.method})")
            loss_sum, loss_n = loss_sum + lv, loss_n + 1
            if step == 1 or step % eval_every == 0:
                max_state_bytes = max(max_state_bytes, _train_state_bytes(model, optimizer))

            if step % eval_every == 0 or step == total:
                now = time.perf_counter()
                history["train_s"] += now - t_loop
                ev = _evaluate(cfg, model, ds, device, final=False)
                entry = {"step": step, "lr": lr, "train_loss": loss_sum / max(1, loss_n), **ev}
                history["curve"].append(entry)
                loss_sum, loss_n = 0.0, 0
                best = history["best"]
                v = ev[metric_name]
                if best is None or (v > best["value"] if higher_better else v < best["value"]):
                    history["best"] = {"value": v, "step": step}
                if sparsifier is not None:
                    diag = sparsifier.diagnostics()
                    summ = _dst_summary(diag)
                    max_dst_memory = max(max_dst_memory, int(summ.get("memory_bytes", 0)))
                    history["dst"].append({"step": step, **summ})
                t_loop = time.perf_counter()
                history["eval_s"] += t_loop - now
                if bar is not None:
                    bar.set_postfix({"loss": f"{entry['train_loss']:.3f}", metric_name: f"{v:.3f}"})
                elif log_lines:
                    # No terminal (a log file, CI, a pipe): a line per evaluation, so a long run shows progress.
                    print(
                        f"[train] {cfg.task} {cfg.method}: step {step}/{total}, loss {entry['train_loss']:.3f}, "
                        f"{metric_name} {v:.4g}",
                        file=sys.stderr,
                        flush=True,
                    )
            if bar is not None:
                bar.update(1)
            if progress is not None:
                progress(step, total, {"loss": lv})
            # Ranks stop on the agreed value, never on their own flag: a SIGINT that set it after the all-reduce
            # reached one rank only (its request goes into the next step's). A single process reads it last.
            stop = agreed_stop if world > 1 else flag.stop
            stopping = stop or step == stop_at
            if step % ckpt_every == 0 or stopping:
                history["train_s"] += time.perf_counter() - t_loop
                save_checkpoint()
                t_loop = time.perf_counter()
            if stop:
                if bar is not None:
                    bar.close()
                raise Interrupted(step, total, saved=ckpt_path is not None)
        history["train_s"] += time.perf_counter() - t_loop
    if bar is not None:
        bar.close()

    if step < total:  # stop_after: an interruption on purpose
        if saved_step != step:  # stopped before any step of this process (stop_after=0): nothing saved it yet
            save_checkpoint()
        return {
            "status": "interrupted",
            "step": step,
            "total_steps": total,
            "checkpoint": str(ckpt_path) if ckpt_path is not None else None,
        }

    # ---- final evaluation (and finalize for DST) -------------------------------------------------
    # A first Ctrl-C or SIGTERM here lets it finish (seconds) and write the results; a second Ctrl-C stops at once
    # (the checkpoint of the last step is complete: --resume redoes this part).
    with _StopFlag(announce=rank == 0 and not cfg.quiet, checkpoint=False, phase="final"):  # checkpoint: saved
        t_eval = time.perf_counter()
        before = _evaluate(cfg, model, ds, device, final=True)
        dst_info: dict[str, Any] | None = None
        final_model = model
        if sparsifier is not None:
            diag = sparsifier.diagnostics()
            dst_info = {
                "config": sparsifier.config.to_dict(),
                "diagnostics": _plain_diagnostics(diag),
                "summary": _dst_summary(diag),
                "history": history["dst"],
                "max_memory_bytes": max(max_dst_memory, int(_dst_summary(diag).get("memory_bytes", 0))),
            }
            with warnings.catch_warnings():
                # The harness evaluates and saves the finalized model; it never trains on through its DDP wrapper.
                warnings.filterwarnings("ignore", message=r".*fresh DistributedDataParallel")
                final_model = sparsifier.finalize()
        after = _evaluate(cfg, final_model, ds, device, final=True)
        eval_final_s = time.perf_counter() - t_eval

        data_info = ds.info()
        specs = _diag_layer_specs(final_model)
        sparse_dense_equiv = sum(s["in_features"] * s["out_features"] for s in specs.values())
        # Stored diagonal values only (biases stay dense).
        sparse_stored = sum(s["k"] * min(s["in_features"], s["out_features"]) for s in specs.values())
        n_sparse_layers = len(specs)
        # mask baselines (dst-baselines): their finalized layers are plain nn.Linear with zeroed weights; count the
        # weights their masks keep (a dense weight is still stored: the masks only simulate sparsity).
        final_params = _count_params(final_model)
        final_kept = final_params  # a compact DiagLinear's parameters are the weights it keeps
        if cfg.method in BASELINE_METHODS and dst_info is not None:
            summ = dst_info["summary"]
            n_sparse_layers, sparse_dense_equiv, sparse_stored = summ["layers"], int(summ["numel"]), int(summ["nnz"])
            final_kept = final_params - sparse_dense_equiv + sparse_stored  # less the pruned zeros
        metrics: dict[str, Any] = {
            "format": _METRICS_FORMAT,
            "status": "complete",
            "task": cfg.task,
            "method": cfg.method,
            "sparsity": cfg.sparsity if cfg.method != "dense" else 0.0,
            "seed": cfg.seed,
            "metric": metric_name,
            "higher_is_better": higher_better,
            "final": after,
            "final_before_finalize": before,
            "best": history["best"],
            "curve": history["curve"],
            # what "final" and "best" / "curve" were measured on (chars: different numbers of validation blocks)
            "final_eval": _eval_set(cfg, ds, data_info["eval_split"], final=True),
            "periodic_eval": _eval_set(cfg, ds, data_info["eval_split"], final=False),
            "steps": total,
            "resumed_from_step": resumed_from,
            "config": cfg.to_dict(),
            "resolved": {
                "steps": total,
                "epochs": total / stream.steps_per_epoch,
                "batch_size": cfg.get("batch_size"),
                "lr": cfg.get("lr"),
                "weight_decay": cfg.get("weight_decay"),
                "eval_every": eval_every,
                "optimizer": "AdamW(betas=(0.9, 0.95)), no decay on biases/norms/embeddings",
                "schedule": f"linear warm-up {cfg.warmup_frac:.0%}, cosine to {cfg.min_lr_frac:g} x lr",
                "grad_clip": cfg.grad_clip,
            },
            "model_config": mcfg.to_dict(),
            "data": data_info,
            "time": {
                "train_s": history["train_s"],
                "eval_s": history["eval_s"] + eval_final_s,
                "wall_s_this_process": time.perf_counter() - t_start,
                "steps_per_s": total / history["train_s"] if history["train_s"] > 0 else None,
            },
            "params": {
                "dense_model": dense_params,
                "training_model": train_params_start,
                # every parameter of the saved model: for the mask methods, dense matrices with the pruned weights 0
                "final_model": final_params,
                # the same less the pruned weights of the mask methods: the count that compares across methods
                "final_model_kept": final_kept,
                "sparse_layers": n_sparse_layers,
                "sparse_layer_weights_dense": sparse_dense_equiv,
                # The weights the sparse layers keep (biases aside): a diagonal method's compact layers store
                # exactly these; a mask method's model.pt stores dense nn.Linear weights with the others zero, so
                # for it "stored" is a misnomer kept for the readers of older results: "kept" says what it is.
                "sparse_layer_weights_stored": sparse_stored,
                "sparse_layer_weights_kept": sparse_stored,
                "sparse_layer_density": sparse_stored / sparse_dense_equiv if sparse_dense_equiv else None,
            },
            "memory": {
                "train_state_bytes_peak": max_state_bytes,
                "process_peak_rss_bytes": _peak_rss_bytes(),
            },
            "dst": dst_info,
            "env": {**env_stamp(cfg.device), "world_size": world},
        }
        if out is not None and rank == 0:
            meta = {"seed": cfg.seed, "sparsity": metrics["sparsity"], "config": cfg.to_dict(), "env": metrics["env"]}
            save_model(final_model, mcfg, out / MODEL_NAME, task=cfg.task, method=cfg.method, **meta)
            atomic_write_text(json.dumps(metrics, indent=1, default=_json_default) + "\n", out / METRICS_NAME)
    return metrics


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------------------
# Finalized models
# ----------------------------------------------------------------------------------------------------
def save_model(model: nn.Module, model_config: ViTConfig | GPTConfig, path: str | os.PathLike, **meta: Any) -> None:
    """Save an inference model (dense or with compact ``DiagLinear``s) so :func:`load_model` can rebuild it."""
    atomic_torch_save(
        {
            "format": _MODEL_FORMAT,
            "model_config": model_config.to_dict(),
            "diag_layers": _diag_layer_specs(model),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": {k: _to_plain(v) for k, v in meta.items()},
        },
        path,
    )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Rebuild a model saved by ``train`` (``model.pt``): returns ``(model in eval mode, example inputs)``.

    Diagonal layers come back as compact ``DiagLinear``s with the saved offsets. Loading uses
    ``torch.load(weights_only=True)`` and does not touch the caller's RNG state. The example input is a batch of
    2 (digits: ``(2, 16, 4)`` float; chars: ``(2, block_size)`` int64 ids).
    """
    from diagcompile.modules import DiagLinear

    blob = _read_saved_file(path, what="model file", advice="train the run again, or use another model.pt")
    if isinstance(blob, dict) and blob.get("format") in (_CKPT_FORMAT, *_OLD_CKPT_FORMATS):
        raise ValueError(
            f"{path} is a training checkpoint (for --resume); the model file is {Path(path).with_name(MODEL_NAME)}, "
            "written when the run finishes"
        )
    if not isinstance(blob, dict) or blob.get("format") != _MODEL_FORMAT:
        raise ValueError(f"{path} is not a diagcompile model file (format {_MODEL_FORMAT})")
    _require_keys(blob, _MODEL_KEYS, path)
    sd = blob["state_dict"]
    with torch.random.fork_rng(devices=[]):
        model = build_model(config_from_dict(blob["model_config"]))
        for fqn, spec in blob["diag_layers"].items():
            key = f"{fqn}.offsets"
            if key not in sd:
                raise ValueError(f"{path}: diagonal layer {fqn!r} has no offsets in the state dict")
            parent_name, _, name = fqn.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if not isinstance(getattr(parent, name, None), nn.Linear):
                raise ValueError(f"{path}: {fqn!r} is not a linear layer of this model")
            layer = DiagLinear(spec["in_features"], spec["out_features"], bias=spec["bias"], offsets=sd[key])
            setattr(parent, name, layer)
        example = model.example_input(2)
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval(), tuple(t.to(device) for t in example)

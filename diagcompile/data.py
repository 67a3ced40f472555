"""Real, bundled training data: scikit-learn's digits and the Python standard library's own source text.

Nothing here downloads anything.

* **digits** (:func:`load_digits_split`): ``sklearn.datasets.load_digits`` — 1797 greyscale 8x8 images of
  handwritten digits that ship inside scikit-learn. A fixed stratified split (``random_state=0``) gives
  **1437 train / 360 test** images. For hyper-parameter tuning a second fixed stratified split of the train
  part gives **1149 fit / 288 tune** images (``split="tune"``): the test set is never used to choose anything.
  Pixels (0..16) are divided by 16 and standardised with the mean/std of the training images (one scalar
  each). Each image becomes **16 tokens of 4 features**: its 2x2 patches in row-major order
  (:func:`patchify`).

* **chars** (:func:`load_chars`): the text of the ``.py`` files of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``), minus test suites, ``site-packages``, ``idlelib``, ``lib2to3``,
  ``turtledemo``, ``ensurepip``, ``encodings`` (generated code tables), ``pydoc_data`` (one 700 kB English
  blob) and the machine-specific ``_sysconfigdata*``. The file list is the **sorted relative POSIX paths**;
  each file goes to val, tune or train by a hash of its path (sha1 mod 10: 0 -> val, 1 -> tune, else train),
  so the split of a file never depends on which other files exist. Texts are joined in file-list order
  (``"\\n"`` between files) and capped at :data:`TRAIN_CHARS` / :data:`EVAL_CHARS` characters. The
  vocabulary is fixed: ``<unk>`` (id 0), ``"\\n"`` (id 1) and printable ASCII 32..126 (ids 2..96); anything
  else (0.002% of the stdlib) maps to ``<unk>``.

  The standard library differs between Python versions (3.11 vs 3.12 add/remove modules), so the corpus
  does too: :class:`CharCorpus` records the interpreter version, the character counts and a sha256 of the
  file list, and the training metrics JSON carries them, so runs are comparable exactly when the hash
  matches.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DigitsSplit",
    "CharCorpus",
    "VOCAB",
    "VOCAB_SIZE",
    "TRAIN_CHARS",
    "EVAL_CHARS",
    "load_digits_split",
    "patchify",
    "stdlib_files",
    "load_chars",
    "encode",
    "decode",
    "sample_blocks",
    "eval_blocks",
    "chance_bpc",
]

Split = Literal["test", "tune"]

# ----------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------
#: Fraction of the 1797 images held out as the test set (stratified, seed 0) -> 1437 train / 360 test.
DIGITS_TEST_FRACTION = 0.2
#: Fraction of the 1437 train images held out for tuning (stratified, seed 1) -> 1149 fit / 288 tune.
DIGITS_TUNE_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSplit:
    """Patchified digits. ``x_*``: ``(n, 16, 4)`` float32; ``y_*``: ``(n,)`` int64 labels in ``[0, 10)``.

    ``split`` says what the evaluation part is: ``"test"`` (the fixed test set; train = all 1437 train images)
    or ``"tune"`` (a held-out part of the train images; train = the rest).
    """

    x_train: Tensor
    y_train: Tensor
    x_eval: Tensor
    y_eval: Tensor
    split: str
    mean: float
    std: float

    def info(self) -> dict:
        """Plain description for the metrics JSON."""
        return {
            "dataset": "sklearn.datasets.load_digits",
            "eval_split": self.split,
            "n_train": int(self.y_train.numel()),
            "n_eval": int(self.y_eval.numel()),
            "tokens": int(self.x_train.shape[1]),
            "token_dim": int(self.x_train.shape[2]),
            "pixel_mean": self.mean,
            "pixel_std": self.std,
        }


def patchify(images: Tensor, patch: int = 2) -> Tensor:
    """``(n, H, W)`` -> ``(n, (H/p)(W/p), p*p)``: non-overlapping ``p x p`` patches in row-major order.

    Token ``i * (W/p) + j`` holds ``images[:, i*p:(i+1)*p, j*p:(j+1)*p]`` flattened row-major.
    """
    if images.dim() != 3:
        raise ValueError(f"patchify expects (n, H, W) images, got shape {tuple(images.shape)}")
    n, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"patchify: image size {h}x{w} is not divisible by the patch size {patch}")
    x = images.reshape(n, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch).contiguous()


@functools.lru_cache(maxsize=4)
def load_digits_split(split: Split = "test") -> DigitsSplit:
    """The digits images, split and normalised as described in the module docstring (cached; deterministic)."""
    if split not in ("test", "tune"):
        raise ValueError(f"split must be 'test' or 'tune', got {split!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = d.images.astype("float32") / 16.0  # (1797, 8, 8), pixel counts 0..16
    labels = d.target.astype("int64")
    idx = list(range(len(labels)))
    train_idx, test_idx = train_test_split(
        idx, test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=0, shuffle=True
    )
    if split == "tune":
        train_idx, eval_idx = train_test_split(
            train_idx, test_size=DIGITS_TUNE_FRACTION, stratify=labels[train_idx], random_state=1, shuffle=True
        )
    else:
        eval_idx = test_idx
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels)
    tr, ev = torch.tensor(sorted(train_idx)), torch.tensor(sorted(eval_idx))
    x_tr, x_ev = x[tr], x[ev]
    # Statistics of the training images only (float64 for a platform-independent value).
    mean = float(x_tr.double().mean())
    std = float(x_tr.double().std())
    norm = lambda t: ((t - mean) / std).float()  # noqa: E731
    return DigitsSplit(patchify(norm(x_tr)), y[tr].clone(), patchify(norm(x_ev)), y[ev].clone(), split, mean, std)


# ----------------------------------------------------------------------------------------------------
# chars
# ----------------------------------------------------------------------------------------------------
#: Id 0 is ``<unk>``, id 1 is newline, ids 2..96 are printable ASCII 32..126.
VOCAB: tuple[str, ...] = ("<unk>", "\n", *(chr(c) for c in range(32, 127)))
VOCAB_SIZE = len(VOCAB)
#: Cap on the training text (characters); a 2-4 minute CPU run reads about this much.
TRAIN_CHARS = 8_000_000
#: Cap on each evaluation text (val, tune), characters.
EVAL_CHARS = 1_000_000

# Directories (any path component) that are not the library's own source text.
_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "site-packages",
        "dist-packages",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "encodings",
        "pydoc_data",
        "lib-dynload",
        "__pycache__",
        "__phello__",
    }
)

_LUT = torch.zeros(128, dtype=torch.uint8)
_LUT[ord("\n")] = 1
_LUT[32:127] = torch.arange(2, 97, dtype=torch.uint8)


def encode(text: str) -> Tensor:
    """``str`` -> ``(len,)`` uint8 ids in ``[0, VOCAB_SIZE)``; non-vocabulary characters -> 0 (``<unk>``)."""
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32) if text else torch.zeros(0)
    codes = codes.long()
    ascii_ = codes < 128
    ids = torch.zeros(codes.shape, dtype=torch.uint8)
    ids[ascii_] = _LUT[codes[ascii_]]
    return ids


def decode(ids: Tensor) -> str:
    """Inverse of :func:`encode` (``<unk>`` becomes ``"\\ufffd"``)."""
    return "".join("\ufffd" if i == 0 else VOCAB[i] for i in ids.tolist())


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted relative POSIX paths of the standard library's own ``.py`` files (see the module docstring)."""
    root = root if root is not None else sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"standard library directory not found: {root}")
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                files.append("/".join([*parts, f]))
    return sorted(files)


def _bucket(relpath: str) -> str:
    h = int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big") % 10
    return "val" if h == 0 else "tune" if h == 1 else "train"


@dataclass(frozen=True)
class CharCorpus:
    """Encoded stdlib text. ``train`` / ``eval``: 1-D uint8 id tensors.

    ``split`` is ``"test"`` (evaluate on the val files — the reported number) or ``"tune"`` (evaluate on the
    tune files; the reported runs never train on them either, so tuning and reporting share one train text).
    """

    train: Tensor
    eval: Tensor
    split: str
    n_files: dict
    file_list_sha256: str
    python: str

    def info(self) -> dict:
        """Plain description for the metrics JSON."""
        return {
            "dataset": "python-stdlib-source",
            "python": self.python,
            "eval_split": "val" if self.split == "test" else "tune",
            "train_chars": int(self.train.numel()),
            "eval_chars": int(self.eval.numel()),
            "n_files": dict(self.n_files),
            "file_list_sha256": self.file_list_sha256,
            "vocab_size": VOCAB_SIZE,
            "unk_fraction_train": float((self.train == 0).double().mean()) if self.train.numel() else 0.0,
        }


def _join_capped(root: str, files: list[str], cap: int) -> tuple[str, int]:
    parts: list[str] = []
    total = 0
    used = 0
    for f in files:
        if total >= cap:
            break
        with open(os.path.join(root, f), encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        parts.append(text)
        total += len(text) + 1
        used += 1
    return "\n".join(parts)[:cap], used


@functools.lru_cache(maxsize=4)
def load_chars(split: Split = "test", root: str | None = None) -> CharCorpus:
    """The stdlib corpus (cached; deterministic for a given standard library)."""
    if split not in ("test", "tune"):
        raise ValueError(f"split must be 'test' or 'tune', got {split!r}")
    root = root if root is not None else sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root)
    if not files:
        raise FileNotFoundError(f"no standard-library .py files found under {root}")
    buckets: dict[str, list[str]] = {"train": [], "val": [], "tune": []}
    for f in files:
        buckets[_bucket(f)].append(f)
    train_text, n_train = _join_capped(root, buckets["train"], TRAIN_CHARS)
    eval_text, n_eval = _join_capped(root, buckets["val" if split == "test" else "tune"], EVAL_CHARS)
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()
    return CharCorpus(
        train=encode(train_text),
        eval=encode(eval_text),
        split=split,
        n_files={"all": len(files), "train_used": n_train, "eval_used": n_eval},
        file_list_sha256=digest,
        python=f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
    )


def sample_blocks(data: Tensor, batch: int, block: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch`` random contiguous windows: inputs ``(batch, block)`` and next-char targets, both int64.

    Start positions are uniform over ``[0, len - block - 1]``, drawn from ``generator`` (the run's data
    generator, whose state checkpoints save).
    """
    n = data.numel() - block - 1  # the last start position; 0 is one valid window
    if n < 0:
        raise ValueError(f"text of {data.numel()} characters is too short for blocks of {block}")
    starts = torch.randint(0, n + 1, (batch,), generator=generator)
    idx = starts[:, None] + torch.arange(block + 1)
    win = data[idx].long()
    return win[:, :-1], win[:, 1:]


def eval_blocks(data: Tensor, block: int, max_blocks: int | None = None) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows covering ``data`` (``max_blocks``: evenly spaced subset): ``(n, block)`` x2.

    Every character after the first is predicted exactly once over the full set (minus the short tail).
    """
    n = (data.numel() - 1) // block
    if n < 1:
        raise ValueError(f"text of {data.numel()} characters is too short for blocks of {block}")
    starts = torch.arange(n) * block
    if max_blocks is not None and max_blocks < n:
        starts = starts[torch.linspace(0, n - 1, max_blocks).round().long()]
    idx = starts[:, None] + torch.arange(block + 1)
    win = data[idx].long()
    return win[:, :-1], win[:, 1:]


def chance_bpc() -> float:
    """Bits per character of a uniform guess over the vocabulary."""
    return math.log2(VOCAB_SIZE)

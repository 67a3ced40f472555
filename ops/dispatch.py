"""Shape-based dispatch: which implementation computes one call of an op.

Three paths compute every op (forward ``fwd``, input gradient ``dx``, values gradient ``dv``):

* ``kernel``    the diagonal kernel of the device: Triton on CUDA (``ops/triton_kernels.py``), numba on the
  CPU (``ops/cpu_kernels.py``). Its cost scales with ``M * k * D``; it wins while the weight bytes or the
  launch dominate (small ``M``, low density).
* ``dense``     materialize ``W`` (or reduce ``dY^T X`` densely, then extract the diagonals) and use the
  vendor GEMM. Its cost scales with ``M * N_out * N_in`` but runs on tensor cores / MKL: it wins at large ``M``.
* ``reference`` the vectorized torch gathers of ``ops/reference.py``: correct on any device and dtype.

The choice is a pure function of ``(op, device type, dtype, M, N_out, N_in, k, threads)`` (``threads``:
torch's intra-op thread count when the call is made). It never times anything at run time, so the same
shapes always take the same path. The thresholds live in ``ops/dispatch_table.py``, one rule per shape class
(the layer's orientation and diagonal length ``D``, which decide how fast the kernel runs per multiply-add)
and thread-count bucket, which ``benchmarks/tune_dispatch.py`` regenerates from measurements. For
benchmarking and debugging, ``force_path("dense")`` (or the env var ``DIAGCOMPILE_FORCE_PATH``) pins a path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

import torch

from diagcompile.ops import dispatch_table
from diagcompile.ops.reference import is_tall

__all__ = [
    "Problem",
    "PATHS",
    "choose_path",
    "clear_path_memo",
    "force_path",
    "forced_path",
    "inline_in_graph",
    "kernel_module",
    "path_for",
    "shape_class",
    "thread_bucket",
]

OpName = Literal["fwd", "dx", "dv"]
PathName = Literal["kernel", "dense", "reference"]
PATHS: tuple[str, ...] = ("kernel", "dense", "reference")

# Kernel providers by device type; each module implements forward / input_grad / values_grad / supports.
_KERNEL_MODULES = {"cpu": "diagcompile.ops.cpu_kernels", "cuda": "diagcompile.ops.triton_kernels"}

# The open force_path blocks, innermost last, each as (its own token, path). Process-wide on purpose: the
# autograd engine runs CUDA backward ops on its own device threads, where a thread-local or ContextVar setting
# would not reach them. Each block removes its own entry on exit, so blocks that close out of order (two
# threads, generators) never leave a stale path behind.
_forced: list[tuple[object, str | None]] = []
# Blocks open and close from any thread: the exit's search-and-delete must not interleave with another's.
_forced_lock = threading.Lock()


@dataclass(frozen=True)
class Problem:
    """The shape of one op call: everything dispatch may look at (``threads`` defaults to torch's count now)."""

    op: OpName
    device_type: str
    dtype: torch.dtype
    M: int
    n_out: int
    n_in: int
    k: int
    threads: int = field(default_factory=torch.get_num_threads)

    @property
    def P(self) -> int:
        return max(self.n_out, self.n_in)

    @property
    def D(self) -> int:
        return min(self.n_out, self.n_in)

    @property
    def density(self) -> float:
        return self.k / self.P

    @property
    def shape_class(self) -> tuple[str, int]:
        return shape_class(self.n_out, self.n_in)

    @property
    def rule_key(self) -> tuple[str, str, int, int]:
        """``(op, orientation, d_edge, t_edge)``: the key of this call's rule in ``dispatch_table.TABLE``."""
        return (self.op, *self.shape_class, thread_bucket(self.threads))


def shape_class(n_out: int, n_in: int) -> tuple[str, int]:
    """The table's shape class of a layer: ``(orientation, d_edge)``.

    ``orientation`` is ``"tall"`` when ``N_out > N_in``; otherwise ``"square"`` when ``N_in < 2 N_out`` (square
    and near-square wide layers), else ``"wide"``. ``d_edge`` is the first edge of ``dispatch_table.D_EDGES`` at
    or above ``D = min(N_out, N_in)``.
    """
    D = min(n_out, n_in)
    d_edge = next(e for e in dispatch_table.D_EDGES if D <= e)
    if is_tall(n_out, n_in):
        return "tall", d_edge
    return ("square" if n_in < 2 * n_out else "wide"), d_edge


def thread_bucket(threads: int) -> int:
    """The first edge of ``dispatch_table.THREAD_EDGES`` at or above a thread count."""
    return next(e for e in dispatch_table.THREAD_EDGES if threads <= e)


# os.environ.get costs ~1 us (it encodes the key and decodes the value), and every op call asks. Where the
# mapping's raw dict is there (CPython's os._Environ), look the encoded key up in it directly: the same data,
# so a variable set or removed at run time (os.environ, monkeypatch.setenv) is still seen at once.
_ENV_NAME = "DIAGCOMPILE_FORCE_PATH"
_environ = os.environ
_env_data = getattr(_environ, "_data", None)
_env_key = _environ.encodekey(_ENV_NAME) if _env_data is not None and hasattr(_environ, "encodekey") else None


def _env_forced() -> str:
    # A test may replace os.environ itself (mock.patch("os.environ", {...})): then ask the object it put there.
    if _env_key is not None and os.environ is _environ:
        raw = _env_data.get(_env_key)
        return "" if raw is None else _environ.decodevalue(raw)
    return os.environ.get(_ENV_NAME, "")


def forced_path() -> str | None:
    """The path pinned by ``force_path`` or ``DIAGCOMPILE_FORCE_PATH``, else ``None``."""
    try:  # not `if _forced`: another thread's block may close between the test and the read
        forced = _forced[-1][1]
    except IndexError:
        forced = None
    if forced is not None:
        return forced
    env = _env_forced().strip().lower()
    if env in ("", "auto"):
        return None
    if env not in PATHS:
        raise ValueError(f"DIAGCOMPILE_FORCE_PATH={env!r} is not one of auto, {', '.join(PATHS)}")
    return env


@contextlib.contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Pin every op call inside the block to one path (``"kernel"``, ``"dense"``, ``"reference"``).

    ``None`` or ``"auto"`` restores shape-based dispatch. Forcing ``"kernel"`` where the device has no
    kernel for the dtype raises instead of falling back silently. The setting is process-wide (every thread,
    including the autograd engine's), like ``torch.set_num_threads``: the innermost open block wins, and
    each block undoes only its own setting when it closes, in whatever order blocks close.
    """
    if path == "auto":
        path = None
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of auto, {', '.join(PATHS)}")
    entry = (object(), path)
    _forced.append(entry)
    try:
        yield
    finally:
        # By identity: another block may have opened (or closed) since, from another thread.
        with _forced_lock:
            for i in range(len(_forced) - 1, -1, -1):
                if _forced[i] is entry:
                    del _forced[i]
                    break


@functools.cache
def kernel_module(device_type: str) -> ModuleType | None:
    """The kernel provider for a device type, imported on first use; ``None`` if it cannot load.

    Imported lazily so that ``import diagcompile`` never imports triton or numba.
    """
    name = _KERNEL_MODULES.get(device_type)
    # ---- triton-kernels: test hook. With DIAGCOMPILE_TRITON_ON_CPU=1 (and TRITON_INTERPRET=1 set before
    # triton is imported) CPU tensors use the Triton provider, so CI can run the CUDA kernels through the op.
    if device_type == "cpu" and os.environ.get("DIAGCOMPILE_TRITON_ON_CPU", "") == "1":
        name = _KERNEL_MODULES["cuda"]
    # ---- end triton-kernels
    if name is None:
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _kernel_supports(device_type: str, dtype: torch.dtype) -> bool:
    mod = kernel_module(device_type)
    return mod is not None and bool(mod.supports(dtype))


def _threshold(rule: dict, density: float) -> int:
    for edge, max_m in zip(rule["density_edges"], rule["max_m"]):
        if density <= edge:
            return max_m
    return rule["max_m"][-1]


def choose_path(p: Problem) -> str:
    """Pick the path for one call. Deterministic in the shapes and dtype."""
    forced = forced_path()
    if forced is not None:
        if forced == "kernel" and not _kernel_supports(p.device_type, p.dtype):
            raise RuntimeError(
                f"path 'kernel' was forced but {p.device_type} has no diagonal kernel for {p.dtype} "
                f"(numba on CPU: float32/float64; Triton on CUDA: float32/float16/bfloat16)"
            )
        return forced
    return _auto_path(p)


def _auto_path(p: Problem) -> str:
    """``choose_path`` without forcing: the table's answer."""
    return _path_within(p.M, _m_limits(p), p.device_type, p.dtype)


def _m_limits(p: Problem) -> list:
    """``[kernel_max_m, reference_max_m, None]`` for ``p``'s layer, independent of ``p.M``: the kernel path while
    ``M <= kernel_max_m`` (where the device has a kernel for the dtype; ``_path_within`` fills that answer into the
    last slot when first needed), the reference while ``M <= reference_max_m``, then dense."""
    key = p.rule_key
    rules = dispatch_table.TABLE.get((p.device_type, *key)) or dispatch_table.TABLE[("default", *key)]
    return [_threshold(rules["kernel"], p.density), _threshold(rules["reference"], p.density), None]


def _path_within(M: int, limits: list, device_type: str, dtype: torch.dtype) -> str:
    if M == 0:
        return "reference"
    if M <= limits[0]:
        # Asked only here: the kernel module (numba, triton) is imported only where the table may pick it.
        supported = limits[2]
        if supported is None:
            supported = limits[2] = _kernel_supports(device_type, dtype)
        if supported:
            return "kernel"
    return "reference" if M <= limits[1] else "dense"


# The table's M limits per layer shape, for the op implementations: a rule lookup costs ~6 us in Python on a
# slow CPU, as much as a small layer's kernel. Keyed by the layer's shape, dtype and thread count, not M, so a
# server whose batch size or sequence length changes every call still hits; dropped whenever
# dispatch_table.TABLE is replaced by another object (tests patch it so), and bounded for callers whose layer
# shapes keep changing. Whoever edits the table in place or patches what choose_path reads calls clear_path_memo().
_memo: dict[tuple, list] = {}
_memo_table: object = None
_MEMO_MAX = 4096


def clear_path_memo() -> None:
    """Forget ``path_for``'s answers (after editing ``dispatch_table.TABLE`` in place)."""
    _memo.clear()


def path_for(op: OpName, device_type: str, dtype: torch.dtype, M: int, n_out: int, n_in: int, k: int) -> str:
    """``choose_path(Problem(op, device_type, dtype, M, n_out, n_in, k))``, memoized. Forcing is never memoized."""
    global _memo_table
    if forced_path() is not None:
        return choose_path(Problem(op, device_type, dtype, M, n_out, n_in, k))
    threads = torch.get_num_threads()
    if dispatch_table.TABLE is not _memo_table:
        _memo.clear()
        _memo_table = dispatch_table.TABLE
    key = (op, device_type, dtype, n_out, n_in, k, threads)
    limits = _memo.get(key)
    if limits is None:
        if len(_memo) >= _MEMO_MAX:
            _memo.clear()
        # Not choose_path: a force_path block another thread opens meanwhile would be remembered for this shape
        # after it closed. The memo holds the table's answers only.
        limits = _memo[key] = _m_limits(Problem(op, device_type, dtype, M, n_out, n_in, k, threads))
    return _path_within(M, limits, device_type, dtype)


# Compiled graphs (the ``diagcompile`` backend) can hold a layer as plain ops instead of an op call: the dense
# weight built in the graph (``reference.to_dense``) and a GEMM, all compiled by Inductor. On the CPU an op call
# costs ~35 us of Python (argument checks, dispatch, kernel calls) whatever its size, several times the whole
# work of a 64-wide layer at a few rows; in-graph the layer costs what the dense layer costs. Both are
# small-layer rules: materializing W is N_out*N_in writes per call, and the GEMM does all M*N_out*N_in
# multiply-adds, so past these sizes the op's diagonal kernel wins (benchmarks/bench_cpu_inline.py measured
# the edges on the CPU machine: results/cpu_inline_layers.md).
INLINE_MAX_WEIGHT = 1 << 15  # N_out * N_in, M known at compile time
INLINE_MAX_WORK = 1 << 19  # M * N_out * N_in
# A dynamic M has no bound to test the work against: only layers small enough that the GEMM keeps up with
# the kernel at every M measured.
INLINE_MAX_WEIGHT_DYNAMIC = 1 << 14


def inline_in_graph(device_type: str, dtype: torch.dtype, M: int | None, n_out: int, n_in: int) -> bool:
    """Whether a compiled graph should compute a forward call as ``F.linear(x, to_dense(values, offsets))``.

    ``M`` is the number of rows, ``None`` when the graph's batch size is dynamic. Only on the CPU, for float32
    / float64 (the CUDA side is unmeasured: there the op call is a kernel launch that CUDA graphs hide), and
    never while ``force_path`` / ``DIAGCOMPILE_FORCE_PATH`` pins a path (which asks for the op's own paths).
    """
    if device_type != "cpu" or dtype not in (torch.float32, torch.float64) or forced_path() is not None:
        return False
    size = n_out * n_in
    if M is None:
        return size <= INLINE_MAX_WEIGHT_DYNAMIC
    return size <= INLINE_MAX_WEIGHT and M * size <= INLINE_MAX_WORK

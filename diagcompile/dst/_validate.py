"""Field checks shared by the frozen DST config dataclasses (``DSTConfig``, ``MaskConfig``).

Private: one home for the ``__post_init__`` checks so both configs word their errors the same way,
``"<ClassName>.<field>=<value!r> <why>"`` (tests match on these messages).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import fields
from typing import Any, TypeVar

__all__: list[str] = []

_C = TypeVar("_C")


def is_real(v: object) -> bool:
    """A real number that is not a ``bool``: any ``numbers.Real``, so numpy's scalars (``np.int64``,
    ``np.float32``) too; not strings, arrays or tensors (``np.bool_`` is no ``numbers.Real`` either)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def plain_number(v: numbers.Real) -> int | float:
    """``v`` (an ``is_real`` value) as a plain ``int`` (any ``numbers.Integral``) or ``float`` (any other real),
    so that the configs' ``to_dict()`` (JSON, ``weights_only`` checkpoints) holds no numpy scalars."""
    return int(v) if isinstance(v, numbers.Integral) else float(v)


class FieldChecker:
    """Validates the fields of config instance ``obj``; errors start ``"<name>.<field>="``."""

    def __init__(self, obj: object, name: str) -> None:
        self.obj = obj
        self.prefix = name

    def bad(self, name: str, why: str, exc: type[Exception] = ValueError) -> Exception:
        """The exception to raise for field ``name`` (returned, so callers ``raise`` it explicitly)."""
        return exc(f"{self.prefix}.{name}={getattr(self.obj, name)!r} {why}")

    def normalize(self, name: str) -> None:
        """Store field ``name`` (an ``is_real`` value) as a plain ``int`` / ``float`` (the configs are frozen)."""
        object.__setattr__(self.obj, name, plain_number(getattr(self.obj, name)))

    def need_int(self, name: str, lo: int, optional: bool = False) -> None:
        """An integer (any ``numbers.Integral`` but ``bool``: numpy's too, stored as ``int``) ``>= lo``; ``None``
        also passes when ``optional``."""
        v = getattr(self.obj, name)
        if optional and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise self.bad(name, "must be an int" + (" or None" if optional else ""), TypeError)
        self.normalize(name)
        if v < lo:
            raise self.bad(name, f"must be >= {lo}")

    def need_real(self, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
        """A real number (not NaN; numpy's too, stored as ``int`` / ``float``) in ``[lo, hi]``, each end open when
        asked."""
        v = getattr(self.obj, name)
        if not is_real(v):
            raise self.bad(name, "must be a real number", TypeError)
        self.normalize(name)
        if math.isnan(v) or (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
            lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
            raise self.bad(name, f"must be in {lb}{lo}, {hi}{rb}")

    def need_choice(self, name: str, choices: tuple[str, ...]) -> None:
        """One of ``choices``."""
        if getattr(self.obj, name) not in choices:
            raise self.bad(name, f"must be one of {', '.join(map(repr, choices))}")

    def need_bool(self, name: str) -> None:
        """A ``bool``."""
        if not isinstance(getattr(self.obj, name), bool):
            raise self.bad(name, "must be a bool", TypeError)


def refuse_other_methods_options(c: FieldChecker, method: str, applies: dict[str, tuple[str, ...]]) -> None:
    """Refuse a field that ``method`` never reads (``applies``: field -> the methods that read it) set to a
    value other than its default (which cannot be told from no value): an option that would do nothing is not
    recorded as if it were used."""
    defaults = {f.name: f.default for f in fields(c.obj)}
    for name, methods in applies.items():
        if method not in methods and getattr(c.obj, name) != defaults[name]:
            used = f"method={methods[0]!r}" if len(methods) == 1 else f"method in {methods!r}"
            raise c.bad(name, f"applies to {used} only, not method={method!r}")


def check_schedule_fields(c: FieldChecker, methods: tuple[str, ...]) -> None:
    """The fields ``DSTConfig`` and ``MaskConfig`` share (same names, meanings and RigL defaults)."""
    c.need_int("total_steps", 1)
    c.need_choice("method", methods)
    c.need_real("sparsity", 0.0, 1.0, hi_open=True)
    c.need_int("update_every", 1)
    c.need_real("drop_fraction", 0.0, 1.0)
    c.need_real("update_end", 0.0, 1.0)


def config_from_dict(cls: type[_C], d: dict[str, Any], name: str) -> _C:
    """``cls(**d)`` for a dataclass ``cls``; keys that are not fields raise ``ValueError`` naming ``name``."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{name}.from_dict: unknown fields {unknown}")
    return cls(**d)

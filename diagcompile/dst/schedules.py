"""When and how much: the temperature schedule and the topology-update schedule.

Both are pure functions of the optimizer step, so a resumed run recomputes exactly the values an
uninterrupted one used; nothing here holds state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["temperature_at", "cosine_fraction", "TemperatureSchedule", "UpdateSchedule"]


def temperature_at(step: int, schedule: str, start: float, end: float, until: int) -> float:
    """``T`` at optimizer ``step``: from ``start`` at step 0 to ``end`` at step ``until``, then constant.

    * ``constant``:    ``start`` (``end`` is ignored)
    * ``linear``:      ``start + (end - start) * u``
    * ``cosine``:      ``end + (start - end) * (1 + cos(pi * u)) / 2``
    * ``exponential``: ``start * (end / start) ** u`` (geometric: a constant factor per step)

    with ``u = clamp(step / until, 0, 1)`` (``u = 1`` when ``until == 0``).
    """
    if schedule == "constant":
        return float(start)
    u = 1.0 if until <= 0 else min(max(step / until, 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * u
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * u))
    if schedule == "exponential":
        return start * (end / start) ** u
    raise ValueError(f"unknown temperature schedule {schedule!r}")


def cosine_fraction(step: int, fraction: float, t_end: int) -> float:
    """RigL's decayed update fraction ``f(t) = fraction / 2 * (1 + cos(pi * t / t_end))`` (0 past ``t_end``)."""
    if t_end <= 0 or step >= t_end:
        return 0.0
    return fraction * 0.5 * (1.0 + math.cos(math.pi * step / t_end))


@dataclass(frozen=True)
class TemperatureSchedule:
    """``T(step)``: see ``temperature_at``."""

    schedule: str
    start: float
    end: float
    until: int

    def __call__(self, step: int) -> float:
        return temperature_at(step, self.schedule, self.start, self.end, self.until)


@dataclass(frozen=True)
class UpdateSchedule:
    """Topology updates at steps ``every, 2 * every, ...`` strictly before ``end``, replacing a decayed fraction.

    Attributes:
        every: ``Delta T``.
        end: the last step (exclusive) at which an update may happen (RigL's ``T_end``).
        fraction: the fraction replaced at step 0, decayed by ``cosine_fraction``.
    """

    every: int
    end: int
    fraction: float

    def is_update_step(self, step: int) -> bool:
        """Whether ``DiagSparsifier.step()`` updates the topology when the step counter reaches ``step``."""
        return 0 < step < self.end and step % self.every == 0

    def fraction_at(self, step: int) -> float:
        return cosine_fraction(step, self.fraction, self.end)

    def count_at(self, step: int, n: int) -> int:
        """How many of ``n`` items are replaced at ``step``: ``floor(f(step) * n)`` (RigL rounds down)."""
        return int(math.floor(self.fraction_at(step) * n)) if self.is_update_step(step) else 0

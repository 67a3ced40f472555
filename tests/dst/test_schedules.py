"""Temperature and topology-update schedules."""

import math

import pytest

from diagcompile.dst.schedules import TemperatureSchedule, UpdateSchedule, cosine_fraction, temperature_at


@pytest.mark.parametrize("kind", ["cosine", "linear", "exponential"])
def test_endpoints_monotone_and_constant_after_freeze(kind):
    sched = TemperatureSchedule(kind, 5.0, 0.05, until=200)
    values = [sched(t) for t in range(0, 260)]
    assert values[0] == pytest.approx(5.0) and values[200] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(values[:200], values[1:201])), "must not increase before the freeze"
    assert all(v == values[200] for v in values[200:]), "constant after the freeze"


def test_midpoints_match_the_closed_forms():
    s, e = 4.0, 0.01
    # Halfway, cosine and linear meet at the arithmetic mean; the geometric schedule at the geometric mean.
    assert temperature_at(50, "cosine", s, e, 100) == pytest.approx((s + e) / 2)
    assert temperature_at(50, "linear", s, e, 100) == pytest.approx((s + e) / 2)
    assert temperature_at(50, "exponential", s, e, 100) == pytest.approx(math.sqrt(s * e))
    # A quarter of the way: cos(pi/4) = sqrt(2)/2.
    assert temperature_at(25, "cosine", s, e, 100) == pytest.approx(e + (s - e) * (1 + math.sqrt(0.5)) / 2)
    # exponential: a constant ratio per step.
    r = [
        temperature_at(t + 1, "exponential", s, e, 100) / temperature_at(t, "exponential", s, e, 100) for t in range(99)
    ]
    assert max(r) == pytest.approx(min(r))
    assert all(temperature_at(t, "constant", s, e, 100) == s for t in (0, 50, 500))


def test_freeze_at_zero_gives_the_end_temperature():
    assert temperature_at(0, "cosine", 1.0, 0.1, 0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        temperature_at(0, "step", 1.0, 0.1, 10)


def test_rigl_cosine_drop_fraction():
    assert cosine_fraction(0, 0.3, 750) == pytest.approx(0.3)
    assert cosine_fraction(375, 0.3, 750) == pytest.approx(0.15)
    assert cosine_fraction(750, 0.3, 750) == 0.0 and cosine_fraction(900, 0.3, 750) == 0.0


def test_update_steps_and_counts():
    sched = UpdateSchedule(every=100, end=750, fraction=0.3)
    assert [t for t in range(0, 1001) if sched.is_update_step(t)] == [100, 200, 300, 400, 500, 600, 700]
    # floor(f(t) * n): at t=100, f = 0.15 * (1 + cos(pi * 100 / 750)).
    f = 0.15 * (1 + math.cos(math.pi * 100 / 750))
    assert sched.count_at(100, 40) == math.floor(f * 40)
    assert sched.count_at(150, 40) == 0  # not an update step

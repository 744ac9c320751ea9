"""λ_t and σ_t schedules: values pinned at their boundaries (paper.md §1.4)."""

from __future__ import annotations

import math
import pickle

import pytest

from lightning_demp.schedules import (
    ConstantSchedule,
    CosineDecaySchedule,
    LinearWarmupSchedule,
    OneCycleSchedule,
    make_schedule,
)


def test_one_cycle_starts_at_peak_over_25_peaks_at_30_percent_and_ends_near_zero():
    schedule = OneCycleSchedule(peak=0.03, span_steps=1000)
    assert schedule.value(0) == pytest.approx(0.03 / 25)
    assert schedule.value(300) == pytest.approx(0.03)
    assert schedule.value(1000) == pytest.approx(0.03 / 25 / 1e4)
    assert schedule.value(5000) == pytest.approx(0.03 / 25 / 1e4)  # held after the span, as optax does
    assert schedule.value(299) < 0.03 and schedule.value(301) < 0.03
    values = [schedule.value(step) for step in range(1001)]
    assert max(values) == pytest.approx(0.03)
    assert all(a <= b for a, b in zip(values[:300], values[1:301]))  # rising
    assert all(a >= b for a, b in zip(values[300:1000], values[301:1001]))  # falling


def test_one_cycle_midpoints_follow_a_cosine():
    schedule = OneCycleSchedule(peak=1.0, span_steps=1000)
    assert schedule.value(150) == pytest.approx((1.0 + 1.0 / 25) / 2)
    final = 1.0 / 25 / 1e4
    assert schedule.value(650) == pytest.approx((1.0 + final) / 2)


def test_constant_linear_warmup_and_cosine_decay_boundaries():
    assert ConstantSchedule(2.0, 10).value(0) == 2.0
    assert ConstantSchedule(2.0, 10).value(10) == 0.0
    warmup = LinearWarmupSchedule(2.0, 100)
    assert (warmup.value(0), warmup.value(15), warmup.value(30), warmup.value(99), warmup.value(100)) == (
        0.0,
        1.0,
        2.0,
        2.0,
        0.0,
    )
    decay = CosineDecaySchedule(2.0, 100)
    assert decay.value(0) == 2.0
    assert decay.value(50) == pytest.approx(1.0)
    assert decay.value(100) == 0.0
    assert math.isclose(decay.value(25), 1.0 + math.cos(math.pi / 4), rel_tol=1e-9)


@pytest.mark.parametrize("name", ["one_cycle", "constant", "linear_warmup", "cosine_decay"])
def test_schedules_pickle_and_have_zero_strength_when_peak_is_zero(name):
    schedule = make_schedule(name, 0.0, 50)
    assert all(schedule.value(step) == 0.0 for step in range(60))
    assert pickle.loads(pickle.dumps(make_schedule(name, 1.0, 50))) == make_schedule(name, 1.0, 50)


def test_unknown_schedule_is_refused_with_its_name():
    with pytest.raises(ValueError, match="Expected `schedule` to be one of .*got 'cubic'"):
        make_schedule("cubic", 1.0, 10)

"""Strength schedules for the regularization λ_t and the noise σ_t.

Each schedule is a small frozen dataclass: a pure function of the step, so it needs no state on resume and
pickles into a checkpoint. The paper's schedule is `OneCycleSchedule`, optax's
``cosine_onecycle_schedule`` with its defaults (``paper.md`` §1.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

ScheduleName = Literal["one_cycle", "constant", "linear_warmup", "cosine_decay"]
SCHEDULE_NAMES: tuple[str, ...] = ("one_cycle", "constant", "linear_warmup", "cosine_decay")


def _cosine_interpolate(start: float, end: float, fraction: float) -> float:
    """Cosine interpolation from ``start`` (fraction 0) to ``end`` (fraction 1)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


@runtime_checkable
class Schedule(Protocol):
    """A strength that depends only on the optimizer step.

    Any object with ``peak``, ``span_steps`` and ``value(step)`` is one (checked structurally).

    Examples:
        >>> isinstance(OneCycleSchedule(peak=1.0, span_steps=10), Schedule), isinstance("one_cycle", Schedule)
        (True, False)
    """

    @property
    def peak(self) -> float:
        """The largest strength of the schedule."""
        ...

    @property
    def span_steps(self) -> int:
        """Number of optimizer steps the schedule spans."""
        ...

    def value(self, step: int) -> float:
        """Return the strength at optimizer step ``step`` (0-based)."""
        ...


@dataclass(frozen=True)
class OneCycleSchedule:
    """Cosine one-cycle: ``peak/div_factor`` → ``peak`` at ``pct_start·span`` → ``peak/(div·final_div)`` at ``span``.

    After ``span_steps`` the final value is held, as in optax.

    Examples:
        >>> schedule = OneCycleSchedule(peak=1.0, span_steps=100)
        >>> round(schedule.value(0), 4), schedule.value(30), round(schedule.value(100) * 25e4, 4)
        (0.04, 1.0, 1.0)
    """

    peak: float
    span_steps: int
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    @property
    def peak_step(self) -> float:
        """The step at which the rise ends and the strength reaches ``peak``."""
        return self.pct_start * self.span_steps

    def value(self, step: int) -> float:
        """Return λ_t (or σ_t) at ``step``."""
        initial = self.peak / self.div_factor
        final = initial / self.final_div_factor
        rise_steps = self.pct_start * self.span_steps
        if step >= self.span_steps:
            return final
        if step < rise_steps:
            return _cosine_interpolate(initial, self.peak, step / rise_steps)
        return _cosine_interpolate(self.peak, final, (step - rise_steps) / (self.span_steps - rise_steps))


@dataclass(frozen=True)
class ConstantSchedule:
    """``peak`` during the span, 0 after it.

    Examples:
        >>> ConstantSchedule(peak=0.5, span_steps=10).value(9), ConstantSchedule(peak=0.5, span_steps=10).value(10)
        (0.5, 0.0)
    """

    peak: float
    span_steps: int

    def value(self, step: int) -> float:
        """Return the strength at ``step``."""
        return self.peak if step < self.span_steps else 0.0


@dataclass(frozen=True)
class LinearWarmupSchedule:
    """Linear rise from 0 to ``peak`` over ``pct_start·span``, then ``peak`` until the span ends, then 0.

    Examples:
        >>> schedule = LinearWarmupSchedule(peak=1.0, span_steps=100)
        >>> schedule.value(0), schedule.value(15), schedule.value(50), schedule.value(100)
        (0.0, 0.5, 1.0, 0.0)
    """

    peak: float
    span_steps: int
    pct_start: float = 0.3

    @property
    def peak_step(self) -> float:
        """The step at which the rise ends and the strength reaches ``peak``."""
        return self.pct_start * self.span_steps

    def value(self, step: int) -> float:
        """Return the strength at ``step``."""
        if step >= self.span_steps:
            return 0.0
        rise_steps = self.pct_start * self.span_steps
        return self.peak * min(1.0, step / rise_steps) if rise_steps > 0 else self.peak


@dataclass(frozen=True)
class CosineDecaySchedule:
    """Cosine decay from ``peak`` to 0 over the span, 0 after it.

    Examples:
        >>> schedule = CosineDecaySchedule(peak=1.0, span_steps=100)
        >>> schedule.value(0), schedule.value(50), schedule.value(100)
        (1.0, 0.5, 0.0)
    """

    peak: float
    span_steps: int

    def value(self, step: int) -> float:
        """Return the strength at ``step``."""
        if step >= self.span_steps:
            return 0.0
        return _cosine_interpolate(self.peak, 0.0, step / self.span_steps)


def make_schedule(name: str, peak: float, span_steps: int) -> Schedule:
    """Build the schedule called ``name`` (one of `SCHEDULE_NAMES`).

    Examples:
        >>> make_schedule("cosine_decay", peak=2.0, span_steps=4).value(0)
        2.0
    """
    if span_steps < 1:
        raise ValueError(f"Expected `span_steps` to be a positive int, got {span_steps!r}.")
    if name == "one_cycle":
        return OneCycleSchedule(peak, span_steps)
    if name == "constant":
        return ConstantSchedule(peak, span_steps)
    if name == "linear_warmup":
        return LinearWarmupSchedule(peak, span_steps)
    if name == "cosine_decay":
        return CosineDecaySchedule(peak, span_steps)
    raise ValueError(f"Expected `schedule` to be one of {SCHEDULE_NAMES}, got {name!r}.")

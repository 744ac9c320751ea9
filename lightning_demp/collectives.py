"""What a distributed run must do at a removal: `Collectives`, passed to the core by the strategy glue."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor, nn

from lightning_demp.units import RemovalPlan

_T = TypeVar("_T")


def _same(value: _T) -> _T:
    return value


def _nothing(*args: Any) -> None:
    return None


@dataclass(frozen=True)
class Collectives:
    """What a distributed run must do at a removal; the defaults are right for one process.

    Examples:
        >>> Collectives().broadcast_plan(RemovalPlan()) == RemovalPlan()
        True

    Attributes:
        broadcast_plan: Make every process hold rank 0's plan (and fail if they disagree).
        after_surgery: Rebuild what wraps the model (DDP's gradient buckets) once parameters were replaced.
        average_batchnorm: Average BatchNorm running statistics over processes after a recalibration.
        any_process: A boolean tensor, true where it is true on any process.
    """

    broadcast_plan: Callable[[RemovalPlan], RemovalPlan] = _same
    after_surgery: Callable[[], None] = _nothing
    average_batchnorm: Callable[[nn.Module], None] = _nothing
    any_process: Callable[[Tensor], Tensor] = _same


SINGLE_PROCESS = Collectives()
"""The collectives of a run in one process: the plan as it is, nothing to rebuild or average."""

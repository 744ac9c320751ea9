"""The removal policy: which units and heads go at an event, from the reduced statistics alone.

The decision is a pure function of the statistics (identical on every process once they are reduced): dead units
(``|value| <= threshold`` at every reader), plus whatever an opt-in part adds (saturated units), never taking a
group below ``min_units``; dead heads of every `HeadedAttention`. Nothing is decided on non-finite statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_demp.attention import plan_head_removal
from lightning_demp.detection import find_dead_units, group_activity
from lightning_demp.units import RemovalPlan, Statistics, UnitGroup

ExtraUnits = Callable[[UnitGroup, Statistics], Tensor]
"""An opt-in part's own removable units of a group (for example saturated ones), as positions."""


@dataclass(frozen=True)
class Decision:
    """A plan and what the user should hear about it.

    Attributes:
        plan: The units and heads to remove.
        warnings: Messages for the user (a group held at ``min_units``, non-finite statistics).

    Examples:
        >>> Decision(RemovalPlan(), ("a group kept `min_units=1`",)).warnings
        ('a group kept `min_units=1`',)
    """

    plan: RemovalPlan
    warnings: tuple[str, ...] = ()


def decide_removal(
    model: nn.Module,
    groups: Sequence[UnitGroup],
    stats: Statistics,
    *,
    threshold: float,
    min_units: int,
    removable: Collection[str],
    extra_units: ExtraUnits | None = None,
) -> Decision:
    """Dead (and ``extra_units``) units of every removable group, and dead heads.

    Args:
        model: The model (for its attention layers).
        groups: The graph's groups (blocked ones are skipped).
        stats: Reduced statistics of the check.
        threshold: A unit is dead when its activity at every reader is at most this.
        min_units: No group drops below this many units; the least active of the dead go first.
        removable: Names of the groups that may lose units (the ledger's groups).
        extra_units: An opt-in part's own removable units of a group.

    Examples:
        >>> from lightning_demp.units import ReaderSlice, ReaderStats
        >>> group = UnitGroup("fc1", 3, readers=[ReaderSlice("fc2", torch.arange(3), torch.arange(3))])
        >>> stats = {"fc2": ReaderStats(max_abs=torch.tensor([0.0, 1.0, 0.0]), num_samples=8)}
        >>> decide_removal(nn.Identity(), [group], stats, threshold=0.0, min_units=1, removable={"fc1"}).plan.units
        {'fc1': tensor([0, 2])}
    """
    if any(reader.num_nonfinite > 0 for reader in stats.values()):
        return Decision(
            RemovalPlan(), ("non-finite activations during the dead check; no unit is removed at this event.",)
        )
    units: dict[str, Tensor] = {}
    warnings: list[str] = []
    for group in groups:
        if group.blocked is not None or group.name not in removable:
            continue
        activity = group_activity(group, stats)
        dead = find_dead_units(activity, threshold)
        if extra_units is not None:
            dead = torch.unique(torch.cat([dead, extra_units(group, stats)]))
        dead = group.removable(dead)  # a unit that reaches the model output stays, dead or not
        allowed = max(0, group.num_units - min_units)
        if len(dead) > allowed:
            warnings.append(
                f"{len(dead)} of {group.num_units} units of `{group.name}` are dead; keeping `min_units={min_units}`."
            )
            order = torch.sort(activity[dead], stable=True).indices
            dead = dead[order[:allowed]].sort().values
        if len(dead):
            units[group.name] = dead
    heads = plan_head_removal(model, {name: reader.max_abs for name, reader in stats.items()}, threshold)
    return Decision(RemovalPlan(units=units, heads=heads), tuple(warnings))


def round_plan(plan: RemovalPlan, widths: Mapping[str, int], multiple: int) -> RemovalPlan:
    """``plan`` with each group's removals cut so that its width stays a multiple of ``multiple`` (``round_to``).

    A group goes down to the smallest multiple at or above the width the plan would leave; one whose width is not
    a multiple yet loses units only once the plan reaches the multiple below it. The planned units kept are the
    highest-numbered ones. Heads are left as planned.

    Examples:
        >>> plan = RemovalPlan(units={"fc1": torch.tensor([0, 1, 2, 5, 9]), "fc2": torch.tensor([3])})
        >>> {name: units.tolist() for name, units in round_plan(plan, {"fc1": 16, "fc2": 12}, 4).units.items()}
        {'fc1': [0, 1, 2, 5]}
        >>> round_plan(plan, {"fc1": 16, "fc2": 12}, 1) is plan
        True
    """
    if multiple <= 1:
        return plan
    units = {}
    for name, removed in plan.units.items():
        width = widths[name]
        kept_width = -(-(width - len(removed)) // multiple) * multiple  # the multiple at or above what is left
        if kept_width < width:
            units[name] = removed[: width - kept_width]
    return plan.with_units(units)

"""Sparsity targets: steer the regularization strength so that removal follows a planned trajectory.

DemP's final size falls out of λ_max, σ_max, the learning rate and the batch size. With a target, the callback
multiplies λ_t and σ_t by a scale that a feedback rule adjusts at every removal event, so that the measured sparsity
follows a cubic ramp to the target by the end of the schedule span (the ramp of gradual magnitude pruning), from
`RAMP_START` of the span on. With ``target_focus`` (the default) nothing is pulled before the ramp starts, and then the
pull and the noise act only on the units the target still needs to remove: the least important live ones,
re-ranked at every event (`SparsityTarget.shortfall`), so the units that will stay are never pulled toward death.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_demp.detection import group_activity
from lightning_demp.ledger import PruningLedger
from lightning_demp.sizes import SizeTable
from lightning_demp.units import RemovalPlan, Statistics, UnitGroup

TargetMetric = Literal["params", "flops", "units"]
TARGET_METRICS: tuple[str, ...] = ("params", "flops", "units")


def reaches(sparsity: float, goal: float) -> bool:
    """``sparsity >= goal`` up to rounding (``1 - 16/20`` is a hair under 0.2 in floating point).

    Examples:
        >>> 1 - 16 / 20 >= 0.2, reaches(1 - 16 / 20, 0.2)
        (False, True)
    """
    return sparsity >= goal - 1e-9


RAMP_START = 0.3
"""Fraction of the schedule span before which the target plans no removal: the one-cycle λ peak. Which units matter
is not settled early in training (a unit's importance at 10 % of a run says little about its worth at the end), so
units pushed out then are often ones the network would have used; and a network that shrinks early trains the rest
of the run with less capacity (the reason gradual magnitude pruning also starts after a warm-up). The committed
target runs use it (``benchmarks/results/target.md``)."""


def planned_sparsity(progress: float, target: float) -> float:
    """The cubic ramp from `RAMP_START` to the end of the span: ``target·(1 − (1 − r)³)``, ``r`` the progress past
    `RAMP_START` as a fraction of the rest, clipped to [0, 1].

    Examples:
        >>> planned_sparsity(0.2, 0.8), planned_sparsity(1.0, 0.8), round(planned_sparsity(0.65, 0.8), 3)
        (0.0, 0.8, 0.7)
    """
    ramp = min(1.0, max(0.0, (progress - RAMP_START) / (1.0 - RAMP_START)))
    return target * (1.0 - (1.0 - ramp) ** 3)


@dataclass
class StrengthController:
    """Multiplicative feedback on the strength scale: behind plan → stronger, ahead → weaker.

    ``scale ← scale · exp(gain · (planned − measured) / target)``, one event's factor bounded to
    ``[1 / max_step, max_step]`` and the scale clamped to ``[min_scale, max_scale]``; once the target is reached the
    scale drops to ``min_scale`` so that no further units are pushed to die. Units die some epochs after the strength
    rises, so an unbounded controller winds up while it waits for them and then kills the network; the bounds keep
    λ within ``max_scale`` times the configured ``reg_max``. The range is wide on purpose (a model that needs 50×
    ``reg_max`` gets it): the live floor (`lightning_demp.pressure`) keeps a strong λ from killing layers wholesale,
    and the late shortfall removal (`SparsityTarget.shortfall`) closes what death leaves open.

    Examples:
        >>> controller = StrengthController(target=0.5)
        >>> controller.update(measured=0.1, planned=0.3) > 1.0
        True
        >>> controller.update(measured=0.5, planned=0.5)
        0.001
    """

    target: float
    gain: float = 3.0
    scale: float = 1.0
    min_scale: float = 1e-3
    max_scale: float = 100.0
    max_step: float = 1.5

    def update(self, measured: float, planned: float) -> float:
        """Adjust and return the scale after a removal event."""
        if reaches(measured, self.target):
            self.scale = self.min_scale
        else:
            step = math.exp(self.gain * (planned - measured) / max(self.target, 1e-6))
            self.scale *= min(self.max_step, max(1.0 / self.max_step, step))
            self.scale = min(self.max_scale, max(self.min_scale, self.scale))
        return self.scale


def least_active_units(
    groups: Sequence[UnitGroup], stats: Statistics, min_units: int, fraction: float = 0.02
) -> dict[str, Tensor]:
    """The ``fraction`` least active removable units over all groups (at least one), as a removal plan.

    Activity is each unit's largest ``|value|`` at its readers, divided by its group's mean so that layers of
    different scales compare; groups never go below ``min_units``. Used by ``force_target`` only: these units are
    alive, and removing them changes the network's function.

    Examples:
        >>> from lightning_demp.units import ReaderSlice, ReaderStats
        >>> group = UnitGroup("fc1", 4, readers=[ReaderSlice("fc2", torch.arange(4), torch.arange(4))])
        >>> least_active_units([group], {"fc2": ReaderStats(torch.tensor([3.0, 0.5, 2.0, 1.0]), 8)}, min_units=1)
        {'fc1': tensor([1])}
    """
    candidates: list[tuple[float, str, int]] = []
    for group in groups:
        if group.blocked is not None or not group.readers or any(r.reader not in stats for r in group.readers):
            continue
        activity = group_activity(group, stats)
        relative = activity / activity.mean().clamp(min=1e-12)
        order = group.removable(torch.sort(relative, stable=True).indices)[: max(0, group.num_units - min_units)]
        candidates += [(float(relative[i]), group.name, int(i)) for i in order]
    candidates.sort()
    plan: dict[str, list[int]] = {}
    for _, name, index in candidates[: max(1, int(len(candidates) * fraction))] if candidates else []:
        plan.setdefault(name, []).append(index)
    return {name: torch.tensor(sorted(idxs)) for name, idxs in plan.items()}


def interleave_plan(plan: Mapping[str, Tensor]) -> list[tuple[str, int]]:
    """The units of a removal plan in an order that shrinks every group in proportion.

    The ``i``-th of a group's ``n`` planned units comes at position ``(i + 0.5) / n``; ties keep the plan's group
    order. A prefix of this order takes about the same share of every group's planned units.

    Examples:
        >>> interleave_plan({"a": torch.tensor([0, 1, 2, 3]), "b": torch.tensor([7, 9])})
        [('a', 0), ('b', 7), ('a', 1), ('a', 2), ('b', 9), ('a', 3)]
    """
    keyed = []
    for position, (name, idxs) in enumerate(plan.items()):
        values = sorted(int(i) for i in idxs.tolist())
        keyed += [((rank + 0.5) / len(values), position, name, index) for rank, index in enumerate(values)]
    return [(name, index) for _, _, name, index in sorted(keyed)]


def limit_plan_to_target(
    plan: Mapping[str, Tensor], sparsity_after: Callable[[Mapping[str, Tensor]], float], target: float
) -> dict[str, Tensor]:
    """The part of ``plan`` that reaches ``target`` without passing it by more than one unit.

    When removing the whole plan stays at or below the target, the whole plan. Otherwise the shortest prefix of
    `interleave_plan` whose removal reaches the target, found by bisection on ``sparsity_after`` (the sparsity a
    plan would leave; it must not decrease as a plan grows). The units left out are dead but kept: they cost
    nothing to the function, and a later event may take them if the target allows.

    Args:
        plan: Unit indices to remove, by group.
        sparsity_after: Measures the sparsity after removing a plan (for example on a copy of the model).
        target: The sparsity not to pass.

    Examples:
        Each unit is worth 10 % here; the target 25 % is reached by three of the five planned units:

        >>> after = lambda p: 0.1 * sum(len(idxs) for idxs in p.values())
        >>> limit_plan_to_target({"a": torch.tensor([0, 1, 2]), "b": torch.tensor([4, 5])}, after, 0.25)
        {'a': tensor([0, 1]), 'b': tensor([4])}
    """
    full = {name: idxs for name, idxs in plan.items() if len(idxs)}
    if not full or sparsity_after(full) <= target:
        return full
    return shortest_prefix(interleave_plan(full), sparsity_after, target)


def shortest_prefix(
    order: list[tuple[str, int]], sparsity_after: Callable[[Mapping[str, Tensor]], float], goal: float
) -> dict[str, Tensor]:
    """The shortest prefix of ``order`` (``(group, unit)`` pairs) whose removal reaches ``goal``, by bisection on
    ``sparsity_after`` (which must not decrease as a plan grows); all of ``order`` when even that falls short.

    Examples:
        >>> after = lambda p: 0.1 * sum(len(idxs) for idxs in p.values())
        >>> shortest_prefix([("a", 3), ("b", 0), ("a", 1)], after, 0.15)
        {'a': tensor([3]), 'b': tensor([0])}
    """

    def prefix(count: int) -> dict[str, Tensor]:
        chosen: dict[str, list[int]] = {}
        for name, index in order[:count]:
            chosen.setdefault(name, []).append(index)
        return {name: torch.tensor(sorted(idxs), dtype=torch.long) for name, idxs in chosen.items()}

    low, high = 1, len(order)
    if not order or not reaches(sparsity_after(prefix(high)), goal):
        return prefix(high)
    while low < high:
        middle = (low + high) // 2
        if reaches(sparsity_after(prefix(middle)), goal):
            high = middle
        else:
            low = middle + 1
    return prefix(high)


def unit_importance(group: UnitGroup, stats: Statistics, modules: Mapping[str, nn.Module]) -> Tensor:
    """Each unit's largest contribution to its readers: ``max |x|`` it delivers times the norm of the reader
    weights it multiplies, summed over the reader features that carry it.

    A bound on how much the readers' outputs can change when the unit goes, in the units of those outputs; dead
    units score 0.

    Examples:
        >>> from lightning_demp.units import ReaderSlice, ReaderStats
        >>> reader = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = reader.weight.copy_(torch.tensor([[3.0, 1.0]]))
        >>> group = UnitGroup("fc1", 2, readers=[ReaderSlice("fc2", torch.arange(2), torch.arange(2))])
        >>> unit_importance(group, {"fc2": ReaderStats(torch.tensor([1.0, 2.0]), 8)}, {"fc2": reader})
        tensor([3., 2.])
    """
    score = torch.zeros(group.num_units)
    for reader in group.readers:
        layer = modules[reader.reader]
        weight = getattr(layer, "weight", None)
        features = stats[reader.reader].max_abs.detach().float().cpu()
        if isinstance(layer, nn.Linear) and isinstance(weight, Tensor):
            norms = weight.detach().float().norm(dim=0).cpu()
        elif isinstance(layer, nn.modules.conv._ConvNd) and isinstance(weight, Tensor) and layer.groups == 1:
            inputs = 0 if layer.transposed else 1  # a transposed convolution's weight is (in, out, ...)
            norms = weight.detach().float().movedim(inputs, 0).reshape(weight.shape[inputs], -1).norm(dim=1).cpu()
        else:  # a selection or a grouped convolution: activity alone
            norms = torch.ones_like(features)
        contribution = features[reader.feature_idxs] * norms[reader.feature_idxs]
        score.index_add_(0, reader.unit_idxs, contribution.nan_to_num(nan=math.inf))
    return score


class SparsityTarget:
    """The opt-in target part: steer the strength, keep each event within the target, close a shortfall.

    Sparsity is measured on the ledger and a `SizeTable` of the model as it is (no copy of the model): the removed
    fraction of the parameters, the forward FLOPs or the units.

    Args:
        target: The sparsity to reach by the end of the schedule span, in (0, 1).
        metric: What it measures: ``"params"``, ``"flops"`` or ``"units"``.
        force: Remove the least active live units at the final check when the target was not reached.

    Examples:
        >>> part = SparsityTarget(0.5, "units", force=False)
        >>> ledger = PruningLedger(initial_widths={"fc1": 4}, kept_units={"fc1": [0, 1, 2]})
        >>> part.measured(ledger, None), part.sparsity_after(ledger, None, RemovalPlan({"fc1": torch.tensor([0])}))
        (0.25, 0.5)
    """

    def __init__(self, target: float, metric: TargetMetric, force: bool) -> None:
        self.target = target
        self.metric = metric
        self.force = force
        self.controller = StrengthController(target)

    @property
    def scale(self) -> float:
        """The factor on λ_t and σ_t."""
        return self.controller.scale

    def measured(self, ledger: PruningLedger, table: SizeTable | None) -> float:
        """The sparsity now."""
        if self.metric == "units":
            return 1.0 - ledger.units_kept_fraction()
        assert table is not None
        if self.metric == "flops":
            return 1.0 - table.flops / ledger.initial_flops if ledger.initial_flops else 0.0
        return 1.0 - table.params / ledger.initial_params if ledger.initial_params else 0.0

    def sparsity_after(self, ledger: PruningLedger, table: SizeTable | None, plan: RemovalPlan) -> float:
        """The sparsity removing ``plan`` would leave. Heads are not units: they count for params and FLOPs only."""
        if self.metric == "units":
            initial = sum(ledger.initial_widths.values())
            return self.measured(ledger, table) + (plan.num_units / initial if initial else 0.0)
        assert table is not None
        if self.metric == "flops":
            return 1.0 - table.flops_after(plan) / ledger.initial_flops if ledger.initial_flops else 0.0
        return 1.0 - table.params_after(plan) / ledger.initial_params if ledger.initial_params else 0.0

    def limit(self, plan: RemovalPlan, ledger: PruningLedger, table: SizeTable | None) -> RemovalPlan:
        """The part of ``plan`` that stays within the target: nothing once it is reached; units up to one past it;
        dead heads only when they fit whole."""
        if reaches(self.measured(ledger, table), self.target):
            return RemovalPlan()
        units = limit_plan_to_target(
            plan.units, lambda part: self.sparsity_after(ledger, table, RemovalPlan(units=part)), self.target
        )
        limited = plan.with_units(units)
        if limited.heads and self.sparsity_after(ledger, table, limited) > self.target:
            limited = limited.with_heads({})
        return limited

    def update_strength(self, progress: float, measured: float) -> float:
        """After an event: adjust the strength scale toward the planned ramp (`StrengthController`)."""
        return self.controller.update(measured, planned_sparsity(progress, self.target))

    def shortfall(
        self,
        groups: Sequence[UnitGroup],
        stats: Statistics,
        modules: Mapping[str, nn.Module],
        ledger: PruningLedger,
        table: SizeTable | None,
        *,
        goal: float,
        floors: Mapping[str, int],
    ) -> RemovalPlan:
        """The least important live units whose removal brings the sparsity to ``goal`` (one unit past it at most).

        Units are ranked across groups by `unit_importance` relative to their group's mean (layers of different
        scales compare); no group goes below its ``floors`` entry. Empty when ``goal`` is already reached.
        """
        if reaches(self.measured(ledger, table), goal):
            return RemovalPlan()
        candidates: list[tuple[float, str, int]] = []
        for group in groups:
            if group.blocked is not None or group.name not in floors or not group.readers:
                continue
            if any(reader.reader not in stats for reader in group.readers):
                continue
            score = unit_importance(group, stats, modules)
            relative = score / score[torch.isfinite(score)].mean().clamp(min=1e-12) if len(score) else score
            ranked = group.removable(torch.sort(relative, stable=True).indices)
            ranked = ranked[: max(0, group.num_units - floors[group.name])]
            candidates += [(float(relative[i]), group.name, int(i)) for i in ranked if math.isfinite(relative[i])]
        candidates.sort()
        order = [(name, index) for _, name, index in candidates]
        units = shortest_prefix(order, lambda part: self.sparsity_after(ledger, table, RemovalPlan(units=part)), goal)
        return RemovalPlan(units=units)

    def least_active(self, groups: Sequence[UnitGroup], stats: Statistics, min_units: int) -> RemovalPlan:
        """``force_target``'s next chunk of least active live units (`least_active_units`)."""
        return RemovalPlan(units=least_active_units(groups, stats, min_units))

    def state_dict(self) -> dict[str, Any]:
        """The controller's scale (saved as ``strength_scale``)."""
        return {"strength_scale": self.controller.scale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the scale."""
        self.controller.scale = float(state.get("strength_scale", 1.0))

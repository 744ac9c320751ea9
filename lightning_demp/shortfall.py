"""Removing live units toward a sparsity target: the late-schedule lag closing, and the opt-in ``force_target``.

Both take units that are alive, so neither preserves the network's function; both say so in the log and record
events with their own ``reason``. They act through what the core offers (`Core`), so this module stays apart from
the core that calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from lightning_demp.collectives import Collectives
from lightning_demp.config import PruningConfig
from lightning_demp.graph import PrunableGraph
from lightning_demp.ledger import PruningLedger, RemovalEvent
from lightning_demp.policy import round_plan
from lightning_demp.sizes import SizeTable
from lightning_demp.target import SparsityTarget, planned_sparsity, reaches
from lightning_demp.units import RemovalPlan, Statistics

SHORTFALL_START = 0.5
"""Fraction of the schedule span after which a lagging target is closed by removing live units: past the
one-cycle peak (30 %), once units pushed at the peak have had time to die."""
SHORTFALL_STEP = 0.15
"""Most sparsity one lag closing adds, so that training recovers between removals instead of one cliff."""
SHORTFALL_TOLERANCE = 0.01
"""How far under the ramp the sparsity may lag before live units are removed."""


class Core(Protocol):
    """What these removals need of `lightning_demp.core.DemonPruner`.

    Examples:
        >>> from lightning_demp.core import DemonPruner
        >>> pruner: Core = DemonPruner(PruningConfig(target_sparsity=0.5))
        >>> pruner.target is not None
        True
    """

    config: PruningConfig
    ledger: PruningLedger
    target: SparsityTarget | None
    graph: PrunableGraph | None
    info: Callable[[str], None] | None
    warn: Callable[[str], None]

    def size_table(self) -> SizeTable | None: ...

    def statistics(self, model: nn.Module) -> Statistics | None: ...

    def apply(
        self,
        model: nn.Module,
        plan: RemovalPlan,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        step: int,
        epoch: int,
        reason: str = ...,
        collectives: Collectives = ...,
    ) -> RemovalEvent: ...


def live_floors(config: PruningConfig, initial_widths: dict[str, int]) -> dict[str, int]:
    """The fewest units a removal of live units may leave in each group: its live floor, at least ``min_units``.

    Examples:
        >>> live_floors(PruningConfig(live_floor=0.05, min_units=2), {"fc1": 100, "fc2": 10})
        {'fc1': 5, 'fc2': 2}
    """
    return {name: max(config.min_units, math.ceil(config.live_floor * n)) for name, n in initial_widths.items()}


def focus_units(core: Core, model: nn.Module, stats: Statistics | None) -> dict[str, list[int]]:
    """The units a focused target pulls: the least important live ones that the rest of the target needs, ranked
    as the lag closing ranks them (`SparsityTarget.shortfall`), no group below its live floor.

    Examples:
        >>> from lightning_demp.core import DemonPruner
        >>> model = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 2))
        >>> pruner = DemonPruner(PruningConfig(regularizer="l2", target_sparsity=0.3, target_metric="units"))
        >>> pruner.prepare(model, torch.randn(2, 4), total_steps=10)
        >>> pruner.remember_batch((torch.randn(32, 4), None))
        >>> {name: len(units) for name, units in focus_units(pruner, model, pruner.statistics(model)).items()}
        {'0': 6}
    """
    if stats is None or core.target is None or core.graph is None:
        return {}
    plan = core.target.shortfall(
        core.graph.groups(),
        stats,
        dict(model.named_modules()),
        core.ledger,
        core.size_table(),
        goal=core.target.target,
        floors=live_floors(core.config, core.ledger.initial_widths),
    )
    return {name: idxs.tolist() for name, idxs in plan.units.items()}


def close_lag(
    core: Core,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    stats: Statistics | None,
    progress: float,
    step: int,
    epoch: int,
    collectives: Collectives,
) -> RemovalEvent | None:
    """When the sparsity lags the target's ramp at ``progress`` of the schedule, remove the least important live
    units that close the gap: at most `SHORTFALL_STEP` of sparsity per event, no group below its live floor.

    Examples:
        Nothing has died at 60 % of the schedule, where a 30 % unit target's ramp stands at 28 %; one event closes at
        most 15 points of it (3 of the 20 units):

        >>> from lightning_demp.core import DemonPruner
        >>> model = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 2))
        >>> pruner = DemonPruner(PruningConfig(regularizer="l2", target_sparsity=0.3, target_metric="units"))
        >>> pruner.prepare(model, torch.randn(2, 4), total_steps=10)
        >>> pruner.remember_batch((torch.randn(32, 4), None))
        >>> stats = pruner.statistics(model)
        >>> event = close_lag(pruner, model, [], stats, progress=0.6, step=6, epoch=0, collectives=Collectives())
        >>> event.reason, model[0].out_features
        ('shortfall', 17)
    """
    target, graph = core.target, core.graph
    if target is None or graph is None or stats is None:
        return None
    table = core.size_table()
    measured = target.measured(core.ledger, table)
    ramp = planned_sparsity(progress, target.target)
    if measured >= ramp - SHORTFALL_TOLERANCE:
        return None
    goal = min(ramp, measured + SHORTFALL_STEP)
    floors = live_floors(core.config, core.ledger.initial_widths)
    modules = dict(model.named_modules())
    plan = collectives.broadcast_plan(
        target.shortfall(graph.groups(), stats, modules, core.ledger, table, goal=goal, floors=floors)
    )
    plan = round_plan(plan, core.ledger.widths(), core.config.round_to)
    if not plan:
        return None
    event = core.apply(model, plan, optimizers, step=step, epoch=epoch, reason="shortfall", collectives=collectives)
    core.ledger.last_removed_count += plan.num_units
    if core.info is not None:
        core.info(
            f"DemonPruning: {target.metric} sparsity {measured:.1%} lagged the target's ramp ({ramp:.1%} at "
            f"{min(progress, 1.0):.0%} of the schedule); the least important live units went (not "
            "function-preserving) while training continues."
        )
    return event


def force_target(
    core: Core,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    stats: Statistics | None,
    step: int,
    epoch: int,
    collectives: Collectives,
) -> RemovalEvent | None:
    """Opt-in last step: remove the least active live units, in small chunks, until the target is met.

    Examples:
        >>> from lightning_demp.core import DemonPruner
        >>> model = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 2))
        >>> config = PruningConfig(regularizer="l2", target_sparsity=0.2, target_metric="units", force_target=True)
        >>> pruner = DemonPruner(config)
        >>> pruner.prepare(model, torch.randn(2, 4), total_steps=10)
        >>> pruner.remember_batch((torch.randn(32, 4), None))
        >>> stats = pruner.statistics(model)
        >>> event = force_target(pruner, model, [], stats, step=10, epoch=0, collectives=Collectives())
        >>> event.reason, model[0].out_features
        ('force_target', 16)
    """
    target, graph = core.target, core.graph
    if target is None or graph is None:
        return None
    forced, event = 0, None
    while stats is not None and not reaches(target.measured(core.ledger, core.size_table()), target.target):
        plan = round_plan(target.least_active(graph.groups(), stats, core.config.min_units), core.ledger.widths(),
                          core.config.round_to)  # fmt: skip
        if not plan:
            core.warn(
                "`DemonPruning(force_target=True)`: every group is at `min_units`, or its next removal would break "
                "`round_to`; target not met."
            )
            break
        plan = collectives.broadcast_plan(plan)
        event = core.apply(
            model, plan, optimizers, step=step, epoch=epoch, reason="force_target", collectives=collectives
        )
        forced += plan.num_units
        stats = core.statistics(model)
    if forced and core.info is not None:
        measured = target.measured(core.ledger, core.size_table())
        core.info(
            f"DemonPruning: force_target removed {forced} live units (not function-preserving) to reach "
            f"{measured:.1%} {target.metric} sparsity (target {target.target:.1%})."
        )
    return event

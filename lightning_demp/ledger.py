"""The ledger: what a run started with, what is left, and every removal event, as one checkpointable record.

The report, the plots and the settled-only callbacks read the ledger, not the callback. Its `state_dict` holds
plain Python values only (lists, dicts, numbers), so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_demp.units import RemovalPlan, UnitGroup


@dataclass(frozen=True)
class RemovalEvent:
    """One removal event.

    Attributes:
        step: Optimizer step at which it happened.
        epoch: Training epoch.
        reason: ``"dead"`` (function-preserving) or ``"force_target"`` (the least active live units).
        removed: Units removed, by group.
        widths: Units left, by group (every group, after the event).
        params: Parameters left.
        flops_kept: Forward FLOPs left, as a fraction of the start.
        seconds: Wall time of the surgery and bookkeeping.
        heads_removed: Attention heads removed, by layer (``None`` when the model has no `HeadedAttention`).
        heads: Heads left, by layer.

    Examples:
        >>> event = RemovalEvent(step=30, epoch=2, reason="dead", removed={"fc1": 3}, widths={"fc1": 5}, params=40,
        ...                      flops_kept=0.7, seconds=0.01)
        >>> RemovalEvent.from_dict(event.to_dict()) == event, "heads" in event.to_dict()
        (True, False)
    """

    step: int
    epoch: int
    reason: str
    removed: dict[str, int]
    widths: dict[str, int]
    params: int
    flops_kept: float
    seconds: float
    heads_removed: dict[str, int] | None = None
    heads: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint form (the keys of earlier releases; no head keys for a model without heads)."""
        record = asdict(self)
        for key in ("heads_removed", "heads"):
            if record[key] is None:
                del record[key]
        return record

    def describe(self, units: int, heads: int, ledger: PruningLedger) -> str:
        """One line for the log: what went, why, and what is left."""
        what = {
            "dead": "units",
            "shortfall": "least important live units (target shortfall)",
            "force_target": "least active live units (force_target)",
        }.get(self.reason, f"units ({self.reason})")
        if units == 1:
            what = what.replace("units", "unit", 1)
        layers = len(self.removed)
        return (
            f"removed {units} {what} from {layers} layer{'s' if layers != 1 else ''}"
            + (f" and {heads} dead attention head{'s' if heads != 1 else ''}" if heads else "")
            + f": {ledger.units_kept_fraction():.0%} of units, {ledger.flops_kept_fraction():.0%} of FLOPs kept."
        )

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> RemovalEvent:
        """Read an event written by `to_dict` (or by an earlier release)."""
        return cls(
            step=int(record["step"]),
            epoch=int(record.get("epoch", 0)),
            reason=str(record.get("reason", "dead")),
            removed={name: int(n) for name, n in record.get("removed", {}).items()},
            widths={name: int(n) for name, n in record.get("widths", {}).items()},
            params=int(record.get("params", 0)),
            flops_kept=float(record.get("flops_kept", 1.0)),
            seconds=float(record.get("seconds", 0.0)),
            heads_removed=dict(record["heads_removed"]) if "heads_removed" in record else None,
            heads=dict(record["heads"]) if "heads" in record else None,
        )


@dataclass
class PruningLedger:
    """Initial and current widths, removal events, and the sizes they imply.

    Attributes:
        initial_widths: Units of each removable group at the start of the run.
        kept_units: For each group, the original indices of the units still present, in their current order.
        initial_heads: Heads of each `HeadedAttention` at the start.
        kept_heads: For each attention layer, the original heads still present.
        initial_params: Parameters at the start.
        initial_flops: Forward FLOPs per sample at the start.
        current_flops: Forward FLOPs per sample now (measured after each removal; not saved).
        events: One `RemovalEvent` per removal.
        last_check_step: Step of the last dead check (``-1`` before the first).
        checks_run: Dead checks made so far (saved, so a resumed run counts on).
        last_removed_count: Units and heads that check removed.

    Examples:
        >>> import torch
        >>> ledger = PruningLedger()
        >>> ledger.start([UnitGroup("fc1", 4)], heads={}, params=20, flops=40.0)
        >>> ledger.record_removal(RemovalPlan(units={"fc1": torch.tensor([0, 2])}))
        >>> ledger.kept_units, ledger.units_kept_fraction()
        ({'fc1': [1, 3]}, 0.5)
    """

    initial_widths: dict[str, int] = field(default_factory=dict)
    kept_units: dict[str, list[int]] = field(default_factory=dict)
    initial_heads: dict[str, int] = field(default_factory=dict)
    kept_heads: dict[str, list[int]] = field(default_factory=dict)
    changed_dims: dict[str, list[int]] = field(default_factory=dict)  # tensor key -> dims removals changed
    initial_params: int | None = None
    initial_flops: float | None = None
    current_flops: float | None = None
    events: list[RemovalEvent] = field(default_factory=list)
    last_check_step: int = -1
    checks_run: int = 0
    last_removed_count: int = 0
    _removal_started: float | None = field(default=None, repr=False, compare=False)

    def note_check(self, step: int) -> None:
        """Record a dead check at ``step``."""
        self.last_check_step, self.checks_run = step, self.checks_run + 1

    def start(self, groups: list[UnitGroup], heads: Mapping[str, int], params: int, flops: float) -> None:
        """Record the starting widths and sizes; a ledger restored from a checkpoint keeps its own."""
        for group in groups:
            if group.blocked is None:
                self.initial_widths.setdefault(group.name, group.num_units)
                self.kept_units.setdefault(group.name, list(range(group.num_units)))
        for name, count in heads.items():
            self.initial_heads.setdefault(name, count)
            self.kept_heads.setdefault(name, list(range(count)))
        if self.initial_params is None:
            self.initial_params = params
        if self.initial_flops is None:
            self.initial_flops = flops
        self.current_flops = flops

    def start_removal(self) -> None:
        """Note the time a removal starts (its event records the seconds it took)."""
        self._removal_started = time.perf_counter()

    def record_removal(self, plan: RemovalPlan, orders: Mapping[str, Any] | None = None) -> None:
        """Drop the removed units and heads from the kept lists, then apply reorderings (``orders``)."""
        for name, idxs in plan.units.items():
            removed = {int(i) for i in idxs.tolist()}
            self.kept_units[name] = [unit for i, unit in enumerate(self.kept_units[name]) if i not in removed]
        for name, order in (orders or {}).items():
            if name in self.kept_units:
                self.kept_units[name] = [self.kept_units[name][int(i)] for i in order.tolist()]
        for name, idxs in plan.heads.items():
            removed = {int(i) for i in idxs.tolist()}
            self.kept_heads[name] = [head for i, head in enumerate(self.kept_heads[name]) if i not in removed]

    def log_event(self, plan: RemovalPlan, *, step: int, epoch: int, reason: str, params: int) -> RemovalEvent:
        """Append the `RemovalEvent` of ``plan`` (already recorded with `record_removal`) and return it."""
        event = RemovalEvent(
            step=step,
            epoch=epoch,
            reason=reason,
            removed={name: len(idxs) for name, idxs in plan.units.items()},
            widths={name: len(kept) for name, kept in self.kept_units.items()},
            params=params,
            flops_kept=self.flops_kept_fraction(),
            seconds=time.perf_counter() - self._removal_started if self._removal_started else 0.0,
            heads_removed={name: len(h) for name, h in plan.heads.items()} if plan.heads else None,
            heads={name: len(kept) for name, kept in self.kept_heads.items()} if self.kept_heads else None,
        )
        self.events.append(event)
        self._removal_started = None
        return event

    def widths(self) -> dict[str, int]:
        """The current width of each group."""
        return {name: len(kept) for name, kept in self.kept_units.items()}

    def units_kept_fraction(self) -> float:
        """Fraction of the removable units still present."""
        initial = sum(self.initial_widths.values())
        return sum(len(kept) for kept in self.kept_units.values()) / initial if initial else 1.0

    def flops_kept_fraction(self) -> float:
        """Forward FLOPs now, as a fraction of the FLOPs at the start of the run."""
        if not self.initial_flops or self.current_flops is None:
            return 1.0
        return self.current_flops / self.initial_flops

    def params_kept_fraction(self, params: int) -> float:
        """``params`` (the count now) as a fraction of the count at the start."""
        return params / self.initial_params if self.initial_params else 1.0

    def sparsity(self, metric: str, params: int) -> float:
        """The removed fraction of ``"params"`` (``params`` is the count now), ``"flops"`` or ``"units"``.

        Examples:
            >>> PruningLedger(initial_params=20).sparsity("params", params=5)
            0.75
        """
        if metric == "flops":
            return 1.0 - self.flops_kept_fraction()
        if metric == "units":
            return 1.0 - self.units_kept_fraction()
        return 1.0 - self.params_kept_fraction(params)

    def size_metrics(self, params: int) -> dict[str, float]:
        """The logged size metrics: units per group, kept/removed fractions, parameters and FLOPs."""
        metrics: dict[str, float] = {f"demp/units/{name}": float(len(kept)) for name, kept in self.kept_units.items()}
        metrics.update({f"demp/heads/{name}": float(len(kept)) for name, kept in self.kept_heads.items()})
        metrics["demp/units_kept_frac"] = self.units_kept_fraction()
        metrics["demp/units_removed_frac"] = 1.0 - self.units_kept_fraction()
        metrics["demp/params"] = float(params)
        metrics["demp/params_removed_frac"] = 1.0 - self.params_kept_fraction(params)
        if self.current_flops is not None:
            metrics["demp/flops_per_sample"] = float(self.current_flops)
            metrics["demp/flops_kept_frac"] = self.flops_kept_fraction()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Plain values, under the keys earlier releases used."""
        return {
            "initial_widths": dict(self.initial_widths),
            "kept_units": {name: list(kept) for name, kept in self.kept_units.items()},
            "kept_heads": {name: list(kept) for name, kept in self.kept_heads.items()},
            "initial_heads": dict(self.initial_heads),
            "initial_params": self.initial_params,
            "initial_flops": self.initial_flops,
            "events": [event.to_dict() for event in self.events],
            "last_check_step": self.last_check_step,
            "checks_run": self.checks_run,
            "last_removed_count": self.last_removed_count,
            "changed_dims": {key: list(dims) for key, dims in self.changed_dims.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict` (missing keys keep their defaults)."""
        self.initial_widths = dict(state.get("initial_widths", {}))
        self.kept_units = {name: list(kept) for name, kept in state.get("kept_units", {}).items()}
        self.kept_heads = {name: list(kept) for name, kept in state.get("kept_heads", {}).items()}
        self.initial_heads = dict(state.get("initial_heads", {}))
        self.initial_params = state.get("initial_params")
        self.initial_flops = state.get("initial_flops")
        self.events = [RemovalEvent.from_dict(event) for event in state.get("events", [])]
        self.last_check_step = int(state.get("last_check_step", -1))
        self.checks_run = int(state.get("checks_run", 0))
        self.last_removed_count = int(state.get("last_removed_count", 0))
        self.changed_dims = {key: list(dims) for key, dims in state.get("changed_dims", {}).items()}

"""The data the parts of the pruner pass to each other: groups of coupled units, statistics and plans.

Low in the house: this module imports only torch, so that the policies (dead units, saturation, targets) and the
ledger can describe groups and plans without importing the graph or the surgery.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class ReaderSlice:
    """The features of layer ``reader`` that carry units of a group, and which unit each one carries.

    Examples:
        Two channels of length 2, flattened into the 4 input features of a Linear layer:

        >>> ReaderSlice("fc", feature_idxs=torch.arange(4), unit_idxs=torch.tensor([0, 0, 1, 1])).unit_idxs
        tensor([0, 0, 1, 1])
    """

    reader: str
    feature_idxs: Tensor
    unit_idxs: Tensor


@dataclass
class UnitGroup:
    """Units that must be removed together: one index per unit, shared by every coupled layer.

    Attributes:
        name: Name of the root producer (a Linear or Conv layer); units are its output features or channels.
        num_units: Current number of units.
        members: Names of every module the removal touches.
        readers: Where the units are read (see `ReaderSlice`).
        selection_outputs: Output sides of `ChannelSelect` modules that carry units, as `ReaderSlice` records
            whose ``reader`` names the selection and whose ``feature_idxs`` are its output channels.
        blocked: Why the group is never pruned, or ``None`` when it can be.
        permutable: Whether every member is a layer whose units can be reordered in place.
        fixed_units: Units that stay while the rest of the group can go (they reach the model output, or an
            excluded layer, through one branch of a concatenation); never all of them (the group is then blocked).
        fixed_because: Why `fixed_units` stay, or ``None`` when there are none.

    Examples:
        >>> group = UnitGroup("fc1", 3, members=["fc1", "fc2"], readers=[ReaderSlice("fc2", torch.arange(3),
        ...                   torch.arange(3))])
        >>> group.name, group.num_units, group.blocked is None
        ('fc1', 3, True)
    """

    name: str
    num_units: int
    members: list[str] = field(default_factory=list)
    readers: list[ReaderSlice] = field(default_factory=list)
    selection_outputs: list[ReaderSlice] = field(default_factory=list)
    blocked: str | None = None
    permutable: bool = True
    fixed_units: tuple[int, ...] = ()
    fixed_because: str | None = None

    def removable(self, units: Tensor) -> Tensor:
        """``units`` (indices into the group) without its `fixed_units`, in their order.

        Examples:
            >>> UnitGroup("fc1", 4, fixed_units=(0, 1)).removable(torch.tensor([3, 1, 2]))
            tensor([3, 2])
        """
        if not self.fixed_units:
            return units
        return units[~torch.isin(units, torch.tensor(self.fixed_units, dtype=units.dtype, device=units.device))]

    @property
    def unread_units(self) -> int:
        """How many units no reader slice covers (a trace that followed one call of a reused module leaves some)."""
        return self.num_units - len({int(unit) for reader in self.readers for unit in reader.unit_idxs})


@dataclass(frozen=True)
class ReaderStats:
    """Activity observed at the input of one reader layer, reduced over every process.

    Attributes:
        max_abs: Largest ``|value|`` per input feature (non-finite where a non-finite value was seen).
        num_samples: Number of samples observed.
        max_value: Largest value per feature; only when the range is tracked (saturation), else ``None``.
        min_value: Smallest value per feature, likewise.

    Examples:
        >>> stats = ReaderStats(max_abs=torch.tensor([0.0, float("nan")]), num_samples=8)
        >>> stats.num_nonfinite
        1
    """

    max_abs: Tensor
    num_samples: int
    max_value: Tensor | None = None
    min_value: Tensor | None = None

    @property
    def num_nonfinite(self) -> int:
        """Features whose ``max_abs`` is NaN or infinite (a decision on them is refused)."""
        return int((~torch.isfinite(self.max_abs)).sum())


Statistics = Mapping[str, ReaderStats]
"""The statistics of one check: one `ReaderStats` per reader layer, by module name."""


@dataclass(frozen=True)
class RemovalPlan:
    """What one removal event takes away: unit positions per group, and attention heads per attention layer.

    Positions are in each group's current numbering (``0 .. num_units - 1``), sorted.

    Examples:
        >>> plan = RemovalPlan(units={"fc1": torch.tensor([1, 5])}, heads={"blocks.0.attn": torch.tensor([0])})
        >>> plan.num_units, plan.num_heads, bool(plan), bool(RemovalPlan())
        (2, 1, True, False)
        >>> RemovalPlan.from_lists(plan.to_lists()) == plan
        True
    """

    units: Mapping[str, Tensor] = field(default_factory=dict)
    heads: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def num_units(self) -> int:
        """Units removed over all groups."""
        return sum(len(idxs) for idxs in self.units.values())

    @property
    def num_heads(self) -> int:
        """Attention heads removed over all layers."""
        return sum(len(idxs) for idxs in self.heads.values())

    def __bool__(self) -> bool:
        return self.num_units > 0 or self.num_heads > 0

    def with_units(self, units: Mapping[str, Tensor]) -> RemovalPlan:
        """The same heads with another unit part."""
        return RemovalPlan(units=dict(units), heads=dict(self.heads))

    def with_heads(self, heads: Mapping[str, Tensor]) -> RemovalPlan:
        """The same units with another head part."""
        return RemovalPlan(units=dict(self.units), heads=dict(heads))

    def to_lists(self) -> dict[str, dict[str, list[int]]]:
        """Plain lists (for a broadcast between processes, or a log)."""
        return {
            "units": {name: [int(i) for i in idxs.tolist()] for name, idxs in sorted(self.units.items()) if len(idxs)},
            "heads": {name: [int(i) for i in idxs.tolist()] for name, idxs in sorted(self.heads.items()) if len(idxs)},
        }

    @classmethod
    def from_lists(cls, lists: Mapping[str, Mapping[str, list[int]]]) -> RemovalPlan:
        """The inverse of `to_lists`."""
        return cls(
            units={name: torch.tensor(idxs, dtype=torch.long) for name, idxs in lists.get("units", {}).items()},
            heads={name: torch.tensor(idxs, dtype=torch.long) for name, idxs in lists.get("heads", {}).items()},
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemovalPlan) and self.to_lists() == other.to_lists()

    __hash__ = None  # type: ignore[assignment]


def reads_each_unit_equally(root_idxs: Iterable[int], num_units: int) -> bool:
    """Whether a layer side carries every unit of a group the same number of times (a condition of reordering).

    Examples:
        >>> reads_each_unit_equally([0, 1, 0, 1], 2), reads_each_unit_equally([0, 0, 1], 2)
        (True, False)
    """
    counts = torch.bincount(torch.as_tensor(list(root_idxs), dtype=torch.long), minlength=num_units)
    return bool((counts == counts[0]).all()) if counts.numel() else True

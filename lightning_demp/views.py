"""Read-only views of what the framework-free `DemonPruner` holds, shared by the `DemonPruning` callback."""

from __future__ import annotations

from torch import nn

from lightning_demp.accounting import count_parameters
from lightning_demp.config import PruningConfig
from lightning_demp.core import DemonPruner
from lightning_demp.ledger import PruningLedger, RemovalEvent


class PrunerViews:
    """Properties over ``self.pruner`` (a `DemonPruner`) and ``self.config``: widths, events, sizes, settling.

    Examples:
        >>> class Holder(PrunerViews):
        ...     def __init__(self):
        ...         self.config = PruningConfig()
        ...         self.pruner = DemonPruner(self.config)
        >>> Holder().events, Holder().strength_scale
        ([], 1.0)
    """

    pruner: DemonPruner
    config: PruningConfig

    @property
    def ledger(self) -> PruningLedger:
        """The `lightning_demp.ledger.PruningLedger`: initial and kept widths, events, sizes."""
        return self.pruner.ledger

    @property
    def events(self) -> list[RemovalEvent]:
        """One `RemovalEvent` per removal."""
        return self.pruner.ledger.events

    @property
    def kept_units(self) -> dict[str, list[int]]:
        """For each group, the original indices of the units still present."""
        return self.pruner.ledger.kept_units

    @property
    def kept_heads(self) -> dict[str, list[int]]:
        """For each attention layer, the original heads still present."""
        return self.pruner.ledger.kept_heads

    @property
    def strength_scale(self) -> float:
        """The factor on λ_t and σ_t (steered when a target is set)."""
        return self.pruner.strength_scale

    def measured_sparsity(self, pl_module: nn.Module) -> float:
        """The sparsity ``target_metric`` measures now: the removed fraction of parameters, FLOPs or units."""
        return self.pruner.ledger.sparsity(self.config.target_metric, count_parameters(pl_module))

    def size_metrics(self, pl_module: nn.Module) -> dict[str, float]:
        """The logged size metrics: units per group, kept/removed fractions, parameters and FLOPs."""
        return self.pruner.ledger.size_metrics(count_parameters(pl_module))

    def is_settled(self, step: int) -> bool:
        """The schedule is over and a check since its end removed nothing (see `DemonPruner.is_settled`)."""
        return self.pruner.is_settled(step)

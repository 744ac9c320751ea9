"""lightning-demp: Demon's Pruning for PyTorch Lightning. Networks that shrink themselves while they train."""

from lightning_demp.callback import DemonPruning
from lightning_demp.checkpoint import load_pruned_checkpoint
from lightning_demp.collectives import Collectives
from lightning_demp.config import PruningConfig
from lightning_demp.core import DemonPruner
from lightning_demp.detection import ActivationMonitor, UnitActivity, dead_check, find_dead_units, unit_activity
from lightning_demp.graph import PrunableGraph, TracingError
from lightning_demp.ledger import PruningLedger, RemovalEvent
from lightning_demp.monitoring import SettledEarlyStopping, SettledModelCheckpoint
from lightning_demp.noise import inject_noise_
from lightning_demp.optim import ParamRemap, remap_optimizer_
from lightning_demp.regularization import add_penalty_grad_
from lightning_demp.removal import RemovalError, remove_units_
from lightning_demp.resize import enable_resize_on_load, resize_like_
from lightning_demp.schedules import (
    ConstantSchedule,
    CosineDecaySchedule,
    LinearWarmupSchedule,
    OneCycleSchedule,
    make_schedule,
)
from lightning_demp.units import ReaderSlice, ReaderStats, RemovalPlan, UnitGroup

__version__ = "0.1.0"

__all__ = [
    "ActivationMonitor",
    "Collectives",
    "ConstantSchedule",
    "CosineDecaySchedule",
    "DemonPruner",
    "DemonPruning",
    "LinearWarmupSchedule",
    "OneCycleSchedule",
    "ParamRemap",
    "PrunableGraph",
    "PruningConfig",
    "PruningLedger",
    "ReaderSlice",
    "ReaderStats",
    "RemovalError",
    "RemovalEvent",
    "RemovalPlan",
    "SettledEarlyStopping",
    "SettledModelCheckpoint",
    "TracingError",
    "UnitActivity",
    "UnitGroup",
    "__version__",
    "add_penalty_grad_",
    "dead_check",
    "enable_resize_on_load",
    "find_dead_units",
    "inject_noise_",
    "load_pruned_checkpoint",
    "make_schedule",
    "remap_optimizer_",
    "remove_units_",
    "resize_like_",
    "unit_activity",
]

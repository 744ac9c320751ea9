"""The peers DemP is compared with, as Lightning callbacks built the way their users would build them.

* Lightning's ``ModelPruning``: L1 structured pruning of output units (``ln_structured``, ``pruning_dim=0``) of every
  Linear/Conv except the head, a per-epoch amount that reaches a chosen final unit sparsity; masks, dense shapes.
* Torch-Pruning magnitude pruning during training (``MetaPruner`` + ``GroupMagnitudeImportance``), a pruning step
  at the end of each epoch of the first ``prune_fraction`` of training; the optimizer is rebuilt after each step
  (fresh state, LR scheduler state carried over), as Torch-Pruning users do.
* Torch-Pruning's BN-scale pruner (network slimming): L1 on BatchNorm scales every step (``regularize``) and
  pruning steps by BN-scale importance, same cadence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_demp.attention import HeadedAttention
from lightning_demp.graph import PrunableGraph


def _prunable_layers(model: LightningModule) -> tuple[list[nn.Module], list[nn.Module]]:
    """The layers whose output units the peers prune, and the layers they must leave alone.

    Every Linear/Conv but the output layers; for a transformer, only the blocks' MLP hidden layers (``fc1``), the
    units DemP prunes there (attention and the residual width stay intact for every method).
    """
    graph = PrunableGraph(model, model.example_input_array)
    modules = dict(model.named_modules())
    heads: list[nn.Module] = [modules[name] for name in graph.output_layers]
    layers: list[nn.Module] = [
        m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m not in heads
    ]
    attention = (nn.MultiheadAttention, HeadedAttention)
    if any(isinstance(m, attention) for m in model.modules()):
        layers = [m for name, m in modules.items() if name.endswith(".fc1")]
        heads = [m for m in modules.values() if isinstance(m, (nn.Linear, *attention)) and m not in layers]
    return layers, heads


def model_pruning(model: LightningModule, final_unit_sparsity: float, epochs: int) -> ModelPruning:
    """Lightning's ModelPruning reaching ``final_unit_sparsity`` of output units after ``epochs`` epochs."""
    layers, _ = _prunable_layers(model)
    per_epoch = 1.0 - (1.0 - final_unit_sparsity) ** (1.0 / epochs)
    return ModelPruning(
        pruning_fn="ln_structured",
        parameters_to_prune=[(layer, "weight") for layer in layers],
        amount=lambda epoch: per_epoch if epoch < epochs else 0.0,
        pruning_dim=0,
        pruning_norm=1,
        use_global_unstructured=False,
        make_pruning_permanent=True,
        verbose=0,
    )


class TorchPruningDuringTraining(Callback):
    """Torch-Pruning's iterative pruners driven at epoch ends, with the optimizer rebuilt after each step."""

    def __init__(self, method: str, pruning_ratio: float, prune_epochs: int, reg: float = 1e-4) -> None:
        self.method = method
        self.pruning_ratio = pruning_ratio
        self.prune_epochs = prune_epochs
        self.reg = reg
        self.pruner: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _, heads = _prunable_layers(pl_module)
        if self.method == "magnitude":
            self.pruner = tp.pruner.MetaPruner(
                pl_module,
                pl_module.example_input_array,
                importance=tp.importance.GroupMagnitudeImportance(p=2),
                pruning_ratio=self.pruning_ratio,
                iterative_steps=self.prune_epochs,
                ignored_layers=heads,
            )
        elif self.method == "bn_scale":
            self.pruner = tp.pruner.BNScalePruner(
                pl_module,
                pl_module.example_input_array,
                importance=tp.importance.BNScaleImportance(),
                reg=self.reg,
                pruning_ratio=self.pruning_ratio,
                iterative_steps=self.prune_epochs,
                ignored_layers=heads,
            )
        else:
            raise ValueError(f"Expected `method` to be 'magnitude' or 'bn_scale', got {self.method!r}.")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.method == "bn_scale":
            self.pruner.regularize(pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch >= self.prune_epochs:
            return
        self.pruner.step()
        scheduler_states = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
        trainer.strategy.setup_optimizers(trainer)  # fresh optimizer on the new parameters
        for config, state in zip(trainer.lr_scheduler_configs, scheduler_states):
            config.scheduler.load_state_dict(state)


def model_pruning_callbacks(
    model: LightningModule, epochs: int, *, unit_sparsity: float, prune_epochs: int
) -> list[Callback]:
    """``extra_callbacks`` factory for the benchmarks (picklable through ``functools.partial``)."""
    return [model_pruning(model, unit_sparsity, prune_epochs)]


def torch_pruning_callbacks(
    model: LightningModule, epochs: int, *, method: str, pruning_ratio: float, prune_epochs: int
) -> list[Callback]:
    """``extra_callbacks`` factory for the benchmarks (picklable through ``functools.partial``)."""
    return [TorchPruningDuringTraining(method, pruning_ratio, prune_epochs)]


def zeroed_fraction(model: nn.Module) -> float:
    """Fraction of all parameter entries that are exactly zero (what masked pruning removes)."""
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return zeros / total


def torch_pruning_available() -> bool:
    return hasattr(tp, "pruner") and torch.__version__ >= "2"

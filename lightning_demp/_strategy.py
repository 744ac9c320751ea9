"""Lightning glue: the only module touching strategy internals, and what the callback reads off the Trainer.

Supported: single-device strategies and DDP (``ddp``, ``ddp_spawn``, ``ddp_fork``, ...). Strategies that shard
parameters (FSDP, DeepSpeed, ModelParallel) are refused: a module-level removal would be silently undone by the
sharded copy (``lightning.md`` §2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_demp.collectives import Collectives
from lightning_demp.config import PruningConfig
from lightning_demp.resize import resize_on_load_enabled
from lightning_demp.units import RemovalPlan


def check_supported(strategy: Strategy) -> None:
    """Raise a ``RuntimeError`` naming ``strategy`` when it shards parameters or is unknown.

    Examples:
        >>> check_supported(SingleDeviceStrategy(device=torch.device("cpu")))
    """
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    raise RuntimeError(
        f"`DemonPruning` does not support the strategy `{type(strategy).__name__}`: it removes units by replacing "
        "parameters, which sharded or model-parallel strategies would undo. Use a single device or "
        '`strategy="ddp"` / `"ddp_spawn"` instead.'
    )


def spawns_processes(trainer: Trainer) -> bool:
    """Whether the strategy runs training in spawned processes (``ddp_spawn``, ``ddp_notebook``...)."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)


def collectives(trainer: Trainer) -> Collectives:
    """The broadcast, rewrap and averaging of ``trainer``'s strategy, for `DemonPruner.removal_event`."""
    return Collectives(
        broadcast_plan=lambda plan: broadcast_plan(trainer, plan),
        after_surgery=lambda: rewrap_after_surgery(trainer),
        average_batchnorm=lambda module: average_batchnorm_statistics(trainer, module),
        any_process=lambda flags: any_process(trainer, flags),
    )


def any_process(trainer: Trainer, flags: Tensor) -> Tensor:
    """``flags`` (booleans) true where they are on any process of ``trainer``'s strategy."""
    if trainer.world_size == 1:
        return flags
    summed = trainer.strategy.reduce(flags.to(trainer.strategy.root_device, torch.float32), reduce_op="sum")
    return summed.cpu() > 0


def check_spawned_reload(trainer: Trainer, module: torch.nn.Module) -> None:
    """Under a spawning strategy, refuse a module that cannot take the pruned shapes its main process reloads."""
    if spawns_processes(trainer) and not resize_on_load_enabled(module):
        raise RuntimeError(
            f"With `{type(trainer.strategy).__name__}` using spawned processes, the main process reloads the "
            f"trained weights into your original `{type(module).__name__}`, which still has its full widths. "
            "Call `lightning_demp.enable_resize_on_load(self)` at the end of its `__init__` so that it accepts "
            'the pruned shapes, or use `strategy="ddp"`.'
        )


def check_fit(trainer: Trainer, module: LightningModule, config: PruningConfig) -> None:
    """Before a fit: refuse what cannot work (`check_callbacks`, `PruningConfig.check_model`), warn about the rest."""
    check_callbacks(trainer)
    for message in config.check_model(module):
        rank_zero_warn(message)


def check_callbacks(trainer: Trainer) -> None:
    """Refuse, before training, the callbacks that keep a copy of the model at its old widths.

    Examples:
        >>> check_callbacks(Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False))
    """
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, StochasticWeightAveraging):
            raise ValueError(
                "`DemonPruning` cannot run beside `StochasticWeightAveraging`: SWA averages a copy of the model made "
                "at setup, whose widths the removals no longer match. Average after pruning instead: fit with "
                "`DemonPruning` first, then fit the pruned model (`load_pruned_checkpoint`) with "
                "`StochasticWeightAveraging` and without `DemonPruning`."
            )


def broadcast_plan(trainer: Trainer, plan: RemovalPlan) -> RemovalPlan:
    """Make every process hold rank 0's removal plan, and fail loudly if a rank had computed another one."""
    if trainer.world_size <= 1:
        return plan
    local = plan.to_lists()
    chosen = trainer.strategy.broadcast(local, src=0)
    agreed = trainer.strategy.reduce_boolean_decision(local == chosen, all=True)
    if not agreed:
        raise RuntimeError(
            "`DemonPruning` computed different removal plans on different processes although the statistics were "
            "reduced; refusing to prune so that the replicas cannot drift apart. Please report this with your setup."
        )
    return RemovalPlan.from_lists(chosen)


def rewrap_after_surgery(trainer: Trainer) -> None:
    """Rebuild the DDP wrapper so gradient synchronisation covers the new parameters."""
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy):
        return
    if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()


def average_batchnorm_statistics(trainer: Trainer, module: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over processes (each rank recalibrated on its own batches)."""
    if trainer.world_size <= 1:
        return
    for norm in module.modules():
        if not isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            continue
        for statistic in (norm.running_mean, norm.running_var):
            if statistic is not None:
                statistic.copy_(trainer.strategy.reduce(statistic.clone(), reduce_op="mean"))


def is_last_epoch(trainer: Trainer) -> bool:
    """Whether the current epoch is the last one ``max_epochs`` or ``max_steps`` allows."""
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
    if max_epochs is not None and trainer.current_epoch + 1 >= max_epochs:
        return True
    return trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step


def schedule_step(trainer: Trainer) -> int:
    """The step the schedules and removal events count: ``global_step`` under automatic optimization; under manual
    optimization the training batches done, since ``global_step`` counts every optimizer's steps there (two
    optimizers would end the schedule halfway through the fit).

    Examples:
        >>> trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        >>> schedule_step(trainer), trainer.strategy.connect(LightningModule()), schedule_step(trainer)
        (0, None, 0)
    """
    module = trainer.lightning_module
    if module is None or module.automatic_optimization:
        return trainer.global_step
    return trainer.fit_loop.epoch_loop.batch_progress.total.completed


def logs_this_step(trainer: Trainer) -> bool:
    """Whether the loggers receive this training step's values (``log_every_n_steps``; as Lightning's
    ``LearningRateMonitor`` asks): a value logged with ``on_step=True`` on another step is overwritten unseen."""
    updates = trainer._logger_connector.should_update_logs or bool(getattr(trainer, "fast_dev_run", False))
    return updates and bool(trainer.loggers)


def total_steps(trainer: Trainer) -> int:
    """The optimizer steps of the whole fit, or the documented error when they cannot be known."""
    total = trainer.estimated_stepping_batches
    if math.isinf(total) or total < 1:  # an IterableDataset without ``__len__`` under ``max_epochs`` gives -1
        raise ValueError(
            "`DemonPruning` needs the number of training steps to lay out its schedule; set `max_steps` or "
            "`max_epochs` on the Trainer and use a dataloader with a length."
        )
    return int(total)


def skipped_step(pl_module: LightningModule, outputs: Any) -> bool:
    """Whether automatic optimization skipped this batch: ``training_step`` returned ``None`` (e.g. on a NaN batch),
    so no optimizer step was taken and Lightning hands ``on_train_batch_end`` no loss."""
    missing = outputs is None or (isinstance(outputs, Mapping) and outputs.get("loss") is None)
    return missing and pl_module.automatic_optimization


def resave_last_checkpoints(trainer: Trainer, *, removed: bool) -> None:
    """After a removal at the end of a fit that stopped early (``EarlyStopping``), write each `ModelCheckpoint`'s
    ``last.ckpt`` again: it was saved before the removal, and ``ckpt_path="last"`` must give the final network."""
    if not removed:
        return
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            trainer.save_checkpoint(callback.last_model_path)

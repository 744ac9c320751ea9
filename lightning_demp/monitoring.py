"""Schedule-aware monitoring: the schedule's phase, whether the network has settled, a warning when
``EarlyStopping`` or best-checkpoint selection would act on validation metrics while units are still dying, and
the two callbacks that act only once the network has settled (`SettledModelCheckpoint`, `SettledEarlyStopping`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from lightning_demp import _strategy
from lightning_demp.core import DemonPruner
from lightning_demp.schedules import Schedule

PHASE_RISING, PHASE_FALLING, PHASE_DONE = 0, 1, 2
PROGRESS_BAR_KEY = "demp/kept"  # the fraction of parameters kept, on the progress bar only


def schedule_phase(schedule: Schedule, step: int) -> int:
    """0 while the strength rises (to its peak), 1 while it falls or holds inside the span, 2 once the span is over.

    Examples:
        >>> from lightning_demp.schedules import OneCycleSchedule
        >>> [schedule_phase(OneCycleSchedule(1.0, 100), step) for step in (0, 29, 30, 99, 100)]
        [0, 0, 1, 1, 2]
    """
    if step >= schedule.span_steps:
        return PHASE_DONE
    peak_at = getattr(schedule, "peak_step", 0)  # schedules that rise first say where they peak
    return PHASE_RISING if step < peak_at else PHASE_FALLING


def risky_monitors(trainer: pl.Trainer, schedule_epochs: float) -> list[str]:
    """Describe each EarlyStopping/ModelCheckpoint that would act on a validation metric during the schedule.

    An ``EarlyStopping`` is risky when its patience (in epochs) is shorter than the schedule; a ``ModelCheckpoint``
    that keeps the best of a monitored metric always is, because the best value may come from an unpruned epoch.
    Metrics under ``demp/`` (such as ``demp/settled``) are never risky.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> callbacks = [EarlyStopping(monitor="val_loss", patience=3), ModelCheckpoint(monitor="demp/settled")]
        >>> trainer = Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False)
        >>> risky_monitors(trainer, schedule_epochs=9)
        ["EarlyStopping(monitor='val_loss', patience=3) can stop the run within the 9 epochs of the schedule"]
        >>> risky_monitors(trainer, schedule_epochs=2)
        []
    """
    if schedule_epochs <= 0:
        return []
    every = trainer.check_val_every_n_epoch or 1
    found = []
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        monitor = getattr(callback, "monitor", None)
        if not monitor or str(monitor).startswith("demp/"):
            continue
        if isinstance(callback, _ActsOnceSettled):
            continue
        if isinstance(callback, EarlyStopping) and callback.patience * every < schedule_epochs:
            found.append(
                f"EarlyStopping(monitor={monitor!r}, patience={callback.patience}) can stop the run within the "
                f"{math.ceil(schedule_epochs)} epochs of the schedule"
            )
        elif isinstance(callback, ModelCheckpoint) and callback.save_top_k != 0:
            found.append(
                f"ModelCheckpoint(monitor={monitor!r}) can keep a checkpoint from the {math.ceil(schedule_epochs)} "
                "epochs of the schedule, before the network shrank"
            )
    return found


def warn_about_monitors(trainer: pl.Trainer, schedule: Schedule | None, total_steps: int | None) -> None:
    """Warn (on rank 0) about each callback that `risky_monitors` finds within the schedule's span.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_demp.schedules import OneCycleSchedule
        >>> trainer = Trainer(max_epochs=10, logger=False, enable_progress_bar=False)
        >>> warn_about_monitors(trainer, OneCycleSchedule(1.0, 90), total_steps=100)  # nothing risky: no warning
    """
    if schedule is None or not total_steps:
        return
    steps_per_epoch = max(1, total_steps // max(1, trainer.max_epochs or 1))
    risky = risky_monitors(trainer, schedule.span_steps / steps_per_epoch)
    if risky:
        rank_zero_warn(
            "`DemonPruning`: " + "; ".join(risky) + ". Validation metrics dip while units die and BatchNorm "
            "statistics move; monitor them once `demp/settled` is 1 (see the docs' monitoring recipe), or raise "
            "the patience past the schedule."
        )


def warn_about_mid_epoch_checkpoints(trainer: pl.Trainer) -> None:
    """Warn (on rank 0) when validation runs mid-epoch and a `ModelCheckpoint` saves after it: a resume from such
    a checkpoint is not exact, because the next removal check sees only the batches after the resume point.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> warn_about_mid_epoch_checkpoints(Trainer(logger=False, enable_progress_bar=False))  # once an epoch: fine
    """
    interval = trainer.val_check_interval
    mid_epoch = (isinstance(interval, float) and interval < 1.0) or isinstance(interval, int)
    savers = [
        callback
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and getattr(callback, "_save_on_train_epoch_end", None) is not True
    ]
    if mid_epoch and savers and trainer.limit_val_batches != 0:
        rank_zero_warn(
            f"`DemonPruning`: `val_check_interval={interval!r}` validates mid-epoch and `ModelCheckpoint` saves after "
            "validation, so checkpoints can be written mid-epoch. A resume from one is not exact: the next removal "
            "check sees only the training batches after the resume point (the batches are not saved). For exact "
            "resumes, pass `ModelCheckpoint(save_on_train_epoch_end=True)`."
        )


def warn_at_fit_start(trainer: pl.Trainer, pruner: DemonPruner) -> None:
    """The fit-start warnings: mid-epoch checkpoints, and monitors that act within the schedule (with pressure).

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_demp.config import PruningConfig
        >>> warn_at_fit_start(Trainer(logger=False, enable_progress_bar=False), DemonPruner(PruningConfig()))
    """
    warn_about_mid_epoch_checkpoints(trainer)
    if pruner.config.reg_max > 0 or pruner.config.noise_std > 0:
        warn_about_monitors(trainer, pruner.pressure.reg_schedule, pruner.pressure.total_steps)


def log_size(
    trainer: pl.Trainer, module: pl.LightningModule, metrics: dict[str, float], *, use_module_log: bool
) -> None:
    """Log the size metrics: through ``module.log`` inside the loop, straight to the loggers at ``on_train_end``
    (where ``LightningModule.log`` is not allowed).

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> log_size(Trainer(logger=False), pl.LightningModule(), {"demp/params": 10.0}, use_module_log=False)
    """
    if use_module_log:
        for key, value in metrics.items():  # the same on every process: the max reduces them exactly, quietly
            module.log(key, value, sync_dist=True, reduce_fx="max")
        if "demp/params_removed_frac" in metrics:  # one short key on the progress bar, not sent to the loggers
            kept = 1.0 - metrics["demp/params_removed_frac"]
            module.log(PROGRESS_BAR_KEY, kept, prog_bar=True, logger=False, sync_dist=True, reduce_fx="max")
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


def log_state(module: pl.LightningModule, pruner: DemonPruner, step: int) -> None:
    """At an epoch end: the strength scale (with a target), the schedule's phase and whether the network settled.

    Examples:
        >>> from lightning_demp.config import PruningConfig
        >>> pruner = DemonPruner(PruningConfig())  # no schedule laid out, no target: nothing to log
        >>> log_state(pl.LightningModule(), pruner, step=0)
    """
    values = {}  # identical on every process: the max reduces them exactly, and Lightning does not warn under DDP
    if pruner.target is not None:
        values["demp/strength_scale"] = pruner.strength_scale
    schedule = pruner.pressure.reg_schedule
    if schedule is not None:
        values["demp/schedule_phase"] = float(schedule_phase(schedule, step))
        values["demp/settled"] = float(pruner.is_settled(step))
    for key, value in values.items():
        module.log(key, value, sync_dist=True, reduce_fx="max")


def network_settled(trainer: pl.Trainer) -> bool:
    """Whether the trainer's `DemonPruning` reports the network settled at the current step.

    Settled means the schedule is over and a removal check made since its end removed nothing, so validation
    metrics describe the final network. Read from the callback itself, not from ``callback_metrics``:
    ``demp/settled`` is logged at the end of the training epoch, after that epoch's validation.

    Raises:
        RuntimeError: if the trainer has no `DemonPruning` callback.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_demp import DemonPruning
        >>> trainer = Trainer(callbacks=[DemonPruning()], logger=False, enable_progress_bar=False)
        >>> network_settled(trainer)  # nothing has been checked yet
        False
    """
    pruner = next(  # the callback's core; found without importing the callback (it imports this module)
        (c.pruner for c in trainer.callbacks if isinstance(getattr(c, "pruner", None), DemonPruner)),  # type: ignore[attr-defined]
        None,
    )
    if pruner is None:
        raise RuntimeError(
            "A settled-only callback (SettledModelCheckpoint, SettledEarlyStopping) needs a `DemonPruning` callback "
            "in the same Trainer: add one to `callbacks`, or use Lightning's ModelCheckpoint/EarlyStopping."
        )
    return pruner.is_settled(_strategy.schedule_step(trainer))


class _ActsOnceSettled(pl.Callback):
    """Passes the decision hooks of a Lightning monitoring callback through only once the network has settled."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        network_settled(trainer)  # fail at setup, not after the schedule, when DemonPruning is missing
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if network_settled(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if network_settled(trainer):
            super().on_validation_end(trainer, pl_module)


class SettledModelCheckpoint(_ActsOnceSettled, ModelCheckpoint):
    """A `ModelCheckpoint` that saves only once `DemonPruning` reports the network settled.

    Best-of selection on a validation metric (``monitor=...``, ``mode=...``) then compares final, pruned networks
    only, never an early unpruned epoch whose metric happened to be higher, nor an epoch in the dip of the schedule.
    It takes `ModelCheckpoint`'s arguments; keep a plain ``ModelCheckpoint(save_last=True)`` beside it for
    resuming, since this one saves nothing while the schedule runs. `DemonPruning` does not warn about it. If no
    saving point comes after the network settled (a schedule that spans the whole fit, or no removal check after
    it), it keeps no checkpoint and warns at the end of the fit. Two saves are not gated: ``save_last`` at the end
    of training (the final network, after `DemonPruning`'s final check) and ``save_on_exception``.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.callbacks import ModelCheckpoint
        >>> from lightning_demp import DemonPruning
        >>> best = SettledModelCheckpoint(monitor="val_acc", mode="max")
        >>> trainer = Trainer(callbacks=[DemonPruning(), best, ModelCheckpoint(save_last=True)], logger=False)
        >>> best.monitor
        'val_acc'
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # save_last: the final network, after DemonPruning's final check
        if self.save_top_k != 0 and not self.best_model_path:
            rank_zero_warn(
                f"`SettledModelCheckpoint(monitor={self.monitor!r})` kept no checkpoint: none of this fit's saving "
                "points came after the network settled (the schedule ran to the end, or no removal check that removed "
                "nothing came after it). Lower `DemonPruning(schedule_span=...)` or `prune_every_n_epochs` so that a "
                "check follows the schedule, and keep `ModelCheckpoint(save_last=True)` beside it."
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if network_settled(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class SettledEarlyStopping(_ActsOnceSettled, EarlyStopping):
    """An `EarlyStopping` that counts its patience only once `DemonPruning` reports the network settled.

    While units die, validation metrics dip and recover; a patience shorter than the schedule would stop a
    healthy run. This one ignores the schedule's epochs: its patience starts with the settled network. It takes
    `EarlyStopping`'s arguments. `DemonPruning` does not warn about it.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_demp import DemonPruning
        >>> stop = SettledEarlyStopping(monitor="val_loss", patience=3)
        >>> trainer = Trainer(callbacks=[DemonPruning(), stop], logger=False, enable_progress_bar=False)
        >>> stop.patience
        3
    """

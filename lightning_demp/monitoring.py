"""Schedule-aware monitoring: the schedule's phase, whether the network has settled, and a warning when
``EarlyStopping`` or best-checkpoint selection would act on validation metrics while units are still dying.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_demp.schedules import Schedule

PHASE_RISING, PHASE_FALLING, PHASE_DONE = 0, 1, 2


def schedule_phase(schedule: Schedule, step: int, pct_start: float = 0.3) -> int:
    """0 while the strength rises (to its peak), 1 while it falls or holds inside the span, 2 once the span is over.

    Examples:
        >>> from lightning_demp.schedules import OneCycleSchedule
        >>> [schedule_phase(OneCycleSchedule(1.0, 100), step) for step in (0, 29, 30, 99, 100)]
        [0, 0, 1, 1, 2]
    """
    if step >= schedule.span_steps:
        return PHASE_DONE
    rising = type(schedule).__name__ in ("OneCycleSchedule", "LinearWarmupSchedule")
    return PHASE_RISING if rising and step < pct_start * schedule.span_steps else PHASE_FALLING


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

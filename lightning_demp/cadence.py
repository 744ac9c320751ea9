"""When removal events come: every n-th training epoch (the default), or every n-th optimizer step.

Framework-free: `Cadence` answers from epoch and step counts; the callback asks it at the ends of batches and
epochs. The end of training always brings a final event, whichever cadence is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_demp.config import check_int


@dataclass(frozen=True)
class Cadence:
    """How often `DemonPruning` checks for dead units and removes them.

    Attributes:
        every_n_epochs: An event at the end of every n-th training epoch (when ``every_n_train_steps`` is unset).
        every_n_train_steps: An event after every n-th optimizer step, mid-epoch included; epoch ends then bring
            no event except the last.

    Raises:
        TypeError: A count is not an int.
        ValueError: A count is below 1, or both are set.

    Examples:
        >>> Cadence(every_n_train_steps=50).describe()
        'prune_every_n_train_steps=50'
        >>> Cadence(every_n_epochs=2, every_n_train_steps=50)
        Traceback (most recent call last):
        ...
        ValueError: Set `prune_every_n_epochs` or `prune_every_n_train_steps`, not both (got 2 and 50).
    """

    every_n_epochs: int = 1
    every_n_train_steps: int | None = None

    def __post_init__(self) -> None:
        check_int("prune_every_n_epochs", self.every_n_epochs, low=1)
        if self.every_n_train_steps is not None:
            check_int("prune_every_n_train_steps", self.every_n_train_steps, low=1)
            if self.every_n_epochs != 1:
                raise ValueError(
                    "Set `prune_every_n_epochs` or `prune_every_n_train_steps`, not both "
                    f"(got {self.every_n_epochs} and {self.every_n_train_steps})."
                )

    def describe(self) -> str:
        """The cadence as the argument that sets it."""
        if self.every_n_train_steps is not None:
            return f"prune_every_n_train_steps={self.every_n_train_steps}"
        return f"prune_every_n_epochs={self.every_n_epochs}"

    def at_epoch_end(self, epoch: int, last_epoch: bool) -> bool:
        """Whether the end of training epoch ``epoch`` (0-based) brings an event.

        Examples:
            >>> [Cadence(every_n_epochs=2).at_epoch_end(epoch, last_epoch=epoch == 4) for epoch in range(5)]
            [False, True, False, True, True]
            >>> Cadence(every_n_train_steps=10).at_epoch_end(1, last_epoch=False)
            False
        """
        if last_epoch:
            return True
        return self.every_n_train_steps is None and (epoch + 1) % self.every_n_epochs == 0

    def after_step(self, steps_done: int, last_epoch_ends_now: bool = False) -> bool:
        """Whether an event follows the optimizer step that brought the count to ``steps_done``; never when the
        epoch end about to come is the last (its event follows).

        Examples:
            >>> [step for step in range(1, 13) if Cadence(every_n_train_steps=4).after_step(step)]
            [4, 8, 12]
            >>> Cadence().after_step(4)
            False
        """
        every = self.every_n_train_steps
        return every is not None and steps_done > 0 and steps_done % every == 0 and not last_epoch_ends_now

    def observe_batch(
        self, steps_done: int, batch_idx: int, epoch_batches: float, check_batches: int, epoch_event: bool
    ) -> bool:
        """Whether a training batch falls in the ``check_batches`` before an event (``check_mode="train_forwards"``).

        ``steps_done`` counts the optimizer steps before this batch; ``epoch_event`` says whether this epoch's
        end brings an event.

        Examples:
            >>> cadence = Cadence(every_n_train_steps=10)
            >>> [step for step in range(20) if cadence.observe_batch(step, step, 20, 3, epoch_event=False)]
            [7, 8, 9, 17, 18, 19]
        """
        before_epoch_end = epoch_event and (math.isinf(epoch_batches) or batch_idx >= epoch_batches - check_batches)
        every = self.every_n_train_steps
        before_step_event = every is not None and every - steps_done % every <= check_batches
        return before_epoch_end or before_step_event

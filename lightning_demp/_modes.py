"""Train/eval flags: one way to change them for a while and give every module its own flag back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit, whatever the block changed.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> _ = model[1].eval()  # a submodule the user keeps in eval mode
        >>> with kept_modes(model):
        ...     _ = model.train()
        >>> model.training, model[1].training
        (True, False)
    """
    flags = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> with eval_mode(model):
        ...     model.training, model[0].training
        (False, False)
        >>> model.training, model[0].training
        (True, True)
    """
    with kept_modes(model):
        model.eval()
        yield

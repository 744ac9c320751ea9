"""BatchNorm recalibration: re-estimate running statistics from a few training batches.

Near the peak of the regularization schedule, BatchNorm scales are pushed toward zero and the running statistics,
an exponential average over many steps, stop describing the network: eval-mode accuracy dips although the
train-mode network is fine (``feasibility.md``). Re-estimating the statistics on a few batches before validation and
after each removal makes validation during DemP trustworthy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

_BATCHNORM = nn.modules.batchnorm._BatchNorm


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that tracks running statistics.

    Examples:
        >>> has_batchnorm(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
        True
        >>> has_batchnorm(nn.BatchNorm1d(3, track_running_stats=False)), has_batchnorm(nn.Linear(2, 3))
        (False, False)
    """
    return any(isinstance(m, _BATCHNORM) and m.track_running_stats for m in model.modules())


def recalibrate_batchnorm_(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]) -> int:
    """Replace every BatchNorm's running statistics by their average over ``batches``, in place.

    Frozen BatchNorm layers are left alone: those whose affine parameters are all frozen (``requires_grad=False``)
    and those kept in eval mode while ``model`` trains. When the new statistics are not finite (a batch with a NaN),
    the old ones are kept and 0 is returned.

    Only BatchNorm layers run in train mode (cumulative average, ``momentum=None``); every other module stays in
    eval mode (no dropout), no gradient is computed, no parameter changes. Modes and momenta are restored.

    Args:
        model: The module to recalibrate.
        batches: Training batches.
        forward: ``forward(model, batch)`` runs the model on one batch.

    Returns:
        The number of batches used (0 when the statistics were kept).

    Examples:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> batches = [torch.randn(64, 3) + 5.0 for _ in range(4)]
        >>> recalibrate_batchnorm_(model, batches, lambda m, b: m(b))
        4
        >>> bool(model[1].running_mean.abs().sum() > 0), model.training
        (True, True)
    """
    norms = recalibrated_norms(model)
    if not norms:
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    saved = {norm: [buffer.clone() for buffer in norm.buffers(recurse=False)] for norm in norms}
    used = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
                used += 1
    finally:
        for module, training in modes.items():
            module.training = training
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        if used and not all(torch.isfinite(buffer).all() for norm in norms for buffer in norm.buffers(recurse=False)):
            used = 0  # a non-finite batch would poison every later eval-mode forward
        if used == 0:  # nothing seen: keep the old statistics
            for norm, buffers in saved.items():
                for buffer, old in zip(norm.buffers(recurse=False), buffers, strict=True):
                    buffer.copy_(old)
    return used


def recalibrated_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers `recalibrate_batchnorm_` re-estimates: those that track statistics and are not frozen.

    Examples:
        >>> model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3).requires_grad_(False))
        >>> recalibrated_norms(model) == [model[0]]
        True
    """
    found = [m for m in model.modules() if isinstance(m, _BATCHNORM)]
    return [m for m in found if m.track_running_stats and not _frozen(m, model)]


def _frozen(norm: nn.Module, model: nn.Module) -> bool:
    """Whether the user froze ``norm``: affine parameters that do not train, or eval mode inside a training model.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        >>> _frozen(model[1], model), _frozen(model[1].requires_grad_(False), model)
        (False, True)
    """
    params = [p for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)) if p is not None]
    return (bool(params) and not any(p.requires_grad for p in params)) or (model.training and not norm.training)

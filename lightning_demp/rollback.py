"""All or nothing: a removal that fails half-way leaves the model and its optimizers as they were before it.

Surgery replaces parameters group by group and the optimizer remap follows; an exception between two groups (a
Torch-Pruning error, a ``KeyboardInterrupt``) would otherwise leave some layers sliced and others not, and a
checkpoint written on the way out (``OnExceptionCheckpoint``) would save a network that matches neither its record
nor its optimizer state. The removal keeps references to what it replaces (no tensor is copied), and puts them
back when it does not finish.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_OPTIMIZER_CACHES = ("_params", "_numel_cache")  # LBFGS's own view of what it trains


class _Snapshot:
    """References to every module's attributes, parameters, buffers and children, and to the optimizers' state."""

    def __init__(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.modules: list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]] = [
            (module, dict(module.__dict__), dict(module._parameters), dict(module._buffers), dict(module._modules))
            for module in model.modules()
        ]
        self.optimizers = [
            (
                optimizer,
                [list(group["params"]) for group in optimizer.param_groups],
                dict(optimizer.state),
                {name: getattr(optimizer, name) for name in _OPTIMIZER_CACHES if hasattr(optimizer, name)},
            )
            for optimizer in optimizers
        ]

    def restore(self) -> None:
        for module, attributes, parameters, buffers, children in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            module.__dict__.update(_parameters=parameters, _buffers=buffers, _modules=children)
        for optimizer, params, state, caches in self.optimizers:
            for group, group_params in zip(optimizer.param_groups, params, strict=True):
                group["params"] = group_params
            optimizer.state.clear()
            optimizer.state.update(state)
            for name, value in caches.items():
                setattr(optimizer, name, value)


@contextmanager
def all_or_nothing(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> Iterator[None]:
    """Undo every change the block made to ``model``'s modules and to ``optimizers`` if it raises.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> weight = model[0].weight
        >>> try:
        ...     with all_or_nothing(model):
        ...         model[0].weight = nn.Parameter(weight.detach()[:6])
        ...         model[0].out_features = 6
        ...         raise KeyboardInterrupt
        ... except KeyboardInterrupt:
        ...     pass
        >>> model[0].weight is weight, model[0].out_features
        (True, 8)
    """
    snapshot = _Snapshot(model, optimizers)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise

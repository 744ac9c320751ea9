"""Where a one-sided regularizer can kill: the layers whose inputs go negative, seen on the first training forward.

``regularizer="positive_l2"`` (and ``"positive_group_l1"``) drives positive weights and offsets to zero or below.
That silences a ReLU unit for every input only when the unit's inputs are never negative (they come from a ReLU).
A layer that reads signed inputs (the raw data, a LayerNorm's output, a residual sum) keeps its units alive under
the pull; it is only confined to non-positive weights, which costs accuracy and removes nothing. So those layers
are not pulled (`lightning_demp.regularization.unkillable_params`); their dead units still go.

The signs are read off real data, not the example input (often zeros): `InputSigns` hooks every Linear/Conv layer
for the first training forward, and `lightning_demp.pressure.Pressure` takes the union over processes before the
first optimizer step, so that every rank pulls the same parameters. The result is kept in the checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


class InputSigns:
    """Whether each Linear/Conv layer of ``model`` sees a negative input value on its next call.

    Each layer's hook removes itself after that call, so nothing stays on the model (`torch.export` and
    `torch.compile` see it bare) and later forwards cost nothing.

    Examples:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> watch = InputSigns(model)
        >>> _ = model(torch.randn(8, 3))
        >>> watch.seen, dict(zip(watch.names, watch.negative)), len(model[0]._forward_pre_hooks)
        (True, {'0': True, '2': False}, 0)
    """

    def __init__(self, model: nn.Module) -> None:
        layers = {name: module for name, module in model.named_modules() if isinstance(module, _LAYERS)}
        self.names = sorted(layers)
        self.negative = [False] * len(self.names)
        self.seen = False  # whether any layer ran
        self.handles = [
            layers[name].register_forward_pre_hook(functools.partial(self._record, index))  # a partial pickles
            for index, name in enumerate(self.names)
        ]

    @torch.compiler.disable  # eager under `model.compile()`: the hook is no part of any graph
    def _record(self, index: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.seen = True
        if args and isinstance(args[0], Tensor):
            self.negative[index] = bool((args[0].detach() < 0).any())
        self.handles[index].remove()  # once per layer (the hooks of a call are copied before it runs)

    def remove(self) -> None:
        """Remove the hooks of the layers that have not run yet (what was seen stays)."""
        for handle in self.handles:
            handle.remove()

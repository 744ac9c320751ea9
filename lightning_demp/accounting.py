"""Size accounting: parameters, forward FLOPs and units, against the widths a run started with."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_demp.detection import eval_mode


def count_parameters(module: nn.Module) -> int:
    """Number of parameter entries of ``module``.

    Examples:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters())


def call_with(module: nn.Module, inputs: Any) -> Any:
    """Call ``module`` on ``inputs`` as Lightning does with ``example_input_array``.

    A tuple or list is unpacked as positional arguments, a dict as keyword arguments, anything else is passed as is.

    Examples:
        >>> class Scale(nn.Module):
        ...     def forward(self, x, factor=1.0):
        ...         return x * factor
        >>> call_with(Scale(), (torch.ones(2), 3.0)), call_with(Scale(), {"x": torch.ones(2), "factor": 2.0})
        (tensor([3., 3.]), tensor([2., 2.]))
        >>> call_with(Scale(), torch.ones(2))
        tensor([1., 1.])
    """
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    if isinstance(inputs, dict):
        return module(**inputs)
    return module(inputs)


def batch_size_of(inputs: Any) -> int:
    """The leading dimension of the first tensor found in ``inputs`` (1 if none).

    Examples:
        >>> batch_size_of(torch.zeros(5, 3)), batch_size_of({"x": torch.zeros(4, 2)})
        (5, 4)
        >>> batch_size_of((2.0, torch.zeros(7)))  # the first tensor, wherever it is
        7
        >>> batch_size_of(torch.tensor(1.0)), batch_size_of("no tensor")
        (1, 1)
    """
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() > 0 else 1
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def count_flops_per_sample(module: nn.Module, inputs: Any) -> float:
    """Forward FLOPs per sample, counted by torch's ``FlopCounterMode`` in eval mode.

    Examples:
        >>> count_flops_per_sample(nn.Linear(3, 2), torch.randn(4, 3))
        12.0
    """
    counter = FlopCounterMode(display=False)
    with eval_mode(module), torch.no_grad(), counter:
        call_with(module, inputs)
    return counter.get_total_flops() / batch_size_of(inputs)

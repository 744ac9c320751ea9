"""Layers the trace did not see: a training-only head, a branch the example input did not take.

Torch-Pruning traces one eval-mode forward on the example input. A Linear or Conv layer that only runs in
training (an auxiliary head) or on other inputs reads units the graph does not know it reads; removing them would
leave that layer at its old width, and the next step would fail. `UntracedWatch` looks at the first training-mode
forward after the trace: a layer that ran there but is not in the graph blocks the groups it may read (those whose
width is its input width; every group when none matches), with the reason. A branch that the first training
forward does not take either stays unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch  # noqa: F401  (the examples use it)
from torch import nn

from lightning_demp.resize import input_width

if TYPE_CHECKING:
    from lightning_demp.graph import PrunableGraph

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


class _Seen:
    """Forward hook of one untraced layer: notes that it ran in training mode (a class, so that models pickle)."""

    def __init__(self, watch: UntracedWatch, name: str) -> None:
        self.watch, self.name = watch, name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training:
            self.watch.ran.add(self.name)


class _RootDone:
    """Forward hook of the model: after its first training-mode forward, report and stop watching."""

    def __init__(self, watch: UntracedWatch) -> None:
        self.watch = watch

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training:
            self.watch.finish()


class UntracedWatch:
    """Watch the first training forward of ``model`` for Linear/Conv layers outside ``traced``.

    Args:
        model: The traced model.
        traced: The modules the trace saw.
        found: Called once with ``{layer name: its input width}`` of the untraced layers that ran (maybe empty).

    Examples:
        >>> class AuxHead(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.aux = nn.Linear(4, 6), nn.Linear(6, 2)
        ...     def forward(self, x):
        ...         h = self.body(x)
        ...         return (h, self.aux(h)) if self.training else h
        >>> model, seen = AuxHead(), []
        >>> watch = UntracedWatch(model, traced={model.body}, found=seen.append)
        >>> _ = model(torch.randn(2, 4))
        >>> seen, watch.active
        ([{'aux': 6}], False)
    """

    def __init__(self, model: nn.Module, traced: set[nn.Module], found: Callable[[dict[str, int]], None]) -> None:
        self.found = found
        self.ran: set[str] = set()
        self.widths = {
            name: int(width)
            for name, module in model.named_modules()
            if isinstance(module, _LAYERS) and module not in traced and (width := input_width(module)) is not None
        }
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(_Seen(self, name)) for name in self.widths]
        self.handles.append(model.register_forward_hook(_RootDone(self)))

    @property
    def active(self) -> bool:
        """Whether the first training forward is still to come."""
        return bool(self.handles)

    def finish(self) -> None:
        """Remove the hooks and report the untraced layers that ran."""
        self.remove()
        self.found({name: self.widths[name] for name in sorted(self.ran)})

    def remove(self) -> None:
        """Remove the hooks without reporting (teardown, or an exception first)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def block_untraced_readers(graph: PrunableGraph, widths: dict[str, int]) -> list[str]:
    """Block, in ``graph``, the groups each untraced layer (name: input width) may read: those of its input width,
    or every group when none has it; return one message per layer.

    Examples:
        >>> from lightning_demp.graph import PrunableGraph
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> graph = PrunableGraph(model, torch.randn(2, 4))
        >>> block_untraced_readers(graph, {"aux": 6})
        ["`aux` ran in training but not in the trace; its groups ['0'] are kept whole."]
        >>> graph.groups()[0].blocked
        '`aux` reads units the trace did not see (a training-only layer?)'
    """
    messages = []
    for name, width in widths.items():
        groups = graph.groups()
        readable = [group.name for group in groups if group.num_units == width] or [group.name for group in groups]
        for group in readable:
            graph.extra_blocks[group] = f"`{name}` reads units the trace did not see (a training-only layer?)"
        messages.append(f"`{name}` ran in training but not in the trace; its groups {readable} are kept whole.")
    return messages

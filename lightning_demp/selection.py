"""Decoupled residual channels: an identity shortcut as a fixed 0/1 channel selection.

With a plain ``x + f(x)``, a channel of the residual stream can only go when it is dead at the block's input *and*
output, because the sum couples them. The authors' code turns identity shortcuts into fixed 0/1 selections
(``paper.md`` §1.1) so that a block's input channels and output channels shrink independently. ``ChannelSelect``
is that selection: it holds the original ids of its input and output channels and routes each output channel from
the input channel with the same id (zeros when that channel is gone). While nothing is removed it is an identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn


class ChannelSelect(nn.Module):
    """Identity shortcut that survives independent removal of its input and output channels.

    Args:
        channels: Number of channels (identity at construction).

    Examples:
        >>> select = ChannelSelect(4)
        >>> x = torch.arange(8.0).reshape(1, 4, 2)
        >>> torch.equal(select(x), x)
        True
        >>> select.keep_inputs_(torch.tensor([0, 2, 3]))   # input channel 1 is gone
        >>> select(x[:, [0, 2, 3]])[0, :, 0]               # output 1 now gets nothing from the shortcut
        tensor([0., 0., 4., 6.])
    """

    in_ids: Tensor
    out_ids: Tensor
    source: Tensor
    present: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("in_ids", torch.arange(channels))
        self.register_buffer("out_ids", torch.arange(channels))
        self._refresh()

    @property
    def in_channels(self) -> int:
        """Current number of input channels."""
        return int(self.in_ids.numel())

    @property
    def out_channels(self) -> int:
        """Current number of output channels."""
        return int(self.out_ids.numel())

    def _refresh(self) -> None:
        match = self.out_ids[:, None] == self.in_ids[None, :]
        self.register_buffer("source", match.to(torch.uint8).argmax(dim=1), persistent=False)
        self.register_buffer("present", match.any(dim=1), persistent=False)
        self.identity = self.in_channels == self.out_channels and bool(torch.equal(self.in_ids, self.out_ids))
        self.complete = bool(self.present.all())

    def keep_inputs_(self, kept: Tensor) -> None:
        """Keep only the input channels at positions ``kept``."""
        self.in_ids = self.in_ids[kept.to(self.in_ids.device)]
        self._refresh()

    def keep_outputs_(self, kept: Tensor) -> None:
        """Keep only the output channels at positions ``kept``."""
        self.out_ids = self.out_ids[kept.to(self.out_ids.device)]
        self._refresh()

    def forward(self, x: Tensor) -> Tensor:
        """Route input channels (dimension 1) to output channels by id."""
        if self.identity:
            return x.view_as(x)  # a node of its own in the autograd graph, so Torch-Pruning can trace it
        selected = x.index_select(1, self.source)
        if self.complete:
            return selected
        shape = [1, -1] + [1] * (x.dim() - 2)
        return selected * self.present.view(shape).to(selected.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("in_ids", "out_ids"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.shape != getattr(self, name).shape:
                setattr(self, name, saved.clone().to(getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"


class ChannelSelectPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning handler: input and output channels of a ``ChannelSelect`` are removed independently."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, ChannelSelect)
        removed = set(idxs)
        layer.keep_outputs_(torch.tensor([i for i in range(layer.out_channels) if i not in removed], dtype=torch.long))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, ChannelSelect)
        removed = set(idxs)
        layer.keep_inputs_(torch.tensor([i for i in range(layer.in_channels) if i not in removed], dtype=torch.long))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, ChannelSelect)
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, ChannelSelect)
        return layer.in_channels

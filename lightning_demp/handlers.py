"""Torch-Pruning handlers for the project's own layers: how their input and output units are removed.

`lightning_demp.graph` registers them when it traces a model, so that Torch-Pruning treats a `ChannelSelect`
shortcut and a `HeadedAttention` block as single layers instead of tracing inside them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from lightning_demp.attention import HeadedAttention
from lightning_demp.selection import ChannelSelect


class ChannelSelectPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning handler: input and output channels of a `ChannelSelect` are removed independently.

    Examples:
        >>> pruner, select = ChannelSelectPruner(), ChannelSelect(4)
        >>> _ = pruner.prune_in_channels(select, [1])
        >>> pruner.get_in_channels(select), pruner.get_out_channels(select)
        (3, 4)
    """

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


class HeadedAttentionPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning handler: a `HeadedAttention` is one layer from ``dim`` input to ``dim`` output channels.

    Registering it keeps Torch-Pruning from tracing inside it, where the heads' reshapes would couple ``qkv``'s
    output features with ``proj``'s input features as if they were units. Heads are removed by
    `HeadedAttention.remove_heads_`, outside the dependency graph; the residual width it reads and writes is
    coupled with LayerNorm in a transformer block and stays blocked.

    Examples:
        >>> pruner, attention = HeadedAttentionPruner(), HeadedAttention(dim=8, heads=2)
        >>> _ = pruner.prune_in_channels(attention, [0, 1])
        >>> pruner.get_in_channels(attention), pruner.get_out_channels(attention), attention.head_dim
        (6, 8, 4)
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, HeadedAttention)
        tp.prune_linear_out_channels(layer.proj, list(idxs))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, HeadedAttention)
        tp.prune_linear_in_channels(layer.qkv, list(idxs))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, HeadedAttention)
        return layer.proj.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, HeadedAttention)
        return layer.qkv.in_features

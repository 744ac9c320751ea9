"""Torch-Pruning handlers for the project's own layers: how their input and output units are removed; and a
correction to its slices of channels-first sequences.

`lightning_demp.graph` registers the handlers when it traces a model, so that Torch-Pruning treats a
`ChannelSelect` shortcut and a `HeadedAttention` block as single layers instead of tracing inside them, and then
calls `map_channels_first_slices`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning.dependency.index_mapping import _SliceIndexMapping

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


_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)
_LAYOUT_CHANGES = ("permute", "transpose", "tbackward", "movedim", "swap")  # grad_fn names that move the channels


def map_channels_first_slices(graph: tp.DependencyGraph) -> None:
    """Map the slices of 3-d tensors whose channels run along dim 1 (a ``Conv1d``'s ``(B, C, T)``) in ``graph``.

    Torch-Pruning reads any 3-d tensor as ``(B, T, C)``: it takes a slice along dim 2 for a slice of channels and
    one along dim 1 for one that leaves them whole. After a ``Conv1d`` it is the other way round: a crop in time
    (``h[:, :, 1:]``, a causal trim) would cut the channel indices, and a slice of channels (``h[:, :8]``) would
    pass them all. Where the tensor's nearest producers are channels-first layers (convolutions, batch and group
    norms; through element-wise ops and other slices only), this sets the mapping such a slice has; elsewhere it
    leaves Torch-Pruning's.

    Examples:
        >>> model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU())
        >>> graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 2, 8))
        >>> map_channels_first_slices(graph)  # no slice: nothing to map
    """
    for node in list(graph.module2node.values()):
        grad_fn = node.grad_fn
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        if node.type != ops.OPTYPE.SLICE or sizes is None or len(sizes) != 3 or _layout(node) != "first":
            continue
        slicing, dim = node.module, node.module.dim % 3
        if dim == 2:  # a crop in time: the channels pass whole, as through an element-wise op
            node.type = ops.OPTYPE.ELEMENTWISE  # (Torch-Pruning maps a slice again before each group)
        for source in node.inputs:
            mapping = {"start": slicing.start, "end": slicing.end, "step": slicing.step, "dim": dim}
            for dep in node.dependencies:
                if dep.target == source:
                    dep.index_mapping[0] = _SliceIndexMapping(**mapping, reverse=True) if dim == 1 else None
            for dep in source.dependencies:
                if dep.target == node:
                    dep.index_mapping[0] = _SliceIndexMapping(**mapping) if dim == 1 else None


def _layout(node: tp.Node, depth: int = 32) -> str | None:
    """``"first"`` or ``"last"`` when every nearest producer of ``node``'s input agrees on where its channels run,
    else ``None`` (unknown: a reshape or a transposition on the way, or no producer found)."""
    found: set[str] = set()
    frontier, seen = list(node.inputs), set()
    while frontier and depth > 0:
        depth -= 1
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        module = current.module
        if isinstance(module, _CHANNELS_FIRST):
            found.add("first")
        elif isinstance(module, _CHANNELS_LAST):
            found.add("last")
        elif current.type == ops.OPTYPE.SLICE or (
            current.type == ops.OPTYPE.ELEMENTWISE
            and not any(change in str(getattr(module, "_grad_fn", "")).lower() for change in _LAYOUT_CHANGES)
        ):
            frontier.extend(current.inputs)
        else:
            return None
    return found.pop() if len(found) == 1 and not frontier else None

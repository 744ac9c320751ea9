"""Demo models: an MLP, the 1-D residual CNN with `ChannelSelect` shortcuts, and a pre-norm transformer."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_demp.attention import HeadedAttention
from lightning_demp.demos.classifier import DemoClassifier
from lightning_demp.selection import ChannelSelect, residual_sum


class MLPClassifier(DemoClassifier):
    """A ReLU MLP: ``input_dim → hidden_sizes… → num_classes``.

    Examples:
        >>> model = MLPClassifier(input_dim=40, hidden_sizes=[32, 16])
        >>> model(torch.randn(2, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_dim: int = 40, hidden_sizes: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        sizes = [input_dim, *(hidden_sizes if hidden_sizes is not None else [256, 256])]
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], self.num_classes))
        self.net = nn.Sequential(*layers)
        self.example_input_array = torch.zeros(2, input_dim)


class ResidualBlock1d(nn.Module):
    """``relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))``.

    With ``decoupled=True`` the shortcut is a `ChannelSelect` (the block's input and output channels shrink
    independently); with ``False`` it is a plain identity (a stream channel goes only if dead wherever it is read).

    Examples:
        >>> block = ResidualBlock1d(8)
        >>> block(torch.randn(2, 8, 40)).shape, type(block.shortcut).__name__
        (torch.Size([2, 8, 40]), 'ChannelSelect')
        >>> type(ResidualBlock1d(8, decoupled=False).shortcut).__name__
        'Identity'
    """

    def __init__(self, channels: int, kernel_size: int = 3, decoupled: bool = True) -> None:
        super().__init__()
        self.shortcut: nn.Module = ChannelSelect(channels) if decoupled else nn.Identity()
        self.conv1 = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(residual_sum(branch, self.shortcut, x))


class ResidualCNNBackbone(nn.Module):
    """Stem conv → residual block → stride-2 conv → residual block → global average pool → linear head.

    Examples:
        >>> backbone = ResidualCNNBackbone(width=8, num_classes=10)
        >>> backbone(torch.randn(2, 40)).shape, backbone(torch.randn(2, 1, 40)).shape
        (torch.Size([2, 10]), torch.Size([2, 10]))
    """

    def __init__(self, width: int = 64, num_classes: int = 10, decoupled: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, width, 5, padding=2, bias=False)
        self.stem_bn = nn.BatchNorm1d(width)
        self.block1 = ResidualBlock1d(width, decoupled=decoupled)
        self.down = nn.Conv1d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm1d(2 * width)
        self.block2 = ResidualBlock1d(2 * width, decoupled=decoupled)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[batch, length]`` or ``[batch, 1, length]``; returns logits."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.block1(x)
        x = F.relu(self.down_bn(self.down(x)))
        x = self.block2(x)
        return self.head(x.mean(dim=-1))


class ResidualCNNClassifier(DemoClassifier):
    """The demo's 1-D residual CNN with BatchNorm (150,218 parameters at ``width=64``).

    Examples:
        >>> model = ResidualCNNClassifier(width=8)
        >>> model(torch.randn(2, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 64, input_length: int = 40, decoupled: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.net = ResidualCNNBackbone(width, self.num_classes, decoupled=decoupled)
        self.example_input_array = torch.zeros(2, input_length)


class PreNormBlock(nn.Module):
    """``x + attn(ln1(x))`` then ``x + fc2(gelu(fc1(ln2(x))))``: a pre-norm transformer block.

    Examples:
        >>> block = PreNormBlock(dim=16, heads=2, hidden=32)
        >>> block(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = HeadedAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``[batch, tokens, dim]``."""
        normed = self.ln1(x)
        x = x + self.attn(normed)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerClassifier(DemoClassifier):
    """A small pre-norm transformer for MNIST-1D: patches of the signal are the tokens.

    DemP prunes the MLP hidden units of each block (after GELU; with ``saturation_tolerance`` set, the units stuck
    near GELU's flat negative side) and attention heads whose output is dead (`HeadedAttention`); the residual
    width is coupled with LayerNorm and left intact.

    Examples:
        >>> model = TransformerClassifier(dim=16, depth=1, heads=2, hidden=32)
        >>> model(torch.randn(2, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_length: int = 40,
        patch: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        hidden: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.patch = patch
        tokens = input_length // patch
        self.embed = nn.Linear(patch, dim)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(PreNormBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.num_classes)
        nn.init.normal_(self.position, std=0.02)
        self.example_input_array = torch.zeros(2, input_length)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[batch, length]``; returns logits."""
        x = self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))

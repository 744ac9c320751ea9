"""A model none of the work was tuned on, for the target benchmark: a plain (non-residual) 1-D CNN with BatchNorm,
strided convolutions and global average pooling, wider at depth than the demo CNN."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_demp.demos import DemoClassifier


class PlainCNN1d(DemoClassifier):
    """conv5(1→32) · conv3/2(32→64) · conv3/2(64→96) · conv3(96→96), each with BatchNorm and ReLU; mean over
    positions; Linear(96→classes)."""

    def __init__(self, input_length: int = 40, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        widths = [(1, 32, 5, 1), (32, 64, 3, 2), (64, 96, 3, 2), (96, 96, 3, 1)]
        layers: list[nn.Module] = []
        for in_channels, out_channels, kernel, stride in widths:
            layers += [
                nn.Conv1d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
                nn.BatchNorm1d(out_channels),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(96, self.num_classes)
        self.example_input_array = torch.zeros(2, input_length)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1)).mean(dim=-1))


class TaperedMLP(DemoClassifier):
    """A second model nothing was tuned on: a norm-free ReLU MLP that narrows with depth, with dropout,
    ``40 → 192 → 160 → 96 → classes``."""

    def __init__(self, input_dim: int = 40, dropout: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        layers: list[nn.Module] = []
        for fan_in, fan_out in [(input_dim, 192), (192, 160), (160, 96)]:
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers, nn.Linear(96, self.num_classes))
        self.example_input_array = torch.zeros(2, input_dim)

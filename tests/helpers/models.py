"""Tiny module-level models for the tests (module level so that they pickle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """Linear → ReLU → Linear → ReLU → Linear, with ``nn.ReLU`` modules."""

    def __init__(self, sizes: tuple[int, ...] = (6, 12, 10, 3)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.fc3 = nn.Linear(sizes[2], sizes[3])
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class FunctionalMLP(nn.Module):
    """The same shape, with ``F.relu`` calls in ``forward`` (no activation modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ConvBN(nn.Module):
    """Conv2d → BN → ReLU → Conv2d → BN → ReLU → flatten → Linear (conv → flatten → linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


class ResidualMLP(nn.Module):
    """``h = relu(fc_in(x)); h = relu(h + fc_b(relu(fc_a(h)))); out = head(h)``: a residual link over Linear units."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(5, 8)
        self.fc_a = nn.Linear(8, 7)
        self.fc_b = nn.Linear(7, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc_in(x))
        h = F.relu(h + self.fc_b(F.relu(self.fc_a(h))))
        return self.head(h)


class ResidualCNN(nn.Module):
    """Conv1d residual network with BatchNorm, an identity shortcut, a stride-2 conv and global average pooling."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm1d(width)
        self.conv1 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(width)
        self.down = nn.Conv1d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm1d(2 * width)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.relu(self.down_bn(self.down(x)))
        return self.head(x.mean(dim=-1))


def kill_linear_units_(layer: nn.Linear, units: list[int]) -> None:
    """Make ``units`` of ``layer`` output a negative constant, so that ReLU gives exactly 0."""
    with torch.no_grad():
        layer.weight[units] = 0.0
        layer.bias[units] = -1.0


def kill_bn_units_(bn: nn.modules.batchnorm._BatchNorm, units: list[int], shift: float = -1.0) -> None:
    """Make ``units`` of a BatchNorm output a negative constant (scale 0, negative shift)."""
    with torch.no_grad():
        bn.weight[units] = 0.0
        bn.bias[units] = shift


def randomize_bn_(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1 + 2.0)  # alive unless planted dead


def make_alive_(model: nn.Module) -> nn.Module:
    """Give every Linear a bias of 1 so that no unit is dead by chance at initialisation; returns ``model``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.bias.fill_(1.0)
    return model


def kill_heads_(attention: nn.Module, heads: list[int]) -> None:
    """Zero the value rows (weights and bias) of ``heads`` of a `HeadedAttention`: their output is exactly 0."""
    width = attention.heads * attention.head_dim
    with torch.no_grad():
        for head in heads:
            rows = slice(2 * width + head * attention.head_dim, 2 * width + (head + 1) * attention.head_dim)
            attention.qkv.weight[rows] = 0.0
            attention.qkv.bias[rows] = 0.0


def tagged_adam(model: nn.Module) -> torch.optim.Adam:
    """An Adam whose ``exp_avg`` for each parameter is a copy of it: after a removal, each state must still equal
    its (sliced) parameter (`assert_optimizer_follows`)."""
    optimizer = torch.optim.Adam(model.parameters())
    for param in model.parameters():
        optimizer.state[param] = {"exp_avg": param.detach().clone(), "step": torch.tensor(1.0)}
    return optimizer


def assert_optimizer_follows(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer holds exactly the model's parameters, each state sliced with its parameter."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    for param in model.parameters():
        assert torch.equal(optimizer.state[param]["exp_avg"], param.detach())

"""CIFAR-10 models of the paper: the "SRigL" CIFAR ResNet-18 and VGG-16 with BatchNorm.

Plain ``nn.Module`` builders (`cifar_resnet18`, `cifar_vgg16_bn`) and LightningModules around them
(`CIFARResNet18Classifier`, `CIFARVGG16Classifier`) that add the paper's optimizers and LR schedules on top of
`lightning_demp.demos.DemoClassifier`. Every unit is a conv channel or linear feature followed by BatchNorm and ReLU,
so `DemonPruning` can remove it; the output layer is never pruned.

Architectures (paper.md §1.1 and §1.6, and the authors' ``source/models/{resnet,vgg16}.py``):

- **ResNet-18** (``srigl_resnet18``): 3×3 stride-1 stem conv with 64 channels, no max-pool, BasicBlocks
  ``[2, 2, 2, 2]`` with widths 64/128/256/512, a 1×1 conv + BatchNorm projection shortcut where the shape changes
  (identity elsewhere), global average pooling and a linear head: 11,173,962 parameters for 10 classes. Convs have
  no bias and Kaiming-normal weights.
- **VGG-16 with BatchNorm**, ``variant="standard"`` (default): the usual configuration
  ``[64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M]`` of 3×3 conv (with bias) →
  BatchNorm → ReLU, then ``Linear(512, 4096) → ReLU → Linear(4096, 4096) → ReLU → Linear(4096, num_classes)``
  (no dropout): 33,646,666 parameters. This is what "VGG-16 (size (64, 4096), with BN)" reads as.
- VGG-16, ``variant="demp"``: the layer sizes of the authors' own ``vgg16(sizes=(64, 4096))``, which differ from
  the standard one: the 13th conv has 1024 channels, the fifth pooling is a 2×2 average pool, and both hidden
  linear layers are followed by BatchNorm (``Linear(1024, 4096) → BN → ReLU → Linear(4096, 4096) → BN → ReLU →
  Linear(4096, num_classes)``): 38,121,034 parameters. Use it to match the authors' runs more closely.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_demp.demos.classifier import DemoClassifier, OptimizerName
from lightning_demp.selection import ChannelSelect, residual_sum

VGGVariant = Literal["standard", "demp"]
CIFARLRSchedule = Literal["one_cycle", "constant", "step"]

_VGG16_TRUNK: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"]
_VGG16_CONFIG: list[int | str] = [*_VGG16_TRUNK, 512, 512, 512, "M"]
# The authors' vgg16(sizes=(64, 4096)): the same max-pools before convs 3, 5, 8 and 11, but the last conv is 16 × 64
# wide and a 2×2 average pool ("A") replaces the fifth max-pool.
_VGG16_DEMP_CONFIG: list[int | str] = [*_VGG16_TRUNK, 512, 512, 1024, "A"]
_VGG_VARIANTS = ("standard", "demp")
_LR_SCHEDULES = ("one_cycle", "constant", "step")


def _init_kaiming_(model: nn.Module) -> None:
    """Kaiming-normal conv weights (fan-out, ReLU gain), BatchNorm at scale 1 and shift 0, zero conv biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
    """The ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Args:
        in_channels: Channels of the block input.
        channels: Channels of both convolutions and of the block output.
        stride: Stride of the first convolution (and of the projection shortcut).

    Examples:
        >>> block = BasicBlock(16, 32, stride=2)
        >>> block(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 4, 4])
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        # Identity shortcuts are 0/1 channel selections, so the block's input and output channels shrink
        # independently (the authors' treatment, paper.md §1.1); an identity while nothing is removed.
        self.shortcut: nn.Module = ChannelSelect(channels)
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(residual_sum(out, self.shortcut, x))


class CIFARResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stride-1 stem, no max-pool, four stages of `BasicBlock`, average pool, head.

    Args:
        blocks_per_stage: Blocks in each of the four stages (``[2, 2, 2, 2]`` for ResNet-18).
        widths: Channels of each stage; the stem has ``widths[0]`` channels.
        num_classes: Number of classes.

    Examples:
        >>> model = CIFARResNet([1, 1, 1, 1], widths=[8, 16, 32, 64])
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        blocks_per_stage: list[int],
        widths: list[int] | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        widths = widths if widths is not None else [64, 128, 256, 512]
        if len(blocks_per_stage) != 4 or len(widths) != 4:
            raise ValueError(
                f"Expected 4 stages in `blocks_per_stage` and `widths`, got {blocks_per_stage!r} and {widths!r}."
            )
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_channels = widths[0]
        stages = []
        for stage, (blocks, width) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            layers = []
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(in_channels, width, stride))
                in_channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_channels, num_classes)
        _init_kaiming_(self)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: images ``[batch, 3, height, width]``; returns logits ``[batch, num_classes]``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def cifar_resnet18(num_classes: int = 10) -> CIFARResNet:
    """The CIFAR ResNet-18 of the paper's "SRigL setup" (11,173,962 parameters for 10 classes).

    Args:
        num_classes: Number of classes.

    Returns:
        The network, with Kaiming-normal conv weights.

    Examples:
        >>> model = cifar_resnet18()
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in model.parameters())
        11173962
    """
    return CIFARResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes)


class VGG(nn.Module):
    """VGG: 3×3 conv → BatchNorm → ReLU layers with pooling, flatten, then a classifier.

    Args:
        config: Conv widths, with ``"M"`` for a 2×2 max-pool and ``"A"`` for a 2×2 average pool.
        hidden: Widths of the hidden linear layers of the classifier.
        num_classes: Number of classes.
        classifier_bn: Put BatchNorm after each hidden linear layer.
        input_size: Image side the classifier is sized for (32 for CIFAR).

    Examples:
        >>> model = VGG([8, "M", 16, "M"], hidden=[32], input_size=8)
        >>> model(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        config: list[int | str],
        hidden: list[int],
        num_classes: int = 10,
        classifier_bn: bool = False,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels, side = 3, input_size
        for entry in config:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
                side //= 2
            elif entry == "A":
                layers.append(nn.AvgPool2d(2, 2))
                side //= 2
            elif isinstance(entry, int):
                layers += [nn.Conv2d(in_channels, entry, 3, padding=1), nn.BatchNorm2d(entry), nn.ReLU()]
                in_channels = entry
            else:
                raise ValueError(f"Expected an int, 'M' or 'A' in the VGG config, got {entry!r}.")
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = []
        fan_in = in_channels * side * side
        for width in hidden:
            head.append(nn.Linear(fan_in, width))
            if classifier_bn:
                head.append(nn.BatchNorm1d(width))
            head.append(nn.ReLU())
            fan_in = width
        head.append(nn.Linear(fan_in, num_classes))
        self.classifier = nn.Sequential(*head)
        _init_kaiming_(self)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: images ``[batch, 3, input_size, input_size]``; returns logits ``[batch, num_classes]``."""
        return self.classifier(self.features(x).flatten(1))


def cifar_vgg16_bn(num_classes: int = 10, variant: VGGVariant = "standard") -> VGG:
    """VGG-16 with BatchNorm for 32×32 CIFAR images, classifier of width 4096.

    Args:
        num_classes: Number of classes.
        variant: ``"standard"`` (the usual VGG-16-BN convs and a ``512 → 4096 → 4096 → num_classes`` classifier
            without BatchNorm; 33,646,666 parameters) or ``"demp"`` (the layer sizes of the authors' code: last conv
            1024 wide, average pool, BatchNorm in the classifier; 38,121,034 parameters). See the module docstring.

    Returns:
        The network, with Kaiming-normal conv weights.

    Raises:
        ValueError: ``variant`` is not one of the two names.

    Examples:
        >>> model = cifar_vgg16_bn()
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in model.parameters())
        33646666
    """
    if variant == "standard":
        return VGG(_VGG16_CONFIG, [4096, 4096], num_classes, classifier_bn=False)
    if variant == "demp":
        return VGG(_VGG16_DEMP_CONFIG, [4096, 4096], num_classes, classifier_bn=True)
    raise ValueError(f"Expected `variant` to be one of {_VGG_VARIANTS}, got {variant!r}.")


class _CIFARClassifier(DemoClassifier):
    """`DemoClassifier` with the CIFAR example input and the paper's step decay (``lr_schedule="step"``).

    ``"step"`` multiplies the LR by ``lr_step_gamma`` every ``lr_step_epochs`` epochs; the arguments are validated.
    """

    def __init__(
        self,
        num_classes: int,
        lr: float,
        weight_decay: float,
        optimizer: OptimizerName,
        lr_schedule: CIFARLRSchedule,
        lr_step_epochs: int,
        lr_step_gamma: float,
    ) -> None:
        if lr_schedule not in _LR_SCHEDULES:
            raise ValueError(f"Expected `lr_schedule` to be one of {_LR_SCHEDULES}, got {lr_schedule!r}.")
        if lr_step_epochs < 1:
            raise ValueError(f"Expected `lr_step_epochs` to be >= 1, got {lr_step_epochs!r}.")
        if not 0 < lr_step_gamma <= 1:
            raise ValueError(f"Expected `lr_step_gamma` to be in (0, 1], got {lr_step_gamma!r}.")
        # DemoClassifier knows "one_cycle" and "constant"; "step" is handled here, in configure_optimizers.
        super().__init__(
            num_classes=num_classes,
            lr=lr,
            weight_decay=weight_decay,
            optimizer=optimizer,
            lr_schedule=lr_schedule,  # type: ignore[arg-type]
        )
        self.lr_step_epochs = lr_step_epochs
        self.lr_step_gamma = lr_step_gamma
        self.example_input_array = torch.zeros(2, 3, 32, 32)

    def configure_optimizers(self) -> Any:
        """The optimizer and its LR schedule.

        ``"step"`` multiplies the LR by ``lr_step_gamma`` every ``lr_step_epochs`` epochs (the paper's ResNet-18
        recipe: ×0.2 every 77 epochs); the other schedules are `DemoClassifier`'s.
        """
        if self.lr_schedule != "step":
            return super().configure_optimizers()
        self.lr_schedule = "constant"  # reuse DemoClassifier's optimizer choice, without its scheduler
        try:
            optimizer = super().configure_optimizers()
        finally:
            self.lr_schedule = "step"
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.lr_step_epochs, gamma=self.lr_step_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class CIFARResNet18Classifier(_CIFARClassifier):
    """The CIFAR ResNet-18 (`cifar_resnet18`) as a LightningModule, defaulting to the paper's recipe.

    The defaults are the "SRigL setup" of paper.md §1.6: AdamW, lr 5e-3, weight decay 5e-4, the LR multiplied by
    0.2 every 77 epochs (250 epochs at batch 128).

    Args:
        num_classes: Number of classes.
        lr: Peak (``"one_cycle"``) or initial learning rate.
        weight_decay: Decoupled weight decay (AdamW) or coupled L2 (Adam, SGD).
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (momentum 0.9).
        lr_schedule: ``"step"``, ``"one_cycle"`` or ``"constant"``.
        lr_step_epochs: Epochs between two decays of ``"step"``.
        lr_step_gamma: Factor of each decay of ``"step"``.

    Examples:
        >>> model = CIFARResNet18Classifier()
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        lr: float = 5e-3,
        weight_decay: float = 5e-4,
        optimizer: OptimizerName = "adamw",
        lr_schedule: CIFARLRSchedule = "step",
        lr_step_epochs: int = 77,
        lr_step_gamma: float = 0.2,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay, optimizer, lr_schedule, lr_step_epochs, lr_step_gamma)
        self.save_hyperparameters()
        self.net = cifar_resnet18(num_classes)


class CIFARVGG16Classifier(_CIFARClassifier):
    """VGG-16 with BatchNorm (`cifar_vgg16_bn`) as a LightningModule, defaulting to the paper's recipe.

    The defaults are paper.md §1.6's VGG-16 run: AdamW, lr 5e-3, weight decay 5e-4, one-cycle LR (80 epochs at
    batch 256).

    Args:
        num_classes: Number of classes.
        variant: ``"standard"`` or ``"demp"`` (the authors' layer sizes); see `cifar_vgg16_bn`.
        lr: Peak (``"one_cycle"``) or initial learning rate.
        weight_decay: Decoupled weight decay (AdamW) or coupled L2 (Adam, SGD).
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (momentum 0.9).
        lr_schedule: ``"one_cycle"``, ``"step"`` or ``"constant"``.
        lr_step_epochs: Epochs between two decays of ``"step"``.
        lr_step_gamma: Factor of each decay of ``"step"``.

    Examples:
        >>> model = CIFARVGG16Classifier()
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        variant: VGGVariant = "standard",
        lr: float = 5e-3,
        weight_decay: float = 5e-4,
        optimizer: OptimizerName = "adamw",
        lr_schedule: CIFARLRSchedule = "one_cycle",
        lr_step_epochs: int = 77,
        lr_step_gamma: float = 0.2,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay, optimizer, lr_schedule, lr_step_epochs, lr_step_gamma)
        self.save_hyperparameters()
        self.net = cifar_vgg16_bn(num_classes, variant)

"""`DemoClassifier`: the LightningModule the demo models share (loss, accuracy, optimizers, LR schedule)."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_demp.resize import enable_resize_on_load

OptimizerName = Literal["adamw", "adam", "sgd"]
LRScheduleName = Literal["one_cycle", "constant"]


class DemoClassifier(pl.LightningModule):
    """Cross-entropy classifier with accuracy metrics and an AdamW/Adam/SGD + one-cycle LR recipe.

    Subclasses build ``self.net`` and set ``example_input_array``.

    Args:
        num_classes: Number of classes.
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (AdamW) or coupled L2 (Adam, SGD).
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (momentum 0.9).
        lr_schedule: ``"one_cycle"`` (torch's OneCycleLR stepped per step) or ``"constant"``.
        betas: Adam's and AdamW's ``betas`` (SGD ignores them). Under ``"one_cycle"`` the first is cycled by
            OneCycleLR (0.85 to 0.95); the second, the second-moment decay, is kept. A faster second moment (0.95
            instead of torch's 0.999) keeps the network steadier while units die: see ``docs/faq.md#val-acc-drops``.

    Examples:
        >>> class TinyClassifier(DemoClassifier):
        ...     def __init__(self, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.net = nn.Linear(4, self.num_classes)
        ...         self.example_input_array = torch.zeros(2, 4)
        >>> model = TinyClassifier(num_classes=3, optimizer="sgd", lr_schedule="constant")
        >>> model(torch.randn(2, 4)).shape, type(model.configure_optimizers()).__name__
        (torch.Size([2, 3]), 'SGD')
        >>> model.predict_step(torch.randn(5, 4), batch_idx=0).shape
        torch.Size([5])
    """

    def __init__(
        self,
        num_classes: int = 10,
        lr: float = 1e-2,
        weight_decay: float = 5e-4,
        optimizer: OptimizerName = "adamw",
        lr_schedule: LRScheduleName = "one_cycle",
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Expected `betas` to be two numbers in [0, 1), got {betas!r}.")
        self.num_classes = num_classes
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.lr_schedule = lr_schedule
        self.betas = (float(betas[0]), float(betas[1]))
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.net: nn.Module = nn.Identity()
        enable_resize_on_load(self)  # pruned checkpoints load into a fresh model (and ddp_spawn works)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch; logs ``train_loss`` and ``train_acc``."""
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_acc``."""
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``test_acc``."""
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class predictions."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)

    def configure_optimizers(self) -> Any:
        """The optimizer and, for ``"one_cycle"``, a per-step OneCycleLR over the whole fit."""
        if self.optimizer_name == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.parameters(), lr=self.lr, weight_decay=self.weight_decay, betas=self.betas
            )
        elif self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(
                self.parameters(), lr=self.lr, weight_decay=self.weight_decay, betas=self.betas
            )
        elif self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        else:
            raise ValueError(
                f"Expected `optimizer` to be one of ('adamw', 'adam', 'sgd'), got {self.optimizer_name!r}."
            )
        if self.lr_schedule == "constant":
            return optimizer
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

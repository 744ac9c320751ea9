"""Demo models and data that need no download: MNIST-1D (generated offline) and scikit-learn's digits.

Models: `MLPClassifier` and `ResidualCNNClassifier` (the 1-D residual CNN with BatchNorm used in
``feasibility.md``). Data: `MNIST1DDataModule` (the ``mnist1d`` package's generator, 4000/1000 split) and
`DigitsDataModule` (8×8 digits flattened to 64 features).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_demp.attention import HeadedAttention
from lightning_demp.selection import ChannelSelect, residual_sum
from lightning_demp.surgery import enable_resize_on_load

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


class ArrayDataModule(pl.LightningDataModule):
    """Serves in-memory arrays: ``(x_train, y_train)`` for fitting, ``(x_test, y_test)`` for validation and test.

    Subclasses implement `load_arrays`.

    Examples:
        >>> class ToyDataModule(ArrayDataModule):
        ...     def load_arrays(self):
        ...         x = np.arange(20.0).reshape(10, 2)
        ...         return x[:8], np.zeros(8), x[8:], np.ones(2)
        >>> data = ToyDataModule(batch_size=4)
        >>> data.setup("fit")
        >>> x, y = next(iter(data.train_dataloader()))
        >>> x.shape, x.dtype, y.dtype
        (torch.Size([4, 2]), torch.float32, torch.int64)
        >>> len(data.val_dataloader().dataset)
        2
    """

    def __init__(self, batch_size: int = 128, num_workers: int = 0, shuffle: bool = True) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return ``x_train, y_train, x_test, y_test``."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Build the datasets (once)."""
        if self.train_set is None:
            x_train, y_train, x_test, y_test = self.load_arrays()
            self.train_set = TensorDataset(
                torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(y_train, dtype=torch.long)
            )
            self.test_set = TensorDataset(
                torch.as_tensor(x_test, dtype=torch.float32), torch.as_tensor(y_test, dtype=torch.long)
            )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        assert self.train_set is not None
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        """The held-out split."""
        assert self.test_set is not None
        return DataLoader(self.test_set, batch_size=512, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The held-out split."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The held-out split."""
        return self.val_dataloader()


@functools.lru_cache(maxsize=4)
def make_mnist1d(num_samples: int = 5000, seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate MNIST-1D offline with the ``mnist1d`` package (80/20 split, standardised), cached per process."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    data = make_dataset(args)
    return data["x"], data["y"], data["x_test"], data["y_test"]


class MNIST1DDataModule(ArrayDataModule):
    """MNIST-1D (Greydanus, 2020), generated offline: 40-sample signals, 10 classes, 4000 train / 1000 held out.

    Args:
        num_samples: Total samples generated (80 % train, 20 % held out).
        seed: Generator seed (the package's default dataset uses 42).
        batch_size: Training batch size.
        num_workers: DataLoader workers.

    Examples:
        A small draw (the default 5000 samples take longer to generate):

        >>> data = MNIST1DDataModule(num_samples=100, batch_size=16)
        >>> data.setup("fit")
        >>> len(data.train_set), len(data.test_set)
        (80, 20)
        >>> next(iter(data.train_dataloader()))[0].shape
        torch.Size([16, 40])
    """

    def __init__(self, num_samples: int = 5000, seed: int = 42, batch_size: int = 128, num_workers: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.num_samples = num_samples
        self.seed = seed

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Generate (or reuse) the arrays."""
        return make_mnist1d(self.num_samples, self.seed)


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's 8×8 digits (1797 samples shipped with the package), 64 standardised features, 80/20 split.

    Examples:
        >>> data = DigitsDataModule(batch_size=32)
        >>> data.setup("fit")
        >>> len(data.train_set), len(data.test_set)
        (1437, 360)
        >>> next(iter(data.train_dataloader()))[0].shape
        torch.Size([32, 64])
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.seed = seed

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Load, shuffle, split and standardise."""
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(self.seed).permutation(len(y))
        x, y = x[order] / 16.0, y[order]
        split = int(0.8 * len(y))
        mean, std = x[:split].mean(), x[:split].std()
        return (x[:split] - mean) / std, y[:split], (x[split:] - mean) / std, y[split:]


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

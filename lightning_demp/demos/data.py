"""Demo data that needs no download: MNIST-1D (generated offline) and scikit-learn's digits."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


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

"""CIFAR-10 from a local copy of the "CIFAR-10 python version", with the paper's augmentation in plain torch.

Nothing is downloaded: get ``cifar-10-python.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html, extract it
(``tar -xzf cifar-10-python.tar.gz``), and pass the ``cifar-10-batches-py`` folder (or the folder that contains it)
as ``data_dir``. Training images get the paper's augmentation (reflection-pad 4, random 32×32 crop, random
horizontal flip, per sample, from torch's default random generator so that Lightning's seeding and worker seeding
apply); validation and test images are only normalized.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
_FOLDER_NAME = "cifar-10-batches-py"
_DOWNLOAD_HINT = (
    'Download the "CIFAR-10 python version" (cifar-10-python.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html, '
    "extract it with `tar -xzf cifar-10-python.tar.gz`, and pass the extracted `cifar-10-batches-py` folder "
    "(or the folder containing it) as `data_dir`."
)


def find_cifar10_folder(data_dir: str | Path) -> Path:
    """Return the folder holding the CIFAR-10 python batches: ``data_dir`` or ``data_dir/cifar-10-batches-py``.

    Args:
        data_dir: The ``cifar-10-batches-py`` folder, or the folder that contains it.

    Returns:
        The folder with ``data_batch_1`` … ``data_batch_5`` and ``test_batch``.

    Raises:
        FileNotFoundError: Some batch files are missing; the message names the folder and how to get the data.

    Examples:
        >>> find_cifar10_folder("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: CIFAR-10 not found in /no/such/folder (missing: data_batch_1, ...). Download ...
    """
    root = Path(data_dir).expanduser()
    for candidate in (root, root / _FOLDER_NAME):
        if all((candidate / name).is_file() for name in (*TRAIN_FILES, TEST_FILE)):
            return candidate
    folder = root / _FOLDER_NAME if (root / _FOLDER_NAME).is_dir() else root
    missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (folder / name).is_file()]
    raise FileNotFoundError(
        f"CIFAR-10 not found in {folder} (missing: {', '.join(missing)}). {_DOWNLOAD_HINT} Nothing is downloaded."
    )


def load_cifar10_batches(folder: str | Path, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Read CIFAR-10 python batches into ``uint8`` images ``[N, 3, 32, 32]`` and ``int64`` labels ``[N]``.

    The batches are pickles: read only files you trust.

    Args:
        folder: Folder holding the batch files.
        names: File names to read, concatenated in this order.

    Returns:
        ``(images, labels)``.

    Examples:
        A tiny fake batch in the CIFAR format (on the real ``test_batch``: 10,000 images):

        >>> import os, tempfile
        >>> import numpy as np
        >>> folder = tempfile.mkdtemp()
        >>> fake = {b"data": np.zeros((2, 3 * 32 * 32), dtype=np.uint8), b"labels": [3, 7]}
        >>> with open(os.path.join(folder, "test_batch"), "wb") as file:
        ...     pickle.dump(fake, file)
        >>> images, labels = load_cifar10_batches(folder, ("test_batch", "test_batch"))
        >>> images.shape, images.dtype, labels
        (torch.Size([4, 3, 32, 32]), torch.uint8, tensor([3, 7, 3, 7]))
    """
    images, labels = [], []
    for name in names:
        with open(Path(folder) / name, "rb") as file:
            batch = pickle.load(file, encoding="bytes")
        data = torch.as_tensor(batch[b"data"], dtype=torch.uint8)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(list(batch[b"labels"]), dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def augment_image(image: Tensor, padding: int = 4) -> Tensor:
    """Reflection-pad by ``padding``, crop back to the original size at a random place, flip half of the time.

    Uses torch's default random generator.

    Args:
        image: One image ``[channels, height, width]``.
        padding: Pixels of reflection padding on each side.

    Returns:
        The augmented image, same shape and dtype.

    Examples:
        >>> augment_image(torch.randn(3, 32, 32)).shape
        torch.Size([3, 32, 32])
    """
    height, width = image.shape[-2:]
    padded = F.pad(image.unsqueeze(0), (padding, padding, padding, padding), mode="reflect").squeeze(0)
    top = int(torch.randint(0, 2 * padding + 1, ()))
    left = int(torch.randint(0, 2 * padding + 1, ()))
    crop = padded[:, top : top + height, left : left + width]
    if bool(torch.rand(()) < 0.5):
        crop = crop.flip(-1)
    return crop.contiguous()


class CIFAR10Dataset(Dataset[tuple[Tensor, Tensor]]):
    """In-memory CIFAR images: ``uint8`` storage, normalized ``float32`` samples, optional augmentation.

    Args:
        images: ``uint8`` images ``[N, 3, 32, 32]``.
        labels: Labels ``[N]``.
        augment: Apply `augment_image` to every sample read.
        mean: Per-channel mean, on the 0-1 scale.
        std: Per-channel standard deviation, on the 0-1 scale.

    Examples:
        >>> dataset = CIFAR10Dataset(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4), augment=True)
        >>> image, label = dataset[1]
        >>> image.shape, image.dtype, label
        (torch.Size([3, 32, 32]), torch.float32, tensor(1))
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        augment: bool = False,
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"Expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}.")
        if len(images) != len(labels):
            raise ValueError(f"Expected as many labels as images, got {len(labels)} and {len(images)}.")
        self.images = images
        self.labels = labels.long()
        self.augment = augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """``(image, label)``: a normalized ``float32`` image ``[3, 32, 32]`` and an ``int64`` label."""
        image = (self.images[index].float() / 255.0 - self.mean) / self.std
        if self.augment:
            image = augment_image(image)
        return image, self.labels[index]


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 from a local folder, with the paper's training augmentation; never downloads.

    Args:
        data_dir: The extracted ``cifar-10-batches-py`` folder, or the folder that contains it.
        batch_size: Batch size of every loader.
        num_workers: DataLoader worker processes.
        augment: Augment the training images (reflection-pad 4, random crop 32, horizontal flip).
        val_split: Training images held out (unaugmented) for validation, drawn once with ``split_seed``; with
            ``0``, validation runs on the test set (as the paper's code reports test accuracy during training).
        split_seed: Seed of the validation draw.

    Raises:
        FileNotFoundError: At ``setup``, when the batch files are not in ``data_dir``.

    Examples:
        On a tiny fake copy of the six batch files (two images each); with the real data, pass its folder and
        train with e.g. ``Trainer(max_epochs=250).fit(CIFARResNet18Classifier(), datamodule=data)``:

        >>> import os, tempfile
        >>> import numpy as np
        >>> folder = tempfile.mkdtemp()
        >>> for name in (*TRAIN_FILES, TEST_FILE):
        ...     with open(os.path.join(folder, name), "wb") as file:
        ...         pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}, file)
        >>> data = CIFAR10DataModule(folder, batch_size=4, num_workers=0)
        >>> data.setup("fit")
        >>> len(data.train_set), len(data.val_set), data.val_set is data.test_set
        (10, 2, True)
        >>> images, labels = next(iter(data.train_dataloader()))
        >>> images.shape, images.dtype
        (torch.Size([4, 3, 32, 32]), torch.float32)
        >>> CIFAR10DataModule("/no/such/folder").prepare_data()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: CIFAR-10 not found in /no/such/folder ... Nothing is downloaded.
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 128,
        num_workers: int = 2,
        augment: bool = True,
        val_split: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be >= 1, got {batch_size!r}.")
        if num_workers < 0:
            raise ValueError(f"Expected `num_workers` to be >= 0, got {num_workers!r}.")
        if not 0 <= val_split < 50_000:
            raise ValueError(f"Expected `val_split` to be in [0, 50000), got {val_split!r}.")
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.val_split = val_split
        self.split_seed = split_seed
        self.train_set: CIFAR10Dataset | None = None
        self.val_set: CIFAR10Dataset | None = None
        self.test_set: CIFAR10Dataset | None = None

    def prepare_data(self) -> None:
        """Check that the files are there (nothing is downloaded)."""
        find_cifar10_folder(self.data_dir)

    def setup(self, stage: str) -> None:
        """Load the batches into memory (once) and build the datasets."""
        if self.train_set is not None:
            return
        folder = find_cifar10_folder(self.data_dir)
        train_images, train_labels = load_cifar10_batches(folder, TRAIN_FILES)
        test_images, test_labels = load_cifar10_batches(folder, (TEST_FILE,))
        self.test_set = CIFAR10Dataset(test_images, test_labels, augment=False)
        if self.val_split > 0:
            if self.val_split >= len(train_labels):
                raise ValueError(
                    f"Expected `val_split` below the {len(train_labels)} training images, got {self.val_split}."
                )
            order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(self.split_seed))
            val_idx, train_idx = order[: self.val_split], order[self.val_split :]
            self.val_set = CIFAR10Dataset(train_images[val_idx], train_labels[val_idx], augment=False)
            train_images, train_labels = train_images[train_idx], train_labels[train_idx]
        else:
            self.val_set = self.test_set
        self.train_set = CIFAR10Dataset(train_images, train_labels, augment=self.augment)

    def _loader(self, dataset: CIFAR10Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "call `setup` first"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The held-out training images, or the test set when ``val_split=0``."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The 10,000 test images."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test images."""
        return self.test_dataloader()

"""Lightning helpers: a synthetic DataModule and a ``train_with_callback`` runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_demp import DemonPruning
from lightning_demp.demos import (
    ArrayDataModule,
    MLPClassifier,
    ResidualCNNClassifier,
    TransformerClassifier,
)
from lightning_demp.demos.quiet import quiet_trainer


class RandomDataModule(ArrayDataModule):
    """Gaussian inputs with labels from a fixed random linear map (learnable, no download)."""

    def __init__(
        self, num_features: int = 6, num_classes: int = 3, size: int = 256, batch_size: int = 32, shuffle: bool = True
    ) -> None:
        super().__init__(batch_size=batch_size, shuffle=shuffle)
        self.num_features = num_features
        self.num_classes = num_classes
        self.size = size

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((self.size, self.num_features)).astype(np.float32)
        y = (x @ rng.standard_normal((self.num_features, self.num_classes))).argmax(axis=1)
        split = int(0.75 * self.size)
        return x[:split], y[:split], x[split:], y[split:]


class UserMLP(MLPClassifier):
    """A user's own model class, with defaults of its own (the CLI must keep them)."""

    def __init__(self, input_dim: int = 6, lr: float = 3e-3, num_classes: int = 3) -> None:
        super().__init__(input_dim=input_dim, hidden_sizes=[16], num_classes=num_classes, lr=lr)


def small_mlp(**kwargs: Any) -> MLPClassifier:
    options: dict[str, Any] = {
        "input_dim": 6,
        "hidden_sizes": [12, 10],
        "num_classes": 3,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "optimizer": "adam",
        "lr_schedule": "constant",
    }
    options.update(kwargs)
    return MLPClassifier(**options)


def train_with_callback(
    tmp_path: Any,
    model: Any = None,
    max_epochs: int = 2,
    trainer_kwargs: Any = None,
    datamodule: Any = None,
    **callback_kwargs: Any,
):
    """Fit ``model`` (a small MLP by default) with ``DemonPruning(**callback_kwargs)``; return (trainer, model, callback).

    ``trainer_kwargs["callbacks"]``, when given, run after the `DemonPruning` callback. The data is
    ``RandomDataModule()`` unless ``datamodule`` is given.
    """
    callback_kwargs.setdefault("regularizer", "positive_l2")
    callback_kwargs.setdefault("verbose", False)
    callback = DemonPruning(**callback_kwargs)
    model = model if model is not None else small_mlp()
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=max_epochs,
        callbacks=[callback, *(trainer_kwargs or {}).get("callbacks", [])],
        **{"logger": CSVLogger(tmp_path), "log_every_n_steps": 1}
        | {key: value for key, value in (trainer_kwargs or {}).items() if key != "callbacks"},
    )
    trainer.fit(model, datamodule=datamodule if datamodule is not None else RandomDataModule())
    return trainer, model, callback


def planted_mlp(**kwargs: Any) -> MLPClassifier:
    """The small MLP with units 1 and 8 of ``net.0`` and unit 4 of ``net.2`` dead from the start."""
    from helpers.models import kill_linear_units_, make_alive_

    model = small_mlp(**kwargs)
    make_alive_(model)
    kill_linear_units_(model.net[0], [1, 8])
    kill_linear_units_(model.net[2], [4])
    return model


def saved_demp_states(directory: Path) -> list[tuple[int, int, int, int]]:
    """For each checkpoint in ``directory``: its global step, and DemonPruning's span of the schedule, last check
    step and units removed by that check."""
    states = []
    for path in sorted(directory.iterdir()):
        checkpoint = torch.load(path, weights_only=False)
        state = checkpoint["callbacks"]["DemonPruning"]
        states.append(
            (
                checkpoint["global_step"],
                state["schedule"]["span_steps"],
                state["last_check_step"],
                state["last_removed_count"],
            )
        )
    return states


def assert_saved_only_when_settled(directory: Path) -> None:
    """Every checkpoint in ``directory`` was saved after the schedule, after a check since its end found nothing."""
    states = saved_demp_states(directory)
    assert states
    for step, span, last_check_step, last_removed_count in states:
        assert step >= span > 0
        assert last_check_step >= span  # a check made after the schedule ...
        assert last_removed_count == 0  # ... that found nothing more to remove


def model_checksum(module: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


def optimizer_checksum(optimizer: torch.optim.Optimizer) -> float:
    total = 0.0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += float(value.detach().double().sum())
    return total


class AssertRanksAgree(Callback):
    """After each epoch end (so after each removal), all-gather widths and checksums and require equality."""

    def __init__(self) -> None:
        self.checked_epochs: list[int] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        widths = [float(p.shape[0]) for p in pl_module.parameters()]
        local = torch.tensor(
            [*widths, model_checksum(pl_module), optimizer_checksum(trainer.optimizers[0])], dtype=torch.float64
        )
        gathered = trainer.strategy.all_gather(local)
        assert gathered.shape[0] == trainer.world_size
        assert torch.equal(gathered[0], gathered[1]), f"ranks differ at epoch {trainer.current_epoch}: {gathered}"
        self.checked_epochs.append(trainer.current_epoch)


class FrozenTransformer(TransformerClassifier):
    """A small demo transformer (2 blocks of 2 heads, 4 classes) trained at learning rate 0: planted deaths stay."""

    def __init__(self) -> None:
        super().__init__(
            dim=16,
            depth=2,
            heads=2,
            hidden=32,
            num_classes=4,
            lr=0.0,
            optimizer="adam",
            lr_schedule="constant",
            weight_decay=0.0,
        )


def tiny_residual_cnn(lr: float = 0.0) -> ResidualCNNClassifier:
    """The decoupled demo CNN (width 8, 4 classes, inputs of 16), by default at learning rate 0 so that weights
    trace back to units."""
    return ResidualCNNClassifier(
        width=8, input_length=16, num_classes=4, lr=lr, optimizer="adam", lr_schedule="constant", weight_decay=0.0
    )


def planted_transformer() -> FrozenTransformer:
    """`FrozenTransformer` with head 1 of block 0 dead from the start."""
    from helpers.models import kill_heads_

    model = FrozenTransformer()
    kill_heads_(model.blocks[0].attn, [1])
    return model


def planted_residual_cnn(lr: float = 0.0) -> ResidualCNNClassifier:
    """`tiny_residual_cnn` with stem channel 1 dead (it stays dead: a dead ReLU gets no gradient): block 1 loses it at
    its input only, so channels get reordered."""
    from helpers.models import kill_bn_units_

    model = tiny_residual_cnn(lr)
    kill_bn_units_(model.net.stem_bn, [1], shift=-5.0)
    return model

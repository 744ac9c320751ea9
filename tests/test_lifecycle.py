"""Lifecycle: misconfiguration caught before training, hooks released, pickling and deep copies at any point."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from helpers.lightning import RandomDataModule, planted_mlp, quiet_trainer, small_mlp
from lightning_demp import DemonPruning
from lightning_demp.demos import DemoClassifier
from lightning_demp.graph import TracingError


class NoNormNoExample(DemoClassifier):
    def __init__(self) -> None:
        super().__init__(num_classes=3)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


class Untraceable(DemoClassifier):
    def __init__(self) -> None:
        super().__init__(num_classes=3)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.example_input_array = torch.zeros(2, 6)
        self.tracing = True

    def forward(self, x):
        if self.tracing and not self.training:
            self.tracing = False
            raise ValueError("data-dependent branch")
        return self.net(x)


class DictBatches(RandomDataModule):
    def train_dataloader(self):
        pairs = self.train_set
        return torch.utils.data.DataLoader([{"x": x, "y": y} for x, y in pairs], batch_size=32)


# Errors raised at setup or on the first batch, before any optimizer step: (model, data, callback args, error, message)
SETUP_CASES = [
    (
        NoNormNoExample,
        RandomDataModule,
        {"regularizer": "l1_norm_scale"},
        ValueError,
        "has no affine normalization layer",
    ),
    (
        Untraceable,
        RandomDataModule,
        {"regularizer": "l2"},
        TracingError,
        "could not trace `Untraceable`.*data-dependent",
    ),
    (
        NoNormNoExample,
        DictBatches,
        {"regularizer": "l2"},
        TypeError,
        "cannot find the model input in a batch of type dict",
    ),
]


@pytest.mark.parametrize(
    ("model_cls", "data_cls", "kwargs", "error", "message"),
    SETUP_CASES,
    ids=["l1-without-norms", "untraceable", "no-example-input"],
)
def test_misconfiguration_is_reported_before_any_optimizer_step(model_cls, data_cls, kwargs, error, message):
    steps = []

    class CountSteps(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps.append(trainer.global_step)

    trainer = Trainer(
        max_epochs=1,
        callbacks=[DemonPruning(verbose=False, **kwargs), CountSteps()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    with pytest.raises(error, match=message):
        trainer.fit(model_cls(), datamodule=data_cls())
    assert steps == []


def test_validation_forwards_never_change_the_statistics(tmp_path):
    recorded = {}

    class Record(DemonPruning):
        def plan_removal(self, pl_module, stats):
            recorded[len(recorded)] = {name: reader.num_samples for name, reader in stats.items()}
            return super().plan_removal(pl_module, stats)

    callback = Record(regularizer="positive_l2", check_mode="train_forwards", check_batches=2, verbose=False)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], val_check_interval=3)
    trainer.fit(planted_mlp(), datamodule=RandomDataModule())  # validation runs mid-epoch and at the end
    assert set(recorded[0].values()) == {2 * 32}  # exactly the two observed training batches


def test_a_nan_loss_does_not_corrupt_the_callback_state(tmp_path):
    class NaNLoss(type(small_mlp())):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * math.nan if batch_idx == 2 else loss

    model = NaNLoss(input_dim=6, hidden_sizes=[12, 10], num_classes=3, optimizer="adam", lr_schedule="constant")
    callback = DemonPruning(regularizer="positive_l2", reg_max=0.01, noise_std=1e-3, verbose=False)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback])
    with pytest.warns(UserWarning, match="non-finite activations"):
        trainer.fit(model, datamodule=RandomDataModule())  # the NaN spreads to the weights; no decision is made
    state = callback.state_dict()
    assert state["kept_units"]["net.0"] == list(range(12))
    assert all(
        math.isfinite(v) for v in [callback.pruner.pressure.last_reg_strength, callback.pruner.pressure.last_noise_std]
    )


def test_callback_and_model_pickle_and_deepcopy_in_the_middle_of_fit(tmp_path):
    copies = []

    class CopyMidFit(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 5:  # observing, after a removal
                demp = next(c for c in trainer.callbacks if isinstance(c, DemonPruning))
                copies.append(copy.deepcopy(demp.kept_units))
                copies.append(pickle.loads(pickle.dumps(demp)))
                copies.append(copy.deepcopy(pl_module))
                copies.append(pickle.loads(pickle.dumps(pl_module)))

    model = planted_mlp()
    demp = DemonPruning(regularizer="positive_l2", check_mode="train_forwards", verbose=False)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[demp, CopyMidFit()])
    trainer.fit(model, datamodule=RandomDataModule())
    kept_then, restored_callback, deep_copied, unpickled = copies
    assert restored_callback.kept_units == kept_then
    assert any(len(kept) < 12 for kept in kept_then.values())
    assert not restored_callback.pruner.prepared
    assert deep_copied.net[0].out_features == unpickled.net[0].out_features <= 10
    x = torch.randn(2, 6)
    torch.testing.assert_close(deep_copied(x), unpickled(x))


def test_hooks_are_released_after_fit_and_when_the_callback_is_detached(tmp_path):
    model = planted_mlp()
    demp = DemonPruning(regularizer="positive_l2", check_mode="train_forwards", verbose=False)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[demp])
    trainer.fit(model, datamodule=RandomDataModule())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not trainer.optimizers[0]._optimizer_step_post_hooks
    trainer.callbacks.remove(demp)  # detached: a later fit runs without any trace of it
    trainer.fit_loop.max_epochs = 2
    widths = model.net[0].out_features
    trainer.fit(model, datamodule=RandomDataModule())
    assert model.net[0].out_features == widths
    assert not any(m._forward_pre_hooks for m in model.modules())

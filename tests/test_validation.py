"""Trustworthy validation during DemP: BatchNorm recalibration, schedule phase, settled flag, monitor warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn

from helpers.lightning import RandomDataModule, planted_mlp
from helpers.models import ConvBN
from lightning_demp import DemonPruning
from lightning_demp.batchnorm import recalibrate_batchnorm_
from lightning_demp.demos import ResidualCNNClassifier


def test_recalibration_matches_a_fresh_estimate_of_the_batch_statistics():
    model = ConvBN()
    with torch.no_grad():
        model.bn1.running_mean.fill_(50.0)  # stale statistics
        model.bn1.running_var.fill_(1e-3)
    batches = [torch.randn(16, 3, 8, 8) * 2 + 1 for _ in range(3)]
    seen = []
    handle = model.bn1.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model.train()
    recalibrate_batchnorm_(model, batches, lambda m, b: m(b))
    handle.remove()
    inputs = [x.transpose(0, 1).reshape(8, -1) for x in seen]  # channels x (batch*positions), per batch
    expected_mean = torch.stack([x.mean(dim=1) for x in inputs]).mean(dim=0)
    expected_var = torch.stack([x.var(dim=1, unbiased=True) for x in inputs]).mean(dim=0)
    torch.testing.assert_close(model.bn1.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var, expected_var, rtol=1e-4, atol=1e-5)
    assert model.training and model.bn1.momentum == 0.1  # modes and momentum restored


def test_recalibration_does_not_touch_parameters_or_run_dropout():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.9), nn.Linear(6, 2))
    before = [p.detach().clone() for p in model.parameters()]
    modes = []
    model[2].register_forward_hook(lambda module, args, out: modes.append(module.training))
    recalibrate_batchnorm_(model, [torch.randn(8, 4)], lambda m, b: m(b))
    assert modes == [False]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def cnn_trainer(tmp_path, callbacks, max_epochs=2):
    return Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        limit_train_batches=4,
        limit_val_batches=2,
    )


def test_recalibration_runs_before_validation_during_the_schedule_and_after_removals(tmp_path):
    class Data(RandomDataModule):
        def __init__(self):
            super().__init__(num_features=40, num_classes=10, size=512, batch_size=32)

    on = DemonPruning(verbose=False, plot=False)
    cnn_trainer(tmp_path, [on]).fit(ResidualCNNClassifier(width=8), datamodule=Data())
    off = DemonPruning(verbose=False, plot=False, recalibrate_bn=False)
    cnn_trainer(tmp_path, [off]).fit(ResidualCNNClassifier(width=8), datamodule=Data())
    assert on.recalibrations == 1 + len(on.events)  # the validation of epoch 0 (inside the schedule), each removal
    assert off.recalibrations == 0


def test_schedule_phase_and_settled_flag_are_logged(tmp_path):
    callback = DemonPruning(regularizer="positive_l2", reg_max=0.01, schedule_span=0.5, verbose=False, plot=False)
    trainer = Trainer(
        max_epochs=4,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(planted_mlp(), datamodule=RandomDataModule())
    metrics = trainer.callback_metrics
    assert metrics["demp/schedule_phase"].item() == 2.0  # the schedule spans the first half only
    assert metrics["demp/settled"].item() == float(callback.last_removed_count == 0)


@pytest.mark.parametrize(
    ("make_monitor", "risky"),
    [
        (lambda: EarlyStopping(monitor="val_acc", mode="max", patience=2), True),
        (lambda: EarlyStopping(monitor="val_acc", mode="max", patience=50), False),
        (lambda: ModelCheckpoint(monitor="val_acc", mode="max"), True),
        (lambda: ModelCheckpoint(save_last=True), False),
        (lambda: ModelCheckpoint(monitor="demp/settled", mode="max"), False),
    ],
    ids=[
        "early-stopping-short-patience",
        "early-stopping-long-patience",
        "best-checkpoint",
        "last-checkpoint",
        "settled-monitor",
    ],
)
def test_a_warning_fires_when_monitoring_would_act_during_the_schedule(tmp_path, make_monitor, risky):
    callback = DemonPruning(regularizer="positive_l2", verbose=False, plot=False)
    trainer = Trainer(
        max_epochs=10,
        callbacks=[callback, make_monitor()],
        logger=False,
        enable_progress_bar=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        limit_train_batches=1,
        limit_val_batches=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(planted_mlp(), datamodule=RandomDataModule())
    fired = [w for w in caught if "Validation metrics dip while units die" in str(w.message)]
    assert bool(fired) == risky


def test_recalibration_uses_as_many_batches_as_asked_even_beyond_check_batches(tmp_path, monkeypatch):
    import lightning_demp.callback as callback_module

    used = []
    original = callback_module.recalibrate_batchnorm_
    monkeypatch.setattr(
        callback_module,
        "recalibrate_batchnorm_",
        lambda model, batches, forward: used.append(len(list(batches))) or original(model, batches, forward),
    )

    class Data(RandomDataModule):
        def __init__(self):
            super().__init__(num_features=40, num_classes=10, size=512, batch_size=32)

    pruning = DemonPruning(verbose=False, plot=False, check_batches=1, recalibration_batches=3)  # 4 batches an epoch
    cnn_trainer(tmp_path, [pruning]).fit(ResidualCNNClassifier(width=8), datamodule=Data())
    assert used and set(used) == {3}

"""Trustworthy validation during DemP: BatchNorm recalibration, schedule phase, settled flag, monitor warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn

from helpers.lightning import (
    RandomDataModule,
    assert_saved_only_when_settled,
    planted_mlp,
    quiet_trainer,
    saved_demp_states,
)
from helpers.models import ConvBN
from lightning_demp import DemonPruning, SettledEarlyStopping, SettledModelCheckpoint
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


def test_once_the_scales_shrink_recalibrated_eval_mode_predicts_what_the_training_network_predicts():
    """The dip's mechanism at the λ peak: most BatchNorm scales are pushed toward zero, the running statistics of
    the layers after them go stale, and eval mode stops computing what the network computes in training."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 16, 5, padding=2),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Conv1d(16, 16, 3, padding=1),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    batches = [torch.randn(64, 1, 40) for _ in range(8)]
    model.train()
    with torch.no_grad():
        for _ in range(20):  # running statistics that describe the network as it was
            for x in batches:
                model(x)
        model[1].weight[:12].mul_(1e-3)  # the λ peak: 12 of 16 scales close to zero
        inputs = torch.cat(batches[:4])
        in_training = model(inputs)  # batch statistics: what training sees
        model.eval()
        stale = model(inputs)
        recalibrate_batchnorm_(model, batches, lambda m, b: m(b))
        recalibrated = model(inputs)

    def distance(logits):  # how far from the training network's logits, relative to their spread
        return float((logits - in_training).norm() / (in_training - in_training.mean(dim=0)).norm())

    assert distance(stale) > 1.0
    assert distance(recalibrated) < 0.1


def cnn_trainer(tmp_path, callbacks, max_epochs=2):
    return quiet_trainer(
        tmp_path,
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
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
    assert on.pruner.recalibrations == 1 + len(
        on.events
    )  # the validation of epoch 0 (inside the schedule), each removal
    assert off.pruner.recalibrations == 0


def test_schedule_phase_and_settled_flag_are_logged(tmp_path):
    callback = DemonPruning(regularizer="positive_l2", reg_max=0.01, schedule_span=0.5, verbose=False, plot=False)
    trainer = quiet_trainer(tmp_path, max_epochs=4, callbacks=[callback])
    trainer.fit(planted_mlp(), datamodule=RandomDataModule())
    metrics = trainer.callback_metrics
    assert metrics["demp/schedule_phase"].item() == 2.0  # the schedule spans the first half only
    assert metrics["demp/settled"].item() == float(callback.ledger.last_removed_count == 0)


@pytest.mark.parametrize(
    ("make_monitor", "risky"),
    [
        (lambda: EarlyStopping(monitor="val_acc", mode="max", patience=2), True),
        (lambda: EarlyStopping(monitor="val_acc", mode="max", patience=50), False),
        (lambda: ModelCheckpoint(monitor="val_acc", mode="max"), True),
        (lambda: ModelCheckpoint(save_last=True), False),
        (lambda: ModelCheckpoint(monitor="demp/settled", mode="max"), False),
        (lambda: SettledModelCheckpoint(monitor="val_acc", mode="max"), False),
        (lambda: SettledEarlyStopping(monitor="val_acc", mode="max", patience=2), False),
    ],
    ids=[
        "early-stopping-short-patience",
        "early-stopping-long-patience",
        "best-checkpoint",
        "last-checkpoint",
        "settled-monitor",
        "settled-model-checkpoint",
        "settled-early-stopping",
    ],
)
def test_a_warning_fires_when_monitoring_would_act_during_the_schedule(tmp_path, make_monitor, risky):
    callback = DemonPruning(regularizer="positive_l2", verbose=False, plot=False)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=10,
        callbacks=[callback, make_monitor()],
        limit_train_batches=1,
        limit_val_batches=1,
        enable_checkpointing=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(planted_mlp(), datamodule=RandomDataModule())
    fired = [w for w in caught if "Validation metrics dip while units die" in str(w.message)]
    assert bool(fired) == risky


def test_recalibration_uses_as_many_batches_as_asked_even_beyond_check_batches(tmp_path, monkeypatch):
    import lightning_demp.core as callback_module

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


class SettledRecorder(Callback):
    """Records whether DemonPruning reports the network settled where the monitoring callbacks decide: at the end
    of validation, and at the end of the training epoch after DemonPruning's check."""

    def __init__(self, demon: DemonPruning) -> None:
        self.demon = demon
        self.at_validation: list[tuple[int, bool]] = []
        self.at_epoch_end: list[tuple[int, bool]] = []

    def on_validation_end(self, trainer: Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.at_validation.append((trainer.current_epoch, self.demon.is_settled(trainer.global_step)))

    def on_train_epoch_end(self, trainer: Trainer, pl_module) -> None:
        self.at_epoch_end.append((trainer.current_epoch, self.demon.is_settled(trainer.global_step)))


def fit_with_a_falling_score(tmp_path, monitor: Callback, max_epochs: int = 8, prune_every_n_epochs: int = 1):
    """Fit the planted MLP (6 steps per epoch; λ over the first 4 epochs, then checks that find nothing) with
    ``monitor``; the model logs ``val_score`` = -epoch, so the best score is always the earliest validation."""
    seed_everything(0)
    model = planted_mlp()
    original_validation_step = model.validation_step

    def validation_step(batch, batch_idx):
        original_validation_step(batch, batch_idx)
        model.log("val_score", -float(model.current_epoch))

    model.validation_step = validation_step
    demon = DemonPruning(
        regularizer="positive_l2",
        reg_max=1e-3,
        schedule_span=0.5,
        prune_every_n_epochs=prune_every_n_epochs,
        verbose=False,
        plot=False,
    )
    recorder = SettledRecorder(demon)
    trainer = quiet_trainer(
        tmp_path, max_epochs=max_epochs, callbacks=[demon, recorder, monitor], enable_checkpointing=True
    )
    trainer.fit(model, datamodule=RandomDataModule())
    return trainer, demon, recorder


CHECKPOINT_SAVING_POINTS = {
    "train-epoch-end": {"monitor": "val_score", "mode": "max", "save_top_k": -1},
    "validation-end": {"monitor": "val_score", "mode": "max", "save_top_k": -1, "save_on_train_epoch_end": False},
    "every-train-step": {"every_n_train_steps": 1, "save_top_k": -1},
}


@pytest.mark.parametrize("saving_point", CHECKPOINT_SAVING_POINTS)
def test_settled_model_checkpoint_saves_only_after_a_check_since_the_schedule_ended_found_nothing(
    tmp_path, saving_point
):
    options = CHECKPOINT_SAVING_POINTS[saving_point]
    fit_with_a_falling_score(tmp_path, ModelCheckpoint(dirpath=tmp_path / "plain", **options))
    fit_with_a_falling_score(tmp_path, SettledModelCheckpoint(dirpath=tmp_path / "settled", **options))

    plain = saved_demp_states(tmp_path / "plain")
    assert any(step < span for step, span, _, _ in plain)  # Lightning's keeps networks from inside the schedule
    assert_saved_only_when_settled(tmp_path / "settled")


def test_settled_model_checkpoint_keeps_the_best_settled_epoch(tmp_path):
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", monitor="val_score", mode="max")
    fit_with_a_falling_score(tmp_path, plain)
    settled = SettledModelCheckpoint(dirpath=tmp_path / "settled", monitor="val_score", mode="max")
    _, _, recorder = fit_with_a_falling_score(tmp_path, settled)

    assert torch.load(plain.best_model_path, weights_only=False)["epoch"] == 0  # inside the schedule
    first_settled = min(epoch for epoch, settled in recorder.at_epoch_end if settled)
    assert torch.load(settled.best_model_path, weights_only=False)["epoch"] == first_settled


def test_settled_model_checkpoint_warns_when_no_saving_point_came_after_the_network_settled(tmp_path):
    never = SettledModelCheckpoint(dirpath=tmp_path / "never", monitor="val_score", mode="max")
    with pytest.warns(UserWarning, match="kept no checkpoint: none of this fit's saving points came after"):
        fit_with_a_falling_score(tmp_path, never, max_epochs=3, prune_every_n_epochs=10)  # only the final check
    assert never.best_model_path == ""
    assert not (tmp_path / "never").exists()

    settled = SettledModelCheckpoint(dirpath=tmp_path / "settled", monitor="val_score", mode="max")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_with_a_falling_score(tmp_path, settled, max_epochs=3)
    assert settled.best_model_path != ""
    assert not [w for w in caught if "kept no checkpoint" in str(w.message)]


@pytest.mark.parametrize("check_on_train_epoch_end", [True, False], ids=["train-epoch-end", "validation-end"])
def test_settled_early_stopping_counts_patience_only_once_the_network_has_settled(tmp_path, check_on_train_epoch_end):
    plain = EarlyStopping(
        monitor="val_score", mode="max", patience=1, check_on_train_epoch_end=check_on_train_epoch_end
    )
    _, _, plain_recorder = fit_with_a_falling_score(tmp_path, plain)
    assert plain.stopped_epoch == 1  # the falling score stops it inside the schedule
    assert not any(settled for _, settled in plain_recorder.at_epoch_end)

    settled = SettledEarlyStopping(
        monitor="val_score", mode="max", patience=1, check_on_train_epoch_end=check_on_train_epoch_end
    )
    trainer, _, recorder = fit_with_a_falling_score(tmp_path, settled)
    decisions = recorder.at_epoch_end if check_on_train_epoch_end else recorder.at_validation
    first_settled = min(epoch for epoch, is_settled in decisions if is_settled)
    assert settled.stopped_epoch == first_settled + 1  # the first settled score, then one epoch of patience
    assert trainer.current_epoch < 8  # it did stop the run


@pytest.mark.parametrize("make_monitor", [SettledModelCheckpoint, SettledEarlyStopping])
def test_settled_callbacks_without_demon_pruning_are_refused_at_setup(tmp_path, make_monitor):
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[make_monitor(monitor="val_acc")], enable_checkpointing=True
    )
    with pytest.raises(RuntimeError, match="needs a `DemonPruning` callback"):
        trainer.fit(planted_mlp(), datamodule=RandomDataModule())


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_demo_models_hand_their_betas_to_adam(optimizer):
    model = ResidualCNNClassifier(width=4, optimizer=optimizer, lr_schedule="constant", betas=(0.8, 0.95))
    assert model.configure_optimizers().defaults["betas"] == (0.8, 0.95)
    assert model.hparams["betas"] == (0.8, 0.95)  # a resumed or reloaded model keeps them


@pytest.mark.parametrize("betas", [(0.9, 1.0), (-0.1, 0.9), (0.9,)])
def test_demo_models_refuse_betas_outside_zero_one(betas):
    with pytest.raises(ValueError, match="`betas`"):
        ResidualCNNClassifier(width=4, betas=betas)

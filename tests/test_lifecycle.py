"""Lifecycle: misconfiguration caught before training, hooks released, pickling and deep copies at any point."""

from __future__ import annotations

import copy
import math
import pickle
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from helpers.lightning import RandomDataModule, planted_mlp, quiet_trainer, small_mlp, train_with_callback
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


class NamespaceBatches(RandomDataModule):
    """Batches of a type the callback cannot read an input from (dicts are keyword arguments)."""

    def train_dataloader(self):
        def collate(items):
            return SimpleNamespace(x=torch.stack([x for x, _ in items]), y=torch.stack([y for _, y in items]))

        return torch.utils.data.DataLoader(list(self.train_set), batch_size=32, collate_fn=collate)


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
        NamespaceBatches,
        {"regularizer": "l2"},
        TypeError,
        "cannot find the model input in a batch of type SimpleNamespace",
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


def test_validation_with_the_callback_attached_demands_nothing_fitting_needs(tmp_path):
    trainer, model, _ = train_with_callback(tmp_path, planted_mlp(), max_epochs=1)
    checkpoint = tmp_path / "fitted.ckpt"
    trainer.save_checkpoint(checkpoint)
    evaluator = quiet_trainer(tmp_path, callbacks=[DemonPruning(verbose=False)])  # l1_norm_scale, no norms
    (metrics,) = evaluator.validate(small_mlp(), datamodule=RandomDataModule(), ckpt_path=checkpoint)
    assert math.isfinite(metrics["val_loss"])
    with pytest.raises(ValueError, match="has no affine normalization layer"):  # fitting still demands it
        evaluator.fit(small_mlp(), datamodule=RandomDataModule())


class UnsizedStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(40):
            yield torch.randn(6, generator=generator), torch.randint(0, 3, (), generator=generator)


def test_an_iterable_dataset_of_unknown_length_under_max_epochs_is_refused_before_training(tmp_path):
    steps = []

    class CountSteps(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps.append(trainer.global_step)

    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[DemonPruning(regularizer="l2"), CountSteps()])
    loader = torch.utils.data.DataLoader(UnsizedStream(), batch_size=8)
    with pytest.raises(ValueError, match="needs the number of training steps.*`max_steps`"):
        trainer.fit(small_mlp(), train_dataloaders=loader)
    assert steps == []


class NormedMLP(DemoClassifier):
    """Linear → BatchNorm → ReLU → Linear; the training step skips a batch with a NaN, as users write it."""

    def __init__(self, freeze_norm: bool = False) -> None:
        super().__init__(num_classes=3, lr=1e-2)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
        self.freeze_norm = freeze_norm
        if freeze_norm:
            self.net[1].requires_grad_(False)
            self.net[1].running_mean.fill_(0.25)
            self.net[1].running_var.fill_(2.0)
            self.net[1].eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_norm:
            self.net[1].eval()  # the usual way to keep a pretrained norm frozen
        return self

    def training_step(self, batch, batch_idx):
        if not torch.isfinite(batch[0]).all():
            return None  # skip the batch: no optimizer step
        return super().training_step(batch, batch_idx)


class OneNaNBatch(RandomDataModule):
    """The last training batch of every epoch holds a NaN (no shuffling)."""

    def __init__(self) -> None:
        super().__init__(shuffle=False)

    def load_arrays(self):
        x, y, x_val, y_val = super().load_arrays()
        x[-3, 2] = math.nan
        return x, y, x_val, y_val


def test_a_batch_the_training_step_skipped_enters_no_recalibration_and_no_check(tmp_path):
    callback = DemonPruning(regularizer="l1_norm_scale", verbose=False, recalibrate_bn=True)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    model = NormedMLP()
    trainer.fit(model, datamodule=OneNaNBatch())  # no "non-finite activations" warning: the check never saw it
    assert callback.pruner.recalibrations > 0
    assert torch.isfinite(model.net[1].running_mean).all() and torch.isfinite(model.net[1].running_var).all()
    (metrics,) = trainer.validate(model, datamodule=OneNaNBatch(), verbose=False)
    assert math.isfinite(metrics["val_loss"])


def test_recalibration_keeps_the_old_statistics_when_the_new_ones_are_not_finite():
    from lightning_demp.batchnorm import recalibrate_batchnorm_

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(0.5)
    batches = [torch.randn(8, 3), torch.full((8, 3), math.nan)]
    assert recalibrate_batchnorm_(model, batches, lambda m, b: m(b)) == 0
    assert torch.equal(model[1].running_mean, torch.full((4,), 0.5))


def test_a_frozen_batchnorm_is_left_alone_by_recalibration(tmp_path):
    callback = DemonPruning(regularizer="l2", verbose=False, recalibrate_bn=True)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    model = NormedMLP(freeze_norm=True)
    trainer.fit(model, datamodule=RandomDataModule())
    assert callback.pruner.recalibrations == 0
    assert torch.equal(model.net[1].running_mean, torch.full_like(model.net[1].running_mean, 0.25))
    assert torch.equal(model.net[1].running_var, torch.full_like(model.net[1].running_var, 2.0))


def test_one_callback_fitting_a_second_model_keeps_nothing_of_the_first(tmp_path):
    callback = DemonPruning(regularizer="positive_l2", verbose=False)
    first = planted_mlp()
    quiet_trainer(tmp_path / "a", max_epochs=1, callbacks=[callback]).fit(first, datamodule=RandomDataModule())
    assert callback.events  # the planted units went
    continued = quiet_trainer(tmp_path / "b", max_epochs=2, callbacks=[callback])
    continued.fit(first, datamodule=RandomDataModule())  # the same model again: its record goes on
    assert callback.kept_units["net.0"] == [u for u in range(12) if u not in (1, 8)]

    second = small_mlp(hidden_sizes=[16, 9])
    trainer = quiet_trainer(tmp_path / "c", max_epochs=1, callbacks=[callback], enable_checkpointing=True)
    trainer.fit(second, datamodule=RandomDataModule())
    assert callback.ledger.initial_widths == {"net.0": 16, "net.2": 9}
    assert callback.ledger.initial_params == sum(p.numel() for p in small_mlp(hidden_sizes=[16, 9]).parameters())
    assert all(event.widths["net.0"] <= 16 for event in callback.events)
    (checkpoint,) = (tmp_path / "c").rglob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]["DemonPruning"]
    assert len(saved["kept_units"]["net.0"]) == second.net[0].out_features


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16), ("64-true", torch.float64)]
)
def test_true_precision_with_an_example_input_traces_and_prunes_in_the_model_dtype(tmp_path, precision, dtype):
    model = planted_mlp(optimizer="sgd")  # Adam's eps underflows in pure float16
    assert model.example_input_array is not None and model.example_input_array.dtype == torch.float32
    callback = DemonPruning(regularizer="positive_l2", verbose=False, noise_std=0.0)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], precision=precision)
    trainer.fit(model, datamodule=RandomDataModule())
    assert [e.removed for e in callback.events] == [{"net.0": 2, "net.2": 1}]
    assert model.net[0].weight.dtype == dtype and model.net[0].out_features == 10


def test_stochastic_weight_averaging_beside_the_callback_is_refused_before_training(tmp_path):
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    steps = []

    class CountSteps(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps.append(trainer.global_step)

    swa = StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[DemonPruning(regularizer="l2"), swa, CountSteps()])
    with pytest.raises(ValueError, match="cannot run beside `StochasticWeightAveraging`.*Average after pruning"):
        trainer.fit(planted_mlp(), datamodule=RandomDataModule())
    assert steps == []


class TwoOptimizers(DemoClassifier):
    """Manual optimization: the hidden layers and the head have optimizers of their own, both stepped every batch."""

    def __init__(self) -> None:
        super().__init__(num_classes=3)
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
        self.example_input_array = torch.zeros(2, 6)

    def training_step(self, batch, batch_idx):
        body, head = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        body.step()
        head.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.net[0].parameters(), 1e-2), torch.optim.Adam(self.net[2].parameters(), 1e-2)


def test_with_two_manual_optimizers_the_schedule_spans_the_fit_not_half_of_it(tmp_path):
    strengths = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            strengths.append(callback.pruner.pressure.last_reg_strength)

    callback = DemonPruning(regularizer="l2", reg_max=0.1, schedule="constant", schedule_span=0.5, verbose=False)
    trainer = quiet_trainer(tmp_path, max_epochs=4, callbacks=[callback, Record()])
    trainer.fit(TwoOptimizers(), datamodule=RandomDataModule())  # 6 batches an epoch, 12 optimizer steps
    assert trainer.global_step == 2 * 24
    assert callback.pruner.pressure.span_steps == 12  # half of the 24 batches
    assert strengths[:12] == [pytest.approx(0.1)] * 12 and strengths[12:] == [0.0] * 12
    assert callback.ledger.last_check_step == 24  # the final check, counted in batches


def test_mid_epoch_checkpoints_are_warned_about_at_fit_start_and_epoch_end_ones_are_not(tmp_path):
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit_warnings(checkpoint: ModelCheckpoint) -> list[str]:
        trainer = quiet_trainer(
            tmp_path,
            max_epochs=1,
            val_check_interval=0.5,
            enable_checkpointing=True,
            callbacks=[DemonPruning(regularizer="l2", verbose=False), checkpoint],
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(planted_mlp(), datamodule=RandomDataModule())
        return [str(w.message) for w in caught if "mid-epoch" in str(w.message)]

    (message,) = fit_warnings(ModelCheckpoint(dirpath=tmp_path / "a"))
    assert "val_check_interval=0.5" in message and "save_on_train_epoch_end=True" in message
    assert fit_warnings(ModelCheckpoint(dirpath=tmp_path / "b", save_on_train_epoch_end=True)) == []

"""Checkpoints of pruned models: weights-only loading, resume, crash-and-resume equivalence, inference, export."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers.lightning import (
    FrozenTransformer,
    RandomDataModule,
    model_checksum,
    optimizer_checksum,
    planted_mlp,
    planted_residual_cnn,
    planted_transformer,
    quiet_trainer,
    small_mlp,
    tiny_residual_cnn,
)
from lightning_demp import DemonPruning, load_pruned_checkpoint
from lightning_demp.demos import MLPClassifier
from lightning_demp.resize import layer_widths

CALLBACK_ARGS = {
    "regularizer": "positive_l2",
    "reg_max": 0.05,
    "noise_std": 1e-3,
    "schedule": "one_cycle",
    "verbose": False,
}


class Crash(Exception):
    pass


class CrashAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Crash


def fit(tmp_path, model, max_epochs, ckpt_path=None, extra_callbacks=(), callback_args=None, data_args=None):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, every_n_epochs=1)
    callback = DemonPruning(**(callback_args or CALLBACK_ARGS))
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=max_epochs,
        callbacks=[callback, checkpoint, *extra_callbacks],
        deterministic=True,
        enable_checkpointing=True,
    )
    trainer.fit(model, datamodule=RandomDataModule(shuffle=False, **(data_args or {})), ckpt_path=ckpt_path)
    return trainer, callback


def test_checkpoint_after_removal_loads_with_weights_only_and_holds_the_shrunk_widths(tmp_path):
    _, callback = fit(tmp_path, planted_mlp(), max_epochs=1)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    state = checkpoint["callbacks"]["DemonPruning"]
    assert state["kept_units"]["net.0"] == callback.kept_units["net.0"]
    assert checkpoint["state_dict"]["net.0.weight"].shape[0] == len(callback.kept_units["net.0"]) < 12
    assert checkpoint["optimizer_states"][0]["state"][0]["exp_avg"].shape[0] == len(callback.kept_units["net.0"])


@pytest.mark.parametrize(
    ("build", "fresh", "callback_args", "data_args"),
    [
        (planted_mlp, small_mlp, CALLBACK_ARGS, {}),
        (planted_mlp, small_mlp, {**CALLBACK_ARGS, "target_sparsity": 0.25, "target_metric": "units"}, {}),
        (planted_mlp, small_mlp, {**CALLBACK_ARGS, "reg_max": 0.0, "noise_std": 0.0, "target_sparsity": 0.4}, {}),
        (
            lambda: planted_residual_cnn(lr=1e-2),
            lambda: tiny_residual_cnn(lr=1e-2),
            {**CALLBACK_ARGS, "regularizer": "l1_norm_scale"},
            {"num_features": 16, "num_classes": 4},
        ),
        (
            planted_transformer,
            FrozenTransformer,
            {**CALLBACK_ARGS, "regularizer": "l2", "noise_std": 0.0},  # noise would revive the dead head
            {"num_features": 40, "num_classes": 4},
        ),
    ],
    ids=["plain", "target", "target-shortfall", "reordered-channels", "heads"],
)
def test_crash_and_resume_ends_like_the_uninterrupted_run(tmp_path, build, fresh, callback_args, data_args):
    torch.manual_seed(0)
    reference_model = build()
    start = copy.deepcopy(reference_model)
    options = {"callback_args": callback_args, "data_args": data_args}
    reference_trainer, reference_callback = fit(tmp_path / "a", reference_model, max_epochs=4, **options)
    assert reference_callback.events  # something was removed before the crash point
    assert reference_callback.events[0].step < 2 * reference_trainer.num_training_batches

    torch.manual_seed(0)
    with pytest.raises(Crash):
        fit(tmp_path / "b", copy.deepcopy(start), max_epochs=4, extra_callbacks=[CrashAtEpoch(2)], **options)
    resumed_model = fresh()  # freshly constructed at full size
    assert layer_widths(resumed_model) == layer_widths(start)
    resumed_trainer, resumed_callback = fit(
        tmp_path / "b", resumed_model, max_epochs=4, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"), **options
    )

    assert layer_widths(resumed_model) == layer_widths(reference_model)
    assert resumed_callback.kept_units == reference_callback.kept_units
    assert resumed_callback.kept_heads == reference_callback.kept_heads
    assert [e.step for e in resumed_callback.events] == [e.step for e in reference_callback.events]
    assert resumed_callback.strength_scale == reference_callback.strength_scale
    for (name, resumed), reference in zip(resumed_model.named_parameters(), reference_model.parameters()):
        assert torch.equal(resumed, reference), name
    for resumed, reference in zip(resumed_model.buffers(), reference_model.buffers()):
        assert torch.equal(resumed, reference)  # selections' ids, BatchNorm statistics
    assert optimizer_checksum(resumed_trainer.optimizers[0]) == optimizer_checksum(reference_trainer.optimizers[0])
    assert resumed_trainer.global_step == reference_trainer.global_step


def test_resume_restores_the_schedules_where_they_were(tmp_path):
    trainer, _ = fit(tmp_path, planted_mlp(), max_epochs=2)
    seen = {}

    class Record(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.setdefault("first_step", trainer.global_step)

    _, callback = fit(
        tmp_path, small_mlp(), max_epochs=3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), extra_callbacks=[Record()]
    )
    assert seen["first_step"] == trainer.global_step == 12
    assert callback.pruner.pressure.reg_schedule.span_steps == round(0.9 * 18)
    assert callback.pruner.pressure.last_reg_strength == pytest.approx(callback.pruner.pressure.reg_schedule.value(17))


@pytest.mark.parametrize("entry", ["validate", "test", "predict"])
def test_validate_test_and_predict_from_a_pruned_checkpoint_with_the_callback_attached(tmp_path, entry):
    fit(tmp_path, planted_mlp(), max_epochs=1)
    model = small_mlp()
    trainer = quiet_trainer(tmp_path, callbacks=[DemonPruning(**CALLBACK_ARGS)], enable_checkpointing=True)
    result = getattr(trainer, entry)(
        model, datamodule=RandomDataModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert result
    assert layer_widths(model)["net.0"] < 12


def test_inference_without_a_trainer_in_one_call_and_through_load_from_checkpoint(tmp_path):
    trained_trainer, _ = fit(tmp_path, planted_mlp(), max_epochs=1)
    trained = trained_trainer.lightning_module
    path = tmp_path / "ckpt" / "last.ckpt"
    x = torch.randn(5, 6)
    trained.eval()
    expected = trained(x)
    model = load_pruned_checkpoint(small_mlp(), path).eval()
    torch.testing.assert_close(model(x), expected)
    loaded = MLPClassifier.load_from_checkpoint(path).eval()  # demo modules call enable_resize_on_load
    torch.testing.assert_close(loaded(x), expected)


def test_the_compact_model_exports_and_the_exported_program_matches(tmp_path):
    trainer, _ = fit(tmp_path, planted_mlp(), max_epochs=1)
    model = trainer.lightning_module.net.eval()
    x = torch.randn(4, 6)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path))
    assert onnx.load(str(path)).graph.node


def test_checksums_differ_between_independent_models():  # guards the helpers used above
    assert model_checksum(small_mlp()) != model_checksum(small_mlp())

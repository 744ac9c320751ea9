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
    import onnx  # test dependencies (with onnxscript, which torch.onnx.export needs): never skipped
    from onnx.reference import ReferenceEvaluator

    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path))
    graph = onnx.load(str(path))
    (onnx_outputs,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_outputs), model(x), rtol=1e-5, atol=1e-5)


def test_checksums_differ_between_independent_models():  # guards the helpers used above
    assert model_checksum(small_mlp()) != model_checksum(small_mlp())


def test_an_exception_half_way_through_a_removal_leaves_a_consistent_checkpoint(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    from lightning_demp.graph import PrunableGraph

    real_cut, calls = PrunableGraph.cut, []

    def cut_then_fail(self, name, unit_idxs):
        calls.append(name)
        if len(calls) == 2:  # the first group (`net.0`) is already sliced
            raise Crash("killed during surgery")
        return real_cut(self, name, unit_idxs)

    monkeypatch.setattr(PrunableGraph, "cut", cut_then_fail)
    callback = DemonPruning(regularizer="positive_l2", verbose=False, noise_std=0.0)
    saver = OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")
    model = planted_mlp()
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback, saver], enable_checkpointing=True)
    with pytest.raises(Crash):
        trainer.fit(model, datamodule=RandomDataModule())
    assert model.net[0].out_features == model.net[2].in_features == 12  # nothing half-removed

    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)
    kept = saved["callbacks"]["DemonPruning"]["kept_units"]
    assert saved["state_dict"]["net.0.weight"].shape[0] == len(kept["net.0"]) == 12
    assert saved["optimizer_states"][0]["state"][0]["exp_avg"].shape[0] == 12
    assert saved["callbacks"]["DemonPruning"]["events"] == []

    monkeypatch.setattr(PrunableGraph, "cut", real_cut)
    resumed_callback = DemonPruning(regularizer="positive_l2", verbose=False, noise_std=0.0)
    resumed = quiet_trainer(tmp_path / "resumed", max_epochs=2, callbacks=[resumed_callback])
    resumed.fit(small_mlp(), datamodule=RandomDataModule(), ckpt_path=tmp_path / "on_exception.ckpt")
    assert resumed_callback.kept_units["net.0"] == [u for u in range(12) if u not in (1, 8)]


def test_a_checkpoint_from_before_a_removal_loads_back_into_the_pruned_model(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}", save_last=True)
    callback = DemonPruning(regularizer="positive_l2", verbose=False, noise_std=0.0, prune_every_n_epochs=2)
    model = planted_mlp()
    trainer = quiet_trainer(tmp_path, max_epochs=4, callbacks=[callback, saver], enable_checkpointing=True)
    trainer.fit(model, datamodule=RandomDataModule())
    assert model.net[0].out_features == 10  # pruned after epoch 1
    early = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=False)
    assert early["state_dict"]["net.0.weight"].shape[0] == 12  # written before the removal

    (metrics,) = trainer.test(model, datamodule=RandomDataModule(), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert model.net[0].out_features == model.net[2].in_features == 12 and model.net[2].out_features == 10
    assert all(torch.equal(value, early["state_dict"][key]) for key, value in model.state_dict().items())
    assert 0.0 <= metrics["test_acc"] <= 1.0
    trainer.test(model, datamodule=RandomDataModule(), ckpt_path="last")  # and back to the pruned widths
    assert model.net[0].out_features == 10


@pytest.mark.parametrize(
    ("other", "tensor"),
    [({"num_classes": 5}, "net.4.weight"), ({"input_dim": 8}, "net.0.weight")],
    ids=["num_classes", "input_dim"],
)
def test_a_checkpoint_of_another_architecture_is_refused_naming_the_tensor(tmp_path, other, tensor):
    fit(tmp_path, planted_mlp(), max_epochs=1)
    with pytest.raises(ValueError, match=f"`{tensor}` has shape .*DemP never changed dimension"):
        load_pruned_checkpoint(small_mlp(**other), tmp_path / "ckpt" / "last.ckpt")
    model = load_pruned_checkpoint(small_mlp(), tmp_path / "ckpt" / "last.ckpt")  # the run's own architecture
    assert model.net[0].out_features == 10


def test_after_early_stopping_last_ckpt_holds_the_final_removal(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    stopper = EarlyStopping(monitor="val_loss", mode="max", patience=0)  # val_loss falls: stops after epoch 2
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = DemonPruning(regularizer="positive_l2", verbose=False, noise_std=0.0, prune_every_n_epochs=5)
    model = planted_mlp()
    trainer = quiet_trainer(tmp_path, max_epochs=20, callbacks=[callback, stopper, saver], enable_checkpointing=True)
    trainer.fit(model, datamodule=RandomDataModule())
    assert trainer.current_epoch < 5 and len(callback.events) == 1  # the final check at on_train_end
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["state_dict"]["net.0.weight"].shape[0] == 10
    assert len(last["callbacks"]["DemonPruning"]["events"]) == 1
    trainer.test(small_mlp(), datamodule=RandomDataModule(), ckpt_path="last")


def test_resuming_with_another_schedule_warns_and_keeps_the_history_true(tmp_path):
    from lightning_demp.plots import schedule_values

    class StopAfterTwoEpochs(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    def run(reg_max: float, extra: list, ckpt_path=None) -> DemonPruning:
        callback = DemonPruning(
            regularizer="l2", reg_max=reg_max, noise_std=0.0, schedule="constant", schedule_span=1.0, verbose=False
        )
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        callbacks = [callback, saver, *extra]
        trainer = quiet_trainer(tmp_path, max_epochs=4, callbacks=callbacks, enable_checkpointing=True)
        trainer.fit(small_mlp() if ckpt_path else planted_mlp(), datamodule=RandomDataModule(), ckpt_path=ckpt_path)
        return callback

    run(0.1, [StopAfterTwoEpochs()])  # 6 steps an epoch: stops at step 12 of 24
    with pytest.warns(UserWarning, match=r"resumed with another schedule .*\(reg_max 0.1 → 0.3\)"):
        resumed = run(0.3, [], ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    record = resumed.state_dict()["schedule"]
    assert [(segment["reg_max"], segment["until_step"]) for segment in record["history"]] == [(0.1, 12)]
    reg_values, _ = schedule_values(record, [0, 11, 12, 23])
    assert reg_values == [0.1, 0.1, 0.3, 0.3]  # the plot draws what each part of the run trained with


def test_a_decoupled_run_checkpoint_loads_into_a_fresh_model_without_extra_steps(tmp_path):
    from test_selection import PlainResidualClassifier

    from helpers.models import kill_bn_units_, randomize_bn_

    model = PlainResidualClassifier()
    randomize_bn_(model)
    kill_bn_units_(model.net.stem_bn, [1], shift=-5.0)
    callback = DemonPruning(regularizer="l1_norm_scale", verbose=False, noise_std=0.0, decouple_residuals=True)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback, saver], enable_checkpointing=True)
    trainer.fit(model, datamodule=RandomDataModule(num_features=16, num_classes=4))
    assert callback.events

    loaded = load_pruned_checkpoint(PlainResidualClassifier(), tmp_path / "ckpt" / "last.ckpt")
    x = torch.randn(8, 16)
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))

"""DemonPruning in a Trainer: validation, removal, optimizer continuity, schedules, noise and logging."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from helpers.lightning import RandomDataModule, quiet_trainer, small_mlp, train_with_callback
from helpers.models import kill_linear_units_, make_alive_
from lightning_demp import DemonPruning
from lightning_demp.schedules import OneCycleSchedule

# (arguments, exception type, message pattern)
BAD_ARGUMENTS = [
    (
        {"target_focus": "yes"},
        TypeError,
        r"Expected `target_focus` to be a bool, got str 'yes'",
    ),
    (
        {"regularizer": "l3"},
        ValueError,
        r"Expected `regularizer` to be one of \('l2', 'positive_l2', 'l1_norm_scale', 'positive_group_l1'\), got 'l3'",
    ),
    ({"regularizer": 2}, TypeError, r"Expected `regularizer` to be one of .* got int 2"),
    ({"reg_max": -1.0}, ValueError, r"Expected `reg_max` to be a number in \[0.0, inf\), got -1.0"),
    ({"reg_max": float("nan")}, ValueError, r"Expected `reg_max` to be a number in \[0.0, inf\), got nan"),
    ({"reg_max": "0.1"}, TypeError, r"Expected `reg_max` to be a number, got str '0.1'"),
    ({"schedule": "cubic"}, ValueError, r"Expected `schedule` to be one of \('one_cycle', .*got 'cubic'"),
    ({"schedule_span": 0.0}, ValueError, r"Expected `schedule_span` to be a number in \(0.0, 1.0\], got 0.0"),
    ({"schedule_span": 1.5}, ValueError, r"Expected `schedule_span` to be a number in \(0.0, 1.0\], got 1.5"),
    ({"noise_std": -1e-5}, ValueError, r"Expected `noise_std` to be a number in \[0.0, inf\), got -1e-05"),
    ({"noise_std": float("inf")}, ValueError, r"Expected `noise_std` to be a number in \[0.0, inf\), got inf"),
    ({"prune_every_n_epochs": 0}, ValueError, r"Expected `prune_every_n_epochs` to be an int >= 1, got 0"),
    ({"prune_every_n_epochs": 1.5}, TypeError, r"Expected `prune_every_n_epochs` to be an int, got float 1.5"),
    ({"dead_threshold": -0.1}, ValueError, r"Expected `dead_threshold` to be a number in \[0.0, inf\), got -0.1"),
    ({"check_batches": 0}, ValueError, r"Expected `check_batches` to be an int >= 1, got 0"),
    (
        {"check_mode": "always"},
        ValueError,
        r"Expected `check_mode` to be one of \('eval_pass', 'train_forwards'\), got 'always'",
    ),
    ({"min_units": 0}, ValueError, r"Expected `min_units` to be an int >= 1, got 0"),
    ({"min_units": True}, TypeError, r"Expected `min_units` to be an int, got bool True"),
    ({"exclude": "fc1"}, TypeError, r"Expected `exclude` to be a list of str, got 'fc1'"),
    ({"seed": -3}, ValueError, r"Expected `seed` to be an int >= 0, got -3"),
    ({"verbose": "yes"}, TypeError, r"Expected `verbose` to be a bool, got str 'yes'"),
    ({"recalibrate_bn": 1}, TypeError, r"Expected `recalibrate_bn` to be a bool, got int 1"),
    (
        {"saturation_tolerance": -1.0},
        ValueError,
        r"Expected `saturation_tolerance` to be a number in \[0.0, inf\), got -1.0",
    ),
    ({"force_target": "no"}, TypeError, r"Expected `force_target` to be a bool, got str 'no'"),
    ({"recalibration_batches": 0}, ValueError, r"Expected `recalibration_batches` to be an int >= 1, got 0"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ARGUMENTS, ids=[str(case[0]) for case in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_with_a_message_naming_them(kwargs, error, message):
    with pytest.raises(error, match=message):
        DemonPruning(**kwargs)


def planted_mlp():
    model = small_mlp()
    make_alive_(model)
    kill_linear_units_(model.net[0], [1, 8])
    kill_linear_units_(model.net[2], [4])
    return model


def test_planted_dead_units_are_removed_and_the_optimizer_trains_what_remains(tmp_path):
    model = planted_mlp()
    snapshots = {}

    class Inspect(DemonPruning):
        def on_train_epoch_end(self, trainer, pl_module):
            super().on_train_epoch_end(trainer, pl_module)
            optimizer = trainer.optimizers[0]
            held = [p for group in optimizer.param_groups for p in group["params"]]
            assert [id(p) for p in held] == [id(p) for p in pl_module.parameters()]
            assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in held)
            snapshots[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    callback = Inspect(regularizer="positive_l2", reg_max=0.0, noise_std=0.0, verbose=False)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[callback])
    trainer.fit(model, datamodule=RandomDataModule())

    assert {1, 8}.isdisjoint(callback.kept_units["net.0"])
    assert 4 not in callback.kept_units["net.2"]
    assert model.net[0].out_features == len(callback.kept_units["net.0"]) <= 10
    assert model.net[2].in_features == model.net[0].out_features
    assert model.net[2].out_features == len(callback.kept_units["net.2"]) <= 9
    assert model.net[4].in_features == model.net[2].out_features
    assert model.net[4].out_features == 3  # the output layer is never pruned
    assert callback.events and callback.events[0].epoch == 0
    # Parameters changed after the first removal (the optimizer was not left holding stale tensors).
    for key, value in snapshots[2].items():
        if snapshots[1][key].shape == value.shape:
            assert not torch.equal(value, snapshots[1][key]), key
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_removal_happens_at_the_last_epoch_even_off_the_cadence(tmp_path):
    _, model, callback = train_with_callback(
        tmp_path, model=planted_mlp(), max_epochs=2, prune_every_n_epochs=7, reg_max=0.0, noise_std=0.0
    )
    assert [event.epoch for event in callback.events] == [1]
    assert {1, 8}.isdisjoint(callback.kept_units["net.0"])


def test_training_stopped_by_max_steps_gets_the_final_check(tmp_path):
    _, model, callback = train_with_callback(
        tmp_path,
        model=planted_mlp(),
        max_epochs=5,
        prune_every_n_epochs=5,
        reg_max=0.0,
        noise_std=0.0,
        trainer_kwargs={"max_steps": 9},
    )
    assert callback.ledger.last_check_step == 9
    assert {1, 8}.isdisjoint(callback.kept_units["net.0"])


def test_train_forwards_mode_observes_training_batches(tmp_path):
    _, model, callback = train_with_callback(
        tmp_path, model=planted_mlp(), max_epochs=1, check_mode="train_forwards", reg_max=0.0, noise_std=0.0
    )
    assert {1, 8}.isdisjoint(callback.kept_units["net.0"])
    assert model.net[0].out_features < 12


def test_logged_keys_reach_a_csv_logger(tmp_path):
    trainer, model, callback = train_with_callback(
        tmp_path, model=planted_mlp(), max_epochs=2, reg_max=1e-3, noise_std=1e-4, schedule="constant"
    )
    with open(trainer.logger.experiment.metrics_file_path) as handle:
        columns = set(next(csv.reader(handle)))
    expected = {
        "demp/reg_strength",
        "demp/noise_std",
        "demp/units/net.0",
        "demp/units/net.2",
        "demp/units_kept_frac",
        "demp/units_removed_frac",
        "demp/params",
        "demp/params_removed_frac",
        "demp/flops_per_sample",
        "demp/flops_kept_frac",
    }
    assert expected <= columns
    assert trainer.callback_metrics["demp/params"].item() == sum(p.numel() for p in model.parameters())
    assert 0 < trainer.callback_metrics["demp/params_removed_frac"].item() < 1
    assert model.flops_per_batch == pytest.approx(3 * trainer.callback_metrics["demp/flops_per_sample"].item() * 32)


def test_logged_strengths_follow_the_one_cycle_schedule(tmp_path):
    trainer, _, _ = train_with_callback(tmp_path, max_epochs=2, reg_max=0.5, noise_std=1e-3, schedule_span=1.0)
    rows = list(csv.DictReader(open(trainer.logger.experiment.metrics_file_path)))
    logged = {int(r["step"]): float(r["demp/reg_strength"]) for r in rows if r.get("demp/reg_strength")}
    schedule = OneCycleSchedule(0.5, span_steps=12)  # 6 batches x 2 epochs
    assert logged  # logged every step
    for step, value in logged.items():
        assert value == pytest.approx(schedule.value(step)), step


def test_strengths_are_logged_only_on_the_steps_the_loggers_write(tmp_path, monkeypatch):
    calls: list[str] = []
    original = pl.LightningModule.log

    def counting_log(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", counting_log)
    trainer, _, _ = train_with_callback(
        tmp_path, max_epochs=2, reg_max=0.5, noise_std=1e-3, schedule_span=1.0, trainer_kwargs={"log_every_n_steps": 4}
    )
    rows = list(csv.DictReader(open(trainer.logger.experiment.metrics_file_path)))
    logged = {int(r["step"]): float(r["demp/reg_strength"]) for r in rows if r.get("demp/reg_strength")}
    schedule = OneCycleSchedule(0.5, span_steps=12)  # 6 batches x 2 epochs
    assert sorted(logged) == [3, 7, 11]  # the logger's steps: every 4th batch
    for step, value in logged.items():
        assert value == pytest.approx(schedule.value(step)), step
    assert calls.count("demp/reg_strength") == 3  # not once per step: each call costs about a millisecond


def test_noise_is_reproducible_from_the_seed_and_changes_the_weights(tmp_path):
    def final_weights(seed, noise_std):
        torch.manual_seed(0)
        _, model, _ = train_with_callback(
            tmp_path, max_epochs=1, reg_max=0.0, noise_std=noise_std, seed=seed, schedule="constant"
        )
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(final_weights(1, 1e-2), final_weights(1, 1e-2))
    assert not torch.equal(final_weights(1, 1e-2), final_weights(2, 1e-2))
    assert not torch.equal(final_weights(1, 1e-2), final_weights(1, 0.0))


def test_regularization_shrinks_positive_weights(tmp_path):
    def positive_mass(reg_max):
        torch.manual_seed(0)
        model = small_mlp(optimizer="sgd", lr=1e-2)
        _, model, _ = train_with_callback(
            tmp_path,
            model=model,
            max_epochs=1,
            reg_max=reg_max,
            noise_std=0.0,
            schedule="constant",
            live_floor=0.0,
            max_death_fraction=1.0,  # the paper's pull
        )
        return sum(p.detach().clamp(min=0).sum().item() for p in model.parameters())

    assert positive_mass(20.0) < 0.5 * positive_mass(0.0)


def test_l1_norm_scale_on_a_model_without_normalization_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="has no affine normalization layer. Use `regularizer='positive_l2'`"):
        train_with_callback(tmp_path, regularizer="l1_norm_scale", reg_max=0.1)


def test_exclusion_patterns_that_match_nothing_warn(tmp_path):
    with pytest.warns(UserWarning, match=r"the patterns \['encoder\.\*'\] match no module"):
        train_with_callback(tmp_path, max_epochs=1, exclude=["encoder.*", "net.0"])


def test_excluded_layers_keep_their_units(tmp_path):
    _, model, _ = train_with_callback(
        tmp_path, model=planted_mlp(), max_epochs=1, exclude=["net.0"], reg_max=0.0, noise_std=0.0
    )
    assert model.net[0].out_features == 12
    assert model.net[2].out_features < 10


def test_min_units_is_never_crossed_and_warns(tmp_path):
    model = small_mlp()
    kill_linear_units_(model.net[0], list(range(12)))
    with pytest.warns(UserWarning, match="keeping `min_units=3`"):
        train_with_callback(tmp_path, model=model, max_epochs=1, min_units=3, reg_max=0.0, noise_std=0.0)
    assert model.net[0].out_features == 3


def test_nan_activations_skip_the_decision(tmp_path):
    model = planted_mlp()

    class NaNOnCheck(DemonPruning):
        def forward_for_check(self, pl_module, batch):
            return pl_module(torch.full_like(batch[0], math.nan))

    callback = NaNOnCheck(regularizer="positive_l2", reg_max=0.0, noise_std=0.0, verbose=False)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback])
    with pytest.warns(UserWarning, match="non-finite activations"):
        trainer.fit(model, datamodule=RandomDataModule())
    assert model.net[0].out_features == 12


def test_a_model_where_nothing_dies_trains_without_removal(tmp_path):
    model = make_alive_(small_mlp())
    with torch.no_grad():
        for layer in (model.net[0], model.net[2]):
            layer.weight.abs_()
            layer.bias.fill_(100.0)  # every unit is positive on every input
    _, model, callback = train_with_callback(tmp_path, model=model, max_epochs=1, reg_max=0.0, noise_std=0.0)
    assert callback.events == []
    assert model.net[0].out_features == 12


def test_hooks_are_removed_when_training_raises(tmp_path):
    model = planted_mlp()

    class Boom(Exception):
        pass

    class RaiseMidEpoch(DemonPruning):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 5:
                raise Boom

    callback = RaiseMidEpoch(regularizer="positive_l2", check_mode="train_forwards", check_batches=3, verbose=False)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback])
    with pytest.raises(Boom):
        trainer.fit(model, datamodule=RandomDataModule())
    assert not any(module._forward_pre_hooks for module in model.modules())
    assert not trainer.optimizers[0]._optimizer_step_post_hooks


def test_callback_state_is_plain_types(tmp_path):
    _, _, callback = train_with_callback(tmp_path, model=planted_mlp(), max_epochs=1, reg_max=0.0, noise_std=0.0)
    state = callback.state_dict()

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (int, float, str, bool))

    assert plain(state)
    restored = DemonPruning(regularizer="positive_l2")
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_models_without_example_input_are_traced_from_the_first_batch(tmp_path):
    model = planted_mlp()
    model.example_input_array = None
    _, model, callback = train_with_callback(tmp_path, model=model, max_epochs=1, reg_max=0.0, noise_std=0.0)
    assert {1, 8}.isdisjoint(callback.kept_units["net.0"])


def test_batches_without_a_recognisable_input_get_a_clear_error():
    with pytest.raises(TypeError, match="override `DemonPruning.batch_to_input"):
        DemonPruning().batch_to_input(SimpleNamespace(image=torch.zeros(1)))  # dicts are keyword arguments now

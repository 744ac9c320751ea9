"""Sparsity targets: λ/σ steered by feedback, no removal past the target, opt-in forcing to meet it exactly."""

from __future__ import annotations

import pytest
import torch

from helpers.lightning import small_mlp, train_with_callback
from helpers.models import kill_linear_units_, make_alive_
from lightning_demp import DemonPruning
from lightning_demp.target import StrengthController, limit_plan_to_target, planned_sparsity


def test_ramp_is_cubic_and_reaches_the_target_at_the_end_of_the_span():
    assert planned_sparsity(0.0, 0.8) == 0.0
    assert planned_sparsity(1.0, 0.8) == pytest.approx(0.8)
    assert planned_sparsity(2.0, 0.8) == pytest.approx(0.8)
    assert planned_sparsity(1 / 3, 0.8) == pytest.approx(0.8 * (1 - (2 / 3) ** 3))


def test_controller_strengthens_when_behind_weakens_when_ahead_and_stops_at_the_target():
    controller = StrengthController(target=0.5)
    behind = controller.update(measured=0.1, planned=0.3)
    assert behind > 1.0
    ahead = controller.update(measured=0.35, planned=0.3)
    assert ahead < behind
    assert controller.update(measured=0.55, planned=0.4) == controller.min_scale


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_sparsity": 1.0}, r"Expected `target_sparsity` to be a number in \(0.0, 0.999\], got 1.0"),
        ({"target_sparsity": 0.0}, r"Expected `target_sparsity` to be a number in \(0.0, 0.999\], got 0.0"),
        (
            {"target_metric": "weights"},
            r"Expected `target_metric` to be one of \('params', 'flops', 'units'\), got 'weights'",
        ),
    ],
)
def test_target_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DemonPruning(**kwargs)


def test_removal_stops_once_the_target_is_reached(tmp_path):
    model = make_alive_(small_mlp(hidden_sizes=[24, 24]))
    kill_linear_units_(model.net[0], list(range(18)))  # 75 % of the first layer is dead from the start
    _, model, callback = train_with_callback(
        tmp_path, model=model, max_epochs=3, reg_max=0.0, noise_std=0.0, target_sparsity=0.2, target_metric="units"
    )
    first = callback.events[0]
    assert first.reason == "dead"
    assert len(callback.events) == 1  # nothing more after the target was passed by that one event
    assert callback.measured_sparsity(model) >= 0.2
    assert callback.strength_scale == pytest.approx(1e-3)  # λ and σ turned down


def test_force_target_meets_the_target_with_the_least_active_units(tmp_path):
    model = make_alive_(small_mlp(hidden_sizes=[24, 24]))
    with torch.no_grad():
        model.net[0].weight[:4] *= 0.01  # four weak units: the first ones to go
    _, model, callback = train_with_callback(
        tmp_path,
        model=model,
        max_epochs=2,
        reg_max=0.0,
        noise_std=0.0,
        target_sparsity=0.3,
        target_metric="units",
        force_target=True,
    )
    measured = callback.measured_sparsity(model)
    assert 0.3 <= measured <= 0.3 + 1 / 48 + 1e-9  # one unit past at most
    assert all(event.reason == "force_target" for event in callback.events)
    assert {0, 1, 2, 3}.isdisjoint(callback.kept_units["net.0"])


def test_the_strength_scale_multiplies_the_logged_lambda_and_is_saved(tmp_path):
    trainer, _, callback = train_with_callback(
        tmp_path, max_epochs=2, reg_max=0.5, noise_std=0.0, schedule="constant", target_sparsity=0.9
    )
    assert callback.strength_scale != 1.0  # behind plan: steered up
    assert trainer.callback_metrics["demp/strength_scale"].item() == pytest.approx(callback.strength_scale)
    restored = DemonPruning(regularizer="positive_l2", target_sparsity=0.9)
    restored.load_state_dict(callback.state_dict())
    assert restored.strength_scale == callback.strength_scale
    assert restored.pruner.target is not None
    assert restored.pruner.target.controller.scale == callback.strength_scale


@pytest.mark.parametrize("metric", ["params", "units"])
def test_one_event_never_passes_the_target_by_more_than_one_unit(tmp_path, metric):
    model = make_alive_(small_mlp(hidden_sizes=[24, 24]))
    kill_linear_units_(model.net[0], list(range(18)))  # 18 dead units: far more than a 20 % target needs
    _, model, callback = train_with_callback(
        tmp_path, model=model, max_epochs=2, reg_max=0.0, noise_std=0.0, target_sparsity=0.2, target_metric=metric
    )
    reached = callback.measured_sparsity(model)
    removed = 24 - len(callback.kept_units["net.0"])
    assert 0 < removed < 18  # only part of the dead units went; the others stay, dead and harmless
    assert reached >= 0.2
    worth_of_one_unit = reached / removed  # every unit of `net.0` carries the same parameters
    assert reached - worth_of_one_unit < 0.2  # one unit fewer would have fallen short


def test_limit_plan_to_target_keeps_whole_plans_that_stay_below_the_target():
    plan = {"a": torch.tensor([1, 3])}
    assert limit_plan_to_target(plan, lambda p: 0.1, 0.5) == plan


def test_the_strength_rises_by_bounded_steps_while_units_are_slow_to_die():
    # Death lags the strength by some epochs: an unbounded controller winds up meanwhile and kills the network.
    controller = StrengthController(target=0.8)
    scales = [controller.update(measured=0.0, planned=planned) for planned in (0.2, 0.4, 0.5, 0.6, 0.7, 0.75)]
    steps = [after / before for before, after in zip([1.0, *scales], scales)]
    assert all(step <= controller.max_step + 1e-9 for step in steps)
    assert max(scales) == pytest.approx(controller.max_scale)  # held at the cap: λ at most 4x `reg_max`

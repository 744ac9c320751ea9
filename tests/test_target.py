"""Sparsity targets: λ/σ steered by feedback, no removal past the target, opt-in forcing to meet it exactly."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.lightning import small_mlp, train_with_callback
from helpers.models import kill_linear_units_, make_alive_
from lightning_demp import DemonPruning
from lightning_demp.target import RAMP_START, StrengthController, limit_plan_to_target, planned_sparsity


def test_ramp_is_cubic_and_reaches_the_target_at_the_end_of_the_span():
    assert planned_sparsity(0.0, 0.8) == 0.0
    assert planned_sparsity(1.0, 0.8) == pytest.approx(0.8)
    assert planned_sparsity(2.0, 0.8) == pytest.approx(0.8)
    third = RAMP_START + (1 - RAMP_START) / 3
    assert planned_sparsity(third, 0.8) == pytest.approx(0.8 * (1 - (2 / 3) ** 3))
    assert planned_sparsity(RAMP_START, 0.8) == 0.0  # nothing is planned before the ramp starts


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


def test_a_target_that_death_does_not_reach_is_met_by_removing_the_least_important_units(tmp_path):
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
    assert {event.reason for event in callback.events} <= {"shortfall", "force_target"}  # nothing died: reg_max=0
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
    assert max(scales) == pytest.approx(1.5**6)  # no cap reached yet: each event's factor alone bounds the rise


def test_a_target_death_cannot_reach_is_closed_in_steps_late_in_the_schedule_not_at_the_last_one(tmp_path):
    model = make_alive_(small_mlp(hidden_sizes=[24, 24]))
    trainer, model, callback = train_with_callback(
        tmp_path, model=model, max_epochs=8, reg_max=0.0, noise_std=0.0, target_sparsity=0.5, verbose=True
    )
    span = callback.pruner.pressure.span_steps
    shortfalls = [event for event in callback.events if event.reason == "shortfall"]
    assert len({event.step for event in shortfalls}) >= 2  # closed over several events ...
    assert all(event.step >= 0.5 * span for event in shortfalls)  # ... in the late schedule only
    assert shortfalls[0].step < trainer.global_step  # not only at the end
    assert callback.measured_sparsity(model) == pytest.approx(0.5, abs=0.02)
    for name, kept in callback.kept_units.items():  # no layer below its live floor
        assert len(kept) >= math.ceil(0.05 * 24), name


def test_the_shortfall_removes_the_least_important_units_and_keeps_the_floor():
    from lightning_demp.ledger import PruningLedger
    from lightning_demp.target import SparsityTarget
    from lightning_demp.units import ReaderSlice, ReaderStats, UnitGroup

    reader = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        reader.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    group = UnitGroup("fc1", 4, readers=[ReaderSlice("fc2", torch.arange(4), torch.arange(4))])
    stats = {"fc2": ReaderStats(torch.tensor([4.0, 0.5, 2.0, 1.0]), 8)}
    ledger = PruningLedger(initial_widths={"fc1": 4}, kept_units={"fc1": [0, 1, 2, 3]})
    part = SparsityTarget(0.9, "units", force=False)
    plan = part.shortfall([group], stats, {"fc2": reader}, ledger, None, goal=0.5, floors={"fc1": 1})
    assert plan.units["fc1"].tolist() == [1, 3]  # the two smallest contributions
    plan = part.shortfall([group], stats, {"fc2": reader}, ledger, None, goal=0.9, floors={"fc1": 2})
    assert plan.units["fc1"].tolist() == [1, 3]  # the floor stops it short of the goal


def test_the_controller_goes_past_four_times_reg_max_when_the_model_needs_it():
    controller = StrengthController(target=0.9)
    scales = [controller.update(measured=0.0, planned=0.9) for _ in range(20)]
    assert max(scales) > 4.0
    assert max(scales) == pytest.approx(controller.max_scale)

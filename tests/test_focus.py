"""A focused target: the pull and the noise act only on the least important live units the target still needs."""

from __future__ import annotations

import math

import torch
from torch import nn

from helpers.models import make_alive_
from lightning_demp import DemonPruner, PruningConfig
from lightning_demp.target import unit_importance


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return make_alive_(nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)))


def test_a_focus_pulls_and_shakes_only_the_chosen_units():
    model = _model()
    pruner = DemonPruner(PruningConfig(regularizer="l2", reg_max=0.5, noise_std=1e-2, schedule="constant"))
    pruner.prepare(model, torch.randn(2, 6), total_steps=10)
    pruner.pressure.focus_on({"0": [1, 4], "2": []})
    for param in model.parameters():  # every entry is live (a non-zero loss gradient)
        param.grad = torch.ones_like(param)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pruner.regularize_(torch.optim.SGD(model.parameters(), lr=0.0), model, step=0)
    penalty = {name: p.grad - 1.0 for name, p in model.named_parameters()}
    pruner.add_noise_()
    noise = {name: p.detach() - before[name] for name, p in model.named_parameters()}

    chosen = torch.zeros(10, dtype=torch.bool)
    chosen[[1, 4]] = True
    for name in ("0.weight", "0.bias"):
        assert torch.allclose(penalty[name][chosen], 0.5 * before[name][chosen])  # λ·θ on the chosen rows
        assert torch.equal(penalty[name][~chosen], torch.zeros_like(penalty[name][~chosen]))
        assert bool((noise[name][chosen] != 0).all()) and bool((noise[name][~chosen] == 0).all())
    for name in ("2.weight", "2.bias", "4.weight", "4.bias"):  # no unit chosen, or not a group (the output)
        assert not penalty[name].any() and not noise[name].any(), name

    pruner.pressure.focus_on(None)  # no focus (no target, or target_focus=False): every unit, every parameter
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    pruner.regularize_(torch.optim.SGD(model.parameters(), lr=0.0), model, step=0)
    assert all(bool((p.grad != 1.0).any()) for p in model.parameters())


def test_with_a_target_the_pull_is_on_the_least_important_units_the_target_still_needs():
    model = _model()
    config = PruningConfig(regularizer="l2", target_sparsity=0.25, target_metric="units", live_floor=0.0)
    pruner = DemonPruner(config)
    pruner.prepare(model, torch.randn(2, 6), total_steps=100)
    pruner.remember_batch((torch.randn(64, 6), None))
    assert pruner.pressure.focus == {}  # nothing is pulled before the target's ramp starts ...
    stats = pruner.statistics(model)
    assert pruner.removal_event(model, [], stats, step=10, epoch=0) is None  # every unit is alive
    assert pruner.pressure.focus == {}  # ... at 11 % of the 90-step span
    assert pruner.removal_event(model, [], stats, step=30, epoch=0) is None  # 33 %: past RAMP_START
    focus = pruner.pressure.focus
    assert focus is not None
    assert sum(len(units) for units in focus.values()) == math.ceil(0.25 * 18)  # what the target still needs
    modules = dict(model.named_modules())
    for group in pruner.graph.groups():
        importance = unit_importance(group, stats, modules)
        chosen = torch.tensor([i in focus.get(group.name, []) for i in range(group.num_units)])
        if chosen.any() and (~chosen).any():  # within a layer, every chosen unit matters less than every other
            assert importance[chosen].max() <= importance[~chosen].min()


def test_without_target_focus_every_unit_is_pulled_on_the_way_to_a_target():
    model = _model()
    config = PruningConfig(regularizer="l2", target_sparsity=0.25, target_metric="units", target_focus=False)
    pruner = DemonPruner(config)
    pruner.prepare(model, torch.randn(2, 6), total_steps=100)
    pruner.remember_batch((torch.randn(64, 6), None))
    pruner.removal_event(model, [], step=30, epoch=0)
    assert pruner.pressure.focus is None

"""The live floor: a layer's regularization and noise fade as it empties, so no layer dies wholesale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.lightning import RandomDataModule, small_mlp, train_with_callback
from lightning_demp import DemonPruner, PruningConfig
from lightning_demp.regularization import live_fraction_multiplier


def _pruner_with_grads(live_first: int, live_second: int, **settings) -> tuple[DemonPruner, nn.Sequential]:
    """A 6-20-20-3 MLP whose two hidden layers have ``live_first`` and ``live_second`` units with a gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    pruner = DemonPruner(PruningConfig(regularizer="l2", schedule="constant", **settings))
    pruner.prepare(model, torch.randn(2, 6), total_steps=10)
    for layer, live in ((model[0], live_first), (model[2], live_second), (model[4], 3)):
        for param in layer.parameters():
            param.grad = torch.zeros_like(param)
            param.grad[:live] = 1.0  # rows with a gradient: the units alive on this batch
    return pruner, model


def test_the_pressure_on_a_layer_is_its_live_share_above_the_floor():
    pruner, model = _pruner_with_grads(live_first=20, live_second=11, reg_max=0.5, noise_std=0.0, live_floor=0.1)
    grads_before = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner.regularize_(optimizer, model, step=0)
    added = {name: p.grad - grads_before[name] for name, p in model.named_parameters()}
    torch.testing.assert_close(added["0.weight"], 0.5 * model[0].weight)  # a whole layer: full pressure
    share = (11 / 20 - 0.1) / (1 - 0.1)
    torch.testing.assert_close(added["2.weight"], 0.5 * share * model[2].weight)  # 55 % alive: half of it, about
    torch.testing.assert_close(added["4.weight"], 0.5 * model[4].weight)  # the output layer is no group: full


def test_a_layer_at_its_floor_gets_neither_regularization_nor_noise():
    pruner, model = _pruner_with_grads(live_first=20, live_second=2, reg_max=0.5, noise_std=0.1, live_floor=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner.regularize_(optimizer, model, step=0)
    optimizer.step()
    pruner.add_noise_()
    torch.testing.assert_close(model[2].weight.grad, grads["2.weight"])  # no penalty at 10 % alive
    torch.testing.assert_close(model[2].weight.detach(), before["2.weight"])  # no noise either
    assert not torch.equal(model[0].weight.detach(), before["0.weight"])  # the full layer got its noise


def test_without_a_floor_every_layer_gets_the_papers_full_pressure():
    pruner, model = _pruner_with_grads(live_first=20, live_second=2, reg_max=0.5, noise_std=0.0, live_floor=0.0)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    pruner.regularize_(torch.optim.SGD(model.parameters(), lr=0.0), model, step=0)
    torch.testing.assert_close(model[2].weight.grad - grads["2.weight"], 0.5 * model[2].weight)


@pytest.mark.parametrize(("fraction", "expected"), [(1.0, 1.0), (0.55, 0.5), (0.1, 0.0), (0.0, 0.0)])
def test_the_share_falls_linearly_from_a_whole_layer_to_none_at_the_floor(fraction, expected):
    assert live_fraction_multiplier(fraction, 0.1) == pytest.approx(expected)


def test_a_bad_floor_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="live_floor"):
        PruningConfig(live_floor=0.7)


def test_with_the_floor_a_huge_reg_max_shrinks_the_network_without_killing_a_layer(tmp_path):
    runs = {}
    for floor in (0.0, 0.1):
        torch.manual_seed(0)
        model = small_mlp(hidden_sizes=[64, 64], lr=3e-3)
        _, _, callback = train_with_callback(
            tmp_path / str(floor),
            model=model,
            max_epochs=4,
            reg_max=30.0,
            noise_std=1e-3,
            live_floor=floor,
            datamodule=RandomDataModule(size=512),
        )
        runs[floor] = min(len(kept) / 64 for kept in callback.kept_units.values())
    assert runs[0.0] < 0.05  # the paper's pressure: a layer dies down to min_units
    assert runs[0.1] >= 0.1  # with the floor every layer keeps at least its floor

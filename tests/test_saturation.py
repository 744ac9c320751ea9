"""Saturated units: constant units are removed with their contribution folded into the readers; outputs kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.lightning import RandomDataModule, quiet_trainer
from lightning_demp import DemonPruning
from lightning_demp.demos import DemoClassifier
from lightning_demp.detection import ActivationMonitor, dead_check
from lightning_demp.graph import PrunableGraph
from lightning_demp.removal import remove_units_
from lightning_demp.resize import layer_widths
from lightning_demp.saturation import constant_units, fold_constant_inputs_, folds_for


def remove_constant_(model: nn.Module, inputs: torch.Tensor, tolerance: float = 1e-6) -> dict[str, int]:
    graph = PrunableGraph(model, inputs[:2])
    stats = dead_check(model, ActivationMonitor(graph.readers(), track_range=True), [inputs], lambda m, b: m(b))
    modules = dict(model.named_modules())
    groups = graph.groups()
    plan = {g.name: constant_units(g, stats, modules, tolerance) for g in groups if g.blocked is None}
    plan = {name: units for name, units in plan.items() if len(units)}
    for fold in folds_for(groups, stats, plan):
        fold_constant_inputs_(modules[fold.reader], fold, graph.norm_after(fold.reader))
    remove_units_(graph, plan)
    return {name: len(units) for name, units in plan.items()}


def saturate_(layer: nn.Linear, units: list[int], values: list[float]) -> None:
    with torch.no_grad():
        layer.weight[units] = 0.0
        layer.bias[units] = torch.tensor(values)


@pytest.mark.parametrize("activation", [nn.GELU(), nn.SiLU(), nn.Tanh(), nn.Sigmoid()], ids=lambda a: type(a).__name__)
def test_constant_units_are_folded_into_the_reader_bias_for_each_activation(activation):
    model = nn.Sequential(nn.Linear(4, 6), activation, nn.Linear(6, 3))
    saturate_(model[0], [1, 4], [3.0, -2.5])
    x = torch.randn(32, 4)
    model.eval()
    before = model(x)
    assert remove_constant_(model, x) == {"0": 2}
    assert layer_widths(model) == {"0": 4, "2": 3}
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_before_a_batchnorm_the_constant_goes_into_its_running_mean():
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)
    )
    with torch.no_grad():
        model[3].running_mean.uniform_(-1, 1)
        model[3].running_var.uniform_(0.5, 2)
    saturate_(model[0], [0, 2], [1.5, -0.75])
    x = torch.randn(32, 4)
    model.eval()
    before = model(x)
    remove_constant_(model, x)
    assert model[2].bias is None  # folded into the BatchNorm, no bias created
    assert model[0].out_features == 4
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_a_missing_bias_is_created():
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3, bias=False))
    saturate_(model[0], [5], [0.3])
    x = torch.randn(16, 4)
    model.eval()
    before = model(x)
    remove_constant_(model, x)
    assert isinstance(model[2].bias, nn.Parameter)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_units_read_by_a_padded_convolution_are_not_folded():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 3, padding=1))
    with torch.no_grad():
        model[0].weight[1] = 0.0
    graph = PrunableGraph(model, torch.randn(2, 2, 8))
    stats = dead_check(
        model, ActivationMonitor(graph.readers(), track_range=True), [torch.randn(8, 2, 8)], lambda m, b: m(b)
    )
    group = next(g for g in graph.groups() if g.name == "0")
    assert constant_units(group, stats, dict(model.named_modules()), 1e-6).tolist() == []


class GeluMLP(DemoClassifier):
    def __init__(self) -> None:
        super().__init__(num_classes=3, optimizer="adam", lr_schedule="constant", weight_decay=0.0)
        self.net = nn.Sequential(
            nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 10, bias=False), nn.GELU(), nn.Linear(10, 3)
        )
        self.example_input_array = torch.zeros(2, 6)
        with torch.no_grad():
            self.net[0].weight[[2, 7]] = 0.0
            self.net[0].bias[[2, 7]] = torch.tensor([4.0, -3.0])
        self.net[0].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([2, 7]), 0.0))  # stay saturated


def test_the_callback_removes_saturated_units_and_trains_a_created_bias(tmp_path):
    model = GeluMLP()
    callback = DemonPruning(
        regularizer="positive_l2", reg_max=0.0, noise_std=0.0, saturation_tolerance=1e-6, verbose=False, plot=False
    )
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    trainer.fit(model, datamodule=RandomDataModule())
    assert {2, 7}.isdisjoint(callback.kept_units["net.0"])
    assert isinstance(model.net[2].bias, nn.Parameter)
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert model.net[2].bias in trainer.optimizers[0].state  # it trained after being created


def test_transformer_mlp_units_are_pruned_and_attention_and_the_residual_width_are_left_alone():
    from lightning_demp.demos import TransformerClassifier

    model = TransformerClassifier(dim=16, depth=2, heads=2, hidden=32)
    block = model.blocks[0]
    saturate_(block.fc1, [3, 9, 20], [2.0, -10.0, 0.5])  # GELU of a constant: a constant unit
    x = torch.randn(16, 40)
    model.eval()
    before = model(x)
    removed = remove_constant_(model, x)
    assert removed == {"blocks.0.fc1": 3}
    assert block.fc1.out_features == block.fc2.in_features == 29
    assert block.attn.qkv.in_features == block.attn.proj.out_features == 16 and block.attn.heads == 2
    assert model.embed.out_features == 16  # residual width untouched
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)

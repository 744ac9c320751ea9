"""Physical removal: outputs unchanged after removing dead units, on every supported pattern."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.models import (
    MLP,
    ConvBN,
    FunctionalMLP,
    ResidualCNN,
    ResidualMLP,
    kill_bn_units_,
    kill_linear_units_,
    make_alive_,
    randomize_bn_,
)
from lightning_demp.detection import ActivationMonitor, dead_check, find_dead_units, unit_activity
from lightning_demp.graph import PrunableGraph, TracingError
from lightning_demp.removal import remove_units_
from lightning_demp.resize import layer_widths, resize_like_


def remove_dead_(model: nn.Module, inputs: torch.Tensor) -> dict[str, int]:
    graph = PrunableGraph(model, inputs[:2])
    stats = dead_check(model, ActivationMonitor(graph.readers()), [inputs], lambda m, b: m(b))
    plan = {}
    for group in graph.groups():
        if group.blocked is None:
            readers = [(stats[r.reader].max_abs, r.feature_idxs, r.unit_idxs) for r in group.readers]
            dead = find_dead_units(unit_activity(group.num_units, readers))
            if len(dead):
                plan[group.name] = dead
    remove_units_(graph, plan)
    return {name: len(idxs) for name, idxs in plan.items()}


def planted_mlp():
    model = make_alive_(MLP())
    kill_linear_units_(model.fc1, [0, 5])
    kill_linear_units_(model.fc2, [9])
    return model, torch.randn(64, 6), {"fc1": 10, "fc2": 9, "fc3": 3}


def planted_functional():
    model = make_alive_(FunctionalMLP())
    kill_linear_units_(model.fc1, [1, 2, 3])
    return model, torch.randn(64, 6), {"fc1": 9, "fc2": 3}


def planted_conv_bn_flatten():
    model = ConvBN()
    randomize_bn_(model)
    kill_bn_units_(model.bn1, [0, 7])
    kill_bn_units_(model.bn2, [2])
    return model, torch.randn(64, 3, 8, 8), {"conv1": 6, "conv2": 5, "fc": 5}


def planted_residual_mlp():
    model = make_alive_(ResidualMLP())
    kill_linear_units_(model.fc_in, [5])
    kill_linear_units_(model.fc_b, [5])
    kill_linear_units_(model.fc_a, [0, 1])
    return model, torch.randn(64, 5), {"fc_in": 7, "fc_a": 5, "fc_b": 7, "head": 2}


def planted_residual_cnn():
    model = ResidualCNN()
    randomize_bn_(model)
    kill_bn_units_(model.stem_bn, [3])
    kill_bn_units_(model.bn2, [3], shift=-5.0)
    kill_bn_units_(model.bn1, [1, 4])
    kill_bn_units_(model.down_bn, [0, 11])
    return model, torch.randn(64, 1, 16), {"stem": 5, "conv1": 4, "conv2": 5, "down": 10, "head": 4}


@pytest.mark.parametrize(
    "build",
    [planted_mlp, planted_functional, planted_conv_bn_flatten, planted_residual_mlp, planted_residual_cnn],
    ids=["mlp", "functional-relu", "conv-bn-flatten-linear", "residual-linear", "residual-cnn"],
)
def test_removing_dead_units_preserves_outputs_and_shrinks_every_dependent_layer(build):
    model, inputs, expected_widths = build()
    model.eval()
    before = model(inputs)
    remove_dead_(model, inputs)
    after = model(inputs)
    assert layer_widths(model) == expected_widths
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for module in model.modules():  # size attributes agree with the tensors
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.num_features == module.weight.shape[0] == module.running_mean.shape[0]
        if isinstance(module, nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)


def test_repeated_removals_on_one_graph_stay_function_preserving():
    model, inputs, _ = planted_conv_bn_flatten()
    model.eval()
    graph = PrunableGraph(model, inputs[:2])
    reference = model(inputs)
    for units in ([0], [3, 4]):
        group = next(g for g in graph.groups() if g.name == "conv1")
        kill_bn_units_(model.bn1, units)
        reference = model(inputs)
        remove_units_(graph, {group.name: torch.tensor(units)})
        torch.testing.assert_close(model(inputs), reference, rtol=1e-5, atol=1e-5)
    assert layer_widths(model)["conv1"] == 5


def test_output_layer_and_excluded_layers_are_blocked():
    graph = PrunableGraph(MLP(), torch.randn(2, 6), exclude=["fc2"])
    blocked = {group.name: group.blocked for group in graph.groups()}
    assert "produces the model output" in blocked["fc3"]
    assert "excluded" in blocked["fc2"]
    assert blocked["fc1"] is None
    assert graph.output_layers == ["fc3"]


class HeadNotLast(nn.Module):
    """The classifier is registered first, the feature layers after it."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(8, 3)
        self.features = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.features(x)))


def test_output_layer_is_found_by_the_graph_not_by_registration_order():
    graph = PrunableGraph(HeadNotLast(), torch.randn(2, 4))
    assert graph.output_layers == ["classifier"]


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 6)
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.norm(self.fc1(x))))))


def test_units_coupled_with_a_layernorm_are_blocked_and_the_rest_is_prunable():
    groups = {group.name: group for group in PrunableGraph(LayerNormMLP(), torch.randn(2, 4)).groups()}
    assert "LayerNorm" in groups["fc1"].blocked
    assert groups["fc2"].blocked is None


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_tracing_failure_names_the_model_and_keeps_the_cause():
    with pytest.raises(TracingError, match="could not trace `Untraceable`") as info:
        PrunableGraph(Untraceable(), torch.randn(1, 3))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_frozen_parameters_stay_frozen_after_removal():
    model, inputs, _ = planted_mlp()
    model.fc2.weight.requires_grad_(False)
    remove_dead_(model, inputs)
    assert not model.fc2.weight.requires_grad
    assert model.fc1.weight.requires_grad


def test_resize_like_lets_a_fresh_model_load_a_pruned_state_dict():
    pruned, inputs, _ = planted_residual_cnn()
    remove_dead_(pruned, inputs)
    fresh = ResidualCNN()
    resize_like_(fresh, pruned.state_dict())
    fresh.load_state_dict(pruned.state_dict())
    pruned.eval()
    fresh.eval()
    assert layer_widths(fresh) == layer_widths(pruned)
    torch.testing.assert_close(fresh(inputs), pruned(inputs))

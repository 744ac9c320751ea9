"""Dead-unit detection at the readers' inputs: planted dead units are found, live ones are not."""

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
from lightning_demp.detection import ActivationMonitor, UnitActivity, dead_check, find_dead_units, unit_activity
from lightning_demp.graph import PrunableGraph


def dead_units_by_group(model: nn.Module, inputs: torch.Tensor, threshold: float = 0.0) -> dict[str, list[int]]:
    graph = PrunableGraph(model, inputs[:2])
    monitor = ActivationMonitor(graph.readers())
    stats = dead_check(model, monitor, [inputs[:32], inputs[32:]], lambda m, b: m(b))
    result = {}
    for group in graph.groups():
        if group.blocked is None:
            readers = [(stats[r.reader].max_abs, r.feature_idxs, r.unit_idxs) for r in group.readers]
            result[group.name] = find_dead_units(unit_activity(group.num_units, readers), threshold).tolist()
    return result


def test_linear_units_with_relu_module_are_found_dead_and_others_live():
    model = make_alive_(MLP())
    kill_linear_units_(model.fc1, [2, 7])
    kill_linear_units_(model.fc2, [0])
    assert dead_units_by_group(model, torch.randn(64, 6)) == {"fc1": [2, 7], "fc2": [0]}


def test_functional_relu_is_seen_at_the_reader_input():
    model = make_alive_(FunctionalMLP())
    kill_linear_units_(model.fc1, [4])
    assert dead_units_by_group(model, torch.randn(64, 6)) == {"fc1": [4]}


def test_conv_bn_channels_are_found_through_flatten():
    model = ConvBN()
    randomize_bn_(model)
    kill_bn_units_(model.bn1, [1, 5])
    kill_bn_units_(model.bn2, [3])
    assert dead_units_by_group(model, torch.randn(64, 3, 8, 8)) == {"conv1": [1, 5], "conv2": [3]}


def test_residual_unit_is_dead_only_if_dead_wherever_it_is_read():
    model = make_alive_(ResidualMLP())
    # Unit 3 of the stream: dead after fc_in, but fc_b adds a positive value before the final ReLU -> alive.
    kill_linear_units_(model.fc_in, [3])
    with torch.no_grad():
        model.fc_b.weight[3] = 0.0
        model.fc_b.bias[3] = 1.0
    # Unit 5 of the stream: dead on both sides of the sum -> dead.
    kill_linear_units_(model.fc_in, [5])
    kill_linear_units_(model.fc_b, [5])
    dead = dead_units_by_group(model, torch.randn(64, 5))
    stream = next(name for name in dead if name in ("fc_in", "fc_b"))
    assert dead[stream] == [5]


def test_residual_cnn_channel_dead_in_one_branch_only_is_kept():
    model = ResidualCNN()
    randomize_bn_(model)
    kill_bn_units_(model.stem_bn, [1, 2])  # stream channels 1 and 2 are 0 at the stem ...
    kill_bn_units_(model.bn2, [2], shift=-5.0)  # ... channel 2 also after the block's sum, channel 1 not
    kill_bn_units_(model.bn1, [0])  # a block-internal channel
    dead = dead_units_by_group(model, torch.randn(64, 1, 16))
    assert dead["conv1"] == [0]
    stream_group = next(name for name in dead if name in ("stem", "conv2"))
    assert dead[stream_group] == [2]


def test_threshold_marks_nearly_dead_units():
    model = make_alive_(MLP())
    with torch.no_grad():
        model.fc1.weight[3] = 0.0
        model.fc1.bias[3] = 1e-4  # a tiny constant: alive at threshold 0, dead at 1e-3
    x = torch.randn(64, 6)
    assert 3 not in dead_units_by_group(model, x)["fc1"]
    assert 3 in dead_units_by_group(model, x, threshold=1e-3)["fc1"]


def test_dead_check_runs_in_eval_mode_and_restores_each_module_flag():
    model = ConvBN()
    model.train()
    model.bn2.eval()  # a user-frozen BatchNorm stays in eval afterwards
    seen = []
    model.bn1.register_forward_hook(lambda module, args, out: seen.append(module.training))
    monitor = ActivationMonitor({"conv2": model.conv2})
    dead_check(model, monitor, [torch.randn(4, 3, 8, 8)], lambda m, b: m(b))
    assert seen == [False]
    assert model.training and model.bn1.training and not model.bn2.training
    assert not model.conv2._forward_pre_hooks


def test_monitor_removes_hooks_when_the_forward_raises():
    model = make_alive_(MLP())
    monitor = ActivationMonitor({"fc2": model.fc2})
    with pytest.raises(RuntimeError), monitor.observe():
        model(torch.randn(2, 99))
    assert not model.fc2._forward_pre_hooks


def test_non_finite_inputs_are_counted_and_never_make_a_unit_dead():
    activity = UnitActivity(num_features=2, feature_dim=-1)
    activity.update(torch.tensor([[float("nan"), 0.0], [float("inf"), 0.0]]))
    stats = activity.compute()
    assert int(stats["num_nonfinite"]) == 1  # one feature saw non-finite values
    assert find_dead_units(stats["max_abs"]).tolist() == [1]  # the non-finite feature is never dead


def test_unit_activity_folds_reader_features_back_to_units():
    readers = [
        (torch.tensor([0.0, 0.0, 2.0, 0.0]), torch.arange(4), torch.tensor([0, 0, 1, 1])),
        (torch.tensor([0.0, 5.0]), torch.arange(2), torch.tensor([0, 2])),
    ]
    assert unit_activity(3, readers).tolist() == [0.0, 2.0, 5.0]


@pytest.mark.parametrize("track_range", [False, True])
def test_a_layer_down_to_one_unit_is_still_checked(track_range):
    # torchmetrics squeezes one-element results to scalars; the monitor keeps per-feature states one-dimensional,
    # so a layer pruned down to a single unit still gets a dead check instead of an IndexError.
    model = nn.Sequential(nn.Linear(3, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # the single hidden unit is dead
    monitor = ActivationMonitor({"2": model[2]}, track_range=track_range)
    stats = dead_check(model, monitor, [torch.randn(8, 3)], lambda m, b: m(b))
    keys = ["max_abs", "max_value", "min_value"] if track_range else ["max_abs"]
    assert all(getattr(stats["2"], key).shape == (1,) for key in keys)
    activity = unit_activity(1, [(stats["2"].max_abs, torch.arange(1), torch.arange(1))])
    assert find_dead_units(activity).tolist() == [0]

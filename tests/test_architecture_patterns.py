"""Architecture patterns: returned tensors are outputs, reused modules and unmappable layers are refused clearly."""

from __future__ import annotations

import torch
from torch import nn

from helpers.models import kill_linear_units_
from lightning_demp import PrunableGraph
from lightning_demp.config import PruningConfig
from lightning_demp.core import DemonPruner


class LogitsAndFeatures(nn.Module):
    """``return self.head(f), f``: the features are returned beside the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 16)
        self.body = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.head(features), features


class TwoBranchesAndTheirConcat(nn.Module):
    """Returns both branches and a head on their concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(6, 8), nn.Linear(6, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        left, right = torch.relu(self.left(x)), torch.relu(self.right(x))
        return left, right, self.head(torch.cat([left, right], dim=1))


def prune_dead(model: nn.Module, x: torch.Tensor) -> DemonPruner:
    pruner = DemonPruner(PruningConfig(regularizer="positive_l2", reg_max=0.0, noise_std=0.0))
    pruner.prepare(model, x[:2], total_steps=1)
    pruner.remember_batch((x, None))
    pruner.removal_event(model, [], step=1, epoch=0, final=True)
    return pruner


def test_returned_features_keep_their_units_while_a_hidden_layer_still_shrinks():
    model = LogitsAndFeatures()
    with torch.no_grad():
        model.stem.bias.fill_(1.0), model.body.bias.fill_(1.0)
    kill_linear_units_(model.stem, [3, 9])
    kill_linear_units_(model.body, [0, 5])  # dead, but returned: the caller sees 12 features
    x = torch.randn(32, 6)
    with torch.no_grad():
        logits, features = model(x)
    graph = PrunableGraph(model, x[:2])
    assert "body" in graph.output_layers
    prune_dead(model, x)
    assert model.stem.out_features == 14 and model.body.out_features == 12
    with torch.no_grad():
        after_logits, after_features = model(x)
    torch.testing.assert_close(after_features, features)  # same shape, same values
    torch.testing.assert_close(after_logits, logits)
    torch.export.export(model, (x,))


def test_returned_branches_that_also_feed_a_concat_keep_their_units():
    model = TwoBranchesAndTheirConcat()
    kill_linear_units_(model.left, [1])
    x = torch.randn(32, 6)
    with torch.no_grad():
        before = model(x)
    prune_dead(model, x)
    assert (model.left.out_features, model.right.out_features) == (8, 8)
    with torch.no_grad():
        for old, new in zip(before, model(x), strict=True):
            torch.testing.assert_close(new, old)


class SharedOnBothHalves(nn.Module):
    """One ``nn.Sequential`` applied to each half of a ``torch.split``: the trace sees one call's indices."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 16, 3, padding=1)
        self.shared = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16 * 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = torch.split(torch.relu(self.stem(x)), 8, dim=1)
        return self.head(torch.cat([self.shared(first), self.shared(second)], dim=1).flatten(1))


def test_no_unit_is_called_dead_without_evidence_from_every_call_of_a_reused_module():
    torch.manual_seed(0)
    model = SharedOnBothHalves()
    x = torch.randn(16, 2, 10)
    with torch.no_grad():
        before = model(x)
    blocked = {group.name: group.blocked for group in PrunableGraph(model, x[:2]).groups()}
    assert "runs more than once per forward and the trace mapped one call's units" in blocked["shared.0"]
    assert "8 of its units reach no traced reader" in blocked["stem"]
    event = prune_dead(model, x).removal_event(model, [], step=2, epoch=1, final=True)
    assert event is None and model.stem.out_channels == 16  # before: live units "dead", a Conv1d(0, 8) and a crash
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


class WithGRU(nn.Module):
    """A GRU between two Linear layers: Torch-Pruning maps no unit index through it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.gru, self.head = nn.Linear(4, 8), nn.GRU(8, 6, batch_first=True), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(torch.relu(self.embed(x)))
        return self.head(out[:, -1])


def test_a_gru_torch_pruning_cannot_map_is_named_in_a_clear_error():
    import pytest

    from lightning_demp import TracingError

    with pytest.raises(TracingError, match=r"maps no unit index through `gru` \(GRU\)") as caught:
        PrunableGraph(WithGRU(), torch.randn(2, 5, 4)).groups()
    assert isinstance(caught.value.__cause__, IndexError)  # Torch-Pruning's own error, attached


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    batch, channels, height, width = x.shape
    return (
        x.view(batch, groups, channels // groups, height, width).transpose(1, 2).reshape(batch, channels, height, width)
    )


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: split the channels, transform one half, concatenate, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, transformed = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(transformed)], dim=1))


class TinyShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.units = nn.Sequential(ShuffleUnit(16), ShuffleUnit(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.units(self.stem(x)).mean(dim=(2, 3)))


def test_a_channel_shuffle_is_refused_with_a_reason_never_pruned_wrong():
    torch.manual_seed(0)
    model = TinyShuffleNet().eval()
    with torch.no_grad():  # dead units at the end of the first unit's branch, which the shuffle moves around
        model.units[0].branch[6].weight[[1, 3]] = 0.0
        model.units[0].branch[6].bias[[1, 3]] = -5.0
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    groups = {group.name: group for group in PrunableGraph(model, x[:2]).groups()}
    shuffled = groups["units.0.branch.5"]  # its units go through the concat and the shuffle
    assert shuffled.blocked is not None and "was stopped (an index past the 8 outputs" in shuffled.blocked
    prune_dead(model, x)  # before: the wrong units went and a reshape failed
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    torch.export.export(model, (x,))


class SplitIntoTwoBranches(nn.Module):
    """One convolution's channels split by fixed sizes between two branches (as Inception and ShuffleNet do)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(3, 8, 3, padding=1)
        self.left, self.right = nn.Conv1d(4, 6, 1), nn.Conv1d(4, 6, 1)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = torch.split(torch.relu(self.stem(x)), [4, 4], dim=1)
        both = torch.cat([torch.relu(self.left(left)), torch.relu(self.right(right))], dim=1)
        return self.head(both.mean(dim=2))


def test_units_split_by_fixed_sizes_stay_and_the_branches_still_shrink():
    torch.manual_seed(0)
    model = SplitIntoTwoBranches().eval()
    kill_linear_units_(model.stem, [1, 6])  # one dead unit on each side of the split
    kill_linear_units_(model.left, [0])
    x = torch.randn(8, 3, 10)
    with torch.no_grad():
        before = model(x)
    groups = {group.name: group for group in PrunableGraph(model, x[:2]).groups()}
    assert "picked by position (`splitwithsizes` over dimension 1)" in (groups["stem"].blocked or "")
    prune_dead(model, x)  # before: the split's readers swapped, then `split_with_sizes` failed on 6 channels
    assert model.stem.out_channels == 8 and model.left.out_channels < 6
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    torch.export.export(model, (x,))


class ConcatResidualReturningABranch(nn.Module):
    """A residual over a concatenation of two branches, one of which is also returned: half the stream's units
    reach the model output through ``a``, the other half only through ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv1d(8, 4, 1), nn.Conv1d(8, 4, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.stem(x))
        returned = self.a(hidden)
        stream = torch.relu(torch.cat([returned, self.b(hidden)], dim=1) + hidden)
        return self.head(stream.mean(dim=2)), returned


def planted_concat_residual() -> tuple[ConcatResidualReturningABranch, torch.Tensor]:
    """Units 1 (through ``a``) and 5 (through ``b``) of the stream dead at every reader."""
    torch.manual_seed(0)
    model = ConcatResidualReturningABranch()
    kill_linear_units_(model.stem, [1, 5])
    kill_linear_units_(model.a, [1])  # ``a``'s channel 1 is a constant -1: returned, and zero after the ReLU
    kill_linear_units_(model.b, [1])  # the stream's unit 5
    return model, torch.randn(16, 3, 10)


def test_a_concat_residual_partly_returned_keeps_those_units_and_loses_the_others():
    from helpers.models import assert_optimizer_follows, tagged_adam

    model, x = planted_concat_residual()
    with torch.no_grad():
        logits, returned = model(x)
    (stream,) = [group for group in PrunableGraph(model, x[:2]).groups() if group.name == "stem"]
    assert stream.blocked is None and not stream.permutable  # before: blocked whole, "`a` produces the model output"
    assert stream.fixed_units == (0, 1, 2, 3) and stream.fixed_because == "`a` produces the model output"
    optimizer = tagged_adam(model)
    pruner = DemonPruner(PruningConfig(regularizer="positive_l2", reg_max=0.0, noise_std=0.0))
    pruner.prepare(model, x[:2], total_steps=1)
    pruner.remember_batch((x, None))
    event = pruner.removal_event(model, [optimizer], step=1, epoch=0, final=True)
    assert event is not None and event.removed == {"stem": 1}  # unit 5; unit 1, as dead, stays
    assert (model.stem.out_channels, model.a.in_channels, model.b.in_channels) == (7, 7, 7)
    assert (model.a.out_channels, model.b.out_channels, model.head.in_features) == (4, 3, 7)
    with torch.no_grad():
        after_logits, after_returned = model(x)
    torch.testing.assert_close(after_returned, returned)  # every returned channel, unchanged
    torch.testing.assert_close(after_logits, logits)
    assert_optimizer_follows(model, optimizer)
    torch.export.export(model, (x,))


def test_a_concat_residual_blocks_whole_when_every_branch_is_kept():
    model, x = planted_concat_residual()
    graph = PrunableGraph(model, x[:2], exclude=["b"])
    (stream,) = [group for group in graph.groups() if group.name == "stem"]
    assert stream.blocked == "`a` produces the model output; `b` is excluded" and stream.fixed_units == ()


def test_removing_a_unit_that_reaches_the_output_is_refused_with_the_reason():
    import pytest

    from lightning_demp.removal import RemovalError, remove_units_

    model, x = planted_concat_residual()
    with pytest.raises(RemovalError, match=r"units \[1\] of group `stem`: they stay \(`a` produces the model output\)"):
        remove_units_(PrunableGraph(model, x[:2]), {"stem": torch.tensor([1, 5])})
    assert model.stem.out_channels == 8  # checked before anything is removed


def test_units_that_stay_are_never_pulled_by_a_prunable_only_penalty():
    model, x = ConcatResidualReturningABranch(), torch.randn(4, 3, 10)
    pruner = DemonPruner(PruningConfig(regularizer="l2", reg_max=1.0, noise_std=0.0, penalize="prunable"))
    pruner.prepare(model, x[:2], total_steps=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    pruner.regularize_(optimizer, model, step=5)
    pull = model.stem.weight.grad.flatten(1).abs().sum(dim=1)
    assert bool(pull[:4].eq(0).all()) and bool(pull[4:].gt(0).all())  # the returned branch's units: no pull
    # (the live floor counts them as held: with every other resistance 0, the rest would get no pull either)


def test_neither_the_dead_check_nor_a_target_ranking_picks_a_unit_that_stays():
    from lightning_demp.policy import decide_removal
    from lightning_demp.target import least_active_units
    from lightning_demp.units import ReaderSlice, ReaderStats, UnitGroup

    group = UnitGroup("stem", 4, readers=[ReaderSlice("head", torch.arange(4), torch.arange(4))], fixed_units=(0, 1))
    stats = {"head": ReaderStats(max_abs=torch.tensor([0.0, 0.1, 0.0, 3.0]), num_samples=8)}
    decision = decide_removal(nn.Identity(), [group], stats, threshold=0.0, min_units=1, removable={"stem"})
    assert decision.plan.units["stem"].tolist() == [2]  # unit 0 is as dead, and stays
    assert least_active_units([group], stats, min_units=1, fraction=0.5)["stem"].tolist() == [2]


def test_the_late_shortfall_ranking_never_picks_a_unit_that_stays():
    from lightning_demp.shortfall import focus_units

    model, x = ConcatResidualReturningABranch(), torch.randn(32, 3, 10)
    config = PruningConfig(regularizer="l2", target_sparsity=0.9, target_metric="units", live_floor=0.0)
    pruner = DemonPruner(config)
    pruner.prepare(model, x[:2], total_steps=10)
    pruner.remember_batch((x, None))
    chosen = focus_units(pruner, model, pruner.statistics(model))
    assert chosen["stem"] and not set(chosen["stem"]) & {0, 1, 2, 3}  # the returned branch's units stay


class CausalConv1d(nn.Module):
    """A causal convolution stack: each ``Conv1d`` pads both sides and its output is trimmed back in time."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv1d(3, 12, 3, padding=2)
        self.second = nn.Conv1d(12, 10, 3, padding=2)
        self.head = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))[:, :, :-2]  # a crop in time, not a slice of channels
        h = torch.relu(self.second(h[..., 1:]))[:, :, :-2]
        return self.head(h.mean(dim=2))


class TokensCroppedInTime(nn.Module):
    """``(B, T, C)`` tokens through a Linear, cropped in time: the channels-last layout Torch-Pruning assumes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(x))[:, 1:].mean(dim=1))


def kill_conv_units_(conv: nn.Conv1d, units: list[int]) -> None:
    with torch.no_grad():
        conv.weight[units] = 0.0
        conv.bias[units] = -1.0  # a ReLU after it outputs zero on every input


def test_a_conv1d_output_cropped_in_time_keeps_its_channels_prunable_and_exact():
    torch.manual_seed(0)
    model = CausalConv1d()
    kill_conv_units_(model.first, [2, 7])
    kill_conv_units_(model.second, [0, 4, 9])
    x = torch.randn(16, 3, 20)
    graph = PrunableGraph(model, x[:2])
    assert {g.name: g.blocked for g in graph.groups() if g.name in ("first", "second")} == {
        "first": None,
        "second": None,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        kill_conv_units_(model.first, [2, 7]), kill_conv_units_(model.second, [0, 4, 9])
        before = model(x)
    moment = optimizer.state[model.second.weight]["exp_avg"].clone()
    pruner = DemonPruner(PruningConfig(regularizer="positive_l2", reg_max=0.0, noise_std=0.0))
    pruner.prepare(model, x[:2], total_steps=1)
    pruner.remember_batch((x, None))
    pruner.removal_event(model, [optimizer], step=1, epoch=0, final=True)
    assert (model.first.out_channels, model.second.in_channels, model.second.out_channels) == (10, 10, 7)
    assert model.head.in_features == 7
    kept_out, kept_in = [1, 2, 3, 5, 6, 7, 8], [0, 1, 3, 4, 5, 6, 8, 9, 10, 11]
    torch.testing.assert_close(optimizer.state[model.second.weight]["exp_avg"], moment[kept_out][:, kept_in])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    torch.export.export(model, (x,))


def test_channels_last_tokens_cropped_in_time_still_prune_exactly():
    torch.manual_seed(0)
    model = TokensCroppedInTime()
    kill_linear_units_(model.embed, [1, 5])
    x = torch.randn(8, 6, 5)
    with torch.no_grad():
        before = model(x)
    prune_dead(model, x)
    assert model.embed.out_features == 10 and model.head.in_features == 10
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)

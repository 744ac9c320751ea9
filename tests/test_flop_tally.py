"""After each removal the forward FLOPs are recounted from the layers' widths, without a forward: the tally must equal
torch's counter, and a model whose FLOPs it does not model falls back to the counter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.lightning import planted_residual_cnn, planted_transformer
from helpers.models import kill_bn_units_, kill_heads_, kill_linear_units_
from lightning_demp import DemonPruner, PrunableGraph, PruningConfig
from lightning_demp.accounting import count_flops_per_sample
from lightning_demp.demos import MLPClassifier


def two_events(model: nn.Module, x: torch.Tensor, plant_more) -> DemonPruner:
    """Prepare, remove the planted units, plant more, remove those: the second recount is the tally's own."""
    pruner = DemonPruner(PruningConfig(regularizer="positive_l2", reg_max=0.0, noise_std=0.0, recalibrate_bn=False))
    model.eval()
    pruner.prepare(model, x[:2], total_steps=1)
    for step in (1, 2):
        pruner.remember_batch((x, None))
        assert pruner.removal_event(model, [], step=step, epoch=step, final=True) is not None
        if step == 1:
            plant_more(model)
    return pruner


def mlp() -> nn.Module:
    model = MLPClassifier(input_dim=6, hidden_sizes=[16, 12], num_classes=3)
    kill_linear_units_(model.net[0], [1, 4])
    return model


CASES = {
    "MLP": (mlp, lambda: torch.randn(16, 6), lambda m: kill_linear_units_(m.net[2], [3])),
    "residual CNN with selections": (
        planted_residual_cnn,
        lambda: torch.randn(16, 40),
        lambda m: kill_bn_units_(m.net.block1.bn1, [2], shift=-5.0),
    ),
    "transformer, heads removed": (
        planted_transformer,
        lambda: torch.randn(16, 40),
        lambda m: kill_heads_(m.blocks[1].attn, [0]),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_flops_recounted_from_widths_equal_the_counter_after_every_removal(case):
    torch.manual_seed(0)
    build, inputs, plant_more = CASES[case]
    model, x = build(), inputs()
    pruner = two_events(model, x, plant_more)
    assert pruner.flop_tally is not None and pruner.flop_tally.trusted  # the first recount agreed with the counter
    counted = count_flops_per_sample(model, x[:1])
    assert pruner.ledger.current_flops == pytest.approx(counted, rel=1e-9)  # the second came from the widths


class TimesAMatrix(nn.Module):
    """A hidden layer whose units also go through a matmul with a matrix the forward holds as a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 10)
        self.mix = nn.Parameter(torch.randn(10, 10))
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)) @ self.mix)


def test_units_mixed_by_a_bare_matrix_stay_whole():
    torch.manual_seed(0)
    model = TimesAMatrix()
    kill_linear_units_(model.hidden, [2])
    x = torch.randn(8, 6)
    with torch.no_grad():
        before = model(x)
    pruner = DemonPruner(PruningConfig(regularizer="positive_l2", reg_max=0.0, noise_std=0.0))
    pruner.prepare(model, x[:2], total_steps=1)
    blocked = {group.name: group.blocked for group in pruner.graph.groups()}
    assert "a bare 10×10 parameter follows its units" in (blocked["hidden"] or "")
    pruner.remember_batch((x, None))
    pruner.removal_event(model, [], step=1, epoch=0, final=True)  # before: `mix` lost one column, the matmul failed
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def shrink_(model: nn.Sequential, keep: int) -> None:
    """Keep the first ``keep`` units of the hidden layer, in place, as the surgery does."""
    with torch.no_grad():
        model[0].weight = nn.Parameter(model[0].weight[:keep])
        model[0].bias = nn.Parameter(model[0].bias[:keep])
        model[2].weight = nn.Parameter(model[2].weight[:, :keep])


def test_the_tally_is_checked_when_a_layer_first_shrinks_and_gives_way_where_it_differs():
    from lightning_demp.sizes import FlopTally

    x = torch.randn(1, 4)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    tally = FlopTally(model, x, count_flops_per_sample(model, x))
    counts = []

    def counter(extra: float):
        return lambda: counts.append(1) or tally.flops(model) + extra

    shrink_(model, 6)
    assert tally.checked(model, counter(0.0)) == tally.flops(model) and len(counts) == 1 and tally.trusted
    shrink_(model, 5)  # the same layers again: covered, no forward
    assert tally.checked(model, counter(0.0)) == tally.flops(model) and len(counts) == 1
    assert tally.flops(model) == count_flops_per_sample(model, x)

    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    disagreeing = FlopTally(other, x, count_flops_per_sample(other, x))
    shrink_(other, 6)
    assert disagreeing.checked(other, lambda: 7.0) == 7.0 and disagreeing.trusted is False  # an op it misses
    assert disagreeing.checked(other, lambda: 8.0) == 8.0  # the counter from then on


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.inner = nn.Linear(6, 6)  # applied twice, to its own output
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(self.inner(torch.relu(self.stem(x)))))


def test_a_layer_called_twice_is_tallied_twice():
    from lightning_demp.sizes import FlopTally

    model, x = CalledTwice(), torch.randn(1, 4)
    tally = FlopTally(model, x, count_flops_per_sample(model, x))
    with torch.no_grad():  # one unit fewer through all of them
        model.stem.weight, model.stem.bias = nn.Parameter(model.stem.weight[:5]), nn.Parameter(model.stem.bias[:5])
        model.inner.weight = nn.Parameter(model.inner.weight[:5, :5])
        model.inner.bias = nn.Parameter(model.inner.bias[:5])
        model.head.weight = nn.Parameter(model.head.weight[:, :5])
    assert tally.flops(model) == count_flops_per_sample(model, x)


def test_a_depthwise_transposed_convolution_keeps_its_units_on_the_first_dimension():
    from lightning_demp.regularization import group_parameters

    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 3, groups=8), nn.ReLU())
    head = nn.Sequential(model, nn.Conv2d(8, 2, 1))
    groups = group_parameters(PrunableGraph(head, torch.randn(2, 3, 4, 4)))
    depthwise = [g for g in groups.values() if g.producer_weight is model[2].weight]
    assert depthwise and all(g.unit_dim == 0 for g in depthwise)  # its weight is (8, 1, 3, 3)

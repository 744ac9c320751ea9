"""After each removal the forward FLOPs are recounted from the layers' widths, without a forward: the tally must equal
torch's counter, and a model whose FLOPs it does not model falls back to the counter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.lightning import planted_residual_cnn, planted_transformer
from helpers.models import kill_bn_units_, kill_heads_, kill_linear_units_
from lightning_demp import DemonPruner, PruningConfig
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


def test_the_tally_is_checked_once_against_the_counter_and_gives_way_where_they_differ():
    from lightning_demp.sizes import FlopTally

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(1, 4)
    tally = FlopTally(model, x, count_flops_per_sample(model, x))
    calls = []

    def counter_that_sees_more() -> float:  # as for an op the tally does not model
        calls.append(1)
        return tally.flops(model) + 100.0

    assert tally.checked(model, counter_that_sees_more) == tally.flops(model) + 100.0
    assert tally.trusted is False
    assert tally.checked(model, counter_that_sees_more) == tally.flops(model) + 100.0 and len(calls) == 2
    agreeing = FlopTally(model, x, count_flops_per_sample(model, x))
    agreeing.checked(model, lambda: agreeing.flops(model))
    assert agreeing.trusted is True

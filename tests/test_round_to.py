"""`round_to`: each group's width stays a multiple of N; the dead units above the multiple stay, harmless."""

from __future__ import annotations

import pytest
import torch

from helpers.lightning import planted_mlp, train_with_callback
from helpers.models import kill_linear_units_
from lightning_demp import DemonPruning


def five_dead_in_the_first_layer():
    model = planted_mlp(lr=0.0)  # net.0: 12 units, net.2: 10 units (unit 4 dead)
    kill_linear_units_(model.net[0], [1, 3, 5, 8, 10])
    return model


@pytest.mark.parametrize(("round_to", "first", "second"), [(1, 7, 9), (4, 8, 10), (8, 8, 10), (16, 12, 10)])
def test_widths_stay_multiples_and_the_function_is_kept(tmp_path, round_to, first, second):
    model = five_dead_in_the_first_layer()
    x = torch.randn(16, 6)
    with torch.no_grad():
        expected = model(x)
    train_with_callback(tmp_path, model=model, max_epochs=1, reg_max=0.0, noise_std=0.0, round_to=round_to)
    assert (model.net[0].out_features, model.net[2].out_features) == (first, second)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)  # only dead units went; the ones kept are still dead


def test_round_to_is_validated():
    with pytest.raises(ValueError, match="Expected `round_to` to be an int >= 1, got 0"):
        DemonPruning(round_to=0)

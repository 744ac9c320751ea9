"""The live floor: the pull on a layer never exceeds what the loss resists on its floor share of units."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.lightning import RandomDataModule, small_mlp, train_with_callback
from lightning_demp import DemonPruner, PruningConfig
from lightning_demp.regularization import floor_share, floor_shares, resistance, resistances


def _pruner(row_grads: list[float], **settings) -> tuple[DemonPruner, nn.Sequential]:
    """A 6-20-20-3 MLP of unit weights whose first hidden layer has loss gradients of 1 everywhere and whose second
    has a gradient of ``row_grads[i]`` in every entry of row ``i`` (0 beyond them). The floor alone unless
    ``max_death_fraction`` is given."""
    settings.setdefault("max_death_fraction", 1.0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0)
    pruner = DemonPruner(PruningConfig(regularizer="l2", schedule="constant", **settings))
    pruner.prepare(model, torch.randn(2, 6), total_steps=10)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    for layer in (model[2].weight, model[2].bias):
        layer.grad = torch.zeros_like(layer)
        for row, value in enumerate(row_grads):
            layer.grad[row] = value
    return pruner, model


def _added_penalty(pruner: DemonPruner, model: nn.Sequential) -> dict[str, torch.Tensor]:
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    pruner.regularize_(torch.optim.SGD(model.parameters(), lr=0.0), model, step=0)
    return {name: p.grad - before[name] for name, p in model.named_parameters()}


def test_the_pull_on_a_layer_is_capped_at_what_the_loss_resists_on_its_floor_share_of_units():
    # With unit weights the penalty gradient of a row is the row itself: resistance = loss gradient / 1 per entry.
    pruner, model = _pruner(row_grads=[0.2, 0.1], reg_max=0.5, noise_std=0.0, live_floor=0.1)
    added = _added_penalty(pruner, model)
    torch.testing.assert_close(added["0.weight"], 0.5 * model[0].weight)  # every unit resists 1 > 0.5: full pull
    # 2 units of 20 (the 10 % floor) must resist: the second strongest resists 0.1, so the pull is 0.1, not 0.5
    torch.testing.assert_close(added["2.weight"], 0.1 * model[2].weight)
    torch.testing.assert_close(added["4.weight"], 0.5 * model[4].weight)  # the output layer is no group: full


def test_a_layer_the_loss_no_longer_holds_on_enough_units_gets_neither_pull_nor_noise():
    pruner, model = _pruner(row_grads=[0.2], reg_max=0.5, noise_std=0.1, live_floor=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner.regularize_(optimizer, model, step=0)
    optimizer.step()
    pruner.add_noise_()
    torch.testing.assert_close(model[2].weight.grad, grads["2.weight"])  # one unit held, the floor wants two
    torch.testing.assert_close(model[2].weight.detach(), before["2.weight"])  # no noise either
    assert not torch.equal(model[0].weight.detach(), before["0.weight"])  # the held layer got its noise


def test_without_a_floor_every_layer_gets_the_papers_full_pull():
    pruner, model = _pruner(row_grads=[0.2], reg_max=0.5, noise_std=0.0, live_floor=0.0)
    torch.testing.assert_close(_added_penalty(pruner, model)["2.weight"], 0.5 * model[2].weight)


@pytest.mark.parametrize(
    ("resistances", "expected"),
    [([3.0, 2.0, 0.0, 0.0], 1.0), ([0.5, 0.1, 0.0, 0.0], 0.1), ([0.5, 0.0, 0.0, 0.0], 0.0), ([0.5], 0.0)],
    ids=["held", "capped", "one-held", "below-the-floor"],
)
def test_the_share_is_the_floor_th_resistance_over_the_strength(resistances, expected):
    assert floor_share(torch.tensor(resistances), strength=1.0, floor=0.5, initial_units=4) == pytest.approx(expected)


def test_resistance_is_zero_for_a_dead_unit_and_infinite_for_an_unpulled_one():
    weight = nn.Parameter(torch.tensor([[1.0, 1.0], [-1.0, -1.0], [2.0, 0.0]]))
    weight.grad = torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    assert resistance(weight, "positive_l2").tolist() == [0.0, float("inf"), 0.5]


@pytest.mark.parametrize("regularizer", ["l1_norm_scale", "l2", "positive_group_l1"])
def test_the_batched_resistances_and_shares_equal_the_per_group_ones(regularizer):
    generator = torch.Generator().manual_seed(0)
    pulled = []
    for units, shape in [(7, (7,)), (3, (3,)), (12, (12, 4)), (1, (1,)), (5, (5, 2, 3))]:
        param = nn.Parameter(torch.randn(shape, generator=generator))
        param.grad = torch.randn(shape, generator=generator)
        param.grad[: units // 2] = 0.0  # dead units: resistance 0
        with torch.no_grad():
            param[-1:] = 0.0  # a scale at 0: not pulled by the L1, infinite resistance there
        pulled.append(param)
    batched = resistances(pulled, regularizer)
    for param, found in zip(pulled, batched, strict=True):
        assert torch.equal(found, resistance(param, regularizer))
    initial = [8, 3, 20, 1, 5]
    for strength in (1e-3, 0.3, 5.0):
        for floor in (0.0, 0.2, 0.5, 1.0):
            expected = [floor_share(r, strength, floor, n) for r, n in zip(batched, initial, strict=True)]
            assert floor_shares(batched, strength, floor, initial) == pytest.approx(expected), (strength, floor)
            assert floor_share(torch.empty(0), strength, floor, 4) == (1.0 if floor == 0 else 0.0)  # an empty group


def test_a_bad_floor_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="live_floor"):
        PruningConfig(live_floor=0.7)


def test_with_a_death_fraction_the_pull_outweighs_the_loss_on_at_most_that_share_of_a_layers_units():
    rows = [1.0 - 0.05 * i for i in range(20)]  # resistances 1.0, 0.95, ..., 0.05
    pruner, model = _pruner(row_grads=rows, reg_max=0.5, noise_std=0.0, live_floor=0.05, max_death_fraction=0.25)
    added = _added_penalty(pruner, model)
    # 15 of 20 units must resist: the 15th strongest resists 0.3, so the pull is 0.3 (the floor alone: 0.5)
    torch.testing.assert_close(added["2.weight"], 0.3 * model[2].weight)
    torch.testing.assert_close(added["0.weight"], 0.5 * model[0].weight)  # every unit resists 1 > 0.5
    pruner, model = _pruner(row_grads=rows, reg_max=0.5, noise_std=0.0, live_floor=0.05)  # the floor alone
    torch.testing.assert_close(_added_penalty(pruner, model)["2.weight"], 0.5 * model[2].weight)


def test_a_focused_target_picks_who_dies_so_the_death_fraction_does_not_cap_it():
    rows = [1.0 - 0.05 * i for i in range(20)]
    pruner, model = _pruner(row_grads=rows, reg_max=0.5, noise_std=0.0, live_floor=0.05, max_death_fraction=0.25)
    pruner.pressure.focus_on({"0": list(range(20)), "2": list(range(20))})
    torch.testing.assert_close(_added_penalty(pruner, model)["2.weight"], 0.5 * model[2].weight)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_a_bad_death_fraction_is_refused_naming_the_argument(fraction):
    with pytest.raises(ValueError, match="max_death_fraction"):
        PruningConfig(max_death_fraction=fraction)


def test_by_default_a_huge_reg_max_removes_at_most_half_of_a_layer_per_event(tmp_path):
    assert PruningConfig().max_death_fraction == 0.5
    most = {}
    for fraction in (1.0, None):  # None: the default
        torch.manual_seed(0)
        _, _, callback = train_with_callback(
            tmp_path / str(fraction),
            model=small_mlp(hidden_sizes=[64, 64], lr=3e-3),
            max_epochs=4,
            reg_max=30.0,
            noise_std=1e-3,
            **({} if fraction is None else {"max_death_fraction": fraction}),
            prune_every_n_epochs=4,  # one event, at the end
            schedule="constant",
            datamodule=RandomDataModule(size=512),
        )
        widths = dict(callback.pruner.ledger.initial_widths)
        shares = []
        for event in callback.pruner.ledger.events:
            shares += [removed / widths[name] for name, removed in event.removed.items() if widths[name]]
            widths.update(event.widths)
        most[fraction] = max(shares)
    assert most[1.0] > 0.5  # the floor alone: a layer loses most of its units in one event
    assert most[None] <= 0.5


def test_with_the_floor_a_huge_reg_max_shrinks_the_network_without_killing_a_layer(tmp_path):
    runs = {}
    for floor in (0.0, 0.1):
        torch.manual_seed(0)
        _, _, callback = train_with_callback(
            tmp_path / str(floor),
            model=small_mlp(hidden_sizes=[64, 64], lr=3e-3),
            max_epochs=4,
            reg_max=30.0,
            noise_std=1e-3,
            live_floor=floor,
            max_death_fraction=1.0,  # the floor alone
            datamodule=RandomDataModule(size=512),
        )
        runs[floor] = min(len(kept) / 64 for kept in callback.kept_units.values())
    assert runs[0.0] < 0.05  # the paper's pull: a layer dies down to min_units
    assert runs[0.1] >= 0.1  # with the floor every layer keeps at least its floor


class CoupledResidualMLP(nn.Module):
    """``x + bn2(fc2(relu(bn1(fc1(x)))))`` on a normalized stem: ``norm`` and ``bn2`` both write the stream the
    shortcut carries, one coupled group whose pull is read off one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.norm = nn.Linear(6, 8), nn.BatchNorm1d(8)
        self.fc1, self.bn1 = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.fc2, self.bn2 = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stream = torch.relu(self.norm(self.stem(x)))
        branch = self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(stream)))))
        return self.head(torch.relu(stream + branch))


def test_a_coupled_streams_other_norm_is_held_channel_by_channel_so_no_branch_is_silenced():
    # Left unheld, a large λ drove such a norm's scales to zero (in a residual CNN, a block's last BatchNorm): the
    # branch fell silent, the layers before it lost their loss gradient, and the rounds of death, which read it,
    # never pulled them again.
    model = CoupledResidualMLP()
    pruner = DemonPruner(PruningConfig(schedule="constant", reg_max=1.0, noise_std=0.0))  # l1_norm_scale, f = 0.5
    pruner.prepare(model, torch.randn(4, 6), total_steps=10)
    grouped = {id(p) for parameters, _ in pruner.pressure.groups.values() for p in parameters.params}
    loose = [name for name in ("norm", "bn2") if id(model.get_submodule(name).weight) not in grouped]
    assert len(loose) == 1  # the premise: the stream's group holds one of its two norms
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    model.get_submodule(loose[0]).weight.grad = torch.arange(1.0, 9.0) / 100  # resistances 0.01 ... 0.08, all < λ
    added = _added_penalty(pruner, model)
    # half of its 8 channels must resist: the pull is the 4th largest resistance, 0.05, not λ = 1
    torch.testing.assert_close(added[f"{loose[0]}.weight"], torch.full((8,), 0.05))


def _positive_l2_pull(data: torch.Tensor, focus: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """The one-sided L2 added to the gradients of a 6-8-8-3 MLP of unit weights traced on ``data``."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0)
    pruner = DemonPruner(PruningConfig(regularizer="positive_l2", schedule="constant", reg_max=0.5, noise_std=0.0))
    pruner.prepare(model, torch.zeros(2, 6), total_steps=10)
    model(data)  # the first forward shows where the inputs go negative
    pruner.pressure.focus_on(focus)
    for param in model.parameters():
        param.grad = torch.ones_like(param)  # the loss holds every unit: the live floor leaves the full pull
    return _added_penalty(pruner, model)


def test_the_one_sided_l2_pulls_only_where_it_can_kill_a_unit_that_can_go():
    # Weights at most 0 silence a ReLU unit only when its inputs are never negative: on signed data the first
    # layer would only be confined to non-positive weights, and lose accuracy without losing a unit. The output
    # layer's units never go, and feed no ReLU.
    added = _positive_l2_pull(torch.randn(4, 6))
    for name in ("0.weight", "0.bias", "4.weight", "4.bias"):
        assert bool(added[name].eq(0).all()), name
    for name in ("2.weight", "2.bias"):  # it reads a ReLU's output, and its units can go
        torch.testing.assert_close(added[name], torch.full_like(added[name], 0.5))


def test_the_one_sided_l2_pulls_the_first_layer_on_data_that_is_never_negative():
    added = _positive_l2_pull(torch.rand(4, 6))
    torch.testing.assert_close(added["0.weight"], torch.full_like(added["0.weight"], 0.5))


def test_a_focused_target_pulls_the_units_it_chose_whatever_their_inputs():
    # They go at the next events anyway, dead or ranked least important: pulled, they fade before they go.
    added = _positive_l2_pull(torch.randn(4, 6), focus={"0": [1, 3]})
    assert added["0.weight"][[1, 3]].eq(0.5).all() and added["0.weight"][[0, 2, 4, 5, 6, 7]].eq(0).all()


def _signed_mlp_pruner(**settings) -> tuple[DemonPruner, nn.Sequential]:
    """A 6-8-3 MLP prepared on an all-zero example input: the trace sees no negative input anywhere."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    pruner = DemonPruner(PruningConfig(regularizer="positive_l2", schedule="constant", reg_max=0.5, **settings))
    pruner.prepare(model, torch.zeros(2, 6), total_steps=10)
    return pruner, model


def test_the_signs_are_read_off_the_first_training_forward_not_the_example_input():
    pruner, model = _signed_mlp_pruner(noise_std=0.0)
    model(torch.randn(16, 6)).sum().backward()  # the data is signed; the example was zeros
    before = model[0].weight.grad.clone()
    pruner.regularize_(torch.optim.SGD(model.parameters(), lr=0.0), model, step=0)
    assert pruner.pressure.signed_inputs == ["0"] and pruner.pressure.sign_watch is None
    torch.testing.assert_close(model[0].weight.grad, before)  # not pulled
    assert not model[0]._forward_pre_hooks  # the watch is gone after the first step


def test_the_signs_are_united_over_processes_so_that_every_rank_pulls_the_same_parameters():
    from lightning_demp.collectives import Collectives

    pruner, model = _signed_mlp_pruner(noise_std=0.0)
    model(torch.rand(16, 6)).sum().backward()  # non-negative here; another process saw a negative everywhere
    everywhere = Collectives(any_process=lambda flags: torch.ones_like(flags))
    pruner.regularize_(torch.optim.SGD(model.parameters(), lr=0.0), model, step=0, collectives=everywhere)
    assert pruner.pressure.signed_inputs == ["0", "2"]


def test_a_checkpoint_keeps_the_signs_so_a_resumed_run_pulls_what_the_run_pulled():
    pruner, model = _signed_mlp_pruner(noise_std=0.0)
    model(torch.randn(16, 6)).sum().backward()
    pruner.regularize_(torch.optim.SGD(model.parameters(), lr=0.0), model, step=0)
    resumed, model_again = _signed_mlp_pruner(noise_std=0.0)
    resumed.load_state_dict(pruner.state_dict())
    resumed.pressure.watch_signs(model_again)  # what the callback does at an epoch start: nothing left to read
    assert resumed.pressure.signed_inputs == ["0"] and resumed.pressure.sign_watch is None


def test_a_fit_reads_the_signs_of_its_training_batches(tmp_path):
    model = small_mlp()
    model.example_input_array = torch.zeros(2, 6)
    _, _, callback = train_with_callback(tmp_path, model, max_epochs=1, reg_max=0.5)
    assert callback.pruner.pressure.signed_inputs == ["net.0"]  # the random data is signed; ReLU outputs are not
    assert callback.state_dict()["signed_inputs"] == ["net.0"]

"""Optimizer continuity: state sliced to the kept units, step kept, no stale entries, training continues."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers.models import MLP, kill_linear_units_, make_alive_
from lightning_demp.graph import PrunableGraph
from lightning_demp.optim import ParamRemap, remap_optimizer_
from lightning_demp.removal import remove_units_

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    "adafactor": lambda params: torch.optim.Adafactor(params, lr=1e-2),  # factored row_var (n, 1), col_var (1, m)
}


def sliced_state(value: torch.Tensor, dim: int, idx: torch.Tensor, full: int) -> torch.Tensor:
    """A state tensor sliced as its parameter was, where it keeps that dimension (not averaged down to 1)."""
    return value.index_select(dim, idx) if value.shape[dim] == full else value


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 6, generator=generator)).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_is_sliced_step_kept_and_one_more_step_matches_a_hand_built_reference(name):
    model = make_alive_(MLP())
    kill_linear_units_(model.fc1, [1, 4])  # dead: no gradient reaches them any more
    optimizer = OPTIMIZERS[name](model.parameters())
    train_steps(model, optimizer, 3)
    old_state = {key: copy.deepcopy(optimizer.state[param]) for key, param in model.named_parameters()}
    old_params = {key: param.detach().clone() for key, param in model.named_parameters()}

    remaps = remove_units_(PrunableGraph(model, torch.randn(2, 6)), {"fc1": torch.tensor([1, 4])})
    remap_optimizer_(optimizer, remaps)

    kept = torch.tensor([i for i in range(12) if i not in (1, 4)])
    expected_slices = {"fc1.weight": (0, kept), "fc1.bias": (0, kept), "fc2.weight": (1, kept)}
    assert {id(p) for p in optimizer.state} == {id(p) for p in model.parameters()}  # no stale keys
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(model.parameters())
    for key, param in model.named_parameters():
        state = optimizer.state[param]
        for state_key, old_value in old_state[key].items():
            if state_key == "step":
                assert torch.equal(torch.as_tensor(state["step"]), torch.as_tensor(old_value))
            elif key in expected_slices:
                dim, idx = expected_slices[key]
                full = old_params[key].shape[dim]
                assert torch.equal(state[state_key], sliced_state(old_value, dim, idx, full)), state_key
            else:
                assert torch.equal(state[state_key], old_value)

    # Reference: a model built at the small widths by hand, with the sliced weights and state transplanted.
    reference = MLP(sizes=(6, 10, 10, 3))
    reference_optimizer = OPTIMIZERS[name](reference.parameters())
    with torch.no_grad():
        for key, param in reference.named_parameters():
            dim, idx = expected_slices.get(key, (0, torch.arange(old_params[key].shape[0])))
            param.copy_(old_params[key].index_select(dim, idx))
    for key, param in reference.named_parameters():
        dim, idx = expected_slices.get(key, (0, torch.arange(old_params[key].shape[0])))
        full = old_params[key].shape[dim]
        reference_optimizer.state[param] = {
            k: (v if k == "step" else sliced_state(v, dim, idx, full)) for k, v in copy.deepcopy(old_state[key]).items()
        }
    train_steps(model, optimizer, 1, seed=7)
    train_steps(reference, reference_optimizer, 1, seed=7)
    for (key, param), reference_param in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param, reference_param, msg=key)


def test_parameters_keep_changing_and_the_lr_scheduler_keeps_its_optimizer():
    model = make_alive_(MLP())
    kill_linear_units_(model.fc2, [3])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train_steps(model, optimizer, 2)
    remap_optimizer_(optimizer, remove_units_(PrunableGraph(model, torch.randn(2, 6)), {"fc2": torch.tensor([3])}))
    before = {key: param.detach().clone() for key, param in model.named_parameters()}
    train_steps(model, optimizer, 1)
    scheduler.step()
    assert scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    for key, param in model.named_parameters():
        assert not torch.equal(param, before[key]), f"{key} stopped training after the removal"


def test_a_parameter_sliced_twice_is_remapped_through_the_whole_chain():
    weight = nn.Parameter(torch.arange(12.0).reshape(4, 3))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    momentum = optimizer.state[weight]["momentum_buffer"].clone()
    rows, cols = torch.tensor([0, 2, 3]), torch.tensor([1, 2])
    middle = nn.Parameter(weight.detach().index_select(0, rows))
    final = nn.Parameter(middle.detach().index_select(1, cols))
    remap_optimizer_(optimizer, [ParamRemap(weight, middle, 0, rows), ParamRemap(middle, final, 1, cols)])
    assert optimizer.param_groups[0]["params"] == [final]
    assert torch.equal(optimizer.state[final]["momentum_buffer"], momentum[rows][:, cols])
    assert weight not in optimizer.state and middle not in optimizer.state


def test_lbfgs_trains_the_new_parameters_after_a_removal():
    model = make_alive_(MLP())
    kill_linear_units_(model.fc1, [1, 4])
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    inputs = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(inputs).pow(2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    remap_optimizer_(optimizer, remove_units_(PrunableGraph(model, torch.randn(2, 6)), {"fc1": torch.tensor([1, 4])}))
    before = {key: param.detach().clone() for key, param in model.named_parameters()}
    optimizer.step(closure)
    for key, param in model.named_parameters():  # every parameter, the replaced ones too, keeps training
        assert not torch.equal(param, before[key]), key

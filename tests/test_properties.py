"""Property tests: random small MLPs and CNNs with planted dead units.

For every generated model: removal preserves outputs, every removed unit delivered nothing to any reader (no live
unit is removed), every planted dead unit is removed, and the optimizer state of every kept unit is unchanged.
CI runs the ``ci`` profile (bounded examples); ``HYPOTHESIS_PROFILE=nightly`` runs 10x as many.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_demp.detection import ActivationMonitor, dead_check, find_dead_units, unit_activity
from lightning_demp.graph import PrunableGraph
from lightning_demp.optim import remap_optimizer_
from lightning_demp.removal import remove_units_

settings.register_profile("ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class RandomNet(nn.Module):
    """Stages of ``layer → [BN] → ReLU``; a stage whose width equals the previous one may add a residual link."""

    def __init__(self, conv: bool, in_width: int, widths: list[int], residual: list[bool], batchnorm: bool) -> None:
        super().__init__()
        self.conv = conv
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.residual = []
        previous = in_width
        for width, wants_residual in zip(widths, residual):
            layer = nn.Conv1d(previous, width, 3, padding=1) if conv else nn.Linear(previous, width)
            self.layers.append(layer)
            norm = nn.BatchNorm1d(width) if batchnorm else nn.Identity()
            self.norms.append(norm)
            self.residual.append(wants_residual and width == previous and len(self.layers) > 1)
            previous = width
        self.head = nn.Linear(previous, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, norm, residual in zip(self.layers, self.norms, self.residual):
            out = norm(layer(x))
            x = F.relu(x + out) if residual else F.relu(out)
        return self.head(x.mean(-1) if self.conv else x)


@st.composite
def planted_networks(draw):
    conv = draw(st.booleans())
    depth = draw(st.integers(1, 4))
    widths = [draw(st.integers(3, 8)) for _ in range(depth)]
    residual = [draw(st.booleans()) for _ in range(depth)]
    batchnorm = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = RandomNet(conv, 2, widths, residual, batchnorm)
    with torch.no_grad():
        for layer, norm in zip(model.layers, model.norms):
            layer.bias.fill_(2.0)  # alive unless planted
            layer.weight.mul_(0.2)
            if isinstance(norm, nn.BatchNorm1d):
                norm.running_var.fill_(1.0)
                norm.bias.fill_(2.0)
    planted: dict[int, list[int]] = {}
    for index, (layer, norm) in enumerate(zip(model.layers, model.norms)):
        if model.residual[index] or (index + 1 < depth and model.residual[index + 1]):
            continue  # stream units: planted in the tests below only through non-stream layers
        units = draw(st.lists(st.integers(0, widths[index] - 1), unique=True, max_size=widths[index] - 1))
        with torch.no_grad():
            target = norm if isinstance(norm, nn.BatchNorm1d) else layer
            target.weight[units] = 0.0
            target.bias[units] = -1.0
        planted[index] = sorted(units)
    inputs = torch.randn(16, 2, 5) if conv else torch.randn(16, 2)
    return model, inputs, planted


def plan_dead(model, graph, inputs):
    stats = dead_check(model, ActivationMonitor(graph.readers()), [inputs], lambda m, b: m(b))
    plan, groups = {}, {}
    for group in graph.groups():
        if group.blocked is None:
            readers = [(stats[r.reader].max_abs, r.feature_idxs, r.unit_idxs) for r in group.readers]
            dead = find_dead_units(unit_activity(group.num_units, readers))
            if len(dead):
                plan[group.name], groups[group.name] = dead, group
    return plan, groups


@given(planted_networks())
def test_removal_preserves_outputs_removes_only_dead_units_and_keeps_optimizer_state(case):
    model, inputs, planted = case
    model.eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    model(inputs).square().mean().backward()
    optimizer.step()
    model.eval()
    before = model(inputs).detach()
    old_state = {name: copy.deepcopy(optimizer.state[p]) for name, p in model.named_parameters()}
    old_params = {name: p.detach().clone() for name, p in model.named_parameters()}
    original = dict(model.named_parameters())

    graph = PrunableGraph(model, inputs[:2])
    plan, groups = plan_dead(model, graph, inputs)

    # No live unit in the plan: silencing it at every reader leaves the output unchanged.
    silenced = copy.deepcopy(model)
    modules = dict(silenced.named_modules())
    with torch.no_grad():
        for name, units in plan.items():
            for reader in groups[name].readers:
                features = reader.feature_idxs[torch.isin(reader.unit_idxs, units)]
                modules[reader.reader].weight[:, features] = 0.0
    torch.testing.assert_close(silenced(inputs), before, rtol=1e-5, atol=1e-5)

    # Every planted unit is found.
    layer_names = {id(layer): f"layers.{i}" for i, layer in enumerate(model.layers)}
    for index, units in planted.items():
        name = layer_names[id(model.layers[index])]
        if units:
            assert set(units) <= set(plan.get(name, torch.tensor([], dtype=torch.long)).tolist())

    remaps = remove_units_(graph, plan)
    remap_optimizer_(optimizer, remaps)
    torch.testing.assert_close(model(inputs), before, rtol=1e-5, atol=1e-5)

    # Kept units keep their optimizer state: follow each original parameter through its chain of slices.
    by_old = {id(remap.old): remap for remap in remaps}
    for name, param in model.named_parameters():
        current, value, state = original[name], old_params[name], dict(old_state[name])
        while id(current) in by_old:
            remap = by_old[id(current)]
            value = value.index_select(remap.dim, remap.kept)
            state = {k: (v if k == "step" else v.index_select(remap.dim, remap.kept)) for k, v in state.items()}
            current = remap.new
        assert current is param, name
        assert torch.equal(param.detach(), value), name
        for key, expected in state.items():
            assert torch.equal(optimizer.state[param][key], expected), (name, key)
    assert {id(p) for p in optimizer.state} == {id(p) for p in model.parameters()}

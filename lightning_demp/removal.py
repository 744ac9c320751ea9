"""Structural removal: slice every layer a group of units runs through, and say what changed for the optimizer.

`remove_units_` applies the unit part of a plan through `PrunableGraph.cut` (Torch-Pruning slices the layers) and
returns one `ParamRemap` per replaced parameter, which `lightning_demp.optim.remap_optimizer_` uses to carry the
optimizer state over.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_demp.graph import PrunableGraph
from lightning_demp.optim import ParamRemap


class RemovalError(ValueError):
    """A plan does not fit the model: an unknown group, a position out of range, or every unit of a group.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> try:
        ...     remove_units_(PrunableGraph(model, torch.randn(2, 4)), {"0": torch.tensor([3])})
        ... except RemovalError as error:
        ...     print(error)
        Cannot remove units [3] of group `0`: it has 3 units (positions 0 to 2).
    """


def remove_units_(graph: PrunableGraph, plan: Mapping[str, Tensor]) -> list[ParamRemap]:
    """Remove units physically, in place.

    Args:
        graph: The model's graph.
        plan: For each group (by root name), the unit positions to remove (in the group's current numbering).

    Returns:
        One `ParamRemap` per replaced parameter slice, in the order they happened.

    Raises:
        RemovalError: When a group name is unknown, a position is out of range, the plan takes a unit that stays
            (`UnitGroup.fixed_units`) or every unit of a group (checked before anything is removed), or when
            Torch-Pruning fails on a group (naming it and its parameters' shapes).

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> remaps = remove_units_(PrunableGraph(model, torch.randn(2, 4)), {"0": torch.tensor([1, 5])})
        >>> model[0].out_features, model[2].in_features, len(remaps)
        (6, 6, 3)
    """
    groups = graph.groups()
    widths = {group.name: group.num_units for group in groups}
    fixed = {group.name: (group.fixed_units, group.fixed_because) for group in groups if group.fixed_units}
    chosen: dict[str, list[int]] = {}
    for name, unit_idxs in plan.items():
        idxs = sorted({int(i) for i in torch.as_tensor(unit_idxs).tolist()})
        if not idxs:
            continue
        if name not in widths:
            raise RemovalError(f"`{name}` names no group of units; the groups are {sorted(widths)} (root layers).")
        width = widths[name]
        outside = [i for i in idxs if not 0 <= i < width]
        if outside:
            raise RemovalError(
                f"Cannot remove units {outside} of group `{name}`: it has {width} units (positions 0 to {width - 1})."
            )
        if name in fixed and (kept := sorted(set(idxs) & set(fixed[name][0]))):
            raise RemovalError(f"Cannot remove units {kept} of group `{name}`: they stay ({fixed[name][1]}).")
        if len(idxs) >= width:
            raise RemovalError(f"Cannot remove all {width} units of group `{name}`; keep at least one.")
        chosen[name] = idxs
    remaps: list[ParamRemap] = []
    for name, idxs in chosen.items():
        cut = graph.cut(name, idxs)
        touched: dict[nn.Module, list[tuple[bool, list[int]]]] = {}
        for layer in cut.layers:
            touched.setdefault(layer.module, []).append((layer.is_out, layer.idxs))
        before = {
            (module, param_name): param
            for module in touched
            for param_name, param in module.named_parameters(recurse=False)
        }
        shapes = {
            f"{graph.name_of(module)}.{param_name}": tuple(old.shape) for (module, param_name), old in before.items()
        }
        owners = {id(param): (module, param_name) for module, param_name, param in _direct_parameters(graph.model)}
        unwrapped = [(owners[id(param)], param, idxs) for param, idxs in cut.parameters if id(param) in owners]
        try:
            cut.apply()
        except Exception as error:
            raise RemovalError(
                f"Removing units {idxs} of group `{name}` failed in Torch-Pruning ({type(error).__name__}: {error}); "
                f"the group's parameters had the shapes {shapes}."
            ) from error
        for (module, param_name), old in before.items():
            new = getattr(module, param_name)
            if new is old:
                continue
            new.requires_grad_(old.requires_grad)
            remaps.extend(_describe_slices(old, new, touched[module]))
        for (module, param_name), old, idxs in unwrapped:  # so that the optimizer keeps training them
            new = getattr(module, param_name)
            if new is not old:
                new.requires_grad_(old.requires_grad)
                remaps.extend(_describe_slices(old, new, [(True, idxs)]))
    return remaps


def _direct_parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    return [
        (module, name, param) for module in model.modules() for name, param in module.named_parameters(recurse=False)
    ]


def _describe_slices(old: Tensor, new: Tensor, prunings: list[tuple[bool, list[int]]]) -> list[ParamRemap]:
    """Work out which dimension lost which indices, from the shapes and Torch-Pruning's per-module indices."""
    changed = [dim for dim in range(old.dim()) if old.shape[dim] != new.shape[dim]]
    remaps = []
    current = old
    for dim in changed:
        removed_count = old.shape[dim] - new.shape[dim]
        candidates = [idxs for is_out, idxs in prunings if len(idxs) == removed_count]
        if len(candidates) > 1:  # both sides of one layer lost the same count: out-features are dim 0
            candidates = [idxs for is_out, idxs in prunings if is_out == (dim == 0)] or candidates
        if not candidates:
            raise RemovalError(f"Cannot tell which indices left dimension {dim} of a {tuple(old.shape)} parameter.")
        removed = set(candidates[0])
        kept = torch.tensor([i for i in range(old.shape[dim]) if i not in removed], dtype=torch.long)
        target = new if dim == changed[-1] else current.detach().index_select(dim, kept.to(old.device))
        remaps.append(ParamRemap(old=current, new=target, dim=dim, kept=kept))
        current = target
    return remaps


def forget_compiled_graphs(model: nn.Module) -> bool:
    """After a removal, drop torch.compile's graphs when any module of ``model`` is compiled (their guards hold
    the old shapes); returns whether it did.

    Examples:
        >>> forget_compiled_graphs(nn.Linear(2, 2))
        False
    """
    if any(getattr(module, "_compiled_call_impl", None) is not None for module in model.modules()):
        torch.compiler.reset()
        return True
    return False

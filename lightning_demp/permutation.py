"""Reordering units: the network's function is unchanged, and `ChannelSelect` shortcuts become slice adds.

`permute_units_` reorders the units of groups in every coupled layer; `order_routed_channels` decides the orders
that make each selection's routed channels one contiguous run on both of its sides, and `order_routed_channels_`
applies them after a removal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_demp.graph import PrunableGraph, reorderable_tensors
from lightning_demp.optim import ParamRemap, slice_parameter_
from lightning_demp.selection import ChannelSelect
from lightning_demp.units import ReaderSlice


@dataclass(frozen=True)
class SelectionRoute:
    """Where a `ChannelSelect` sits between two groups of units, and which of its channels it routes.

    Attributes:
        name: The selection's module name.
        input_group: The group whose units are the selection's input channels, or ``None`` when its channels
            cannot be reordered (no single group, or a group that must keep its order).
        input_units: For each input position, the unit (in ``input_group``'s numbering) it carries.
        output_group: The same for the output channels.
        output_units: For each output position, the unit it carries.
        routed_outputs: Output positions that receive an input channel.
        routed_inputs: The input position each of them receives.

    Examples:
        >>> from lightning_demp.demos import ResidualCNNBackbone
        >>> route = selection_routes(PrunableGraph(ResidualCNNBackbone(width=4), torch.randn(2, 40)))[0]
        >>> route.name, route.input_group, route.output_group, route.routed_inputs
        ('block1.shortcut', 'stem', 'block1.conv2', tensor([0, 1, 2, 3]))
    """

    name: str
    input_group: str | None
    input_units: Tensor
    output_group: str | None
    output_units: Tensor
    routed_outputs: Tensor
    routed_inputs: Tensor


def order_routed_channels(routes: Sequence[SelectionRoute], widths: Mapping[str, int]) -> dict[str, Tensor]:
    """Unit orders that make each selection's routed channels contiguous and aligned on both of its sides.

    Reordering the units of a group (the producer's output channels, their BatchNorm, every reader's input) leaves the
    network's function unchanged; once the routed channels of a selection sit at the same relative positions in one
    run on each side, `ChannelSelect.add_to_` is a single in-place slice add. Selections are visited in order; the
    first to touch a group fixes its order: routed channels first (in the order of the other side when that is
    already fixed), then, on an output side, the channels a later selection reads, so that they are contiguous too
    (a chain of two selections gets one run each). Longer chains may get a few runs.

    Args:
        routes: The selections, in module order (`PrunableGraph.selection_routes`).
        widths: Current number of units of every group.

    Returns:
        For each group to reorder, the new order: position ``p`` takes the unit now at ``order[p]``. Groups whose
        order is already right are left out.

    Examples:
        A selection that lost input channel 0 and output channel 2 of 4 routes ids 1 and 3 (input positions 0 and 2)
        to output positions 1 and 2: both groups get the routed channels first.

        >>> route = SelectionRoute("select", "a", torch.arange(3), "b", torch.arange(3),
        ...                        routed_outputs=torch.tensor([1, 2]), routed_inputs=torch.tensor([0, 2]))
        >>> order_routed_channels([route], {"a": 3, "b": 3})
        {'a': tensor([0, 2, 1]), 'b': tensor([1, 2, 0])}
    """
    read_later: dict[str, dict[str, set[int]]] = {}
    for route in routes:
        if route.input_group is not None:
            units = route.input_units[route.routed_inputs].tolist()
            read_later.setdefault(route.input_group, {})[route.name] = set(units)
    fixed: dict[str, list[int]] = {}
    for route in routes:
        sides = (route.input_group, route.output_group)
        if None in sides or route.input_group == route.output_group:
            for group in sides:
                if group is not None:
                    fixed.setdefault(group, list(range(widths[group])))
            continue
        assert route.input_group is not None
        assert route.output_group is not None
        if route.input_group in fixed and route.output_group in fixed:
            continue
        pairs = list(
            zip(
                route.input_units[route.routed_inputs].tolist(),
                route.output_units[route.routed_outputs].tolist(),
                strict=True,
            )
        )
        others = read_later.get(route.output_group, {})
        read_next = set().union(*(units for name, units in others.items() if name != route.name))
        if route.input_group in fixed:
            position = {unit: p for p, unit in enumerate(fixed[route.input_group])}
            pairs.sort(key=lambda pair: position[pair[0]])
        elif route.output_group in fixed:
            position = {unit: p for p, unit in enumerate(fixed[route.output_group])}
            pairs.sort(key=lambda pair: position[pair[1]])
        else:
            pairs.sort(key=lambda pair: (pair[1] in read_next, pair[1]))
        if route.input_group not in fixed:
            fixed[route.input_group] = _layout([unit for unit, _ in pairs], [], widths[route.input_group])
        if route.output_group not in fixed:
            written = [unit for _, unit in pairs]
            also_read = sorted(read_next - set(written))
            fixed[route.output_group] = _layout(written, also_read, widths[route.output_group])
    return {
        group: torch.tensor(order, dtype=torch.long)
        for group, order in fixed.items()
        if order != list(range(widths[group]))
    }


def _layout(first: Sequence[int], then: Sequence[int], width: int) -> list[int]:
    """``first``, then ``then``, then every other unit of ``range(width)`` in its current order."""
    placed = set(first) | set(then)
    return [*first, *then, *(unit for unit in range(width) if unit not in placed)]


def selection_routes(graph: PrunableGraph) -> list[SelectionRoute]:
    """Every `ChannelSelect` of the model, with the groups on its two sides, in module order.

    A side is ``None`` (never reordered) when its channels do not all belong to one group, or the group is
    blocked or not permutable.

    Examples:
        >>> from lightning_demp.demos import ResidualCNNBackbone
        >>> [route.name for route in selection_routes(PrunableGraph(ResidualCNNBackbone(width=4), torch.randn(2, 40)))]
        ['block1.shortcut', 'block2.shortcut']
    """
    groups = graph.groups()
    sides: dict[str, dict[bool, tuple[str, Tensor]]] = {}
    for group in groups:
        usable = group.blocked is None and group.permutable
        for is_input, slices in ((True, group.readers), (False, group.selection_outputs)):
            for touched in slices:
                seen = sides.setdefault(touched.reader, {})
                if is_input in seen:  # this side's channels span several groups: keep its order
                    seen[is_input] = ("", torch.empty(0, dtype=torch.long))
                else:
                    seen[is_input] = (group.name if usable else "", _units_by_position(touched))
    routes = []
    for name, module in graph.model.named_modules():
        if not isinstance(module, ChannelSelect):
            continue
        found = sides.get(name, {})
        input_group, input_units = _side(found.get(True), module.in_channels)
        output_group, output_units = _side(found.get(False), module.out_channels)
        routes.append(
            SelectionRoute(
                name=name,
                input_group=input_group,
                input_units=input_units,
                output_group=output_group,
                output_units=output_units,
                routed_outputs=module.present.cpu(),
                routed_inputs=module.present_source.cpu(),
            )
        )
    return routes


def permute_units_(graph: PrunableGraph, orders: Mapping[str, Tensor]) -> list[ParamRemap]:
    """Reorder the units of groups in place: the network computes the same function afterwards.

    Args:
        orders: For each group (by root name), the new order: position ``p`` takes the unit now at ``order[p]``.

    Returns:
        One `ParamRemap` per replaced parameter (``kept`` is the permutation), for `remap_optimizer_`.

    Raises:
        ValueError: When an order is not a permutation of the group's units, or the group holds a layer whose
            units cannot be reordered (see `UnitGroup.permutable`).

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> x = torch.randn(4, 2)
        >>> before = model(x)
        >>> remaps = permute_units_(PrunableGraph(model, x), {"0": torch.tensor([2, 0, 1])})
        >>> torch.allclose(model(x), before), len(remaps)
        (True, 3)
    """
    groups = graph.groups()
    remaps: list[ParamRemap] = []
    unknown = sorted(set(orders) - {group.name for group in groups})
    if unknown:
        raise ValueError(
            f"{unknown} name no group of units; the groups are {[group.name for group in groups]} (root layers)."
        )
    fixed = [group.name for group in groups if group.name in orders and not group.permutable]
    if fixed:
        raise ValueError(f"The units of {fixed} cannot be reordered: a member layer is not a plain Linear/Conv.")
    blocked = {group.name: group.blocked for group in groups if group.name in orders and group.blocked}
    if blocked:
        raise ValueError(f"The units of {sorted(blocked)} cannot be reordered: {'; '.join(blocked.values())}.")
    for name, order in orders.items():
        width = next(group.num_units for group in groups if group.name == name)
        order = torch.as_tensor(order, dtype=torch.long).cpu()
        if not torch.equal(order.sort().values, torch.arange(width)):
            raise ValueError(f"The order for `{name}` must be a permutation of its {width} units, got {order}.")
        done: set[tuple[int, bool]] = set()
        for layer in graph.cut(name, list(range(width))).layers:
            module = layer.module
            if not layer.per_unit:
                continue  # functional ops: Torch-Pruning maps indices through them
            is_out = layer.is_out or isinstance(module, nn.modules.batchnorm._BatchNorm)  # BN: one set of channels
            if (id(module), is_out) in done:
                continue
            done.add((id(module), is_out))
            width_of_side = _side_width(module, is_out)
            if width_of_side is None:
                continue  # holds no tensor that follows its units (a shared PReLU slope)
            layer_order = _layer_order(layer.idxs, layer.root_idxs, order, width_of_side)
            if layer_order is None:
                continue
            remaps.extend(_permute_module_(module, is_out, layer_order, layer.name))
    return remaps


def order_routed_channels_(graph: PrunableGraph) -> tuple[dict[str, Tensor], list[ParamRemap]]:
    """Reorder units so that every `ChannelSelect` routes one contiguous run (see `order_routed_channels`).

    Returns:
        The orders applied (by group) and the `ParamRemap` records for the optimizer.

    Examples:
        >>> from lightning_demp.demos import ResidualCNNBackbone
        >>> model, x = ResidualCNNBackbone(width=8).eval(), torch.randn(2, 40)
        >>> from lightning_demp.removal import remove_units_
        >>> graph = PrunableGraph(model, x)
        >>> _ = remove_units_(graph, {"block1.conv2": torch.tensor([0, 3]), "stem": torch.tensor([5])})
        >>> before = model(x)
        >>> orders, remaps = order_routed_channels_(graph)
        >>> sorted(orders), len(model.block1.shortcut.segments), torch.allclose(model(x), before, atol=1e-6)
        (['block1.conv2', 'stem'], 1, True)
    """
    if not any(isinstance(module, ChannelSelect) for module in graph.model.modules()):
        return {}, []  # nothing to arrange: spare the group analysis at every removal event
    widths = {group.name: group.num_units for group in graph.groups()}
    orders = order_routed_channels(selection_routes(graph), widths)
    return orders, permute_units_(graph, orders)


def _units_by_position(touched: ReaderSlice) -> Tensor:
    """The unit each channel of a selection side carries, ``-1`` at a position no unit of the group reaches."""
    units = torch.full((int(touched.feature_idxs.max()) + 1 if touched.feature_idxs.numel() else 0,), -1)
    units[touched.feature_idxs] = touched.unit_idxs
    return units


def _side(found: tuple[str, Tensor] | None, channels: int) -> tuple[str | None, Tensor]:
    if found is None or not found[0] or found[1].numel() != channels or bool((found[1] < 0).any()):
        return None, torch.arange(channels)
    return found


def _side_width(module: nn.Module, is_out: bool) -> int | None:
    """Features on one side of ``module``, read off the first tensor that follows its units (`_permuted_tensors`)."""
    if isinstance(module, ChannelSelect):
        return module.out_channels if is_out else module.in_channels
    for attribute, dim in reorderable_tensors(module, is_out) or []:
        tensor = getattr(module, attribute, None)
        if isinstance(tensor, Tensor):
            return int(tensor.shape[dim])
    return None


def _layer_order(idxs: list[int], root_idxs: list[int], order: Tensor, width: int) -> Tensor | None:
    """A layer's new order along one side, for the group's new unit order ``order``.

    The layer's features that carry unit ``p`` (in ascending position: a flatten gives each unit a run, a
    concatenation of the group with itself gives it one feature per copy) keep their positions; the ``k``-th of them
    takes the ``k``-th feature of the unit that moves to ``p``. Features of other groups stay where they are.
    """
    if not idxs:
        return None
    features, units = torch.tensor(idxs, dtype=torch.long), torch.tensor(root_idxs, dtype=torch.long)
    counts = torch.bincount(units, minlength=len(order))
    if counts.numel() == len(order) and bool((counts == counts[0]).all()):  # every unit carried equally often
        by_unit = features[torch.argsort(units * (width + 1) + features)].view(len(order), -1)  # ascending per unit
        layer_order = torch.arange(width)
        layer_order[by_unit.flatten()] = by_unit[order].flatten()
        return None if torch.equal(layer_order, torch.arange(width)) else layer_order
    carriers: dict[int, list[int]] = {}
    for idx, unit in sorted(zip(idxs, root_idxs, strict=True)):
        carriers.setdefault(unit, []).append(idx)
    layer_order = torch.arange(width)
    for position, unit in enumerate(order.tolist()):
        targets, sources = carriers.get(position, []), carriers.get(unit, [])
        if len(targets) != len(sources):
            raise ValueError("A layer reads the units of a group an unequal number of times; they cannot be reordered.")
        layer_order[targets] = torch.tensor(sources, dtype=torch.long)
    return None if torch.equal(layer_order, torch.arange(width)) else layer_order


def _permute_module_(module: nn.Module, is_out: bool, order: Tensor, name: str) -> list[ParamRemap]:
    """Apply one side's new order to ``module``; parameters are replaced by permuted copies."""
    if isinstance(module, ChannelSelect):
        (module.keep_outputs_ if is_out else module.keep_inputs_)(order)
        return []
    tensors = reorderable_tensors(module, is_out)
    if tensors is None:
        raise ValueError(f"`{name}` ({type(module).__name__}) cannot have its units reordered in place.")
    remaps = []
    for attribute, dim in tensors:
        old = getattr(module, attribute, None)
        if isinstance(old, nn.Parameter):
            remaps.append(slice_parameter_(module, attribute, dim, order))
        elif isinstance(old, Tensor):  # BatchNorm running statistics
            old.copy_(old.index_select(dim, order.to(old.device)))
    return remaps

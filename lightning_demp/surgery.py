"""Dependency-aware structural removal; the only module that imports Torch-Pruning.

`PrunableGraph` traces a model once with Torch-Pruning's ``DependencyGraph`` and describes every group of
coupled units as a `UnitGroup`: the producers whose outputs carry the units (Linear/Conv out-features and
channels, with their BatchNorm), and the *readers*, the Linear/Conv layers whose input receives them, with the
mapping from each reader feature back to the unit it carries (through flatten, concatenation and residual sums).
`PrunableGraph.remove_units_` removes units physically and returns `ParamRemap`
records for the optimizer. `resize_like_` shrinks a fresh model to the shapes of a saved state dict.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_demp.attention import HeadedAttention
from lightning_demp.optim import ParamRemap, slice_parameter_
from lightning_demp.selection import ChannelSelect, SelectionRoute, order_routed_channels

log = logging.getLogger(__name__)

_OPTYPE = tp.ops.OPTYPE
# Module types whose units we can remove exactly: per-channel layers and the Linear/Conv producers/readers.
_SUPPORTED_MODULE_TYPES = {_OPTYPE.CONV, _OPTYPE.LINEAR, _OPTYPE.BN, _OPTYPE.DEPTHWISE_CONV, _OPTYPE.PRELU}
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ReaderSlice:
    """The features of reader ``reader`` that carry units of a group, and which unit each one carries.

    Examples:
        Two channels of length 2, flattened into the 4 input features of a Linear layer:

        >>> model = nn.Sequential(nn.Conv1d(1, 2, 1), nn.Flatten(), nn.Linear(4, 1))
        >>> reader = PrunableGraph(model, torch.randn(1, 1, 2)).groups()[0].readers[0]
        >>> reader.reader, reader.feature_idxs, reader.unit_idxs
        ('2', tensor([0, 1, 2, 3]), tensor([0, 0, 1, 1]))
    """

    reader: str
    feature_idxs: Tensor
    unit_idxs: Tensor


@dataclass
class UnitGroup:
    """Units that must be removed together: one index per unit, shared by every coupled layer.

    Attributes:
        name: Name of the root producer (a Linear or Conv layer); units are its output features or channels.
        num_units: Current number of units.
        members: Names of every module the removal touches.
        readers: Where the units are read (see `ReaderSlice`).
        selection_outputs: Output sides of `ChannelSelect` modules that carry units, as `ReaderSlice` records
            whose ``reader`` names the selection and whose ``feature_idxs`` are its output channels.
        blocked: Why the group is never pruned, or ``None`` when it can be.
        permutable: Whether every member is a layer whose units can be reordered in place (see
            `PrunableGraph.permute_units_`).

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> hidden, output = PrunableGraph(model, torch.randn(2, 4)).groups()
        >>> hidden.name, hidden.num_units, hidden.members, hidden.blocked
        ('0', 3, ['0', '2'], None)
        >>> output.blocked
        '`2` produces the model output'
    """

    name: str
    num_units: int
    members: list[str] = field(default_factory=list)
    readers: list[ReaderSlice] = field(default_factory=list)
    selection_outputs: list[ReaderSlice] = field(default_factory=list)
    blocked: str | None = None
    permutable: bool = True


class ChannelSelectPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning handler: input and output channels of a `ChannelSelect` are removed independently.

    Examples:
        >>> pruner, select = ChannelSelectPruner(), ChannelSelect(4)
        >>> _ = pruner.prune_in_channels(select, [1])
        >>> pruner.get_in_channels(select), pruner.get_out_channels(select)
        (3, 4)
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, ChannelSelect)
        removed = set(idxs)
        layer.keep_outputs_(torch.tensor([i for i in range(layer.out_channels) if i not in removed], dtype=torch.long))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, ChannelSelect)
        removed = set(idxs)
        layer.keep_inputs_(torch.tensor([i for i in range(layer.in_channels) if i not in removed], dtype=torch.long))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, ChannelSelect)
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, ChannelSelect)
        return layer.in_channels


class HeadedAttentionPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning handler: a `HeadedAttention` is one layer from ``dim`` input to ``dim`` output channels.

    Registering it keeps Torch-Pruning from tracing inside it, where the heads' reshapes would couple ``qkv``'s
    output features with ``proj``'s input features as if they were units. Heads are removed by
    `HeadedAttention.remove_heads_`, outside the dependency graph; the residual width it reads and writes is
    coupled with LayerNorm in a transformer block and stays blocked.

    Examples:
        >>> pruner, attention = HeadedAttentionPruner(), HeadedAttention(dim=8, heads=2)
        >>> _ = pruner.prune_in_channels(attention, [0, 1])
        >>> pruner.get_in_channels(attention), pruner.get_out_channels(attention), attention.head_dim
        (6, 8, 4)
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, HeadedAttention)
        tp.prune_linear_out_channels(layer.proj, list(idxs))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, HeadedAttention)
        tp.prune_linear_in_channels(layer.qkv, list(idxs))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, HeadedAttention)
        return layer.proj.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, HeadedAttention)
        return layer.qkv.in_features


@contextlib.contextmanager
def _plain_metric_comparisons() -> Iterator[None]:
    """Compare torchmetrics metrics by identity while Torch-Pruning builds its graph.

    ``Metric.__eq__``/``__ne__`` build compositional metrics (always truthy). Torch-Pruning compares modules with
    ``==`` and ``in`` when it registers customized layers, so a LightningModule holding metrics would have every
    layer treated as ignored.
    """
    from torchmetrics import Metric

    saved = Metric.__eq__, Metric.__ne__
    Metric.__eq__ = object.__eq__  # type: ignore[assignment,method-assign]
    Metric.__ne__ = object.__ne__  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        Metric.__eq__, Metric.__ne__ = saved  # type: ignore[method-assign]


class TracingError(RuntimeError):
    """The dependency graph could not be built from the example input.

    Examples:
        >>> try:
        ...     PrunableGraph(nn.Linear(4, 2), torch.randn(2, 3))  # the input has the wrong width
        ... except TracingError as error:
        ...     print(type(error.__cause__).__name__)
        RuntimeError
    """


def _layer_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    return None


def match_modules(model: nn.Module, patterns: Iterable[str]) -> dict[str, list[str]]:
    """Return, for each glob pattern, the names of the modules of ``model`` it matches.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> match_modules(model, ["0", "2*", "head"])
        {'0': ['0'], '2*': ['2'], 'head': []}
    """
    names = [name for name, _ in model.named_modules() if name]
    return {pattern: [name for name in names if fnmatch.fnmatchcase(name, pattern)] for pattern in patterns}


class PrunableGraph:
    """Torch-Pruning's dependency graph of ``model``, seen as groups of removable units.

    Args:
        model: The module to prune (the LightningModule itself, not a DDP wrapper).
        example_inputs: Inputs for one forward: a tensor, a tuple of positional arguments or a dict of keyword
            arguments (Lightning's ``example_input_array`` convention).
        exclude: Module names or glob patterns whose output units are never removed.

    Raises:
        TracingError: When tracing fails; the original error is attached as ``__cause__``.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> graph = PrunableGraph(model, torch.randn(2, 4))
        >>> [(group.name, group.num_units, group.blocked is None) for group in graph.groups()]
        [('0', 8, True), ('2', 2, False)]
        >>> remaps = graph.remove_units_({"0": torch.tensor([1, 5])})
        >>> model[0].out_features, model[2].in_features, len(remaps)
        (6, 6, 3)
    """

    def __init__(self, model: nn.Module, example_inputs: Any, exclude: Sequence[str] = ()) -> None:
        self.model = model
        self.exclude = list(exclude)
        was_training = {module: module.training for module in model.modules()}
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for param in frozen:  # Torch-Pruning traces autograd: a frozen layer would be invisible to it
            param.requires_grad_(True)
        try:
            with torch.enable_grad(), warnings.catch_warnings(), _plain_metric_comparisons():
                warnings.simplefilter("ignore")
                model.eval()  # trace without touching BatchNorm running statistics
                self._graph = tp.DependencyGraph().build_dependency(
                    model,
                    example_inputs=example_inputs,
                    verbose=False,
                    customized_pruners={ChannelSelect: ChannelSelectPruner(), HeadedAttention: HeadedAttentionPruner()},
                )
        except Exception as error:
            raise TracingError(
                f"Torch-Pruning could not trace `{type(model).__name__}` with the example input "
                f"({type(error).__name__}: {error}). Make `forward` run on `example_input_array` and traceable by "
                "autograd (tensor outputs, no Python branches on tensor values)."
            ) from error
        finally:
            for module, training in was_training.items():
                module.training = training
            for param in frozen:
                param.requires_grad_(False)
        self._names = {module: name for name, module in model.named_modules()}
        self._output_layers = self._find_output_layers()

    @property
    def output_layers(self) -> list[str]:
        """Names of the layers whose outputs reach the model output directly (never pruned)."""
        return sorted(self._names[module] for module in self._output_layers)

    def _find_output_layers(self) -> set[nn.Module]:
        sinks = [node for node in self._graph.module2node.values() if not node.outputs]
        found: set[nn.Module] = set()
        seen: set[int] = set()
        stack = list(sinks)
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node.module, _LAYER_TYPES):
                found.add(node.module)
                continue
            stack.extend(node.inputs)
        return found

    def _excluded_modules(self) -> set[nn.Module]:
        matches = match_modules(self.model, self.exclude)
        by_name = dict(self.model.named_modules())
        return {by_name[name] for names in matches.values() for name in names}

    def _modules_sharing_parameters(self) -> dict[nn.Module, str]:
        """Modules holding a parameter that another module also holds (tied weights), with the other's name."""
        owners: dict[int, list[nn.Module]] = {}
        for module in self.model.modules():
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), []).append(module)
        shared: dict[nn.Module, str] = {}
        for modules in owners.values():
            for module in modules if len(modules) > 1 else ():
                other = next(m for m in modules if m is not module)
                shared[module] = self._names.get(other, type(other).__name__)
        return shared

    def norm_after(self, name: str) -> nn.Module | None:
        """The BatchNorm that directly and only consumes the output of layer ``name``, if any."""
        node = self._graph.module2node.get(dict(self.model.named_modules())[name])
        if node is None or len(node.outputs) != 1:
            return None
        module = node.outputs[0].module
        return module if isinstance(module, nn.modules.batchnorm._BatchNorm) else None

    def readers(self) -> dict[str, nn.Module]:
        """Every Linear/Conv layer that reads a unit of some group, by name."""
        modules = dict(self.model.named_modules())
        return {reader.reader: modules[reader.reader] for group in self.groups() for reader in group.readers}

    def groups(self) -> list[UnitGroup]:
        """Describe every group of coupled units, blocked or not, in the model's current shape."""
        excluded = self._excluded_modules()
        shared = self._modules_sharing_parameters()
        graph = self._graph
        result = []
        for tp_group in graph.get_all_groups(ignored_layers=[], root_module_types=_LAYER_TYPES):
            root = tp_group[0].dep.target.module
            group = UnitGroup(name=self._names[root], num_units=int(_layer_width(root) or 0))
            reasons: list[str] = []
            for item in tp_group.items:
                dep = item.dep
                module = dep.target.module
                if not isinstance(module, nn.Module) or dep.target.type not in (
                    *_SUPPORTED_MODULE_TYPES,
                    _OPTYPE.LN,
                    _OPTYPE.GN,
                    _OPTYPE.IN,
                    _OPTYPE.PARAMETER,
                    _OPTYPE.MHA,
                    _OPTYPE.EMBED,
                    _OPTYPE.LSTM,
                    _OPTYPE.CUSTOMIZED,
                ):
                    continue  # functional ops (add, relu, flatten, cat, ...): Torch-Pruning maps indices through them
                name = self._names.get(module, type(module).__name__)
                if name not in group.members:
                    group.members.append(name)
                is_select = isinstance(module, ChannelSelect)
                if dep.target.type not in _SUPPORTED_MODULE_TYPES and not is_select:
                    reasons.append(f"it is coupled with `{name}` ({type(module).__name__}), which mixes units")
                    group.permutable = False
                    continue
                if module in shared:
                    reasons.append(f"`{name}` shares parameters with `{shared[module]}`")
                is_out = graph.is_out_channel_pruning_fn(dep.handler)
                if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.out_channels:
                    reasons.append(f"`{name}` is a grouped convolution (groups={module.groups})")
                if is_out and module in self._output_layers:
                    reasons.append(f"`{name}` produces the model output")
                if is_out and module in excluded:
                    reasons.append(f"`{name}` is excluded")
                if _permuted_tensors(module, is_out) is None or not _reads_each_unit_equally(
                    item.root_idxs, group.num_units
                ):
                    group.permutable = False
                touched = ReaderSlice(
                    reader=name,
                    feature_idxs=torch.as_tensor(list(item.idxs), dtype=torch.long),
                    unit_idxs=torch.as_tensor(list(item.root_idxs), dtype=torch.long),
                )
                if graph.is_in_channel_pruning_fn(dep.handler) and isinstance(module, (*_LAYER_TYPES, ChannelSelect)):
                    group.readers.append(touched)
                elif is_out and is_select:
                    group.selection_outputs.append(touched)
            if not group.readers and not reasons:
                reasons.append("no Linear/Conv layer reads its units")
            group.blocked = "; ".join(dict.fromkeys(reasons)) or None
            result.append(group)
        order = {name: position for position, (name, _) in enumerate(self.model.named_modules())}
        return sorted(result, key=lambda group: order[group.name])

    def remove_units_(self, plan: Mapping[str, Tensor]) -> list[ParamRemap]:
        """Remove units physically, in place.

        Args:
            plan: For each group (by root name), the unit indices to remove (in the group's current numbering).

        Returns:
            One `ParamRemap` per replaced parameter slice, in the order they happened.
        """
        modules = dict(self.model.named_modules())
        remaps: list[ParamRemap] = []
        for name, unit_idxs in plan.items():
            idxs = sorted({int(i) for i in unit_idxs.tolist()})
            if not idxs:
                continue
            root = modules[name]
            pruner = self._graph.get_pruner_of_module(root)
            tp_group = self._graph.get_pruning_group(root, pruner.prune_out_channels, idxs)
            touched: dict[nn.Module, list[tuple[bool, list[int]]]] = {}
            for item in tp_group.items:
                module = item.dep.target.module
                if isinstance(module, nn.Module) and not isinstance(module, nn.Parameter):
                    touched.setdefault(module, []).append(
                        (self._graph.is_out_channel_pruning_fn(item.dep.handler), list(item.idxs))
                    )
            before = {
                (module, param_name): param
                for module in touched
                for param_name, param in module.named_parameters(recurse=False)
            }
            tp_group.prune(record_history=False)
            for (module, param_name), old in before.items():
                new = getattr(module, param_name)
                if new is old:
                    continue
                new.requires_grad_(old.requires_grad)
                remaps.extend(_describe_slices(old, new, touched[module]))
        return remaps

    def selection_routes(self) -> list[SelectionRoute]:
        """Every `ChannelSelect` of the model, with the groups on its two sides, in module order.

        A side is ``None`` (never reordered) when its channels do not all belong to one group, or the group is
        blocked or not permutable.
        """
        return self._selection_routes(self.groups())

    def _selection_routes(self, groups: Sequence[UnitGroup]) -> list[SelectionRoute]:
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
        for name, module in self.model.named_modules():
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

    def permute_units_(self, orders: Mapping[str, Tensor]) -> list[ParamRemap]:
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
            >>> remaps = PrunableGraph(model, x).permute_units_({"0": torch.tensor([2, 0, 1])})
            >>> torch.allclose(model(x), before), len(remaps)
            (True, 3)
        """
        return self._permute_units_(orders, self.groups())

    def _permute_units_(self, orders: Mapping[str, Tensor], groups: Sequence[UnitGroup]) -> list[ParamRemap]:
        remaps: list[ParamRemap] = []
        modules = dict(self.model.named_modules())
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
            root = modules[name]
            width = int(_layer_width(root) or 0)
            order = torch.as_tensor(order, dtype=torch.long).cpu()
            if not torch.equal(order.sort().values, torch.arange(width)):
                raise ValueError(f"The order for `{name}` must be a permutation of its {width} units, got {order}.")
            pruner = self._graph.get_pruner_of_module(root)
            tp_group = self._graph.get_pruning_group(root, pruner.prune_out_channels, list(range(width)))
            done: set[tuple[int, bool]] = set()
            for item in tp_group.items:
                module = item.dep.target.module
                if item.dep.target.type not in _SUPPORTED_MODULE_TYPES and not isinstance(module, ChannelSelect):
                    continue  # functional ops: Torch-Pruning maps indices through them
                is_out = self._graph.is_out_channel_pruning_fn(item.dep.handler)
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    is_out = True  # one set of channels, whichever side Torch-Pruning reached it from
                if (id(module), is_out) in done:
                    continue
                done.add((id(module), is_out))
                width_of_side = _side_width(module, is_out)
                if width_of_side is None:
                    continue  # holds no tensor that follows its units (a shared PReLU slope)
                layer_order = _layer_order(list(item.idxs), list(item.root_idxs), order, width_of_side)
                if layer_order is None:
                    continue
                remaps.extend(_permute_module_(module, is_out, layer_order, self._names.get(module, name)))
        return remaps

    def order_routed_channels_(self) -> tuple[dict[str, Tensor], list[ParamRemap]]:
        """Reorder units so that every `ChannelSelect` routes one contiguous run (see `order_routed_channels`).

        Returns:
            The orders applied (by group) and the `ParamRemap` records for the optimizer.

        Examples:
            >>> from lightning_demp.demos import ResidualCNNBackbone
            >>> model, x = ResidualCNNBackbone(width=8).eval(), torch.randn(2, 40)
            >>> graph = PrunableGraph(model, x)
            >>> _ = graph.remove_units_({"block1.conv2": torch.tensor([0, 3]), "stem": torch.tensor([5])})
            >>> before = model(x)
            >>> orders, remaps = graph.order_routed_channels_()
            >>> sorted(orders), len(model.block1.shortcut.segments), torch.allclose(model(x), before, atol=1e-6)
            (['block1.conv2', 'stem'], 1, True)
        """
        if not any(isinstance(module, ChannelSelect) for module in self.model.modules()):
            return {}, []  # nothing to arrange: spare the group analysis at every removal event
        groups = self.groups()  # once, for the routes, the widths and the reordering
        widths = {group.name: group.num_units for group in groups}
        orders = order_routed_channels(self._selection_routes(groups), widths)
        return orders, self._permute_units_(orders, groups)


def _reads_each_unit_equally(root_idxs: Iterable[int], num_units: int) -> bool:
    """Whether a layer side carries every unit of a group the same number of times (a condition of reordering)."""
    counts = torch.bincount(torch.as_tensor(list(root_idxs), dtype=torch.long), minlength=num_units)
    return bool((counts == counts[0]).all()) if counts.numel() else True


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
    for attribute, dim in _permuted_tensors(module, is_out) or []:
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


def _permuted_tensors(module: nn.Module, is_out: bool) -> list[tuple[str, int]] | None:
    """``(attribute, dimension)`` of every tensor that follows a reordering of ``module``'s output (``is_out``) or
    input units, or ``None`` when the module's units cannot be reordered in place."""
    if isinstance(module, ChannelSelect):
        return []
    if isinstance(module, nn.Linear):
        return [("weight", 0), ("bias", 0)] if is_out else [("weight", 1)]
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1 or module.transposed:
            return None
        return [("weight", 0), ("bias", 0)] if is_out else [("weight", 1)]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]
    if isinstance(module, nn.PReLU):
        return [("weight", 0)] if module.num_parameters > 1 else []
    if not any(True for _ in module.parameters(recurse=False)) and not any(True for _ in module.buffers(False)):
        return []  # holds no per-unit tensor (activation, pooling, ...)
    return None


def _permute_module_(module: nn.Module, is_out: bool, order: Tensor, name: str) -> list[ParamRemap]:
    """Apply one side's new order to ``module``; parameters are replaced by permuted copies."""
    if isinstance(module, ChannelSelect):
        (module.keep_outputs_ if is_out else module.keep_inputs_)(order)
        return []
    tensors = _permuted_tensors(module, is_out)
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
            raise RuntimeError(f"Cannot tell which indices left dimension {dim} of a {tuple(old.shape)} parameter.")
        removed = set(candidates[0])
        kept = torch.tensor([i for i in range(old.shape[dim]) if i not in removed], dtype=torch.long)
        target = new if dim == changed[-1] else current.detach().index_select(dim, kept.to(old.device))
        remaps.append(ParamRemap(old=current, new=target, dim=dim, kept=kept))
        current = target
    return remaps


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every Linear/Conv layer, by name.

    Examples:
        >>> layer_widths(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        {'0': 8, '2': 2}
    """
    return {name: int(width) for name, module in model.named_modules() if (width := _layer_width(module)) is not None}


def resize_like_(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Shrink the layers of ``model`` to the shapes found in ``state_dict``, so that it can be loaded.

    Which entries survive does not matter: every one is overwritten by the load that follows. Only Linear, Conv,
    BatchNorm and LayerNorm layers are resized; other mismatches are left for ``load_state_dict`` to report.

    Args:
        model: A freshly built, full-size model.
        state_dict: A state dict saved from a pruned copy of it.
        prefix: Prefix of ``model``'s keys in ``state_dict``.

    Returns:
        The names of the resized modules.

    Examples:
        >>> pruned = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> resize_like_(fresh, pruned.state_dict())
        ['0', '2']
        >>> fresh.load_state_dict(pruned.state_dict())
        <All keys matched successfully>
    """
    resized = []
    for name, module in model.named_modules():
        key = f"{prefix}{name}." if name else prefix
        changed = False
        for param_name, param in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            saved = state_dict.get(key + param_name)
            if not isinstance(saved, Tensor) or saved.shape == param.shape or saved.dim() != param.dim():
                continue
            slices = tuple(slice(0, size) for size in saved.shape)
            new_value = param.detach()[slices].clone()
            if isinstance(param, nn.Parameter):
                setattr(module, param_name, nn.Parameter(new_value, requires_grad=param.requires_grad))
            else:
                module.register_buffer(
                    param_name, new_value, persistent=param_name not in module._non_persistent_buffers_set
                )
            changed = True
        if not changed:
            continue
        _sync_size_attributes(module)
        resized.append(name)
    return resized


_RESIZE_FLAG = "_demp_resize_on_load"


def _resize_on_load_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: shrink to the incoming shapes before the values are copied."""
    resize_like_(module, state_dict, prefix)


def enable_resize_on_load(module: nn.Module) -> torch.utils.hooks.RemovableHandle | None:
    """Let ``module.load_state_dict`` accept a state dict saved after units were removed (idempotent).

    Call it in your LightningModule's ``__init__`` to make ``LightningModule.load_from_checkpoint`` work on pruned
    checkpoints, and to run under ``strategy="ddp_spawn"`` (whose main process reloads the trained weights into the
    original, full-size module). `DemonPruning` calls it in ``setup`` otherwise.

    Returns:
        The hook's handle when it was registered now, ``None`` when it already was.

    Examples:
        >>> pruned = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = enable_resize_on_load(fresh)
        >>> fresh.load_state_dict(pruned.state_dict())
        <All keys matched successfully>
        >>> fresh[0].out_features, enable_resize_on_load(fresh) is None
        (3, True)
    """
    if getattr(module, _RESIZE_FLAG, False):
        return None
    handle = module.register_load_state_dict_pre_hook(_resize_on_load_hook)
    object.__setattr__(module, _RESIZE_FLAG, True)
    return handle


def disable_resize_on_load(module: nn.Module, handle: torch.utils.hooks.RemovableHandle) -> None:
    """Remove a hook registered by `enable_resize_on_load`.

    Examples:
        >>> fresh = nn.Linear(4, 8)  # a pruned state dict (4 → 3) no longer fits it afterwards
        >>> handle = enable_resize_on_load(fresh)
        >>> disable_resize_on_load(fresh, handle)
        >>> resize_on_load_enabled(fresh)
        False
        >>> fresh.load_state_dict(nn.Linear(4, 3).state_dict())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: Error(s) in loading state_dict for Linear:...
    """
    handle.remove()
    object.__setattr__(module, _RESIZE_FLAG, False)


def resize_on_load_enabled(module: nn.Module) -> bool:
    """Whether `enable_resize_on_load` was called on ``module`` (also on a pickled copy of it).

    Examples:
        >>> import pickle
        >>> model = nn.Linear(4, 2)
        >>> resize_on_load_enabled(model)
        False
        >>> _ = enable_resize_on_load(model)
        >>> resize_on_load_enabled(model), resize_on_load_enabled(pickle.loads(pickle.dumps(model)))
        (True, True)
    """
    return bool(getattr(module, _RESIZE_FLAG, False))


def _sync_size_attributes(module: nn.Module) -> None:
    """Update ``in_features``/``out_channels``/``num_features``/... from the module's (resized) weights."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        out_dim, in_dim = (1, 0) if module.transposed else (0, 1)
        module.out_channels = module.weight.shape[out_dim]
        module.in_channels = module.weight.shape[in_dim] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        tensor = module.weight if module.weight is not None else module.running_mean
        if tensor is not None:
            module.num_features = tensor.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)

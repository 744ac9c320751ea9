"""The dependency graph: which units are coupled, where they are read.

Torch-Pruning is imported here and in two helpers only: `lightning_demp.handlers` (how the project's own layers
lose units) and `lightning_demp.search` (the bounded group search).

`PrunableGraph` traces a model once with Torch-Pruning's ``DependencyGraph`` and describes every group of
coupled units as a `UnitGroup`: the producers whose outputs carry the units (Linear/Conv out-features and
channels, with their BatchNorm), and the *readers*, the Linear/Conv layers whose input receives them, with the
mapping from each reader feature back to the unit it carries (through flatten, concatenation and residual sums).
`PrunableGraph.cut` says which layers a removal touches; `lightning_demp.removal` and
`lightning_demp.permutation` act on them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from lightning_demp._modes import tracing_modes
from lightning_demp.attention import HeadedAttention
from lightning_demp.handlers import ChannelSelectPruner, HeadedAttentionPruner, map_channels_first_slices
from lightning_demp.mixing import reshape_split, unit_reduction, unit_split
from lightning_demp.patterns import match_modules
from lightning_demp.resize import input_width, layer_width, reorderable_tensors, tensor_shapes
from lightning_demp.search import coupled_groups
from lightning_demp.selection import ChannelSelect
from lightning_demp.units import ReaderSlice, UnitGroup, reads_each_unit_equally
from lightning_demp.usage import (
    buffer_pointers,
    buffer_read_by,
    grouping_failure,
    model_usage,
    modules_sharing_parameters,
    output_tensors,
    trace_failure,
)

_OPTYPE = tp.ops.OPTYPE
# Module types whose units we can remove exactly: per-channel layers and the Linear/Conv producers/readers.
_SUPPORTED_MODULE_TYPES = {_OPTYPE.CONV, _OPTYPE.LINEAR, _OPTYPE.BN, _OPTYPE.DEPTHWISE_CONV, _OPTYPE.PRELU}
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class TracingError(RuntimeError):
    """The dependency graph could not be built from the example input, or its groups could not be formed.

    Examples:
        >>> try:
        ...     PrunableGraph(nn.Linear(4, 2), torch.randn(2, 3))  # the input has the wrong width
        ... except TracingError as error:
        ...     print(type(error.__cause__).__name__)
        RuntimeError
    """


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
        >>> graph.norm_after("0") is None, graph.output_layers
        (True, ['2'])
    """

    def __init__(self, model: nn.Module, example_inputs: Any, exclude: Sequence[str] = ()) -> None:
        self.model = model
        self.exclude = list(exclude)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for param in frozen:  # Torch-Pruning traces autograd: a frozen layer would be invisible to it
            param.requires_grad_(True)
        try:
            with torch.enable_grad(), warnings.catch_warnings(), tracing_modes(model):
                warnings.simplefilter("ignore")  # eval mode: the trace leaves BatchNorm running statistics alone
                pruners = {ChannelSelect: ChannelSelectPruner(), HeadedAttention: HeadedAttentionPruner()}
                self._graph = tp.DependencyGraph().build_dependency(
                    model,
                    example_inputs=example_inputs,
                    output_transform=output_tensors,  # a ModelOutput, a key-value cache: every tensor in it
                    verbose=False,
                    customized_pruners=pruners,
                )
                map_channels_first_slices(self._graph)  # a Conv1d output cropped in time keeps its channels
                self._usage = model_usage(model, example_inputs)
        except Exception as error:
            raise TracingError(trace_failure(model, error, Path(tp.__file__).parent)) from error
        finally:
            for param in frozen:
                param.requires_grad_(False)
        self._names = {module: name for name, module in model.named_modules()}
        self._modules_by_name = {name: module for module, name in self._names.items()}
        self._output_layers = self._find_output_layers() | self._usage.returned  # sinks and every returned tensor
        self._groups: list[UnitGroup] | None = None
        self.extra_blocks: dict[str, str] = {}  # group name -> a reason found after the trace
        self._groups_signature: tuple[Any, ...] = ()

    def name_of(self, module: nn.Module) -> str:
        """The module name of ``module`` in the traced model (its class name when it is not part of it)."""
        return self._names.get(module, type(module).__name__)

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
        """Every group of coupled units, blocked or not, in the model's current shape (cached until a shape
        changes, so that asking several times per event costs one analysis)."""
        signature = tuple(tensor_shapes(self.model).items())
        if self._groups is None or self._groups_signature != signature:
            self._groups = self._describe_groups()
            self._groups_signature = signature
        for group in self._groups:  # blocks found after the trace (`block`)
            if group.name in self.extra_blocks and self.extra_blocks[group.name] not in (group.blocked or ""):
                group.blocked = "; ".join(filter(None, [group.blocked, self.extra_blocks[group.name]]))
        return list(self._groups)

    def _describe_groups(self) -> list[UnitGroup]:
        excluded = self._excluded_modules()
        shared = modules_sharing_parameters(self.model, self._names)
        buffers = buffer_pointers(self.model)
        graph = self._graph
        result = []
        try:
            searches = coupled_groups(graph, _LAYER_TYPES)
        except Exception as error:  # an index mapping Torch-Pruning lacks (through a GRU, ...): name the suspects
            raise TracingError(grouping_failure(self.model, error)) from error
        stopped = {(m, h): self._names[s.root] for s in searches if s.group is None for m, h in s.reached}
        for search in searches:
            root = search.root
            group = UnitGroup(name=self._names[root], num_units=int(layer_width(root) or 0))
            if search.group is None:  # kept whole, with every layer the search reached (`stopped`)
                stop = (
                    f"Torch-Pruning's search for the layers coupled with it was stopped ({search.stopped_because}): "
                    "an index mapping it cannot follow, such as a channel shuffle or grouped-query attention's "
                    "repeated key-value heads"
                )
                whole = [*self._layer_reasons(root, shared), *self._side_reasons(root, True, excluded), stop]
                group.blocked = "; ".join(whole)
                group.permutable = False
                result.append(group)
                continue
            reasons: list[str] = []
            fixed: set[int] = set()  # units that reach the model output or an excluded layer through one member
            fixed_reasons: list[str] = []
            for item in search.group.items:
                dep = item.dep
                module = dep.target.module
                if (other := stopped.get((module, dep.handler))) is not None and other != group.name:
                    reasons.append(f"it is coupled with `{other}`, whose search for coupled layers did not end")
                if isinstance(module, nn.Parameter) and sum(size > 1 for size in module.shape) > 1:
                    shape = "×".join(map(str, module.shape))
                    reasons.append(
                        f"a bare {shape} parameter follows its units on more than one dimension (a matrix they "
                        "multiply, a table added to them)"
                    )
                grad_fn = getattr(dep.target, "grad_fn", None)
                if (buffer := buffer_read_by(grad_fn, buffers)) is not None:
                    reasons.append(f"the buffer `{buffer}` is applied to its units and would keep its size")
                channels_last = isinstance(root, nn.Linear)
                if (reduction := unit_reduction(grad_fn, group.num_units, channels_last)) is not None:
                    reasons.append(f"its units are reduced together ({reduction}): removing one changes the others")
                if (picked := unit_split(grad_fn, group.num_units, channels_last)) is not None:
                    reasons.append(f"its units are picked by position ({picked}): removing one shifts the others")
                if (split := reshape_split(grad_fn)) is not None and math.prod(split[1]) % group.num_units == 0:
                    reasons.append(
                        f"its units pass through a reshape into {'×'.join(map(str, split[1]))} pieces (per-head "
                        "attention, an unflatten): removing single units would break it"
                    )
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
                is_out = graph.is_out_channel_pruning_fn(dep.handler)
                reasons += self._layer_reasons(module, shared)
                if side := self._side_reasons(module, is_out, excluded):
                    fixed.update(int(unit) for unit in item.root_idxs)
                    fixed_reasons += side
                if reorderable_tensors(module, is_out) is None or not reads_each_unit_equally(
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
            if fixed and (reasons or len(fixed) >= group.num_units):
                reasons += fixed_reasons
            elif fixed:  # the other units can go (one branch of a concatenation reaches the output)
                group.fixed_units, group.permutable = tuple(sorted(fixed)), False
                group.fixed_because = "; ".join(dict.fromkeys(fixed_reasons))
            if not group.readers and not reasons:
                reasons.append("no Linear/Conv layer reads its units")
            if group.readers and (unread := group.unread_units):
                reasons.append(f"{unread} of its units reach no traced reader: no evidence they are dead")
            group.blocked = "; ".join(dict.fromkeys(reasons)) or None
            result.append(group)
        self._block_unmapped_calls(result)
        order = {name: position for position, (name, _) in enumerate(self.model.named_modules())}
        return sorted(result, key=lambda group: order[group.name])

    def _layer_reasons(self, module: nn.Module, shared: dict[nn.Module, str]) -> list[str]:
        """Why a layer keeps every unit it carries, on either side: its tensors cannot be sliced."""
        name = self._names.get(module, type(module).__name__)
        checks = [
            (module in shared, f"`{name}` shares parameters with `{shared.get(module)}`"),
            (
                module in self._usage.used_outside,
                f"the weight of `{name}` is also used outside it (a tied or transposed weight)",
            ),
            (
                isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.out_channels,
                f"`{name}` is a grouped convolution (groups={getattr(module, 'groups', 1)})",
            ),
        ]
        return [reason for applies, reason in checks if applies]

    def _side_reasons(self, module: nn.Module, is_out: bool, excluded: set[nn.Module]) -> list[str]:
        """Why the units a layer carries on its output side (``is_out``) stay: only these units, not the whole
        group, when the layer carries part of it (one branch of a concatenation)."""
        name = self._names.get(module, type(module).__name__)
        checks = [
            (is_out and module in self._output_layers, f"`{name}` produces the model output"),
            (is_out and module in excluded, f"`{name}` is excluded"),
        ]
        return [reason for applies, reason in checks if applies]

    def _block_unmapped_calls(self, groups: list[UnitGroup]) -> None:
        """Block the groups of a producer run more than once whose readers have inputs no group maps: the trace
        followed one call's indices (one module on both halves of a split), so the other calls' units are unseen."""
        mapped: dict[str, set[int]] = {}
        for group in groups:
            for reader in group.readers:
                mapped.setdefault(reader.reader, set()).update(int(feature) for feature in reader.feature_idxs)
        for group in groups:
            widths = {r.reader: input_width(self._modules_by_name[r.reader]) or 0 for r in group.readers}
            if self._modules_by_name[group.name] in self._usage.reused and any(
                len(mapped[reader]) < width for reader, width in widths.items()
            ):
                reason = f"`{group.name}` runs more than once per forward and the trace mapped one call's units"
                group.blocked = "; ".join(filter(None, [group.blocked, reason]))

    def traced_modules(self) -> set[nn.Module]:
        """The modules the trace saw, with everything inside them (a custom-pruned layer's own projections)."""
        seen = [module for module in self._graph.module2node if isinstance(module, nn.Module)]
        return {inner for module in seen for inner in module.modules()}

    def forget_groups(self) -> None:
        """Drop the cached `groups` (after a removal, or one that was rolled back)."""
        self._groups = None

    def cut(self, name: str, unit_idxs: Sequence[int]) -> GroupCut:
        """What removing (or, with every index, reordering) units ``unit_idxs`` of group ``name`` touches.

        Raises:
            KeyError: When ``name`` is not the root layer of a group, with the group names.
        """
        root = self._modules_by_name.get(name)
        if root is None or layer_width(root) is None:
            names = [group.name for group in self.groups()]
            raise KeyError(f"`{name}` names no group of units; the groups are {names} (their root layers).")
        pruner = self._graph.get_pruner_of_module(root)
        tp_group = self._graph.get_pruning_group(root, pruner.prune_out_channels, list(unit_idxs))
        layers, parameters = [], []
        for item in tp_group.items:
            module = item.dep.target.module
            if isinstance(module, nn.Parameter):  # an unwrapped parameter (a per-unit gain): sliced too
                parameters.append((module, [int(i) for i in item.idxs]))
            if not isinstance(module, nn.Module):
                continue
            per_unit = item.dep.target.type in _SUPPORTED_MODULE_TYPES or isinstance(module, ChannelSelect)
            layers.append(  # functional ops hold no tensor that follows the units: their indices are not needed
                CoupledLayer(
                    module=module,
                    name=self._names.get(module, type(module).__name__),
                    is_out=self._graph.is_out_channel_pruning_fn(item.dep.handler),
                    idxs=[int(i) for i in item.idxs] if per_unit else [],
                    root_idxs=[int(i) for i in item.root_idxs] if per_unit else [],
                    per_unit=per_unit,
                )
            )
        return GroupCut(name, layers, tp_group, parameters)


@dataclass(frozen=True)
class CoupledLayer:
    """One side of one layer that a group's units run through.

    Attributes:
        module: The layer.
        name: Its module name.
        is_out: Whether the units are its outputs (a producer, or a per-channel layer) or its inputs (a reader).
        idxs: The layer's features on that side that carry the chosen units.
        root_idxs: For each of ``idxs``, the unit (in the group's numbering) it carries.
        per_unit: Whether the layer holds tensors that follow the units (Linear, Conv, BatchNorm, PReLU,
            `ChannelSelect`); functional ops that Torch-Pruning maps indices through do not.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> layers = PrunableGraph(model, torch.randn(2, 2)).cut("0", [1]).layers
        >>> [(layer.name, layer.is_out) for layer in layers if layer.per_unit]  # the ReLU between is a functional op
        [('0', True), ('2', False)]
    """

    module: nn.Module
    name: str
    is_out: bool
    idxs: list[int]
    root_idxs: list[int]
    per_unit: bool


class GroupCut:
    """A group's removal as Torch-Pruning planned it: the layers it touches (`layers`) and `apply`.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> PrunableGraph(model, torch.randn(2, 2)).cut("0", [1]).apply()
        >>> model[0].out_features, model[2].in_features
        (2, 2)
    """

    def __init__(
        self, name: str, layers: list[CoupledLayer], tp_group: Any, parameters: list[tuple[nn.Parameter, list[int]]]
    ) -> None:
        self.name = name
        self.layers = layers
        self.parameters = parameters  # unwrapped parameters the cut slices, with the indices they lose
        self._tp_group = tp_group

    def apply(self) -> None:
        """Slice every coupled layer (Torch-Pruning replaces the parameters)."""
        self._tp_group.prune(record_history=False)

"""Decoupled residual channels: an identity shortcut as a fixed 0/1 channel selection.

With a plain ``x + f(x)``, a channel of the residual stream can only go when it is dead at the block's input *and*
output, because the sum couples them. The authors' code turns identity shortcuts into fixed 0/1 selections
(``paper.md`` §1.1) so that a block's input channels and output channels shrink independently. ``ChannelSelect``
is that selection: it holds the original ids of its input and output channels and routes each output channel from
the input channel with the same id (zeros when that channel is gone). While nothing is removed it is an identity.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.fx.passes.shape_prop
from torch import Tensor, nn

from lightning_demp.attention import HeadedAttention


class ChannelSelect(nn.Module):
    """Identity shortcut that survives independent removal of its input and output channels.

    Args:
        channels: Number of channels (identity at construction).

    Examples:
        >>> select = ChannelSelect(4)
        >>> x = torch.arange(8.0).reshape(1, 4, 2)
        >>> torch.equal(select(x), x)
        True
        >>> select.keep_inputs_(torch.tensor([0, 2, 3]))   # input channel 1 is gone
        >>> select(x[:, [0, 2, 3]])[0, :, 0]               # output 1 now gets nothing from the shortcut
        tensor([0., 0., 4., 6.])
    """

    in_ids: Tensor
    out_ids: Tensor
    source: Tensor
    absent: Tensor
    present: Tensor
    present_source: Tensor
    unrouted: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("in_ids", torch.arange(channels))
        self.register_buffer("out_ids", torch.arange(channels))
        self._refresh()

    @property
    def in_channels(self) -> int:
        """Current number of input channels."""
        return int(self.in_ids.numel())

    @property
    def out_channels(self) -> int:
        """Current number of output channels."""
        return int(self.out_ids.numel())

    def _refresh(self) -> None:
        match = self.out_ids[:, None] == self.in_ids[None, :]
        present = match.any(dim=1)
        self.register_buffer("source", match.to(torch.uint8).argmax(dim=1), persistent=False)
        self.register_buffer("absent", torch.nonzero(~present).flatten(), persistent=False)
        self.register_buffer("present", torch.nonzero(present).flatten(), persistent=False)
        self.register_buffer("present_source", self.source[self.present], persistent=False)
        self.register_buffer("unrouted", ~present, persistent=False)
        self.identity = self.in_channels == self.out_channels and bool(torch.equal(self.in_ids, self.out_ids))
        self.complete = bool(present.all())
        self.segments = _runs(self.present.tolist(), self.present_source.tolist())

    @property
    def routed_channels(self) -> int:
        """Number of output channels that still receive an input channel."""
        return int(self.present.numel())

    def keep_inputs_(self, kept: Tensor) -> None:
        """Keep only the input channels at positions ``kept``."""
        self.in_ids = self.in_ids[kept.to(self.in_ids.device)]
        self._refresh()

    def keep_outputs_(self, kept: Tensor) -> None:
        """Keep only the output channels at positions ``kept``."""
        self.out_ids = self.out_ids[kept.to(self.out_ids.device)]
        self._refresh()

    def forward(self, x: Tensor) -> Tensor:
        """Route input channels (dimension 1) to output channels by id."""
        if self.identity:
            return x.view_as(x)  # a node of its own in the autograd graph, so Torch-Pruning can trace it
        if x.dim() > 2 and x.shape[0] >= 8:
            return self._gather_rows(x)
        selected = x.index_select(1, self.source)
        if self.complete:
            return selected
        # zero the outputs whose channel is gone: writes only those channels (``selected`` is a fresh tensor)
        return selected.index_fill_(1, self.absent, 0.0)

    def _gather_rows(self, x: Tensor) -> Tensor:
        """``forward`` for ``x`` with trailing dimensions: one gather of whole rows ``x[n, c, ...]``.

        About twice as fast on CPU as ``index_select`` on dim 1, which copies one short run per (sample, channel).
        Outputs whose channel is gone read an appended row of zeros (on CPU, zeroing them afterwards with a broadcast
        ``masked_fill_`` was several times slower, and ``index_fill_`` on the channel dimension no faster).
        """
        batch, channels = x.shape[0], x.shape[1]
        flat = x.reshape(batch * channels, -1)
        rows = torch.arange(batch, device=x.device)[:, None] * channels + self.source[None, :]
        if not self.complete:
            flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
            rows = torch.where(self.unrouted[None, :], batch * channels, rows)  # the zero row
        return flat.index_select(0, rows.flatten()).view(batch, self.out_channels, *x.shape[2:])

    def add_to_(self, branch: Tensor, x: Tensor) -> Tensor:
        """``branch + self(x)``, computed by adding the routed input channels into ``branch`` in place.

        Skips the zero-filled intermediate: only the output channels that still have a source are touched. Use it
        through `residual_sum`, which falls back to the plain form while anything observes the selection.

        Args:
            branch: The residual branch's output, ``[batch, out_channels, ...]``; overwritten. It must be a fresh
                tensor its producer does not keep for backward (a convolution's or BatchNorm's output is; a ReLU's
                is not, and autograd would refuse the in-place update).
            x: The block input, ``[batch, in_channels, ...]``.

        Examples:
            >>> select = ChannelSelect(3)
            >>> select.keep_inputs_(torch.tensor([0, 2]))
            >>> x, branch = torch.ones(1, 2, 1), torch.full((1, 3, 1), 10.0)
            >>> expected = branch + select(x)
            >>> torch.equal(select.add_to_(branch, x), expected)
            True
        """
        path = self.sum_path(x)
        if path == "identity":
            return branch.add_(x)
        if path == "slices":
            for out_start, in_start, length in self.segments:
                branch[:, out_start : out_start + length].add_(x[:, in_start : in_start + length])
            return branch
        if path == "scatter":
            return branch.index_add_(1, self.present, x.index_select(1, self.present_source))
        return branch.add_(self._gather_rows(x))

    def sum_path(self, x: Tensor) -> str:
        """How `add_to_` sums ``x`` into a branch: the cheapest way for these channels and this input.

        * ``"identity"``: nothing removed, one dense add;
        * ``"slices"``: the routed channels form at most `MAX_SLICE_ADDS` runs that are contiguous on both sides
          (`PrunableGraph.order_routed_channels_` arranges one run after each removal): in-place adds of slices, as a
          statically pruned network would do;
        * ``"scatter"``: a gather and a scatter-add over the routed channels only, for few of them, small batches or
          inputs without trailing dimensions (on CPU the scatter-add's cost grows with the routed channels,
          ``benchmarks/index_add_cost.py``);
        * ``"gather"``: one gather of whole rows (`_gather_rows`) and one dense add.

        Examples:
            >>> select = ChannelSelect(4)
            >>> select.sum_path(torch.randn(16, 4, 8))
            'identity'
            >>> select.keep_inputs_(torch.tensor([0, 1, 3]))  # channel 2 gone: ids 0, 1 | 3 route in two runs
            >>> select.segments, select.sum_path(torch.randn(16, 3, 8))
            (((0, 0, 2), (3, 2, 1)), 'slices')
        """
        if self.identity:
            return "identity"
        if len(self.segments) <= MAX_SLICE_ADDS:
            return "slices"
        if x.dim() <= 2 or x.shape[0] < 8 or 6 * self.present.numel() <= self.in_channels + 2 * self.out_channels:
            return "scatter"
        return "gather"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("in_ids", "out_ids"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.shape != getattr(self, name).shape:
                setattr(self, name, saved.clone().to(getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, segments={len(self.segments)}"


MAX_SLICE_ADDS = 4
"""`ChannelSelect.add_to_` adds slices when the routed channels form at most this many runs, and gathers otherwise."""


def _runs(out_positions: Sequence[int], in_positions: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """Maximal runs ``(out_start, in_start, length)`` of routed pairs that are consecutive on both sides.

    Examples:
        >>> _runs([0, 1, 2, 5, 6], [3, 4, 5, 0, 1])
        ((0, 3, 3), (5, 0, 2))
    """
    runs: list[list[int]] = []
    for out_position, in_position in zip(out_positions, in_positions, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == out_position and runs[-1][1] + runs[-1][2] == in_position:
            runs[-1][2] += 1
        else:
            runs.append([out_position, in_position, 1])
    return tuple((out_start, in_start, length) for out_start, in_start, length in runs)


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
        >>> from lightning_demp.surgery import PrunableGraph
        >>> route = PrunableGraph(ResidualCNNBackbone(width=4), torch.randn(2, 40)).selection_routes()[0]
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


def _observed(module: nn.Module) -> bool:
    """Whether forward hooks (the module's own or global ones) would see calls of ``module``."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(torch.nn.modules.module, "_global_forward_hooks", None)
        or getattr(torch.nn.modules.module, "_global_forward_pre_hooks", None)
    )


def residual_sum(branch: Tensor, shortcut: nn.Module, x: Tensor) -> Tensor:
    """``branch + shortcut(x)``, fused in place when ``shortcut`` is a `ChannelSelect` that nobody observes.

    The fused form (`ChannelSelect.add_to_`) spares the selection's zero-filled intermediate and the full-width sum,
    which keeps a decoupled compact model close to the speed of a statically pruned one. While hooks are attached to
    the selection (Torch-Pruning's tracing, the dead check's monitors) the plain form runs, so they see the module
    called as usual; so it does when the sum would broadcast ``branch`` or promote its dtype (under autocast, a
    half-precision branch and a float input). Both forms give the same values. A forward hook that keeps the branch
    layer's output would see it overwritten.

    Args:
        branch: The residual branch's output (a fresh tensor: see `ChannelSelect.add_to_`).
        shortcut: The shortcut module (a `ChannelSelect`, a projection, or anything else).
        x: The block input.

    Examples:
        >>> select, x, branch = ChannelSelect(4), torch.randn(2, 4, 3), torch.randn(2, 4, 3)
        >>> expected = branch + x
        >>> torch.equal(residual_sum(branch, select, x), expected)
        True
    """
    if isinstance(shortcut, ChannelSelect) and not _observed(shortcut) and _fits_in_place(branch, shortcut, x):
        return shortcut.add_to_(branch, x)
    return branch + shortcut(x)


def _fits_in_place(branch: Tensor, select: ChannelSelect, x: Tensor) -> bool:
    """Whether ``branch + select(x)`` has ``branch``'s own shape and dtype (no broadcast, no type promotion)."""
    return (
        branch.dim() == x.dim() >= 2
        and branch.shape[0] == x.shape[0]
        and branch.shape[1] == select.out_channels
        and branch.shape[2:] == x.shape[2:]
        and branch.dtype == torch.result_type(branch, x)
    )


class DecouplingError(RuntimeError):
    """A model could not be rewritten into the selection form.

    Examples:
        >>> class Branchy(nn.Module):  # branches on a tensor value: torch.fx cannot trace it
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return x + self.fc(x) if x.sum() > 0 else x
        >>> try:
        ...     decouple_residuals_(nn.Sequential(Branchy()), torch.ones(1, 2))
        ... except DecouplingError as error:
        ...     print(type(error.__cause__).__name__)
        TraceError
    """


_ADD_TARGETS = (operator.add, torch.add)


def _residual_operand(add: torch.fx.Node) -> torch.fx.Node | None:
    """For ``a + b`` where one side is computed from the other (``x + f(x)``), return the shortcut side ``x``."""
    if len(add.args) < 2 or not all(isinstance(a, torch.fx.Node) for a in add.args[:2]):
        return None
    left, right = add.args[0], add.args[1]
    assert isinstance(left, torch.fx.Node)
    assert isinstance(right, torch.fx.Node)
    for shortcut, branch in ((left, right), (right, left)):
        stack, seen = [branch], set()
        while stack:
            node = stack.pop()
            if node is shortcut:
                return shortcut
            if node in seen:
                continue
            seen.add(node)
            stack.extend(n for n in node.all_input_nodes)
    return None


_FRESH_OUTPUT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)


def _fusable_branch(
    graph_module: torch.fx.GraphModule, add: torch.fx.Node, shortcut: torch.fx.Node
) -> torch.fx.Node | None:
    """The branch operand of ``add`` when `residual_sum` may overwrite it: the output of a Linear, Conv or BatchNorm
    layer (which autograd does not keep for backward) that nothing but this sum reads, with the sum's own shape and
    dtype, in a plain two-operand add."""
    if add.kwargs or len(add.args) != 2:
        return None
    branch = add.args[1] if add.args[0] is shortcut else add.args[0]
    if not isinstance(branch, torch.fx.Node) or branch.op != "call_module" or len(branch.users) != 1:
        return None
    branch_meta, sum_meta = branch.meta.get("tensor_meta"), add.meta.get("tensor_meta")
    if (
        branch_meta is None
        or sum_meta is None
        or (branch_meta.shape, branch_meta.dtype) != (sum_meta.shape, sum_meta.dtype)
    ):
        return None  # the sum broadcasts the branch or promotes its dtype: it cannot be written into the branch
    layer = graph_module.get_submodule(str(branch.target))
    return branch if isinstance(layer, _FRESH_OUTPUT_LAYERS) else None


class _LeafTracer(torch.fx.Tracer):
    """Keeps the package's own layers whole: tracing into a `HeadedAttention` would freeze its head count into
    reshapes and hide it from the head removal."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (ChannelSelect, HeadedAttention)) or super().is_leaf_module(m, module_qualified_name)


def _rewrite(module: nn.Module, example_inputs: Any) -> tuple[nn.Module, int]:
    graph = _LeafTracer().trace(module)
    graph_module = torch.fx.GraphModule(module, graph, type(module).__name__)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    torch.fx.passes.shape_prop.ShapeProp(graph_module).propagate(*args)
    inserted = 0
    for node in list(graph_module.graph.nodes):
        is_add = (node.op == "call_function" and node.target in _ADD_TARGETS) or (
            node.op == "call_method" and node.target == "add"
        )
        shortcut = _residual_operand(node) if is_add else None
        meta = shortcut.meta.get("tensor_meta") if shortcut is not None else None
        if shortcut is None or meta is None or len(meta.shape) < 2:
            continue
        name = f"demp_select_{inserted}"
        graph_module.add_submodule(name, ChannelSelect(int(meta.shape[1])))
        branch = _fusable_branch(graph_module, node, shortcut)
        with graph_module.graph.inserting_before(node):
            if branch is None:
                selected = graph_module.graph.call_module(name, (shortcut,))
                node.replace_input_with(shortcut, selected)
            else:  # the sum becomes `residual_sum`, which adds the routed channels into the branch in place
                select = graph_module.graph.get_attr(name)
                fused = graph_module.graph.call_function(residual_sum, (branch, select, shortcut))
                fused.meta = dict(node.meta)  # shapes, for residual sums further down that read this one
                node.replace_all_uses_with(fused)
                graph_module.graph.erase_node(node)
        inserted += 1
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module, inserted


def decouple_residuals_(module: nn.Module, example_inputs: Any) -> int:
    """Rewrite the plain ``x + f(x)`` residuals of ``module``'s children into ``select(x) + f(x)``, in place.

    Each child that torch.fx can trace (and whose residual sums it finds) is replaced by a ``GraphModule`` with a
    `ChannelSelect` on the shortcut side of every residual sum; parameters are shared, so optimizers and outputs are
    unchanged. Children that cannot be traced are searched recursively. Where the branch ends in a Linear, Conv or
    BatchNorm layer read by nothing else, the sum becomes `residual_sum`, which adds the routed channels into the
    branch output in place (a slice add once `PrunableGraph.order_routed_channels_` has run).

    Args:
        module: Usually the LightningModule; its ``forward`` itself is not rewritten, its children are.
        example_inputs: Inputs of ``module.forward`` (used to find each child's input shapes).

    Returns:
        How many selections were inserted.

    Raises:
        DecouplingError: When no child could be traced, with the last tracing error attached.

    Examples:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return torch.relu(x + self.fc(x))
        >>> wrapper = nn.Sequential(Block())
        >>> x = torch.randn(3, 4)
        >>> before = wrapper(x)
        >>> decouple_residuals_(wrapper, x)
        1
        >>> torch.equal(wrapper(x), before)
        True
    """
    if any(isinstance(child, ChannelSelect) for child in module.modules()):
        return 0  # already in the selection form (built with selections, or rewritten by an earlier call)
    inputs: dict[nn.Module, Any] = {}
    handles = [
        child.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, a))
        for child in module.modules()
        if child is not module
    ]
    try:
        with torch.no_grad():
            was_training = module.training
            module.eval()
            module(*example_inputs) if isinstance(example_inputs, tuple) else module(example_inputs)
            module.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    inserted = 0
    last_error: Exception | None = None

    def visit(parent: nn.Module) -> None:
        nonlocal inserted, last_error
        for name, child in list(parent.named_children()):
            if isinstance(child, ChannelSelect) or not any(True for _ in child.children()):
                continue
            if child not in inputs:  # never called itself (a ModuleList, a ModuleDict): its children may be
                visit(child)
                continue
            try:
                rewritten, count = _rewrite(child, inputs[child])
            except Exception as error:  # torch.fx raises many types; recurse into the children instead
                last_error = error
                visit(child)
                continue
            if count:
                rewritten.train(child.training)
                setattr(parent, name, rewritten)
                inserted += count

    visit(module)
    if inserted == 0 and last_error is not None:
        raise DecouplingError(
            f"`decouple_residuals=True` could not trace `{type(module).__name__}` with torch.fx "
            f"({type(last_error).__name__}: {last_error}). Make its submodules fx-traceable (no Python control flow "
            "on tensor values), or use a model built with `lightning_demp.selection.ChannelSelect` shortcuts."
        ) from last_error
    return inserted

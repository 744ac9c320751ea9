"""The fx rewrite: plain ``x + f(x)`` residual sums become ``select(x) + f(x)`` with a `ChannelSelect` shortcut.

With the selection in place, a block's input and output channels are removed independently (the authors'
treatment, ``paper.md`` §1.1); the rewrite itself changes no output.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.fx.passes.shape_prop
from torch import nn

from lightning_demp._modes import eval_mode
from lightning_demp.attention import HeadedAttention
from lightning_demp.selection import ChannelSelect, residual_sum


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
    for node in list(graph_module.graph.nodes):  # an `nn.Identity` shortcut is the tensor itself: `x + f(x)`
        if node.op == "call_module" and isinstance(graph_module.get_submodule(str(node.target)), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
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
    branch output in place (a slice add once `lightning_demp.permutation.order_routed_channels_` has run).

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

    def remember_first_input(child: nn.Module, args: Any) -> None:  # returns None: the call keeps its own input
        inputs.setdefault(child, args)

    handles = [
        child.register_forward_pre_hook(remember_first_input) for child in module.modules() if child is not module
    ]
    try:
        with torch.no_grad(), eval_mode(module):
            module(*example_inputs) if isinstance(example_inputs, tuple) else module(example_inputs)
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

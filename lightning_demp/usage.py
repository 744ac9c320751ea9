"""How a model uses its parameters: tied between layers, or used outside the layer that holds them.

A layer's units can be removed only if slicing its parameters changes nothing but that layer. Two patterns break
this without Torch-Pruning seeing it: a parameter held by two modules (tied embeddings), and a weight a forward
uses directly (``F.linear(h, self.enc.weight.t())``, a tied decoder); `lightning_demp.mixing` finds the ops that
regroup or mix units. `lightning_demp.graph` blocks the groups
of such layers, with the reason.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def modules_sharing_parameters(model: nn.Module, names: dict[nn.Module, str]) -> dict[nn.Module, str]:
    """Modules holding a parameter that another module also holds (tied weights), with the other's name.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> model[1].weight = model[0].weight
        >>> sorted(modules_sharing_parameters(model, {m: n for n, m in model.named_modules()}).values())
        ['0', '1']
    """
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    shared: dict[nn.Module, str] = {}
    for modules in owners.values():
        for module in modules if len(modules) > 1 else ():
            other = next(m for m in modules if m is not module)
            shared[module] = names.get(other, type(other).__name__)
    return shared


def weights_used_outside(model: nn.Module, example_inputs: Any) -> set[nn.Module]:
    """The Linear/Conv layers whose weight one forward on ``example_inputs`` uses more often than the layer runs:
    some code outside the layer reads it (a transposed, tied decoder weight).

    Counted on the autograd graph: each use of a weight is one reference to its gradient accumulator.

    Examples:
        >>> class Tied(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.enc = nn.Linear(6, 8)
        ...     def forward(self, x):
        ...         return nn.functional.linear(torch.relu(self.enc(x)), self.enc.weight.t())
        >>> model = Tied()
        >>> weights_used_outside(model, torch.randn(2, 6)) == {model.enc}
        True
    """
    return model_usage(model, example_inputs).used_outside


def buffer_pointers(model: nn.Module) -> dict[int, str]:
    """The storage address of each buffer with more than one entry, to its name.

    Examples:
        >>> model = nn.BatchNorm1d(3)
        >>> sorted(buffer_pointers(model).values())
        ['running_mean', 'running_var']
    """
    return {buffer.data_ptr(): name for name, buffer in model.named_buffers() if buffer.numel() > 1}


def buffer_read_by(grad_fn: Any, buffers: dict[int, str]) -> str | None:
    """The name of a model buffer an autograd op read (``h * self.scale``), if any: Torch-Pruning does not see
    buffers, so a buffer sized by the units would keep its size while they go.

    Examples:
        >>> model = nn.Linear(2, 3)
        >>> model.register_buffer("scale", torch.ones(3))
        >>> out = model(torch.randn(1, 2)) * model.scale
        >>> buffer_read_by(out.grad_fn, buffer_pointers(model))
        'scale'
    """
    for attribute in ("_saved_other", "_saved_self"):
        try:
            saved = getattr(grad_fn, attribute, None) if grad_fn is not None else None
        except RuntimeError:  # a parameter the optimizer has changed in place since the trace: not a buffer
            continue
        if isinstance(saved, Tensor) and saved.numel() > 1 and saved.data_ptr() in buffers:
            return buffers[saved.data_ptr()]
    return None


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def output_tensors(value: Any, depth: int = 4) -> list[Tensor]:
    """Every tensor in a model's output that autograd tracks: inside tuples, lists, dicts (a Hugging Face
    ``ModelOutput``) and the attributes of plain objects (a key-value cache), ``depth`` levels down.

    Examples:
        >>> class Cache:
        ...     def __init__(self, keys):
        ...         self.keys = [keys]
        >>> x = torch.ones(2, requires_grad=True)
        >>> [t.shape for t in output_tensors({"logits": x * 2, "cache": Cache(x * 3), "mask": torch.ones(1)})]
        [torch.Size([2]), torch.Size([2])]
    """
    if isinstance(value, Tensor):
        return [value] if value.grad_fn is not None else []
    if depth == 0 or isinstance(value, (str, bytes, int, float, bool, nn.Module)) or value is None:
        return []
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple, set)):
        items = list(value)
    elif hasattr(value, "__dict__"):
        items = list(vars(value).values())
    else:
        return []
    return [tensor for item in items for tensor in output_tensors(item, depth - 1)]


def returned_layers(model: nn.Module, example_inputs: Any) -> set[nn.Module]:
    """The Linear/Conv layers whose output units reach a tensor the model returns without another Linear/Conv
    between them: every returned tensor is an output (``return self.head(f), f`` returns ``f``'s units too).

    Walked back on the autograd graph from each returned tensor, stopping at the first layer output on each path.

    Examples:
        >>> class LogitsAndFeatures(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
        ...     def forward(self, x):
        ...         features = torch.relu(self.body(x))
        ...         return self.head(features), features
        >>> model = LogitsAndFeatures()
        >>> returned_layers(model, torch.randn(3, 4)) == {model.body, model.head}
        True
    """
    return model_usage(model, example_inputs).returned


@dataclass(frozen=True)
class ModelUsage:
    """How one forward uses the layers of a model, beyond what the dependency graph says.

    Attributes:
        used_outside: Layers whose weight is also read outside the layer (`weights_used_outside`).
        returned: Layers whose units reach a returned tensor (`returned_layers`).
        reused: Linear/Conv layers that run more than once per forward (one module applied to several inputs).

    Examples:
        >>> ModelUsage(used_outside=set(), returned=set(), reused=set()).reused
        set()
    """

    used_outside: set[nn.Module]
    returned: set[nn.Module]
    reused: set[nn.Module]


def model_usage(model: nn.Module, example_inputs: Any) -> ModelUsage:
    """The `ModelUsage` of ``model`` on ``example_inputs``.

    Examples:
        >>> layer = nn.Linear(4, 4)
        >>> model = nn.Sequential(layer, nn.ReLU(), layer)  # one module, two calls
        >>> usage = model_usage(model, torch.randn(2, 4))
        >>> usage.reused == {layer}, usage.used_outside
        (True, set())
    """
    calls: Counter[nn.Module] = Counter()
    producers: dict[Any, nn.Module] = {}  # the grad_fn of each layer output -> the layer

    def record(module: nn.Module, args: Any, output: Any) -> None:
        calls.update([module])
        if isinstance(output, Tensor) and output.grad_fn is not None:
            producers[output.grad_fn] = module

    layers: list[nn.Module] = [module for module in model.modules() if isinstance(module, _LAYERS)]
    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        with torch.enable_grad():  # one forward; everything below is read off its autograd graph
            outputs = _call(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    uses: Counter[int] = Counter()  # references to each weight's gradient accumulator: one per use
    returned: set[nn.Module] = set()
    seen: set[Any] = set()  # (node, direct) states walked
    counted: set[Any] = set()  # nodes whose references were counted
    stack = [(t.grad_fn, True) for t in output_tensors(outputs) if t.grad_fn is not None]
    while stack:
        node, direct = stack.pop()  # direct: no Linear/Conv output between this node and a returned tensor
        if (node, direct) in seen:
            continue
        seen.add((node, direct))
        if direct and node in producers:
            returned.add(producers[node])
        first_visit = node not in counted
        counted.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None and first_visit:
                uses.update([id(variable)])
            stack.append((child, direct and node not in producers))
    used_outside = {
        layer
        for layer in layers
        if isinstance(layer.weight, nn.Parameter) and uses[id(layer.weight)] > calls[layer] and calls[layer] > 0
    }
    return ModelUsage(used_outside, returned, {layer for layer, count in calls.items() if count > 1})


_UNMAPPED = (nn.RNNBase, nn.RNNCellBase)  # Torch-Pruning maps no unit index through these (LSTM aside)


def grouping_failure(model: nn.Module, error: Exception) -> str:
    """The message when Torch-Pruning fails while grouping ``model``'s units: the error, and the layers it cannot
    map units through, by name.

    Examples:
        >>> model = nn.ModuleDict({"embed": nn.Linear(4, 8), "rnn": nn.GRU(8, 6)})
        >>> print(grouping_failure(model, IndexError("list index out of range")))  # doctest: +NORMALIZE_WHITESPACE
        Torch-Pruning could not group the units of `ModuleDict` (IndexError: list index out of range). It maps no
        unit index through `rnn` (GRU): DemonPruning cannot prune this model (LSTM layers are supported, with the
        groups they read kept whole).
    """
    suspects = [
        f"`{name}` ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, _UNMAPPED) and not isinstance(module, nn.LSTM)
    ]
    head = f"Torch-Pruning could not group the units of `{type(model).__name__}` ({type(error).__name__}: {error})."
    if not suspects:
        return head + " Check that every layer of the model is one Torch-Pruning supports, or report the model."
    return (
        f"{head} It maps no unit index through {', '.join(suspects)}: DemonPruning cannot prune this model "
        "(LSTM layers are supported, with the groups they read kept whole)."
    )


def trace_failure(model: nn.Module, error: Exception, library: Path | None = None) -> str:
    """The message for a failed trace: the forward itself failed, or Torch-Pruning could not follow its indices.

    Examples:
        >>> print(trace_failure(nn.Linear(2, 2), RuntimeError("shapes cannot be multiplied")))  # doctest: +ELLIPSIS
        Torch-Pruning could not trace `Linear` with the example input (RuntimeError: shapes cannot be multiplied)...
    """
    frames = traceback.extract_tb(error.__traceback__)
    inside = frames and library is not None and Path(frames[-1].filename).is_relative_to(library)
    where = f"`{frames[-1].name}` in Torch-Pruning" if inside else None
    if where is None:
        return (
            f"Torch-Pruning could not trace `{type(model).__name__}` with the example input "
            f"({type(error).__name__}: {error}). Make `forward` run on `example_input_array` and traceable by "
            "autograd (tensor outputs, no Python branches on tensor values)."
        )
    return (
        f"`{type(model).__name__}` ran on the example input, but Torch-Pruning could not map unit indices through "
        f"its forward ({type(error).__name__} in {where}: {error}). An operation it cannot follow, such as a "
        "concatenation along a dimension other than the units, is in the way: DemonPruning cannot prune this model "
        "as it is; report it with the model's code."
    )

"""Torch-Pruning's search for the layers coupled with a root layer, bounded so that it always ends.

Torch-Pruning forms a group by following index mappings from a root layer until no new (layer, indices) pair
appears. Some mappings cycle without settling: grouped-query attention repeats each key-value head for several
query heads (``expand`` then ``reshape``), and the indices that come back differ on every lap, so the search grows
forever (a one-layer tiny Qwen2 never finished). `coupled_groups` gives every search a budget proportional to the
size of the graph, far above what any search that ends needs, and reports the roots whose search it stopped,
with the layers reached by then, so that `lightning_demp.graph` can keep all of them whole.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch_pruning as tp
from torch import nn

from lightning_demp.resize import input_width, layer_width

# A search is stopped at the first index past a layer's width, or after this many (layer, indices) entries per
# dependency in the graph plus a constant. Searches that end added at most one entry per dependency on ResNet-18,
# a DenseNet block, BERT and Llama, and 17 per dependency through a ShuffleNet channel shuffle (whose permutation
# takes several laps to close): 32 per dependency leaves a margin above that.
ADDS_PER_DEPENDENCY = 32
MIN_BUDGET = 1024
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
_PATCH = threading.RLock()  # one bounded search at a time: the count is patched into Torch-Pruning's Group class


class SearchStopped(RuntimeError):
    """A group search went past its budget.

    Examples:
        >>> isinstance(SearchStopped("more than 256 entries"), RuntimeError)
        True
    """


@dataclass
class GroupSearch:
    """The outcome of one root layer's search.

    Attributes:
        root: The layer whose output units the search started from.
        group: Torch-Pruning's group, or None when the search was stopped.
        reached: When it was stopped: every (layer, Torch-Pruning handler) pair it had reached by then.
        budget: The number of entries the search was allowed.
        stopped_because: Why it was stopped (empty when it ended).

    Examples:
        >>> search = GroupSearch(root=nn.Linear(2, 3), group=None, budget=256)
        >>> search.group is None, search.reached
        (True, [])
    """

    root: nn.Module
    group: Any | None
    reached: list[tuple[nn.Module, Any]] = field(default_factory=list)
    budget: int = 0
    stopped_because: str = ""


@contextmanager
def _bounded(graph: Any, limit: int, entries: list[Any]) -> Iterator[None]:
    """Record the entries every Torch-Pruning ``Group`` gets in the block (into ``entries``), and raise
    `SearchStopped` when they exceed ``limit`` or when an index lands past the width of the layer side it is on
    (a mapping gone wrong, which is how a cycling search shows first: its indices grow lap after lap)."""
    group_type = tp.dependency.group.Group
    _PATCH.acquire()
    original = group_type.add_dep

    def add_dep(group: Any, dep: Any, idxs: Any) -> Any:
        module = dep.target.module
        entries.append((module, dep.handler))
        if len(entries) > limit:
            raise SearchStopped(f"more than {limit} entries")
        if isinstance(module, _LAYERS) and idxs:
            out = graph.is_out_channel_pruning_fn(dep.handler)
            width = layer_width(module) if out else input_width(module)
            if width is not None and max(int(getattr(i, "idx", i)) for i in idxs) >= width:
                side = "outputs" if out else "inputs"
                raise SearchStopped(f"an index past the {width} {side} of a {type(module).__name__}")
        return original(group, dep, idxs)

    group_type.add_dep = add_dep
    try:
        yield
    finally:
        group_type.add_dep = original
        _PATCH.release()


def coupled_groups(graph: Any, root_types: tuple[type[nn.Module], ...]) -> list[GroupSearch]:
    """Every group of ``graph`` (a Torch-Pruning ``DependencyGraph``), one search per root layer of ``root_types``
    whose output units no earlier group holds, as Torch-Pruning's ``get_all_groups`` forms them, each search bounded.

    Examples:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 4))
        >>> [(type(s.root).__name__, s.group is not None) for s in coupled_groups(graph, (nn.Linear,))]
        [('Linear', True), ('Linear', True)]
    """
    dependencies = sum(len(node.dependencies) for node in graph.module2node.values())
    budget = ADDS_PER_DEPENDENCY * dependencies + MIN_BUDGET
    ignored = list(graph.IGNORED_LAYERS_IN_TRACING)
    held: set[nn.Module] = set()
    searches: list[GroupSearch] = []
    for module in list(graph.module2node):
        if not isinstance(module, root_types) or module in held or any(module is m for m in ignored):
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        entries: list[Any] = []
        try:
            with _bounded(graph, budget, entries):
                group = graph.get_pruning_group(
                    module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
                )
        except SearchStopped as stop:
            reached = [(m, handler) for m, handler in entries if isinstance(m, nn.Module)]
            searches.append(GroupSearch(module, None, reached, budget, str(stop)))
            continue
        outputs = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        held.update(outputs)
        if not any(out is m for out in outputs for m in ignored):
            searches.append(GroupSearch(module, group, budget=budget))
    return searches

"""Optimizer continuity across a structural removal.

Surgery replaces ``nn.Parameter`` objects with smaller ones. `remap_optimizer_` edits an optimizer in place
so it trains the new parameters: ``param_groups`` are rebound, every state tensor shaped like the old parameter
(Adam's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``, ...) or like it with dimensions averaged to 1
(Adafactor's ``row_var``/``col_var``) is sliced to the kept indices, scalar state such as ``step`` is kept, and no
entry is left for a parameter that no longer exists. LBFGS, whose history spans all parameters flattened, is
rebound and restarts its history. Because the optimizer object
is the same, LR schedulers and Lightning's optimizer wrappers keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParamRemap:
    """One parameter replaced by a slice of itself: ``new == old.index_select(dim, kept)``.

    Examples:
        >>> old = nn.Parameter(torch.arange(6.0).reshape(3, 2))
        >>> new = nn.Parameter(old.detach()[[0, 2]])
        >>> ParamRemap(old, new, dim=0, kept=torch.tensor([0, 2])).dim
        0
    """

    old: Tensor
    new: Tensor
    dim: int
    kept: Tensor


def slice_parameter_(module: nn.Module, name: str, dim: int, kept: Tensor) -> ParamRemap:
    """Replace parameter ``name`` of ``module`` by ``index_select(dim, kept)`` of itself (a slice or a permutation).

    Returns:
        The record `remap_optimizer_` needs to carry the parameter's optimizer state over.

    Examples:
        >>> layer = nn.Linear(2, 3)
        >>> remap = slice_parameter_(layer, "weight", 0, torch.tensor([2, 0]))
        >>> layer.weight.shape, remap.new is layer.weight, torch.equal(remap.new, remap.old[[2, 0]])
        (torch.Size([2, 2]), True, True)
    """
    old = getattr(module, name)
    new = nn.Parameter(old.detach().index_select(dim, kept.to(old.device)), requires_grad=old.requires_grad)
    setattr(module, name, new)
    return ParamRemap(old=old, new=new, dim=dim, kept=kept)


@dataclass
class _Chain:
    original: Tensor
    current: Tensor
    slices: list[tuple[int, Tensor]] = field(default_factory=list)


def _collapse(remaps: Sequence[ParamRemap]) -> list[_Chain]:
    """Join remaps of a parameter sliced more than once (e.g. as a reader, then as a producer)."""
    chains: dict[int, _Chain] = {}
    for remap in remaps:
        chain = chains.pop(id(remap.old), None) or _Chain(remap.old, remap.old)
        chain.current = remap.new
        chain.slices.append((remap.dim, remap.kept))
        chains[id(remap.new)] = chain
    return list(chains.values())


def slice_like(value: object, reference_shape: torch.Size, slices: Iterable[tuple[int, Tensor]]) -> object:
    """Slice ``value`` as its parameter was sliced, when it is a tensor shaped like the parameter.

    Examples:
        >>> slice_like(torch.arange(4.0), torch.Size([4]), [(0, torch.tensor([1, 3]))])
        tensor([1., 3.])
        >>> slice_like(torch.tensor(7.0), torch.Size([4]), [(0, torch.tensor([1, 3]))])
        tensor(7.)
        >>> slice_like(torch.ones(4, 1), torch.Size([4, 3]), [(0, torch.tensor([1, 3]))]).shape  # Adafactor's row_var
        torch.Size([2, 1])
    """
    if not (isinstance(value, Tensor) and value.dim() > 0 and _reduced_like(value.shape, reference_shape)):
        return value
    shape = list(reference_shape)
    for dim, kept in slices:
        if value.shape[dim] == shape[dim]:  # a dimension the state keeps (not averaged down to 1)
            value = value.index_select(dim, kept.to(value.device))
        shape[dim] = len(kept)
    return value.contiguous()


def _reduced_like(shape: torch.Size, reference: torch.Size) -> bool:
    """Whether a state of ``shape`` is its parameter's ``reference`` shape with some dimensions averaged down to 1
    (Adafactor's factored ``row_var``/``col_var``), or the shape itself."""
    return len(shape) == len(reference) and all(size in (1, full) for size, full in zip(shape, reference, strict=True))


def remap_optimizer_(optimizer: torch.optim.Optimizer, remaps: Sequence[ParamRemap]) -> int:
    """Rebind ``optimizer`` to the new parameters and slice their state, in place.

    Args:
        optimizer: Any ``torch.optim.Optimizer`` whose per-parameter state tensors have the parameter's shape.
        remaps: The records returned by the surgery, in the order it made them.

    Returns:
        The number of parameters rebound in this optimizer.

    Examples:
        >>> layer = nn.Linear(2, 3)
        >>> optimizer = torch.optim.Adam(layer.parameters())
        >>> layer(torch.randn(4, 2)).sum().backward()
        >>> optimizer.step()
        >>> kept = torch.tensor([0, 2])
        >>> old = layer.weight
        >>> layer.weight = nn.Parameter(old.detach().index_select(0, kept))
        >>> remap_optimizer_(optimizer, [ParamRemap(old, layer.weight, 0, kept)])
        1
        >>> optimizer.state[layer.weight]["exp_avg"].shape
        torch.Size([2, 2])
    """
    chains = {id(chain.original): chain for chain in _collapse(remaps)}
    rebound = 0
    for group in optimizer.param_groups:
        new_params = []
        for param in group["params"]:
            chain = chains.get(id(param))
            if chain is None:
                new_params.append(param)
                continue
            new_params.append(chain.current)
            rebound += 1
            state = optimizer.state.pop(param, None)
            if state is not None:
                optimizer.state[chain.current] = {
                    key: slice_like(value, param.shape, chain.slices) for key, value in state.items()
                }
        group["params"] = new_params
    if rebound and isinstance(optimizer, torch.optim.LBFGS):
        optimizer._params = optimizer.param_groups[0]["params"]  # its own cached list of what it trains ...
        optimizer._numel_cache = None  # ... and their size
        optimizer.state.clear()  # the curvature history spans the flattened old parameters: it restarts
    return rebound


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Return every parameter an optimizer holds, in group order.

    Examples:
        >>> layer = nn.Linear(2, 3)
        >>> optimizer = torch.optim.SGD([{"params": [layer.bias]}, {"params": [layer.weight], "lr": 0.01}], lr=0.1)
        >>> [param.shape for param in optimizer_params(optimizer)]
        [torch.Size([3]), torch.Size([3, 2])]
    """
    return [param for group in optimizer.param_groups for param in group["params"]]


def add_param_next_to_(optimizer: torch.optim.Optimizer, reference: Tensor, new: nn.Parameter) -> bool:
    """Add ``new`` to the parameter group that holds ``reference`` (e.g. a bias created next to its weight).

    Returns:
        Whether ``reference`` was found in ``optimizer``.

    Examples:
        >>> layer = nn.Linear(2, 2, bias=False)
        >>> optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        >>> add_param_next_to_(optimizer, layer.weight, nn.Parameter(torch.zeros(2)))
        True
        >>> len(optimizer.param_groups[0]["params"])
        2
    """
    for group in optimizer.param_groups:
        if any(param is reference for param in group["params"]):
            group["params"].append(new)
            return True
    return False

"""Saturated units: units whose value reaching every reader is constant over the observed data.

Smooth activations (GELU, SiLU, tanh, sigmoid) rarely output exactly zero, but a unit pushed deep into a flat
region delivers the same value ``c`` on every input. Such a unit can be removed without changing the outputs once
its constant contribution ``W[:, i]·c`` is folded into each reader: into the reader's bias (created if missing), or,
for a bias-free reader followed by BatchNorm, into the BatchNorm's running mean (train-mode BatchNorm subtracts the
batch mean, which absorbs a constant anyway). Readers are Linear layers and convolutions without padding; a padded
convolution sees the constant only away from the borders, so units read by one are never folded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_demp.detection import group_range
from lightning_demp.optim import add_param_next_to_
from lightning_demp.units import Statistics, UnitGroup


@dataclass(frozen=True)
class Fold:
    """Reader ``reader`` receives the constant ``values`` on its input features ``feature_idxs``.

    Examples:
        >>> fold = Fold("fc2", feature_idxs=torch.tensor([1]), values=torch.tensor([0.25]))
        >>> fold.reader, fold.feature_idxs, fold.values
        ('fc2', tensor([1]), tensor([0.2500]))
    """

    reader: str
    feature_idxs: Tensor
    values: Tensor


def can_fold_into(module: nn.Module) -> bool:
    """Whether a constant input of ``module`` can be folded exactly (Linear, or a convolution without padding).

    Examples:
        >>> can_fold_into(nn.Linear(2, 3)), can_fold_into(nn.Conv1d(2, 3, 3, padding=1))
        (True, False)
    """
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.modules.conv._ConvNd):
        padding = module.padding
        no_padding = padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))
        return no_padding and module.groups == 1 and not module.transposed
    return False


def constant_units(group: UnitGroup, stats: Statistics, modules: Mapping[str, nn.Module], tolerance: float) -> Tensor:
    """Units of ``group`` whose value at every reader varies by at most ``tolerance`` and can be folded.

    Examples:
        >>> from lightning_demp.units import ReaderSlice, ReaderStats
        >>> group = UnitGroup("fc1", 2, readers=[ReaderSlice("fc2", torch.arange(2), torch.arange(2))])
        >>> maxima, minima = torch.tensor([0.7, 2.0]), torch.tensor([0.7, -1.0])
        >>> stats = {"fc2": ReaderStats(torch.ones(2), 8, max_value=maxima, min_value=minima)}
        >>> constant_units(group, stats, {"fc2": nn.Linear(2, 1)}, tolerance=1e-6)
        tensor([0])
    """
    if not group.readers or not all(can_fold_into(modules[r.reader]) for r in group.readers):
        return torch.zeros(0, dtype=torch.long)
    return torch.nonzero(group_range(group, stats) <= tolerance).flatten()


def folds_for(groups: Sequence[UnitGroup], stats: Statistics, plan: Mapping[str, Tensor]) -> list[Fold]:
    """The folds that make removing ``plan``'s units exact: each reader gets the constants of its removed features.

    A feature whose constant is 0 (a dead unit) needs no fold and is skipped.

    Examples:
        >>> from lightning_demp.units import ReaderSlice, ReaderStats
        >>> group = UnitGroup("fc1", 3, readers=[ReaderSlice("fc2", torch.arange(3), torch.arange(3))])
        >>> maxima, minima = torch.tensor([0.5, 2.0, 0.0]), torch.tensor([0.5, -1.0, 0.0])
        >>> stats = {"fc2": ReaderStats(torch.ones(3), 8, max_value=maxima, min_value=minima)}
        >>> folds = folds_for([group], stats, {"fc1": torch.tensor([0, 2])})  # unit 2 is dead: nothing to fold
        >>> [(fold.reader, fold.feature_idxs, fold.values) for fold in folds]
        [('fc2', tensor([0]), tensor([0.5000]))]
    """
    folds = []
    for group in groups:
        units = plan.get(group.name)
        if units is None or not len(units):
            continue
        for reader in group.readers:
            observed = stats[reader.reader]
            if observed.max_value is None or observed.min_value is None:
                continue
            chosen = torch.isin(reader.unit_idxs, units)
            features = reader.feature_idxs[chosen]
            values = (observed.max_value + observed.min_value).cpu()[features] / 2
            nonzero = values != 0
            if bool(nonzero.any()):
                folds.append(Fold(reader.reader, features[nonzero], values[nonzero]))
    return folds


def fold_constant_inputs_(reader: nn.Module, fold: Fold, norm_after: nn.Module | None) -> nn.Parameter | None:
    """Add the constant contribution of ``fold`` to ``reader``'s bias (or ``norm_after``'s running mean), in place.

    Returns:
        A new bias parameter when one had to be created (the caller adds it to the optimizer), else ``None``.

    Examples:
        >>> layer = nn.Linear(3, 2)
        >>> x = torch.tensor([[1.0, 0.25, -2.0]])
        >>> before = layer(x)
        >>> _ = fold_constant_inputs_(layer, Fold("layer", torch.tensor([1]), torch.tensor([0.25])), None)
        >>> with torch.no_grad():
        ...     layer.weight[:, 1] = 0.0  # the feature is gone: its contribution now lives in the bias
        >>> torch.allclose(layer(x), before)
        True
    """
    weight = reader.weight
    assert isinstance(weight, Tensor)
    features = fold.feature_idxs.to(weight.device)
    values = fold.values.to(weight.device, weight.dtype)
    with torch.no_grad():
        sliced = weight.index_select(1, features)
        shape = [1, -1] + [1] * (sliced.dim() - 2)
        contribution = (sliced * values.view(shape)).sum(dim=tuple(range(1, sliced.dim())))
        bias = reader.bias
        if isinstance(bias, Tensor):
            bias.add_(contribution)
            return None
        running_mean = getattr(norm_after, "running_mean", None)
        if isinstance(norm_after, nn.modules.batchnorm._BatchNorm) and isinstance(running_mean, Tensor):
            running_mean.sub_(contribution)
            return None
        new_bias = nn.Parameter(contribution.clone(), requires_grad=weight.requires_grad)
    reader.bias = new_bias
    return new_bias


class SaturationFolding:
    """The opt-in saturation part: which units are constant, and folding their constants before they go.

    Args:
        tolerance: A unit is constant when its value at every reader varies by at most this.

    Examples:
        >>> SaturationFolding(tolerance=1e-6).extra_units(UnitGroup("fc1", 2), {}).tolist()  # no reader: nothing
        []
    """

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.modules: Mapping[str, nn.Module] = {}

    def bind(self, model: nn.Module) -> None:
        """Look readers up in ``model`` (call again after the model changed)."""
        self.modules = dict(model.named_modules())

    def extra_units(self, group: UnitGroup, stats: Statistics) -> Tensor:
        """The constant units of ``group`` that can be folded (`constant_units`)."""
        return constant_units(group, stats, self.modules, self.tolerance)

    def fold_(
        self,
        groups: Sequence[UnitGroup],
        stats: Statistics,
        plan: Mapping[str, Tensor],
        norm_after: Callable[[str], nn.Module | None],
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> None:
        """Move the constant contribution of the planned units into their readers; new biases join the optimizers."""
        for fold in folds_for(groups, stats, plan):
            reader = self.modules[fold.reader]
            new_bias = fold_constant_inputs_(reader, fold, norm_after(fold.reader))
            weight = reader.weight
            if new_bias is not None and isinstance(weight, Tensor):
                for optimizer in optimizers:
                    add_param_next_to_(optimizer, weight, new_bias)

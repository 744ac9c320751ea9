"""Dead-unit detection: activity statistics at the inputs of the layers that read each unit.

A unit (a Linear output feature, a Conv output channel) is *dead* when every layer that reads it receives
nothing from it: ``|value| <= threshold`` for every sample and position over the observed batches
(``paper.md`` §1.2). Observing at the reader's input sees what the reader really gets, after functional
activations (``F.relu`` in ``forward``), pooling and residual sums.

The statistics live in a torchmetrics `Metric`, so ``compute()`` reduces them across
processes (maximum of ``|x|`` is reduced with ``max``), and the dead test on the reduced value equals the test on
the union of every rank's data.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_demp._modes import eval_mode
from lightning_demp.units import ReaderStats, Statistics, UnitGroup

log = logging.getLogger(__name__)


class UnitActivity(Metric):
    """Per-feature activity at the input of one reader layer.

    States: ``max_abs`` (largest ``|x|`` seen per feature, reduced across processes with ``max``) and the number of
    observed samples. A non-finite input makes ``max_abs`` non-finite for its feature (NaN and inf propagate), which
    never counts as dead; ``compute()`` reports how many features are affected so that a caller can refuse to decide.
    The update is two reductions over the input (``amax``, ``amin``) and no copy of it.

    Args:
        num_features: Number of input features (Linear) or channels (Conv) of the reader.
        feature_dim: Dimension of the input holding the features: ``-1`` for Linear, ``1`` for Conv.

    Examples:
        >>> activity = UnitActivity(num_features=3, feature_dim=-1)
        >>> activity.update(torch.tensor([[0.0, 1.0, -2.0], [0.0, 0.5, 0.0]]))
        >>> activity.compute()["max_abs"]
        tensor([0., 1., 2.])
    """

    full_state_update = False
    max_abs: Tensor
    num_samples: Tensor
    max_value: Tensor
    min_value: Tensor

    def __init__(self, num_features: int, feature_dim: int, track_range: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feature_dim = feature_dim
        self.track_range = track_range
        self.add_state("max_abs", default=torch.zeros(num_features), dist_reduce_fx="max")
        self.add_state("num_samples", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if track_range:  # for saturated units: a feature whose value never changes
            self.add_state("max_value", default=torch.full((num_features,), -math.inf), dist_reduce_fx="max")
            self.add_state("min_value", default=torch.full((num_features,), math.inf), dist_reduce_fx="min")

    def update(self, inputs: Tensor) -> None:
        """Accumulate one reader input (any shape, features on ``feature_dim``)."""
        values = inputs.detach()
        feature_dim = self.feature_dim % values.dim()
        dims = [d for d in range(values.dim()) if d != feature_dim]
        # max |x| = max(max x, −min x): two reductions in the input's own layout, no |x| copy (several times faster
        # than ``abs().amax()`` over a channels-first activation on CPU); NaN and inf propagate.
        batch_max = (values.amax(dim=dims) if dims else values).float()
        batch_min = (values.amin(dim=dims) if dims else values).float()
        self.max_abs = torch.maximum(self.max_abs, torch.maximum(batch_max, -batch_min))
        self.num_samples += values.shape[0] if values.dim() > 1 else 1
        if self.track_range:
            self.max_value = torch.maximum(self.max_value, batch_max)
            self.min_value = torch.minimum(self.min_value, batch_min)

    def compute(self) -> dict[str, Tensor]:
        """Return the reduced states as a dict."""
        stats = {
            "max_abs": self.max_abs,
            "num_samples": self.num_samples,
            "num_nonfinite": (~torch.isfinite(self.max_abs)).sum(),
        }
        if self.track_range:
            stats["max_value"], stats["min_value"] = self.max_value, self.min_value
        return stats


def reader_feature_dim(module: nn.Module) -> int:
    """Return the feature dimension of the input of a reader layer (``-1`` for Linear, ``1`` for Conv).

    Examples:
        >>> reader_feature_dim(nn.Linear(2, 3)), reader_feature_dim(nn.Conv1d(2, 3, 1))
        (-1, 1)
    """
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, nn.modules.conv._ConvNd) or hasattr(module, "in_ids"):  # Conv or ChannelSelect
        return 1
    raise TypeError(f"Expected a Linear or Conv reader, got {type(module).__name__}.")


def reader_num_features(module: nn.Module) -> int:
    """Return the number of input features of a Linear or Conv reader.

    Examples:
        >>> reader_num_features(nn.Linear(2, 3)), reader_num_features(nn.Conv1d(4, 3, 1))
        (2, 4)
    """
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels
    in_ids = getattr(module, "in_ids", None)  # ChannelSelect
    if isinstance(in_ids, Tensor):
        return int(in_ids.numel())
    raise TypeError(f"Expected a Linear or Conv reader, got {type(module).__name__}.")


class ActivationMonitor:
    """Forward pre-hooks that feed each reader's input into its `UnitActivity`.

    Hooks exist only inside `observe`; they are removed on exit, also when an exception is raised.

    Args:
        readers: Reader modules by name (Linear or Conv layers).

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> monitor = ActivationMonitor({"2": model[2]})
        >>> with monitor.observe():
        ...     _ = model(torch.randn(4, 2))
        >>> monitor.activity["2"].num_samples.item(), len(model[2]._forward_pre_hooks)
        (4, 0)
    """

    def __init__(self, readers: Mapping[str, nn.Module], track_range: bool = False) -> None:
        self.readers = dict(readers)
        self.track_range = track_range
        self.activity: dict[str, UnitActivity] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.paused = False  # when True, attached hooks record nothing (e.g. during validation)
        self.reset()

    def reset(self) -> None:
        """Start new statistics sized to the readers' current widths."""
        self.activity = {}
        for name, module in self.readers.items():
            parameter = next(module.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
            self.activity[name] = UnitActivity(
                reader_num_features(module), reader_feature_dim(module), track_range=self.track_range
            ).to(device)

    @property
    def is_observing(self) -> bool:
        """Whether hooks are attached now."""
        return bool(self._handles)

    def attach(self) -> None:
        """Attach the hooks (idempotent)."""
        if self._handles:
            return
        for name, module in self.readers.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))

    def detach(self) -> None:
        """Remove every hook this monitor attached."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def observe(self) -> Iterator[ActivationMonitor]:
        """Attach the hooks for the duration of the block."""
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        # A partial of a method, not a closure: a model with hooks attached still pickles and deep-copies.
        return functools.partial(self._record, name)

    @torch.compiler.disable  # eager under `model.compile()`: no graph per reader width, no recompile per event
    def _record(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.paused and args and isinstance(args[0], Tensor):
            self.activity[name].update(args[0])

    def compute(self) -> dict[str, ReaderStats]:
        """Reduce (across processes when distributed) and return every reader's statistics.

        Per-feature states stay one-dimensional for a reader of one feature (torchmetrics squeezes one-element
        results to scalars).
        """
        stats = {}
        for name, activity in self.activity.items():
            computed = activity.compute()
            stats[name] = ReaderStats(
                max_abs=computed["max_abs"].reshape(-1),
                num_samples=int(computed["num_samples"]),
                max_value=computed["max_value"].reshape(-1) if "max_value" in computed else None,
                min_value=computed["min_value"].reshape(-1) if "min_value" in computed else None,
            )
        return stats


def dead_check(
    model: nn.Module,
    monitor: ActivationMonitor,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
) -> dict[str, ReaderStats]:
    """Run the paper's dead check: an eval-mode, gradient-free pass over ``batches`` with the hooks attached.

    BatchNorm uses its running statistics; every module's train/eval flag is restored afterwards.

    Args:
        model: The module to run.
        monitor: The activity monitor whose readers are inside ``model``.
        batches: Batches of training data.
        forward: ``forward(model, batch)`` runs the model on one batch.

    Returns:
        The reduced statistics per reader (see `ActivationMonitor.compute`).

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> monitor = ActivationMonitor({"2": model[2]})
        >>> stats = dead_check(model, monitor, [torch.randn(8, 2)], lambda m, b: m(b))
        >>> stats["2"].num_samples
        8
    """
    monitor.reset()
    with eval_mode(model), torch.no_grad(), monitor.observe():
        for batch in batches:
            forward(model, batch)
    return monitor.compute()


def unit_activity(
    num_units: int,
    readers: Iterable[tuple[Tensor, Tensor, Tensor]],
) -> Tensor:
    """Fold reader statistics back onto the units that feed them.

    Args:
        num_units: Number of units of the group (the producer's output width).
        readers: For each reader: its per-feature ``max_abs``, the reader feature indices that belong to the
            group, and for each of those the unit (root index) it carries.

    Returns:
        For each unit, the largest ``|value|`` any reader received from it (0 when no reader saw it).

    Examples:
        >>> reader = (torch.tensor([0.0, 3.0, 0.0, 0.0]), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1]))
        >>> unit_activity(2, [reader])
        tensor([3., 0.])
    """
    activity = torch.zeros(num_units)
    for max_abs, feature_idxs, root_idxs in readers:
        values = max_abs.detach().float().cpu()[feature_idxs]
        activity.scatter_reduce_(0, root_idxs, values, reduce="amax")
    return activity


def group_activity(group: UnitGroup, stats: Statistics) -> Tensor:
    """`unit_activity` of ``group``: each unit's largest ``|value|`` at any of its readers.

    Examples:
        >>> from lightning_demp.units import ReaderSlice
        >>> group = UnitGroup("fc1", 2, readers=[ReaderSlice("fc2", torch.arange(2), torch.arange(2))])
        >>> group_activity(group, {"fc2": ReaderStats(max_abs=torch.tensor([0.0, 0.5]), num_samples=4)})
        tensor([0.0000, 0.5000])
    """
    return unit_activity(
        group.num_units, [(stats[r.reader].max_abs, r.feature_idxs, r.unit_idxs) for r in group.readers]
    )


def group_range(group: UnitGroup, stats: Statistics) -> Tensor:
    """`unit_range` of ``group`` (its readers' statistics must track the range).

    Examples:
        >>> from lightning_demp.units import ReaderSlice
        >>> group = UnitGroup("fc1", 2, readers=[ReaderSlice("fc2", torch.arange(2), torch.arange(2))])
        >>> maxima, minima = torch.tensor([1.0, 0.5]), torch.tensor([1.0, -0.5])
        >>> observed = ReaderStats(torch.ones(2), 4, max_value=maxima, min_value=minima)
        >>> group_range(group, {"fc2": observed})
        tensor([0., 1.])
    """
    readers = []
    for r in group.readers:
        observed = stats[r.reader]
        if observed.max_value is None or observed.min_value is None:
            raise ValueError(f"The statistics of reader `{r.reader}` do not track the range of values.")
        readers.append((observed.max_value, observed.min_value, r.feature_idxs, r.unit_idxs))
    return unit_range(group.num_units, readers)


def find_dead_units(activity: Tensor, threshold: float = 0.0) -> Tensor:
    """Return the indices of units whose activity is at most ``threshold``.

    Examples:
        >>> find_dead_units(torch.tensor([0.0, 2.0, 1e-9]), threshold=1e-6)
        tensor([0, 2])
    """
    return torch.nonzero(activity <= threshold).flatten()


def unit_range(num_units: int, readers: Iterable[tuple[Tensor, Tensor, Tensor, Tensor]]) -> Tensor:
    """For each unit, the largest ``max − min`` of its value at any reader (0 for a constant unit).

    Args:
        num_units: Number of units of the group.
        readers: For each reader: per-feature ``max_value`` and ``min_value``, the reader feature indices of the
            group, and the unit each carries.

    Examples:
        >>> reader = (torch.tensor([1.0, 0.5]), torch.tensor([1.0, -0.5]), torch.arange(2), torch.arange(2))
        >>> unit_range(2, [reader])
        tensor([0., 1.])
    """
    spread = torch.zeros(num_units)
    for max_value, min_value, feature_idxs, root_idxs in readers:
        values = (max_value.detach().float().cpu() - min_value.detach().float().cpu())[feature_idxs]
        spread.scatter_reduce_(0, root_idxs, values.nan_to_num(nan=math.inf), reduce="amax")
    return spread

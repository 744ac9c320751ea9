"""The pruner's settings, validated once: `PruningConfig` (framework-free; the callback builds one)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from lightning_demp.graph import match_modules
from lightning_demp.regularization import REGULARIZER_NAMES, RegularizerName, norm_scales
from lightning_demp.schedules import SCHEDULE_NAMES, ScheduleName
from lightning_demp.target import TARGET_METRICS, TargetMetric

PenalizeScope = Literal["all", "prunable"]
PENALIZE_SCOPES: tuple[str, ...] = ("all", "prunable")


def check_number(name: str, value: Any, *, low: float, low_inclusive: bool, high: float = math.inf) -> float:
    """``value`` as a float, or an error naming ``name`` and the allowed range.

    Examples:
        >>> check_number("reg_max", 0.5, low=0.0, low_inclusive=True)
        0.5
        >>> check_number("reg_max", -1, low=0.0, low_inclusive=True)
        Traceback (most recent call last):
        ...
        ValueError: Expected `reg_max` to be a number in [0.0, inf), got -1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a number, got {type(value).__name__} {value!r}.")
    low_ok = value >= low if low_inclusive else value > low
    if not math.isfinite(value) or not low_ok or value > high:
        bracket = "[" if low_inclusive else "("
        upper = "inf)" if math.isinf(high) else f"{high}]"
        raise ValueError(f"Expected `{name}` to be a number in {bracket}{low}, {upper}, got {value!r}.")
    return float(value)


def check_int(name: str, value: Any, *, low: int) -> int:
    """``value`` if it is an int ``>= low``, else an error naming ``name``.

    Examples:
        >>> check_int("min_units", 2, low=1)
        2
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, got {type(value).__name__} {value!r}.")
    if value < low:
        raise ValueError(f"Expected `{name}` to be an int >= {low}, got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else an error naming ``name``.

    Examples:
        >>> check_bool("verbose", False)
        False
    """
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, got {type(value).__name__} {value!r}.")
    return value


def check_keys(keys: Any) -> list[str] | None:
    """Validate ``input_keys``: ``None`` or a non-empty list of str.

    Examples:
        >>> check_keys(("input_ids", "attention_mask"))
        ['input_ids', 'attention_mask']
        >>> check_keys("input_ids")
        Traceback (most recent call last):
        ...
        TypeError: Expected `input_keys` to be a non-empty list of str, got 'input_ids'.
    """
    if keys is None:
        return None
    if not isinstance(keys, (list, tuple)) or not keys or not all(isinstance(key, str) for key in keys):
        raise TypeError(f"Expected `input_keys` to be a non-empty list of str, got {keys!r}.")
    return list(keys)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else an error naming ``name`` and the choices.

    Examples:
        >>> check_choice("schedule", "constant", ("one_cycle", "constant"))
        'constant'
    """
    if not isinstance(value, str):
        raise TypeError(f"Expected `{name}` to be one of {tuple(choices)}, got {type(value).__name__} {value!r}.")
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {tuple(choices)}, got {value!r}.")
    return value


@dataclass(frozen=True)
class PruningConfig:
    """Everything `lightning_demp.core.DemonPruner` needs to know; see `DemonPruning` for each argument.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range or not one of the allowed names.

    Examples:
        >>> PruningConfig(regularizer="positive_l2", reg_max=0.1).reg_max
        0.1
        >>> PruningConfig(min_units=0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `min_units` to be an int >= 1, got 0.
    """

    regularizer: RegularizerName = "l1_norm_scale"
    reg_max: float = 0.03
    schedule: ScheduleName = "one_cycle"
    schedule_span: float = 0.9
    noise_std: float = 5e-5
    dead_threshold: float = 0.0
    check_batches: int = 12
    min_units: int = 1
    exclude: Sequence[str] = field(default_factory=tuple)
    seed: int = 0
    recalibrate_bn: bool = True
    recalibration_batches: int = 4
    saturation_tolerance: float | None = None
    target_sparsity: float | None = None
    target_metric: TargetMetric = "params"
    force_target: bool = False
    penalize: PenalizeScope = "all"
    live_floor: float = 0.05
    max_death_fraction: float = 0.5
    target_focus: bool = True
    round_to: int = 1

    def __post_init__(self) -> None:
        check_choice("regularizer", self.regularizer, REGULARIZER_NAMES)
        self._set("reg_max", check_number("reg_max", self.reg_max, low=0.0, low_inclusive=True))
        check_choice("schedule", self.schedule, SCHEDULE_NAMES)
        span = check_number("schedule_span", self.schedule_span, low=0.0, low_inclusive=False, high=1.0)
        self._set("schedule_span", span)
        self._set("noise_std", check_number("noise_std", self.noise_std, low=0.0, low_inclusive=True))
        self._set("dead_threshold", check_number("dead_threshold", self.dead_threshold, low=0.0, low_inclusive=True))
        check_int("check_batches", self.check_batches, low=1)
        check_int("min_units", self.min_units, low=1)
        exclude = self.exclude
        if not isinstance(exclude, (list, tuple)) or not all(isinstance(p, str) for p in exclude):
            raise TypeError(f"Expected `exclude` to be a list of str, got {exclude!r}.")
        self._set("exclude", tuple(exclude))
        check_int("seed", self.seed, low=0)
        check_bool("recalibrate_bn", self.recalibrate_bn)
        check_int("recalibration_batches", self.recalibration_batches, low=1)
        if self.saturation_tolerance is not None:
            tolerance = check_number("saturation_tolerance", self.saturation_tolerance, low=0.0, low_inclusive=True)
            self._set("saturation_tolerance", tolerance)
        if self.target_sparsity is not None:
            target = check_number("target_sparsity", self.target_sparsity, low=0.0, low_inclusive=False, high=0.999)
            self._set("target_sparsity", target)
        check_choice("target_metric", self.target_metric, TARGET_METRICS)
        check_bool("force_target", self.force_target)
        check_choice("penalize", self.penalize, PENALIZE_SCOPES)
        self._set("live_floor", check_number("live_floor", self.live_floor, low=0.0, low_inclusive=True, high=0.5))
        fraction = check_number("max_death_fraction", self.max_death_fraction, low=0.0, low_inclusive=False, high=1.0)
        self._set("max_death_fraction", fraction)
        check_bool("target_focus", self.target_focus)
        check_int("round_to", self.round_to, low=1)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def check_model(self, model: nn.Module) -> list[str]:
        """Check ``model`` against these settings before training: raise what cannot work, return warnings.

        Raises:
            ValueError: ``regularizer="l1_norm_scale"`` with ``reg_max > 0`` on a model without affine
                normalization layers.

        Examples:
            >>> PruningConfig(exclude=("head",)).check_model(nn.BatchNorm1d(2))
            ["`DemonPruning(exclude=...)`: the patterns ['head'] match no module of the model."]
        """
        unmatched = [pattern for pattern, names in match_modules(model, self.exclude).items() if not names]
        found = [f"`DemonPruning(exclude=...)`: the patterns {unmatched} match no module of the model."]
        if self.regularizer == "l1_norm_scale" and self.reg_max > 0 and not norm_scales(model):
            raise ValueError(
                f"`DemonPruning(regularizer='l1_norm_scale')` regularizes BatchNorm/LayerNorm scales, but "
                f"`{type(model).__name__}` has no affine normalization layer. Use `regularizer='positive_l2'` "
                "or `'l2'` for this model."
            )
        return found if unmatched else []

    @property
    def batches_kept(self) -> int:
        """Training batches to keep: enough for the dead check and for a BatchNorm recalibration."""
        return max(self.check_batches, self.recalibration_batches)

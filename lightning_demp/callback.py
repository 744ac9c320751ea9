"""DemonPruning: the Lightning callback that wires detection, schedules, regularization, surgery and the optimizer.

Each hook is a short list of calls into the concept modules; see ``docs/how-it-works.md`` for the data flow.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_demp import _strategy
from lightning_demp.accounting import batch_size_of, call_with, count_flops_per_sample, count_parameters
from lightning_demp.attention import attention_layers, head_readers, plan_head_removal, remove_heads_
from lightning_demp.batchnorm import recalibrate_batchnorm_
from lightning_demp.detection import ActivationMonitor, dead_check, find_dead_units, unit_activity
from lightning_demp.monitoring import risky_monitors, schedule_phase
from lightning_demp.optim import add_param_next_to_, remap_optimizer_
from lightning_demp.regularization import (
    REGULARIZER_NAMES,
    RegularizerName,
    add_penalty_grad_,
    inject_noise_,
    live_masks,
    norm_scales,
    penalized_params,
)
from lightning_demp.report import print_summary
from lightning_demp.saturation import Fold, constant_units, fold_constant_inputs_, folds_for
from lightning_demp.schedules import SCHEDULE_NAMES, Schedule, ScheduleName, make_schedule
from lightning_demp.selection import decouple_residuals_
from lightning_demp.surgery import (
    PrunableGraph,
    UnitGroup,
    disable_resize_on_load,
    enable_resize_on_load,
    match_modules,
    resize_on_load_enabled,
)
from lightning_demp.target import (
    TARGET_METRICS,
    StrengthController,
    TargetMetric,
    least_active_units,
    limit_plan_to_target,
    planned_sparsity,
)

log = logging.getLogger(__name__)

CheckMode = Literal["eval_pass", "train_forwards"]
_CHECK_MODES = ("eval_pass", "train_forwards")
PenalizeScope = Literal["all", "prunable"]
_PENALIZE_SCOPES = ("all", "prunable")
_STATE_VERSION = 1


def _check_number(name: str, value: Any, *, low: float, low_inclusive: bool, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a number, got {type(value).__name__} {value!r}.")
    low_ok = value >= low if low_inclusive else value > low
    if not math.isfinite(value) or not low_ok or value > high:
        bracket = "[" if low_inclusive else "("
        upper = "inf)" if math.isinf(high) else f"{high}]"
        raise ValueError(f"Expected `{name}` to be a number in {bracket}{low}, {upper}, got {value!r}.")
    return float(value)


def _check_int(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, got {type(value).__name__} {value!r}.")
    if value < low:
        raise ValueError(f"Expected `{name}` to be an int >= {low}, got {value!r}.")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, got {type(value).__name__} {value!r}.")
    return value


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"Expected `{name}` to be one of {tuple(choices)}, got {type(value).__name__} {value!r}.")
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {tuple(choices)}, got {value!r}.")
    return value


class DemonPruning(Callback):
    r"""Demon's Pruning (DemP): promote neuron death while training, and remove dead units physically.

    Every optimizer step, the regularizer's gradient at strength `\lambda_t` is added before the step, and
    after it `\sigma_t \cdot N(0, 1)` noise is added to the parameter entries that received a gradient (live
    units). Every ``prune_every_n_epochs`` epochs, and once more when training ends, units that deliver nothing to
    any layer reading them are removed from every coupled layer (BatchNorm, residual links and flatten included);
    the optimizer keeps training what remains, with its state sliced, not reset. The output layer is never pruned.
    Attention heads of a `lightning_demp.attention.HeadedAttention` whose output is dead on every observed token are
    removed whole at the same events.

    Method: Dufort-Labbé et al., "Maxwell's Demon at Work: Efficient Pruning by Leveraging Saturation of Neurons"
    (arXiv:2403.07688).

    Args:
        regularizer: ``"l1_norm_scale"`` (λΣ|γ| on BatchNorm/LayerNorm scales, the paper's later variant),
            ``"positive_l2"`` (½λΣmax(θ, 0)², the first variant) or ``"l2"`` (coupled ½λ‖θ‖²).
        reg_max: Peak regularization strength λ_max; ``0`` turns regularization off.
        schedule: Shape of λ_t and σ_t: ``"one_cycle"`` (λ_max/25, cosine up to λ_max at 30 % of the span, cosine
            down to ≈0), ``"constant"``, ``"linear_warmup"`` or ``"cosine_decay"``.
        schedule_span: Fraction of the total optimizer steps that the schedule spans, in (0, 1].
        noise_std: Peak σ of the live-only noise; ``0`` turns noise off.
        prune_every_n_epochs: Run a dead check and removal at the end of every n-th training epoch (and always at
            the end of training).
        dead_threshold: A unit is dead when every reader gets ``|value| <= dead_threshold`` from it on every sample
            and position; ``0`` means exact death. The same threshold applies to a `HeadedAttention` head's output.
        check_batches: How many training batches the dead check observes.
        check_mode: ``"eval_pass"`` (the paper's way: an eval-mode, gradient-free pass over the last
            ``check_batches`` training batches) or ``"train_forwards"`` (observe the last ``check_batches`` training
            forwards of the epoch, at no extra cost; BatchNorm then uses batch statistics).
        min_units: A group of coupled units never drops below this many.
        exclude: Module names or glob patterns whose output units are never removed.
        seed: Seed of the noise generator (combined with the step, so every process draws the same noise).
        verbose: Print a one-line message at each removal and a summary table when fit ends.
        recalibrate_bn: While the schedule runs, and after each removal, re-estimate BatchNorm running statistics on
            the epoch's recent training batches (train mode, no gradients, no optimizer step) before validation, so
            that validation metrics stay trustworthy when BatchNorm scales are pushed toward zero.
        saturation_tolerance: Also remove *saturated* units (for smooth activations: GELU, SiLU, tanh, sigmoid):
            a unit whose value at every reader varies by at most this much over the observed data. Its constant
            contribution is folded into each reader's bias (created if missing) or, before a BatchNorm, into its
            running mean. Readers must be Linear layers or unpadded convolutions. ``None`` (default): dead units only.
        decouple_residuals: Before training, rewrite plain ``x + f(x)`` residual sums of the model's (torch.fx
            traceable) submodules into ``select(x) + f(x)`` with a `ChannelSelect`, so that a block's input and
            output channels are removed independently (the authors' treatment). Outputs are unchanged by the
            rewrite; needs ``example_input_array``.
        target_sparsity: A sparsity to reach by the end of the schedule span, in (0, 1): λ_t and σ_t are scaled by a
            feedback rule at each removal event so that the measured sparsity follows a cubic ramp to it. An event
            removes only as many dead units as reach the target (one unit past it at most); once it is reached, no
            more units are removed. ``None`` (default): the paper's behaviour, no target.
        target_metric: What ``target_sparsity`` measures: removed fraction of ``"params"``, ``"flops"`` or ``"units"``.
        force_target: At the final check, if the target was not reached, remove the least active remaining units
            (live ones: not function-preserving) until it is, and say so in the log.
        recalibration_batches: How many of the epoch's most recent training batches a recalibration uses.
        penalize: Which parameters the regularizer acts on. ``"all"`` (default, the paper): every parameter it
            applies to. ``"prunable"``: only the layers whose units can be removed (the producer of every group that
            is not blocked, and its BatchNorm), so that the rest of the network (attention, embeddings, the output
            layer) trains unregularized.
        plot: When fit ends, save ``demp_units.png`` (live units per layer over training, λ/σ beneath) in the run's
            log directory and send it to loggers that take figures (TensorBoard). Needs matplotlib.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range or not one of the allowed names.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_demp import DemonPruning
        >>> callback = DemonPruning(regularizer="positive_l2", reg_max=1.0, noise_std=5e-5, prune_every_n_epochs=5)
        >>> trainer = Trainer(max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False)

    Note:
        Under DDP the statistics are reduced across processes before any decision, the plan is broadcast from rank
        0, noise is drawn identically on every rank, and the DDP wrapper is rebuilt after each removal.
    """

    def __init__(
        self,
        regularizer: RegularizerName = "l1_norm_scale",
        reg_max: float = 0.03,
        schedule: ScheduleName = "one_cycle",
        schedule_span: float = 0.9,
        noise_std: float = 5e-5,
        prune_every_n_epochs: int = 1,
        dead_threshold: float = 0.0,
        check_batches: int = 12,
        check_mode: CheckMode = "eval_pass",
        min_units: int = 1,
        exclude: list[str] | None = None,
        seed: int = 0,
        verbose: bool = True,
        recalibrate_bn: bool = True,
        recalibration_batches: int = 4,
        saturation_tolerance: float | None = None,
        decouple_residuals: bool = False,
        target_sparsity: float | None = None,
        target_metric: TargetMetric = "params",
        force_target: bool = False,
        plot: bool = True,
        penalize: PenalizeScope = "all",
    ) -> None:
        super().__init__()
        self.regularizer: RegularizerName = _check_choice("regularizer", regularizer, REGULARIZER_NAMES)  # type: ignore[assignment]
        self.reg_max = _check_number("reg_max", reg_max, low=0.0, low_inclusive=True)
        self.schedule: ScheduleName = _check_choice("schedule", schedule, SCHEDULE_NAMES)  # type: ignore[assignment]
        self.schedule_span = _check_number("schedule_span", schedule_span, low=0.0, low_inclusive=False, high=1.0)
        self.noise_std = _check_number("noise_std", noise_std, low=0.0, low_inclusive=True)
        self.prune_every_n_epochs = _check_int("prune_every_n_epochs", prune_every_n_epochs, low=1)
        self.dead_threshold = _check_number("dead_threshold", dead_threshold, low=0.0, low_inclusive=True)
        self.check_batches = _check_int("check_batches", check_batches, low=1)
        self.check_mode: CheckMode = _check_choice("check_mode", check_mode, _CHECK_MODES)  # type: ignore[assignment]
        self.min_units = _check_int("min_units", min_units, low=1)
        if exclude is None:
            exclude = []
        if not isinstance(exclude, (list, tuple)) or not all(isinstance(p, str) for p in exclude):
            raise TypeError(f"Expected `exclude` to be a list of str, got {exclude!r}.")
        self.exclude = list(exclude)
        self.seed = _check_int("seed", seed, low=0)
        self.verbose = _check_bool("verbose", verbose)
        self.recalibrate_bn = _check_bool("recalibrate_bn", recalibrate_bn)
        self.recalibration_batches = _check_int("recalibration_batches", recalibration_batches, low=1)
        if saturation_tolerance is not None:
            saturation_tolerance = _check_number(
                "saturation_tolerance", saturation_tolerance, low=0.0, low_inclusive=True
            )
        self.saturation_tolerance = saturation_tolerance
        self.decouple_residuals = _check_bool("decouple_residuals", decouple_residuals)
        if target_sparsity is not None:
            target_sparsity = _check_number(
                "target_sparsity", target_sparsity, low=0.0, low_inclusive=False, high=0.999
            )
        self.target_sparsity = target_sparsity
        self.target_metric: TargetMetric = _check_choice("target_metric", target_metric, TARGET_METRICS)  # type: ignore[assignment]
        self.force_target = _check_bool("force_target", force_target)
        self._controller = StrengthController(target_sparsity) if target_sparsity is not None else None
        self.strength_scale = 1.0  # multiplies λ_t and σ_t; steered when a target is set
        self.plot = _check_bool("plot", plot)
        self.penalize: PenalizeScope = _check_choice("penalize", penalize, _PENALIZE_SCOPES)  # type: ignore[assignment]
        self._prunable_param_ids: set[int] = set()

        # Persistent state (plain types, saved in checkpoints).
        self.initial_widths: dict[str, int] = {}  # group name -> units at the start of the run
        self.kept_units: dict[str, list[int]] = {}  # group name -> original indices still present
        self.kept_heads: dict[str, list[int]] = {}  # attention layer name -> original heads still present
        self.initial_heads: dict[str, int] = {}
        self.initial_params: int | None = None
        self.initial_flops: float | None = None
        self.events: list[dict[str, Any]] = []  # one record per removal event
        self.plot_path: str | None = None
        self.recalibrations = 0  # BatchNorm recalibrations done in this process
        self.last_check_step: int = -1
        self.last_removed_count: int = 0

        # Runtime state (rebuilt in every process, never pickled).
        self._graph: PrunableGraph | None = None
        self._monitor: ActivationMonitor | None = None
        self._reg_schedule: Schedule | None = None
        self._noise_schedule: Schedule | None = None
        self._recent_batches: deque[Any] = deque(maxlen=self._recent_batches_kept())
        self._example_input: Any = None
        self._pending_noise: tuple[int, float, list[tuple[nn.Parameter, Tensor]]] | None = None
        self._step_hooks: list[Any] = []
        self._load_hook: Any = None
        self._current_flops: float | None = None
        self._train_batch_size: int | None = None
        self._total_steps: int | None = None
        self._loaded_schedule: dict[str, Any] | None = None
        self._fit_start_time: float | None = None
        self._last_reg_strength = 0.0
        self._last_noise_std = 0.0

    # ------------------------------------------------------------------ extension points
    def batch_to_input(self, batch: Any) -> Any:
        """Return the model input inside a training ``batch``; override for other batch layouts.

        The default takes a tensor batch as is, and the first element of a tuple or list (``(x, y)``).
        """
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, (tuple, list)) and batch:
            return batch[0]
        raise TypeError(
            f"`DemonPruning` cannot find the model input in a batch of type {type(batch).__name__}. Set "
            "`example_input_array` on your LightningModule and override `DemonPruning.batch_to_input(batch)`."
        )

    def forward_for_check(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        """Run ``pl_module`` on one batch during the dead check; override when ``forward`` needs more."""
        return call_with(pl_module, self.batch_to_input(batch))

    def _forward_module(self, module: nn.Module, batch: Any) -> Any:
        assert isinstance(module, pl.LightningModule)
        return self.forward_for_check(module, batch)

    def should_prune(self, trainer: pl.Trainer) -> bool:
        """Whether the current training epoch ends with a removal event (override for other cadences)."""
        return (trainer.current_epoch + 1) % self.prune_every_n_epochs == 0 or self._is_last_epoch(trainer)

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _strategy.check_supported(trainer.strategy)
        unmatched = [pattern for pattern, names in match_modules(pl_module, self.exclude).items() if not names]
        if unmatched:
            rank_zero_warn(f"`DemonPruning(exclude=...)`: the patterns {unmatched} match no module of the model.")
        if self.regularizer == "l1_norm_scale" and self.reg_max > 0 and not norm_scales(pl_module):
            raise ValueError(
                f"`DemonPruning(regularizer='l1_norm_scale')` regularizes BatchNorm/LayerNorm scales, but "
                f"`{type(pl_module).__name__}` has no affine normalization layer. Use `regularizer='positive_l2'` "
                "or `'l2'` for this model."
            )
        if _strategy.spawns_processes(trainer) and not resize_on_load_enabled(pl_module):
            raise RuntimeError(
                f"With `{type(trainer.strategy).__name__}` using spawned processes, the main process reloads the "
                f"trained weights into your original `{type(pl_module).__name__}`, which still has its full widths. "
                "Call `lightning_demp.enable_resize_on_load(self)` at the end of its `__init__` so that it accepts "
                'the pruned shapes, or use `strategy="ddp"`.'
            )
        self._load_hook = enable_resize_on_load(pl_module) or self._load_hook
        if self.decouple_residuals:
            if pl_module.example_input_array is None:
                raise ValueError(
                    "`DemonPruning(decouple_residuals=True)` rewrites the model with torch.fx and needs "
                    f"`example_input_array` on `{type(pl_module).__name__}`; set it in `__init__`."
                )
            decouple_residuals_(pl_module, pl_module.example_input_array)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._total_steps = _total_steps(trainer)
        span_steps = max(1, round(self.schedule_span * self._total_steps))
        self._reg_schedule = make_schedule(self.schedule, self.reg_max, span_steps)
        self._noise_schedule = make_schedule(self.schedule, self.noise_std, span_steps)
        self._fit_start_time = time.perf_counter()
        self._install_step_hooks(trainer)
        if pl_module.example_input_array is not None:
            self._prepare(pl_module, pl_module.example_input_array)
        self._warn_about_monitors(trainer, span_steps)

    def _warn_about_monitors(self, trainer: pl.Trainer, span_steps: int) -> None:
        if self.reg_max == 0 and self.noise_std == 0:
            return
        steps_per_epoch = max(1, self._total_steps // max(1, trainer.max_epochs or 1)) if self._total_steps else 1
        risky = risky_monitors(trainer, span_steps / steps_per_epoch)
        if risky:
            rank_zero_warn(
                "`DemonPruning`: " + "; ".join(risky) + ". Validation metrics dip while units die and BatchNorm "
                "statistics move; monitor them once `demp/settled` is 1 (see the docs' monitoring recipe), or raise "
                "the patience past the schedule."
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._graph is None:
            self._prepare(pl_module, _first_samples(self.batch_to_input(batch)))
        if self._train_batch_size is None:
            self._train_batch_size = batch_size_of(self.batch_to_input(batch))
            _set_flops_per_batch(pl_module, self._current_flops, self._train_batch_size)
        self._recent_batches.append(batch)  # references only; the eval pass (or its fallback) reads them
        if self._observing_this_batch(trainer, batch_idx):
            assert self._monitor is not None
            if not self._monitor.is_observing:
                self._monitor.reset()
                self._monitor.attach()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._recent_batches.clear()  # each check sees this epoch's batches only (also after a resume)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        assert self._reg_schedule is not None
        assert self._noise_schedule is not None
        step = trainer.global_step
        self._last_reg_strength = self._reg_schedule.value(step) * self.strength_scale
        self._last_noise_std = self._noise_schedule.value(step) * self.strength_scale
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._pending_noise = (step, self._last_noise_std, live_masks(params)) if self._last_noise_std > 0 else None
        if self._last_reg_strength > 0:
            penalized = penalized_params(optimizer, pl_module, self.regularizer)
            if self.penalize == "prunable":
                penalized = [p for p in penalized if id(p) in self._prunable_param_ids]
            add_penalty_grad_(penalized, self.regularizer, self._last_reg_strength)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._pending_noise is None:
            return
        step, std, masks = self._pending_noise
        self._pending_noise = None
        inject_noise_(masks, std, self.seed, step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.reg_max > 0 or self.noise_std > 0:
            pl_module.log("demp/reg_strength", self._last_reg_strength, on_step=True, on_epoch=False)
            pl_module.log("demp/noise_std", self._last_noise_std, on_step=True, on_epoch=False)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._monitor is not None:
            self._monitor.paused = True  # validation forwards never enter a removal decision
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self.schedule_active(trainer.global_step):
            self._recalibrate(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._monitor is not None:
            self._monitor.paused = False

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.should_prune(trainer):
            self._removal_event(trainer, pl_module, final=self._is_last_epoch(trainer))
        self._log_size(trainer, pl_module, use_module_log=True)
        if self.target_sparsity is not None:
            pl_module.log("demp/strength_scale", self.strength_scale)
        if self._reg_schedule is not None:
            pl_module.log("demp/schedule_phase", float(schedule_phase(self._reg_schedule, trainer.global_step)))
            pl_module.log("demp/settled", float(self.is_settled(trainer.global_step)))

    def is_settled(self, step: int) -> bool:
        """The schedule is over, and a check since its end removed nothing: validation metrics describe the final
        network. A check made while λ was still on does not count: units may die after it."""
        span_steps = self._reg_schedule.span_steps if self._reg_schedule is not None else 0
        return not self.schedule_active(step) and self.last_removed_count == 0 and self.last_check_step >= span_steps

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._graph is not None and self.last_check_step != trainer.global_step:
            self._removal_event(trainer, pl_module, final=True)  # training stopped early: the paper's final check
            self._log_size(trainer, pl_module, use_module_log=False)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and self._graph is not None:
            if self.plot:
                self._save_plot(trainer, Path(log_dir))
            if self.verbose:
                print_summary(self, trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release_hooks()
        if self._load_hook is not None:
            disable_resize_on_load(pl_module, self._load_hook)
            self._load_hook = None
        self._graph = None
        self._monitor = None
        self._recent_batches.clear()

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "initial_widths": dict(self.initial_widths),
            "kept_units": {name: list(kept) for name, kept in self.kept_units.items()},
            "kept_heads": {name: list(kept) for name, kept in self.kept_heads.items()},
            "initial_heads": dict(self.initial_heads),
            "initial_params": self.initial_params,
            "initial_flops": self.initial_flops,
            "events": [dict(event) for event in self.events],
            "last_check_step": self.last_check_step,
            "last_removed_count": self.last_removed_count,
            "strength_scale": self.strength_scale,
            "schedule": self._schedule_record(),
        }

    def _schedule_record(self) -> dict[str, Any] | None:
        """The schedule as plain values (for plots of a saved run); the loaded one until fit lays out its own."""
        if self._reg_schedule is None:
            return self._loaded_schedule
        return {
            "name": self.schedule,
            "reg_max": self.reg_max,
            "noise_std": self.noise_std,
            "span_steps": self._reg_schedule.span_steps,
            "total_steps": self._total_steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_schedule = state_dict.get("schedule")
        self.initial_widths = dict(state_dict.get("initial_widths", {}))
        self.kept_units = {name: list(kept) for name, kept in state_dict.get("kept_units", {}).items()}
        self.kept_heads = {name: list(kept) for name, kept in state_dict.get("kept_heads", {}).items()}
        self.initial_heads = dict(state_dict.get("initial_heads", {}))
        self.initial_params = state_dict.get("initial_params")
        self.initial_flops = state_dict.get("initial_flops")
        self.events = [dict(event) for event in state_dict.get("events", [])]
        self.last_check_step = int(state_dict.get("last_check_step", -1))
        self.last_removed_count = int(state_dict.get("last_removed_count", 0))
        self.strength_scale = float(state_dict.get("strength_scale", 1.0))
        if self._controller is not None:
            self._controller.scale = self.strength_scale

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_graph", "_monitor", "_pending_noise", "_load_hook", "_example_input"):
            state[key] = None
        state["_step_hooks"] = []
        state["_recent_batches"] = deque(maxlen=self._recent_batches_kept())
        return state

    # ------------------------------------------------------------------ internals
    def _recent_batches_kept(self) -> int:
        """Training batches to keep: enough for the dead check and for a BatchNorm recalibration."""
        return max(self.check_batches, self.recalibration_batches)

    def _prepare(self, pl_module: pl.LightningModule, example_input: Any) -> None:
        """Trace the model, create the activity monitor and record the starting size."""
        self._example_input = example_input
        self._graph = PrunableGraph(pl_module, example_input, exclude=self.exclude)
        self._monitor = self._new_monitor()
        self._current_flops = count_flops_per_sample(pl_module, _first_samples(example_input, 1))
        groups = [group for group in self._graph.groups() if group.blocked is None]
        for group in groups:
            self.initial_widths.setdefault(group.name, group.num_units)
            self.kept_units.setdefault(group.name, list(range(group.num_units)))
        for name, attention in attention_layers(pl_module).items():
            self.initial_heads.setdefault(name, attention.heads)
            self.kept_heads.setdefault(name, list(range(attention.heads)))
        if self.initial_params is None:
            self.initial_params = count_parameters(pl_module)
        if self.initial_flops is None:
            self.initial_flops = self._current_flops
        _set_flops_per_batch(pl_module, self._current_flops, None)
        self._prunable_param_ids = self._find_prunable_param_ids()

    def _find_prunable_param_ids(self) -> set[int]:
        """Ids of the parameters of each unblocked group's producer and its BatchNorm, for ``penalize="prunable"``
        (empty otherwise: nothing on the step path reads them).

        Ids, not parameters: the surgery replaces parameters, so this is recomputed after every removal.
        """
        if self.penalize != "prunable":
            return set()
        assert self._graph is not None
        modules = dict(self._graph.model.named_modules())
        ids: set[int] = set()
        for group in self._graph.groups():
            if group.blocked is not None:
                continue
            layers = [modules[group.name], self._graph.norm_after(group.name)]
            ids.update(id(p) for layer in layers if layer is not None for p in layer.parameters(recurse=False))
        return ids

    def _install_step_hooks(self, trainer: pl.Trainer) -> None:
        self._release_step_hooks()
        for optimizer in trainer.optimizers:
            self._step_hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def _release_step_hooks(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    def _release_hooks(self) -> None:
        self._release_step_hooks()
        if self._monitor is not None:
            self._monitor.detach()
        self._pending_noise = None

    def _is_last_epoch(self, trainer: pl.Trainer) -> bool:
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        if max_epochs is not None and trainer.current_epoch + 1 >= max_epochs:
            return True
        return trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step

    def _observing_this_batch(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        if self.check_mode != "train_forwards" or not self.should_prune(trainer):
            return False
        total = trainer.num_training_batches
        return math.isinf(total) or batch_idx >= total - self.check_batches

    def _collect_statistics(self, pl_module: pl.LightningModule) -> dict[str, dict[str, Tensor]] | None:
        assert self._monitor is not None
        if self.check_mode == "train_forwards" and self._monitor.is_observing:
            self._monitor.detach()
            stats = self._monitor.compute()
            if all(int(reader["num_samples"]) > 0 for reader in stats.values()):
                return stats
        # The paper's eval pass; also the fallback when training stopped before the observed forwards.
        if not self._recent_batches:
            return None
        return dead_check(pl_module, self._monitor, list(self._recent_batches), self._forward_module)

    def plan_removal(self, groups: Sequence[UnitGroup], stats: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Decide which units to remove from the reduced statistics (identical on every process)."""
        if any(int(reader_stats["num_nonfinite"]) > 0 for reader_stats in stats.values()):
            rank_zero_warn(
                "`DemonPruning`: non-finite activations during the dead check; no unit is removed at this event."
            )
            return {}
        plan: dict[str, Tensor] = {}
        for group in groups:
            if group.blocked is not None or group.name not in self.kept_units:
                continue
            readers = [(stats[r.reader]["max_abs"], r.feature_idxs, r.unit_idxs) for r in group.readers]
            activity = unit_activity(group.num_units, readers)
            dead = find_dead_units(activity, self.dead_threshold)
            if self.saturation_tolerance is not None and self._graph is not None:
                modules = dict(self._graph.model.named_modules())
                constant = constant_units(group, stats, modules, self.saturation_tolerance)
                dead = torch.unique(torch.cat([dead, constant]))
            allowed = max(0, group.num_units - self.min_units)
            if len(dead) > allowed:
                rank_zero_warn(
                    f"`DemonPruning`: {len(dead)} of {group.num_units} units of `{group.name}` are dead; keeping "
                    f"`min_units={self.min_units}`."
                )
                order = torch.sort(activity[dead], stable=True).indices
                dead = dead[order[:allowed]].sort().values
            if len(dead):
                plan[group.name] = dead
        return plan

    def _removal_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, final: bool = False) -> None:
        self.last_check_step = trainer.global_step
        if self._graph is None or self._monitor is None:
            return
        stats = self._collect_statistics(pl_module)
        if stats is None:
            return
        groups = self._graph.groups()
        target_reached = self.target_sparsity is not None and self.measured_sparsity(pl_module) >= self.target_sparsity
        plan = {} if target_reached else _strategy.broadcast_plan(trainer, self.plan_removal(groups, stats))
        if plan and self.target_sparsity is not None:  # identical on every rank: same model, same plan
            plan = limit_plan_to_target(plan, lambda part: self._sparsity_after(pl_module, part), self.target_sparsity)
        head_plan = {} if target_reached else _strategy.broadcast_plan(trainer, self.plan_head_removal(stats))
        if (  # dead heads go whole, and only within the target
            head_plan
            and self.target_sparsity is not None
            and self._sparsity_after(pl_module, plan, head_plan) > self.target_sparsity
        ):
            head_plan = {}
        self.last_removed_count = sum(len(idxs) for idxs in plan.values()) + sum(len(h) for h in head_plan.values())
        if plan and self.saturation_tolerance is not None:
            self._fold_constants(trainer, folds_for(groups, stats, plan))
        if plan or head_plan:
            self._apply_plan(trainer, pl_module, plan, reason="dead", head_plan=head_plan)
        if self.target_sparsity is not None and final and self.force_target:
            self._force_target(trainer, pl_module, stats)
        if self._controller is not None and self._reg_schedule is not None:
            progress = trainer.global_step / self._reg_schedule.span_steps
            planned = planned_sparsity(progress, self._controller.target)
            self.strength_scale = self._controller.update(self.measured_sparsity(pl_module), planned)

    def plan_head_removal(self, stats: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Dead attention heads to remove, from the reduced statistics (identical on every process)."""
        if self._graph is None or any(int(reader["num_nonfinite"]) > 0 for reader in stats.values()):
            return {}
        return plan_head_removal(self._graph.model, stats, self.dead_threshold)

    def _apply_plan(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        plan: dict[str, Tensor],
        *,
        reason: str,
        head_plan: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Surgery, optimizer remap, DDP rewrap and bookkeeping for one plan (identical on every rank)."""
        assert self._graph is not None
        start = time.perf_counter()
        head_plan = dict(head_plan or {})
        remaps = self._graph.remove_units_(plan)
        orders, order_remaps = self._graph.order_routed_channels_()  # selections become single slice adds
        head_remaps = remove_heads_(pl_module, head_plan)
        for optimizer in trainer.optimizers:
            remap_optimizer_(optimizer, remaps + order_remaps + head_remaps)
        _strategy.rewrap_after_surgery(trainer)
        if any(getattr(module, "_compiled_call_impl", None) is not None for module in pl_module.modules()):
            torch.compiler.reset()  # drop graphs guarded on the old shapes instead of piling up recompiles
        for name, idxs in plan.items():
            removed = set(idxs.tolist())
            self.kept_units[name] = [unit for i, unit in enumerate(self.kept_units[name]) if i not in removed]
        for name, order in orders.items():
            if name in self.kept_units:
                self.kept_units[name] = [self.kept_units[name][i] for i in order.tolist()]
        for name, heads in head_plan.items():
            removed = set(heads.tolist())
            self.kept_heads[name] = [head for i, head in enumerate(self.kept_heads[name]) if i not in removed]
        self._monitor = self._new_monitor()
        self._prunable_param_ids = self._find_prunable_param_ids()
        self._current_flops = count_flops_per_sample(pl_module, _first_samples(self._example_input, 1))
        _set_flops_per_batch(pl_module, self._current_flops, self._train_batch_size)
        self._recalibrate(trainer, pl_module)
        removed_count = sum(len(idxs) for idxs in plan.values())
        self.events.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "reason": reason,
                "removed": {name: len(idxs) for name, idxs in plan.items()},
                "widths": {name: len(kept) for name, kept in self.kept_units.items()},
                **({"heads_removed": {name: len(h) for name, h in head_plan.items()}} if head_plan else {}),
                **({"heads": {name: len(kept) for name, kept in self.kept_heads.items()}} if self.kept_heads else {}),
                "params": count_parameters(pl_module),
                "flops_kept": self.flops_kept_fraction(),
                "seconds": time.perf_counter() - start,
            }
        )
        if self.verbose:
            what = "units" if reason == "dead" else "least active live units (force_target)"
            heads_removed = sum(len(h) for h in head_plan.values())
            rank_zero_info(
                f"DemonPruning: removed {removed_count} {what} from {len(plan)} layers"
                + (f" and {heads_removed} dead attention heads" if heads_removed else "")
                + f": {self.units_kept_fraction():.0%} of units, {self.flops_kept_fraction():.0%} of FLOPs kept."
            )

    def _new_monitor(self) -> ActivationMonitor:
        assert self._graph is not None
        readers = {**self._graph.readers(), **head_readers(self._graph.model)}
        return ActivationMonitor(readers, track_range=self.saturation_tolerance is not None)

    def _fold_constants(self, trainer: pl.Trainer, folds: Sequence[Fold]) -> None:
        """Move the constant contribution of saturated units into their readers before they are removed."""
        assert self._graph is not None
        modules = dict(self._graph.model.named_modules())
        for fold in folds:
            reader = modules[fold.reader]
            new_bias = fold_constant_inputs_(reader, fold, self._graph.norm_after(fold.reader))
            if new_bias is not None:
                for optimizer in trainer.optimizers:
                    add_param_next_to_(optimizer, reader.weight, new_bias)

    def measured_sparsity(self, pl_module: nn.Module) -> float:
        """The sparsity ``target_metric`` measures now: the removed fraction of parameters, FLOPs or units."""
        if self.target_metric == "flops":
            return 1.0 - self.flops_kept_fraction()
        if self.target_metric == "units":
            return 1.0 - self.units_kept_fraction()
        return 1.0 - count_parameters(pl_module) / self.initial_params if self.initial_params else 0.0

    def _sparsity_after(
        self,
        pl_module: pl.LightningModule,
        plan: Mapping[str, Tensor],
        head_plan: Mapping[str, Tensor] | None = None,
    ) -> float:
        """The ``target_metric`` sparsity that removing ``plan`` (and the heads of ``head_plan``) would leave,
        measured on a copy of the model. Heads are not units: they count for ``"params"`` and ``"flops"`` only."""
        if self.target_metric == "units":
            initial = sum(self.initial_widths.values())
            removed = sum(len(idxs) for idxs in plan.values())
            return self.measured_sparsity(pl_module) + (removed / initial if initial else 0.0)
        trial = copy.deepcopy(pl_module)
        PrunableGraph(trial, self._example_input, exclude=self.exclude).remove_units_(plan)
        remove_heads_(trial, head_plan or {})
        if self.target_metric == "flops":
            flops = count_flops_per_sample(trial, _first_samples(self._example_input, 1))
            return 1.0 - flops / self.initial_flops if self.initial_flops else 0.0
        return self.measured_sparsity(trial)

    def _force_target(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: Mapping[str, Mapping[str, Tensor]]
    ) -> None:
        """Opt-in last step: remove the least active live units, in small chunks, until the target is met."""
        assert self._graph is not None
        assert self.target_sparsity is not None
        forced = 0
        while self.measured_sparsity(pl_module) < self.target_sparsity:
            plan = least_active_units(self._graph.groups(), stats, self.min_units)
            if not plan:
                rank_zero_warn("`DemonPruning(force_target=True)`: every group is at `min_units`; target not met.")
                break
            plan = _strategy.broadcast_plan(trainer, plan)
            self._apply_plan(trainer, pl_module, plan, reason="force_target")
            forced += sum(len(idxs) for idxs in plan.values())
            assert self._monitor is not None
            stats = dead_check(pl_module, self._monitor, list(self._recent_batches), self._forward_module)
        if forced:
            rank_zero_info(
                f"DemonPruning: force_target removed {forced} live units (not function-preserving) to reach "
                f"{self.measured_sparsity(pl_module):.1%} {self.target_metric} sparsity "
                f"(target {self.target_sparsity:.1%})."
            )

    def _save_plot(self, trainer: pl.Trainer, directory: Path) -> None:
        try:
            from lightning_demp.plots import plot_run

            figure = plot_run(self.state_dict())
        except ImportError:
            rank_zero_info("DemonPruning: install matplotlib to get the units-over-training plot.")
            return
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "demp_units.png"
        figure.savefig(path, dpi=120)
        self.plot_path = str(path)
        if self.verbose:
            rank_zero_info(f"DemonPruning: live units per layer over training, plotted in {path}")
        for logger in trainer.loggers:
            add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
            if callable(add_figure):
                add_figure("demp/units", figure, global_step=trainer.global_step)
        import matplotlib.pyplot as plt

        plt.close(figure)

    def schedule_active(self, step: int) -> bool:
        """Whether λ_t/σ_t are still inside their span at ``step``."""
        return self._reg_schedule is not None and step < self._reg_schedule.span_steps

    def _recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.recalibrate_bn or not self._recent_batches:
            return
        batches = list(self._recent_batches)[-self.recalibration_batches :]
        if recalibrate_batchnorm_(pl_module, batches, self._forward_module):
            _strategy.average_batchnorm_statistics(trainer, pl_module)
            self.recalibrations += 1

    def units_kept_fraction(self) -> float:
        """Fraction of the prunable units still present."""
        initial = sum(self.initial_widths.values())
        return sum(len(kept) for kept in self.kept_units.values()) / initial if initial else 1.0

    def flops_kept_fraction(self) -> float:
        """Forward FLOPs now, as a fraction of the FLOPs at the start of the run."""
        if not self.initial_flops or self._current_flops is None:
            return 1.0
        return self._current_flops / self.initial_flops

    def size_metrics(self, pl_module: nn.Module) -> dict[str, float]:
        """The logged size metrics: units per group, kept/removed fractions, parameters and FLOPs."""
        params = count_parameters(pl_module)
        metrics: dict[str, float] = {f"demp/units/{name}": float(len(kept)) for name, kept in self.kept_units.items()}
        metrics.update({f"demp/heads/{name}": float(len(kept)) for name, kept in self.kept_heads.items()})
        metrics["demp/units_kept_frac"] = self.units_kept_fraction()
        metrics["demp/units_removed_frac"] = 1.0 - self.units_kept_fraction()
        metrics["demp/params"] = float(params)
        metrics["demp/params_removed_frac"] = 1.0 - params / self.initial_params if self.initial_params else 0.0
        if self._current_flops is not None:
            metrics["demp/flops_per_sample"] = float(self._current_flops)
            metrics["demp/flops_kept_frac"] = self.flops_kept_fraction()
        return metrics

    def _log_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, use_module_log: bool) -> None:
        if self._graph is None:
            return
        metrics = self.size_metrics(pl_module)
        if use_module_log:
            on_bar = {"demp/units_kept_frac", "demp/flops_kept_frac"}
            for key, value in metrics.items():
                pl_module.log(key, value, prog_bar=key in on_bar, sync_dist=False)
            return
        for logger in trainer.loggers:  # on_train_end: LightningModule.log is not allowed there
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()


def _total_steps(trainer: pl.Trainer) -> int:
    total = trainer.estimated_stepping_batches
    if math.isinf(total):
        raise ValueError(
            "`DemonPruning` needs the number of training steps to lay out its schedule; set `max_steps` or "
            "`max_epochs` on the Trainer and use a dataloader with a length."
        )
    return int(total)


def _first_samples(inputs: Any, count: int = 2) -> Any:
    if isinstance(inputs, Tensor) and inputs.dim() > 0:
        return inputs[:count]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_first_samples(value, count) for value in inputs)
    if isinstance(inputs, dict):
        return {key: _first_samples(value, count) for key, value in inputs.items()}
    return inputs


def _set_flops_per_batch(pl_module: nn.Module, flops_per_sample: float | None, batch_size: int | None) -> None:
    """Keep ``flops_per_batch`` (training FLOPs ≈ 3 × forward) current for Lightning's ``ThroughputMonitor``."""
    if flops_per_sample is not None and batch_size:
        pl_module.flops_per_batch = int(3 * flops_per_sample * batch_size)  # type: ignore[assignment]

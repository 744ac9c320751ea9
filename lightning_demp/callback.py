"""DemonPruning: the Lightning callback, a thin adapter over the framework-free `DemonPruner`.

Each hook calls one method of the core (`lightning_demp.core`); the strategy glue (`_strategy`) supplies the
broadcast, the DDP rewrap and the BatchNorm averaging. See ``docs/how-it-works.md`` for the data flow.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_demp import _strategy
from lightning_demp.accounting import (
    accepted_keywords,
    batch_size_of,
    call_with,
    first_input,
    first_samples,
    set_flops_per_batch,
)
from lightning_demp.cadence import Cadence
from lightning_demp.collectives import SINGLE_PROCESS
from lightning_demp.config import PenalizeScope, PruningConfig, check_bool, check_choice, check_keys
from lightning_demp.core import DemonPruner
from lightning_demp.decouple import decouple_residuals_
from lightning_demp.monitoring import log_size, log_state, warn_at_fit_start
from lightning_demp.plots import validation_point
from lightning_demp.regularization import RegularizerName
from lightning_demp.report import check_plot, plot_directory, report_end_of_fit
from lightning_demp.resize import disable_resize_on_load, enable_resize_on_load
from lightning_demp.schedules import ScheduleName
from lightning_demp.target import TargetMetric
from lightning_demp.units import RemovalPlan, Statistics
from lightning_demp.views import PrunerViews

CheckMode = Literal["eval_pass", "train_forwards"]
_CHECK_MODES = ("eval_pass", "train_forwards")


class DemonPruning(PrunerViews, Callback):
    r"""Demon's Pruning (DemP): promote neuron death while training, and remove dead units physically.

    Every optimizer step, λ_t·∇R is added to the gradients before the step and σ_t noise to the entries that had a
    gradient after it. Every ``prune_every_n_epochs`` epochs, and when training ends, units that deliver nothing to
    any reader are removed from every coupled layer; the optimizer keeps its sliced state. The output layer is never
    pruned; dead heads of a `lightning_demp.attention.HeadedAttention` go whole. The work is done by the
    framework-free `lightning_demp.core.DemonPruner` (``self.pruner``); this class wires it to Lightning.

    Method: Dufort-Labbé et al., "Maxwell's Demon at Work: Efficient Pruning by Leveraging Saturation of Neurons"
    (arXiv:2403.07688).

    Args (each in full in ``docs/configuration.md``):
        regularizer: ``"l1_norm_scale"`` (λΣ|γ| on norm scales), ``"positive_l2"`` (½λΣmax(θ, 0)²) or ``"l2"``.
        reg_max: Peak regularization strength λ_max; ``0`` turns regularization off.
        schedule: Shape of λ_t and σ_t: ``"one_cycle"``, ``"constant"``, ``"linear_warmup"`` or ``"cosine_decay"``.
        schedule_span: Fraction of the total optimizer steps that the schedule spans, in (0, 1].
        noise_std: Peak σ of the noise on live entries; ``0`` turns noise off.
        prune_every_n_epochs: Check and remove at the end of every n-th training epoch (and at the end of training).
        prune_every_n_train_steps: Check and remove after every n-th optimizer step instead, mid-epoch included (and
            at the end of training); ``None``: by epochs. Set one of the two.
        dead_threshold: A unit is dead when every reader gets ``|value| <= dead_threshold`` from it everywhere.
        check_batches: How many training batches the dead check observes.
        check_mode: ``"eval_pass"`` (the paper's eval-mode pass over recent batches) or ``"train_forwards"``
            (observe the epoch's last training forwards, at no extra cost).
        min_units: A group of coupled units never drops below this many.
        exclude: Module names or glob patterns whose output units are never removed.
        seed: Seed of the noise (combined with the step, so every process draws the same noise).
        verbose: A line at each removal and a summary table when fit ends.
        recalibrate_bn: Re-estimate BatchNorm statistics on recent training batches before validations during the
            schedule and after each removal.
        saturation_tolerance: Also remove units of smooth activations whose value varies by at most this at every
            reader, their constant folded into the reader; ``None``: dead units only.
        decouple_residuals: Rewrite plain ``x + f(x)`` residuals into `ChannelSelect` shortcuts before training.
        target_sparsity: Steer λ_t/σ_t toward this removed fraction by the end of the schedule, close a late lag
            with the least important live units, never pass it; ``None``: no target.
        target_metric: What ``target_sparsity`` measures: ``"params"``, ``"flops"`` or ``"units"``.
        force_target: At the final check, remove the least active live units until the target is met.
        recalibration_batches: How many recent training batches a recalibration uses.
        penalize: ``"all"`` (the paper) or ``"prunable"`` (only the layers whose units can be removed).
        live_floor: The pull on a layer never exceeds what the loss resists on this share of its units
            (`lightning_demp.pressure`); ``0`` turns the floor off.
        max_death_fraction: Nor does it outweigh the loss on more than this share of a layer's units (they go in
            rounds, one per event); ``1``: no cap (with ``live_floor=0``, the paper). Not with a focused target.
        target_focus: With a target, pull nothing before its ramp starts, then only the least important live
            units it still needs, re-ranked at every event; ``False``: pull every unit, as without a target.
        input_keys: For batches that are mappings (dicts, ``BatchEncoding``): the keys passed to ``forward`` as
            keyword arguments; ``None``: every key ``forward`` accepts.
        round_to: Keep each group's width a multiple of this (dead units stay until the multiple is reached);
            ``1``: any width.
        plot: When fit ends, draw ``demp_units.png`` (share of units kept per layer, λ/σ beneath): ``True`` saves it
            in the logger's directory and sends it to loggers that take figures (no logger, no file); a directory
            saves it there; ``False``: no plot.

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
        prune_every_n_train_steps: int | None = None,
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
        plot: bool | str = True,
        penalize: PenalizeScope = "all",
        live_floor: float = 0.05,
        max_death_fraction: float = 0.5,
        target_focus: bool = True,
        round_to: int = 1,
        input_keys: list[str] | None = None,
    ) -> None:
        super().__init__()
        arguments = {**locals(), "exclude": () if exclude is None else exclude}
        self.config = PruningConfig(**{field.name: arguments[field.name] for field in fields(PruningConfig)})
        self._cadence = Cadence(prune_every_n_epochs, prune_every_n_train_steps)
        self.input_keys = check_keys(input_keys)
        self.prune_every_n_epochs, self.prune_every_n_train_steps = prune_every_n_epochs, prune_every_n_train_steps
        self.check_mode: CheckMode = check_choice("check_mode", check_mode, _CHECK_MODES)  # type: ignore[assignment]
        self.verbose = check_bool("verbose", verbose)
        self.decouple_residuals = check_bool("decouple_residuals", decouple_residuals)
        self.plot = check_plot(plot)
        self.pruner = self._new_pruner()
        self.plot_path: str | None = None
        self.fit_start_time: float | None = None  # perf_counter() at the start of fit, for the summary
        self._removals_before_validation: int | None = None  # removal events behind the last validation's metrics
        self.validation_history: list[dict[str, Any]] = []  # {"step", "name", "value"} after each validation
        self._train_batch_size: int | None = None
        self._step_hooks: list[Any] = []
        self._load_hook: Any = None
        self._model_ref: weakref.ref[pl.LightningModule] | None = None  # the model the record belongs to

    def _new_pruner(self) -> DemonPruner:
        info = rank_zero_info if self.verbose else None
        return DemonPruner(
            self.config, forward=self._forward_module, warn=rank_zero_warn, info=info, decide=self._plan_for
        )

    # ------------------------------------------------------------------ extension points
    def batch_to_input(self, batch: Any) -> Any:
        """Return the model input inside a training ``batch``; override for other batch layouts.

        The default takes a tensor batch as is, the first element of a tuple or list (``(x, y)``), and a mapping (a
        dict, a Hugging Face ``BatchEncoding``) as keyword arguments: ``input_keys`` of it when given.
        """
        try:
            return first_input(batch, self.input_keys)
        except TypeError:
            raise TypeError(
                f"`DemonPruning` cannot find the model input in a batch of type {type(batch).__name__}. Set "
                "`example_input_array` on your LightningModule and override `DemonPruning.batch_to_input(batch)`."
            ) from None

    def forward_for_check(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        """Run ``pl_module`` on one batch during the dead check; override when ``forward`` needs more."""
        return call_with(pl_module, self.batch_to_input(batch))

    def _forward_module(self, module: nn.Module, batch: Any) -> Any:
        assert isinstance(module, pl.LightningModule)
        return self.forward_for_check(module, batch)

    def plan_removal(self, pl_module: pl.LightningModule, stats: Statistics) -> RemovalPlan:
        """Decide what a removal event removes from the reduced statistics; override for another policy.

        The default is `DemonPruner.decide`: dead units (and saturated ones with ``saturation_tolerance``), never
        below ``min_units``, and dead heads. It must be a pure function of its arguments (under DDP every process
        computes it, and the plans must agree).
        """
        return self.pruner.decide(pl_module, stats)

    def _plan_for(self, module: nn.Module, stats: Statistics) -> RemovalPlan:
        assert isinstance(module, pl.LightningModule)
        return self.plan_removal(module, stats)

    @property
    def cadence(self) -> str:
        """How often removal events come, as the arguments that set it."""
        return self._cadence.describe()

    def should_prune(self, trainer: pl.Trainer) -> bool:
        """Whether the current training epoch ends with a removal event (override for other cadences)."""
        return self._cadence.at_epoch_end(trainer.current_epoch, _strategy.is_last_epoch(trainer))

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _strategy.check_supported(trainer.strategy)
        if stage == "fit" and self._model_ref is not None and self._model_ref() is not pl_module:
            self.pruner, self._train_batch_size, self.validation_history = self._new_pruner(), None, []  # a new model
        if stage == "fit":  # validate/test/predict run no pressure: nothing to demand of the model
            self._model_ref = weakref.ref(pl_module)
            _strategy.check_fit(trainer, pl_module, self.config)
        _strategy.check_spawned_reload(trainer, pl_module)
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
        self.pruner.lay_out(_strategy.total_steps(trainer), resumed_at=_strategy.schedule_step(trainer))
        self.fit_start_time = time.perf_counter()
        self._release_step_hooks()
        for optimizer in trainer.optimizers:
            self._step_hooks.append(optimizer.register_step_post_hook(lambda *args: self.pruner.add_noise_()))
        if pl_module.example_input_array is not None:  # in the model's dtype under "bf16-true", "64-true"...
            self._prepare(pl_module, trainer.precision_plugin.convert_input(pl_module.example_input_array))
        warn_at_fit_start(trainer, self.pruner)

    def _prepare(self, pl_module: pl.LightningModule, example_input: Any) -> None:
        if isinstance(example_input, Mapping):  # keyword arguments: the tracer gets only those forward takes
            example_input = accepted_keywords(pl_module, example_input)
        self.pruner.prepare(pl_module, example_input)
        set_flops_per_batch(pl_module, self.pruner.ledger.current_flops, self._train_batch_size)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pruner.forget_batches()  # each check sees this epoch's batches only (also after a resume)
        self.pruner.pressure.watch_signs(pl_module)  # until read: the training batches' signs, not the sanity check's

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.pruner.prepared:
            self._prepare(pl_module, first_samples(self.batch_to_input(batch)))
        if self._train_batch_size is None:
            self._train_batch_size = batch_size_of(self.batch_to_input(batch))
            set_flops_per_batch(pl_module, self.pruner.ledger.current_flops, self._train_batch_size)
        self.pruner.remember_batch(batch)  # references only; the eval pass (or its fallback) reads them
        if self._observing_this_batch(trainer, batch_idx):
            self.pruner.start_observing()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        collectives = _strategy.collectives(trainer) if self.pruner.pressure.sign_watch is not None else SINGLE_PROCESS
        self.pruner.regularize_(optimizer, pl_module, _strategy.schedule_step(trainer), collectives)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _strategy.skipped_step(pl_module, outputs):
            self.pruner.forget_last_batch()
        if (self.config.reg_max > 0 or self.config.noise_std > 0) and _strategy.logs_this_step(trainer):
            pl_module.log("demp/reg_strength", self.pruner.pressure.last_reg_strength, on_step=True, on_epoch=False)
            pl_module.log("demp/noise_std", self.pruner.pressure.last_noise_std, on_step=True, on_epoch=False)
        step = _strategy.schedule_step(trainer)
        ends_fit = _strategy.is_last_epoch(trainer) and batch_idx + 1 >= trainer.num_training_batches
        if self._cadence.after_step(step, ends_fit) and self.pruner.prepared and self.ledger.last_check_step != step:
            self._removal_event(trainer, pl_module, final=False)  # the step cadence: mid-epoch

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pruner.pause_observing(True)  # validation forwards never enter a removal decision
        if (
            trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and self.pruner.schedule_active(_strategy.schedule_step(trainer))
        ):
            self.pruner.recalibrate(pl_module, _strategy.collectives(trainer))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pruner.pause_observing(False)
        if not trainer.sanity_checking:  # the logged accuracy belongs to the network with these events behind it
            self._removals_before_validation = len(self.pruner.ledger.events)
            point = validation_point(trainer.callback_metrics, _strategy.schedule_step(trainer))
            if trainer.state.fn == "fit" and point is not None:
                self.validation_history.append(point)  # for the plot; saved in checkpoints

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.should_prune(trainer):
            self._removal_event(trainer, pl_module, final=_strategy.is_last_epoch(trainer))
        if self.pruner.prepared:
            log_size(trainer, pl_module, self.size_metrics(pl_module), use_module_log=True)
        log_state(pl_module, self.pruner, _strategy.schedule_step(trainer))

    def _removal_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, final: bool) -> bool:
        stats = self.pruner.stop_observing() if self.check_mode == "train_forwards" else None
        step, epoch, collectives = (
            _strategy.schedule_step(trainer),
            trainer.current_epoch,
            _strategy.collectives(trainer),
        )
        event = self.pruner.removal_event(
            pl_module, trainer.optimizers, stats, step=step, epoch=epoch, final=final, collectives=collectives
        )
        if event is not None:
            set_flops_per_batch(pl_module, self.pruner.ledger.current_flops, self._train_batch_size)
        return event is not None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner.prepared and self.pruner.ledger.last_check_step != _strategy.schedule_step(trainer):
            removed = self._removal_event(trainer, pl_module, final=True)  # stopped early: the paper's final check
            log_size(trainer, pl_module, self.size_metrics(pl_module), use_module_log=False)
            _strategy.resave_last_checkpoints(trainer, removed=removed)
        directory = plot_directory(self.plot, trainer)  # asks trainer.log_dir, a collective under DDP: every rank
        if trainer.is_global_zero and self.pruner.prepared:
            report_end_of_fit(self, trainer, pl_module, directory, self._removals_before_validation)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release_hooks()
        if self._load_hook is not None:
            disable_resize_on_load(pl_module, self._load_hook)
            self._load_hook = None
        self.pruner.release()

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.pruner.state_dict(), "validation": [dict(point) for point in self.validation_history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validation_history = [dict(point) for point in state_dict.get("validation", [])]
        self.pruner.load_state_dict({key: value for key, value in state_dict.items() if key != "validation"})

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_step_hooks": [], "_load_hook": None, "_model_ref": None}  # this process's own

    # ------------------------------------------------------------------ internals
    def _observing_this_batch(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        if self.check_mode != "train_forwards":
            return False
        return self._cadence.observe_batch(
            _strategy.schedule_step(trainer),
            batch_idx,
            trainer.num_training_batches,
            self.config.check_batches,
            epoch_event=self.should_prune(trainer),
        )

    def _release_step_hooks(self) -> None:
        while self._step_hooks:
            self._step_hooks.pop().remove()

    def _release_hooks(self) -> None:
        self._release_step_hooks()
        self.pruner.detach()

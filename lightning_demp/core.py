"""The framework-free pruner: DemP on any ``nn.Module`` and its optimizers, with or without a Trainer.

`DemonPruner` holds the graph, the activity monitor, the ledger and the policies. A training loop calls it at four
places: `DemonPruner.regularize_` before each optimizer step (the regularizer's gradient; the live-entry masks for
the noise), `DemonPruner.add_noise_` after it, `DemonPruner.remember_batch` with each training batch, and
`DemonPruner.removal_event` at the epoch ends where units should go. `DemonPruning` is this class wired to
Lightning's hooks; under DDP it passes `lightning_demp.collectives.Collectives` (broadcast, rewrap, averaging).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_demp.accounting import call_on_first_input, count_flops_per_sample, count_parameters, first_samples
from lightning_demp.attention import attention_layers, head_readers, remove_heads_
from lightning_demp.batchnorm import recalibrate_batchnorm_, recalibrated_norms
from lightning_demp.collectives import SINGLE_PROCESS, Collectives
from lightning_demp.config import PruningConfig
from lightning_demp.detection import ActivationMonitor, dead_check
from lightning_demp.graph import PrunableGraph
from lightning_demp.ledger import PruningLedger, RemovalEvent
from lightning_demp.optim import remap_optimizer_
from lightning_demp.permutation import order_routed_channels_
from lightning_demp.policy import decide_removal, round_plan
from lightning_demp.pressure import Pressure
from lightning_demp.regularization import group_parameters
from lightning_demp.removal import forget_compiled_graphs, remove_units_
from lightning_demp.resize import changed_dims, merge_dims, note_changed_dims, tensor_shapes
from lightning_demp.rollback import all_or_nothing
from lightning_demp.saturation import SaturationFolding
from lightning_demp.shortfall import SHORTFALL_START, close_lag, focus_units, force_target
from lightning_demp.sizes import FlopTally, SizeTable
from lightning_demp.target import RAMP_START, SparsityTarget
from lightning_demp.units import RemovalPlan, Statistics
from lightning_demp.untraced import UntracedWatch, block_untraced_readers

STATE_VERSION = 1


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


class DemonPruner:
    """DemP on a plain model: regularize and add noise at every step, remove dead units at events.

    Args:
        config: The settings (validated by `PruningConfig`).
        forward: ``forward(model, batch)`` runs the model on one training batch (for the dead check and the
            BatchNorm recalibration); by default the model is called on `first_input` of the batch.
        warn: Where warnings go (the callback passes Lightning's ``rank_zero_warn``).
        info: Where progress messages go; ``None`` for none.
        decide: ``decide(model, stats) -> RemovalPlan`` in place of `DemonPruner.decide` at removal events (the
            callback's `DemonPruning.plan_removal` extension point).

    Examples:
        A plain training loop, no Lightning:

        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> pruner = DemonPruner(PruningConfig(regularizer="positive_l2", reg_max=1.0))
        >>> batches = [(torch.randn(32, 4), torch.randint(0, 2, (32,))) for _ in range(8)]
        >>> pruner.prepare(model, batches[0][0][:2], total_steps=16)
        >>> for step in range(16):
        ...     x, y = batches[step % 8]
        ...     pruner.remember_batch((x, y))
        ...     optimizer.zero_grad()
        ...     nn.functional.cross_entropy(model(x), y).backward()
        ...     pruner.regularize_(optimizer, model, step)
        ...     optimizer.step()
        ...     pruner.add_noise_()
        >>> event = pruner.removal_event(model, [optimizer], step=16, epoch=1, final=True)
        >>> model[0].out_features == len(pruner.ledger.kept_units["0"]) == model[2].in_features
        True
    """

    def __init__(
        self,
        config: PruningConfig,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        warn: Callable[[str], None] | None = None,
        info: Callable[[str], None] | None = None,
        decide: Callable[[nn.Module, Statistics], RemovalPlan] | None = None,
    ) -> None:
        self.config = config
        self.decider = decide if decide is not None else self.decide
        self.forward = forward if forward is not None else call_on_first_input
        self.warn = warn if warn is not None else _warn
        self.info = info
        self.ledger = PruningLedger()
        self.target = (
            SparsityTarget(config.target_sparsity, config.target_metric, config.force_target)
            if config.target_sparsity is not None
            else None
        )
        self.saturation = (
            SaturationFolding(config.saturation_tolerance) if config.saturation_tolerance is not None else None
        )
        self.graph: PrunableGraph | None = None
        self.monitor: ActivationMonitor | None = None
        self.pressure = Pressure(config)
        if self.target is not None and config.target_focus:
            self.pressure.focus_on({})  # nothing is pulled before the target's ramp starts
        self.example_input: Any = None
        self.flop_tally: FlopTally | None = None  # forward FLOPs after removals, without a forward
        self.recent_batches: deque[Any] = deque(maxlen=config.batches_kept)
        self.recalibrations = 0  # BatchNorm recalibrations done in this process
        self.untraced_watch: UntracedWatch | None = None  # until the first training forward after `prepare`

    # ------------------------------------------------------------------ setting up
    def prepare(self, model: nn.Module, example_input: Any, total_steps: int | None = None) -> None:
        """Trace ``model``, create the monitor, record the starting size; lay the schedules over ``total_steps``."""
        self.example_input = example_input
        self.graph = PrunableGraph(model, example_input, exclude=self.config.exclude)
        self.monitor = self._new_monitor()
        flops = count_flops_per_sample(model, first_samples(example_input, 1))
        self.flop_tally = FlopTally(model, first_samples(example_input, 1), flops)
        heads = {name: attention.heads for name, attention in attention_layers(model).items()}
        self.ledger.start(self.graph.groups(), heads, count_parameters(model), flops)
        if self.saturation is not None:
            self.saturation.bind(model)
        self.refresh_pressure()
        self.pressure.watch_signs(model)  # the one-sided L2's: on the next forward (`lightning_demp.signs`)
        note_changed_dims(model, self.ledger.changed_dims)  # a resumed run's record
        self.untraced_watch = UntracedWatch(model, self.graph.traced_modules(), self._block_untraced)
        if total_steps is not None:
            self.lay_out(total_steps)

    def lay_out(self, total_steps: int, resumed_at: int = 0) -> None:
        """Lay the schedules over ``total_steps``; warn when a resume brought other settings (`Pressure.lay_out`)."""
        if changed := self.pressure.lay_out(total_steps, resumed_at):
            self.warn(
                f"`DemonPruning`: resumed with another schedule than the checkpoint's ({'; '.join(changed)}); the "
                "new one applies from the resumed step on, the old one stays in the record's history."
            )

    @property
    def prepared(self) -> bool:
        """Whether `prepare` traced a model."""
        return self.graph is not None

    @property
    def strength_scale(self) -> float:
        """The factor on λ_t and σ_t (steered when a target is set, else 1)."""
        return self.pressure.scale

    # ------------------------------------------------------------------ every step
    def remember_batch(self, batch: Any) -> None:
        """Keep a reference to a training batch for the next dead check and recalibration."""
        self.recent_batches.append(batch)

    def forget_last_batch(self) -> None:
        """Drop the batch kept last (its training step was skipped: it must not enter a check or a recalibration)."""
        if self.recent_batches:
            self.recent_batches.pop()

    def forget_batches(self) -> None:
        """Drop the kept batches (at an epoch start: each check sees its own epoch's batches)."""
        self.recent_batches.clear()

    def regularize_(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, step: int, collectives: Collectives = SINGLE_PROCESS
    ) -> None:
        """Before the step: λ_t·∇R into the gradients (`Pressure.before_step_`; ``collectives`` on the first)."""
        self.pressure.before_step_(optimizer, model, step, collectives.any_process)

    def add_noise_(self) -> None:
        """After the step: σ_t noise on the live entries (`Pressure.after_step_`)."""
        self.pressure.after_step_()

    def schedule_active(self, step: int) -> bool:
        """Whether λ_t/σ_t are still inside their span at ``step``."""
        return self.pressure.active(step)

    def is_settled(self, step: int) -> bool:
        """The schedule is over and a check since its end (units may die after one made during it) removed nothing."""
        done = not self.pressure.active(step) and self.ledger.last_check_step >= self.pressure.span_steps
        return done and self.ledger.last_removed_count == 0

    # ------------------------------------------------------------------ observing
    @contextmanager
    def observe(self) -> Iterator[None]:
        """Record activity of the forwards run inside the block (fresh statistics)."""
        assert self.monitor is not None, "call `prepare` first"
        self.monitor.reset()
        with self.monitor.observe():
            yield

    def start_observing(self) -> None:
        """Start recording the training forwards that follow (``check_mode="train_forwards"``; idempotent)."""
        assert self.monitor is not None, "call `prepare` first"
        if not self.monitor.is_observing:
            self.monitor.reset()
            self.monitor.attach()

    def stop_observing(self) -> Statistics | None:
        """Stop recording; the statistics of the recorded forwards, or ``None`` when some reader saw nothing."""
        if self.monitor is None or not self.monitor.is_observing:
            return None
        self.monitor.detach()
        stats = self.monitor.compute()
        return stats if all(reader.num_samples > 0 for reader in stats.values()) else None

    def pause_observing(self, paused: bool) -> None:
        """While paused, attached hooks record nothing (validation forwards never enter a decision)."""
        if self.monitor is not None:
            self.monitor.paused = paused

    def statistics(self, model: nn.Module) -> Statistics | None:
        """The paper's dead check: an eval-mode, gradient-free pass over the kept batches (``None`` without any)."""
        assert self.monitor is not None, "call `prepare` first"
        if not self.recent_batches:
            return None
        return dead_check(model, self.monitor, list(self.recent_batches), self.forward)

    # ------------------------------------------------------------------ deciding and applying
    def decide(self, model: nn.Module, stats: Statistics) -> RemovalPlan:
        """The dead units and heads in ``stats`` (`lightning_demp.policy.decide_removal`), before any target limit."""
        assert self.graph is not None, "call `prepare` first"
        decision = decide_removal(
            model,
            self.graph.groups(),
            stats,
            threshold=self.config.dead_threshold,
            min_units=self.config.min_units,
            removable=self.ledger.kept_units.keys(),
            extra_units=self.saturation.extra_units if self.saturation is not None else None,
        )
        for message in decision.warnings:
            self.warn(f"`DemonPruning`: {message}")
        return decision.plan

    def removal_event(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        stats: Statistics | None = None,
        *,
        step: int,
        epoch: int,
        final: bool = False,
        collectives: Collectives = SINGLE_PROCESS,
    ) -> RemovalEvent | None:
        """A whole removal event: check (unless ``stats`` are given), decide, broadcast, fold, remove, steer.

        Returns:
            The event record when something was removed, else ``None``.
        """
        self.ledger.note_check(step)
        if self.graph is None or self.monitor is None:
            return None
        stats = stats if stats is not None else self.statistics(model)
        if stats is None:
            return None
        table = self.size_table()
        plan = collectives.broadcast_plan(self.decider(model, stats))
        if self.target is not None:  # identical on every rank: same model, same plan
            plan = self.target.limit(plan, self.ledger, table)
        plan = round_plan(plan, self.ledger.widths(), self.config.round_to)  # widths stay multiples of round_to
        self.ledger.last_removed_count = plan.num_units + plan.num_heads
        if plan.units and self.saturation is not None:
            self.saturation.fold_(self.graph.groups(), stats, plan.units, self.graph.norm_after, optimizers)
        event = self.apply(model, plan, optimizers, step=step, epoch=epoch, collectives=collectives) if plan else None
        fresh = stats if event is None else None  # None once a removal renumbered the units: check again
        if self.target is not None and self.pressure.span_steps >= 1:
            progress = step / self.pressure.span_steps
            if progress >= SHORTFALL_START:
                fresh = fresh if fresh is not None else self.statistics(model)
                if (lag := close_lag(self, model, optimizers, fresh, progress, step, epoch, collectives)) is not None:
                    event, fresh = lag, None
            if final and self.target.force:
                fresh = fresh if fresh is not None else self.statistics(model)
                if (forced := force_target(self, model, optimizers, fresh, step, epoch, collectives)) is not None:
                    event, fresh = forced, None
        if self.target is not None and self.pressure.span_steps:
            measured = self.target.measured(self.ledger, self.size_table())
            self.pressure.scale = self.target.update_strength(step / self.pressure.span_steps, measured)
            if self.config.target_focus and step >= RAMP_START * self.pressure.span_steps:
                fresh = fresh if fresh is not None else self.statistics(model)
                self.pressure.focus_on(focus_units(self, model, fresh))
        return event

    def apply(
        self,
        model: nn.Module,
        plan: RemovalPlan,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        step: int,
        epoch: int,
        reason: str = "dead",
        collectives: Collectives = SINGLE_PROCESS,
    ) -> RemovalEvent:
        """Surgery, optimizer remap, rewrap and bookkeeping for one plan (identical on every process)."""
        assert self.graph is not None, "call `prepare` first"
        self.ledger.start_removal()
        shapes = tensor_shapes(model)
        try:
            with all_or_nothing(model, optimizers):  # a failure half-way leaves no half-pruned network behind
                remaps = remove_units_(self.graph, plan.units)
                orders, order_remaps = order_routed_channels_(self.graph)  # selections become single slice adds
                head_remaps = remove_heads_(model, plan.heads)
                for optimizer in optimizers:
                    remap_optimizer_(optimizer, remaps + order_remaps + head_remaps)
        finally:
            self.graph.forget_groups()  # shapes changed, or were put back
        collectives.after_surgery()
        forget_compiled_graphs(model)  # graphs guarded on the old shapes go, instead of piling up recompiles
        self.ledger.record_removal(plan, orders)
        merge_dims(self.ledger.changed_dims, changed_dims(shapes, tensor_shapes(model)))
        note_changed_dims(model, self.ledger.changed_dims)  # what a load from before this removal may grow back
        self.monitor = self._new_monitor()
        if self.saturation is not None:
            self.saturation.bind(model)
        self.refresh_pressure()
        count = partial(count_flops_per_sample, model, first_samples(self.example_input, 1))
        self.ledger.current_flops = count() if self.flop_tally is None else self.flop_tally.checked(model, count)
        self.recalibrate(model, collectives)
        event = self.ledger.log_event(plan, step=step, epoch=epoch, reason=reason, params=count_parameters(model))
        if self.info is not None:
            self.info(f"DemonPruning: {event.describe(plan.num_units, plan.num_heads, self.ledger)}")
        return event

    def recalibrate(self, model: nn.Module, collectives: Collectives = SINGLE_PROCESS) -> bool:
        """Re-estimate BatchNorm running statistics on the most recent kept batches (when enabled)."""
        if not self.config.recalibrate_bn or not self.recent_batches:
            return False
        batches = list(self.recent_batches)[-self.config.recalibration_batches :]
        used = recalibrate_batchnorm_(model, batches, self.forward)
        collectives.average_batchnorm(model)  # on every rank alike, even one that kept its old statistics
        if not used:
            if recalibrated_norms(model):
                self.warn(
                    "`DemonPruning`: BatchNorm recalibration gave non-finite running statistics (a batch with a NaN "
                    "or an inf?); the previous statistics were kept."
                )
            return False
        self.recalibrations += 1
        return True

    def refresh_pressure(self) -> None:
        """Bind the pressure to the groups' parameters (new after a removal) and those it cannot kill through."""
        if self.graph is None:
            return
        parameters, initial = group_parameters(self.graph), self.ledger.initial_widths
        groups = {name: (found, initial[name]) for name, found in parameters.items() if name in initial}
        prunable = {id(p) for found in parameters.values() for p in found.params}
        scope = prunable if self.config.penalize == "prunable" else None
        self.pressure.bind(groups, scope, self.graph.output_layers)

    def size_table(self) -> SizeTable | None:
        """Widths of the model as it is, for the target's sparsity after a plan (``None`` without a size target)."""
        if self.target is None or self.target.metric == "units" or self.graph is None:
            return None
        return SizeTable.of(self.graph, first_samples(self.example_input, 1))

    def _new_monitor(self) -> ActivationMonitor:
        assert self.graph is not None
        readers = {**self.graph.readers(), **head_readers(self.graph.model)}
        return ActivationMonitor(readers, track_range=self.saturation is not None)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain values: the ledger, the strength scale, the schedule record and where the pull can kill."""
        pressure: dict[str, Any] = {"schedule": self.pressure.record(), "focus": self.pressure.focus}
        pressure["signed_inputs"] = self.pressure.signed_inputs
        return {"version": STATE_VERSION, **self.ledger.state_dict(), "strength_scale": self.strength_scale, **pressure}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict` (also one written by an earlier release)."""
        self.pressure.loaded_record = state.get("schedule")
        self.pressure.signed_inputs = state.get("signed_inputs")  # an earlier release's: read on the next batch
        self.refresh_pressure()  # when the model is already traced
        self.ledger.load_state_dict(state)
        if self.target is not None:
            self.target.load_state_dict(state)
            self.pressure.scale = self.target.scale
            self.pressure.focus_on(state.get("focus") if self.config.target_focus else None)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but this process's runtime parts (graph, hooks, kept batches), which `prepare` rebuilds."""
        state = self.__dict__.copy()
        state.update(graph=None, monitor=None, example_input=None, untraced_watch=None, flop_tally=None)
        if state["decider"] == self.decide:
            state["decider"] = None  # a bound method of this object: rebound on unpickling
        state["recent_batches"] = deque(maxlen=self.config.batches_kept)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.decider is None:
            self.decider = self.decide

    def _block_untraced(self, widths: dict[str, int]) -> None:
        assert self.graph is not None
        for message in block_untraced_readers(self.graph, widths):
            self.warn(f"`DemonPruning`: {message}")
        self.refresh_pressure()  # the live floor and ``penalize="prunable"`` leave the blocked groups alone

    def detach(self) -> None:
        """Remove the monitor's hooks and drop a pending noise draw (after an exception)."""
        if self.untraced_watch is not None:
            self.untraced_watch.remove()
        if self.monitor is not None:
            self.monitor.detach()
        self.pressure.drop_pending()

    def release(self) -> None:
        """Detach hooks and forget the traced graph (at teardown)."""
        self.detach()
        self.graph, self.monitor, self.flop_tally = None, None, None
        self.recent_batches.clear()

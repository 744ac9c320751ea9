"""The pressure that makes units die: λ_t·∇R before each optimizer step, σ_t noise on live entries after it.

`Pressure` is the stateful part (the schedules laid over a run, the live masks between the two halves of a step);
the math is in `lightning_demp.regularization` and `lightning_demp.schedules`.

**The live floor.** A unit dies when the regularizer's pull on it wins against the loss gradient that holds it.
At every step, for each prunable layer, the resistance of each unit is the norm of its loss gradient over the norm
of its penalty gradient (`lightning_demp.regularization.resistance`, on the rows the regularizer pulls: BatchNorm
scales for ``"l1_norm_scale"``, the producer's weight rows otherwise). The pull on the layer, and the noise on its
parameters, are capped at its ``k``-th largest resistance, ``k = ceil(live_floor · initial units)``
(`lightning_demp.regularization.floor_share`): the loss outweighs the pull on at least ``k`` units, so the layer
cannot be driven to death wholesale, whatever ``λ``. Under a large ``λ`` the pull otherwise wins on every unit of a
layer at once, and the layer, then the network, collapses (``benchmarks/results/collapse.md``). Dead units still
go, and where the loss holds enough units the pull is the paper's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_demp.collectives import SINGLE_PROCESS
from lightning_demp.config import PruningConfig
from lightning_demp.noise import inject_noise_, live_masks
from lightning_demp.regularization import (
    ONE_SIDED,
    GroupParameters,
    add_penalty_grad_,
    broadcast_rows,
    floor_shares,
    penalized_params,
    resistances,
    unkillable_params,
)
from lightning_demp.schedules import Schedule, make_schedule
from lightning_demp.signs import InputSigns

# before the step, for the noise after it: (step, σ, live entries of each parameter, each one's share of σ)
_PendingNoise = tuple[int, float, list[tuple[nn.Parameter, Tensor]], list[float]]
_SETTINGS = ("name", "reg_max", "noise_std", "span_steps", "total_steps")


class Pressure:
    """λ_t and σ_t over a run, applied around each optimizer step.

    Args:
        config: The settings: regularizer, ``reg_max``, ``noise_std``, schedule and span, seed, ``penalize``.

    Examples:
        >>> layer = nn.Linear(2, 2)
        >>> optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
        >>> pressure = Pressure(PruningConfig(regularizer="l2", reg_max=0.5, schedule="constant"))
        >>> pressure.lay_out(total_steps=10)  # a fresh run: nothing changed since a checkpoint
        []
        >>> layer(torch.ones(1, 2)).sum().backward()
        >>> before = layer.weight.grad.clone()
        >>> pressure.before_step_(optimizer, layer, step=0)
        >>> torch.allclose(layer.weight.grad, before + 0.5 * layer.weight), pressure.last_reg_strength
        (True, 0.5)
    """

    def __init__(self, config: PruningConfig) -> None:
        self.config = config
        self.reg_schedule: Schedule | None = None
        self.noise_schedule: Schedule | None = None
        self.total_steps: int | None = None
        self.loaded_record: dict[str, Any] | None = None  # a checkpoint's schedule record, until one is laid out
        self.history: list[dict[str, Any]] = []  # earlier schedules of a run resumed with other settings
        self._ended: dict[str, Any] | None = None  # the schedule a resume replaced, until its first step
        self.scale = 1.0  # multiplies λ_t and σ_t (steered by a sparsity target)
        self.penalized_ids: set[int] | None = None  # with ``penalize="prunable"``: ids of the parameters to penalize
        self.unpulled_ids: set[int] = set()  # parameters the regularizer cannot kill a unit through: never pulled
        self._unpulled_stale = True
        self._output_layers: list[str] = []
        self.signed_inputs: list[str] | None = None  # layers whose inputs go negative (`lightning_demp.signs`)
        self.sign_watch: InputSigns | None = None  # reading them on the first training forward
        self.groups: dict[str, tuple[GroupParameters, int]] = {}  # group -> (its parameters, initial units)
        self.focus: dict[str, list[int]] | None = None  # with a focused target: the units pulled, by group
        self._focus_rows: dict[int, Tensor] | None = None  # from ``focus``: 0/1 weights on each group row, by id
        self.last_reg_strength = 0.0
        self.last_noise_std = 0.0
        self._pending_noise: _PendingNoise | None = None
        # by the optimizer's parameters: the parameters to penalize, and the dimension their units run along
        self._penalized: tuple[tuple[int, ...], list[nn.Parameter], list[int]] | None = None
        self._exempt_rows: dict[int, Tensor] = {}  # with ``penalize="prunable"``: 0 on the fixed units, by id
        self._loose: tuple[list[nn.Parameter], list[nn.Parameter]] | None = None  # penalized -> its `_loose_scales`

    def bind(
        self,
        groups: dict[str, tuple[GroupParameters, int]],
        penalized_ids: set[int] | None,
        output_layers: Sequence[str] = (),
    ) -> None:
        """The groups' parameters (new ones after every removal); with ``penalize="prunable"``, the ids of the
        parameters to penalize; the layers whose units reach the model output (never removed)."""
        self.groups, self.penalized_ids, self._output_layers = groups, penalized_ids, list(output_layers)
        self._unpulled_stale = True
        self._focus_rows = None
        self._penalized = None
        self._loose = None
        self._exempt_rows = {}
        for parameters, _ in groups.values() if penalized_ids is not None else ():
            for param in parameters.params if parameters.fixed_units else ():  # units that stay: not pulled
                fixed = torch.tensor(parameters.fixed_units, dtype=torch.long)
                self._exempt_rows[id(param)] = _unit_weights(param, parameters.unit_dim_of(param), fixed, on=0.0)

    def focus_on(self, units: Mapping[str, Sequence[int]] | None) -> None:
        """Pull only these units (by group; a group left out is not pulled), or every unit (``None``)."""
        self.focus = None if units is None else {name: sorted(int(i) for i in idxs) for name, idxs in units.items()}
        self._focus_rows = None
        self._unpulled_stale = True

    def focus_is_empty(self) -> bool:
        """Whether a focus is set and holds no unit (before a target's ramp starts, once it is reached)."""
        return self.focus is not None and not any(self.focus.values())

    def focus_rows(self) -> dict[int, Tensor] | None:
        """With a focus, the weight of the pull on each row (unit) of each group parameter, by parameter id."""
        if self.focus is None:
            return None
        if self._focus_rows is None:
            rows: dict[int, Tensor] = {}
            for name, (parameters, _) in self.groups.items():
                chosen = torch.tensor(self.focus.get(name, []), dtype=torch.long)
                for param in parameters.params:
                    rows[id(param)] = _unit_weights(param, parameters.unit_dim_of(param), chosen, on=1.0)
            self._focus_rows = rows
        return self._focus_rows

    def lay_out(self, total_steps: int, resumed_at: int = 0) -> list[str]:
        """Lay λ_t and σ_t over ``schedule_span`` of ``total_steps`` optimizer steps.

        On a resume (a checkpoint's schedule was loaded) with other settings, the loaded schedule is kept in the
        record's ``history`` up to the first step the resumed run takes (``resumed_at`` until then), so that plots
        draw what each part of the run trained with; returns what changed (empty when nothing did).
        """
        self.total_steps = total_steps
        span_steps = max(1, round(self.config.schedule_span * total_steps))
        self.reg_schedule = make_schedule(self.config.schedule, self.config.reg_max, span_steps)
        self.noise_schedule = make_schedule(self.config.schedule, self.config.noise_std, span_steps)
        loaded, self.loaded_record = self.loaded_record, None
        if loaded is None:
            return []
        self.history = [dict(segment) for segment in loaded.get("history", [])]
        now = self.record()
        assert now is not None
        changed = [f"{key} {loaded.get(key)!r} → {now[key]!r}" for key in _SETTINGS if loaded.get(key) != now[key]]
        if changed:  # it ends where the resumed run takes its first step (known once it does)
            self._ended = {**{key: loaded.get(key) for key in _SETTINGS}, "until_step": resumed_at}
        return changed

    @property
    def span_steps(self) -> int:
        """Steps the schedules span (0 before they are laid out)."""
        return self.reg_schedule.span_steps if self.reg_schedule is not None else 0

    def active(self, step: int) -> bool:
        """Whether λ_t/σ_t are still inside their span at ``step``."""
        return self.reg_schedule is not None and step < self.reg_schedule.span_steps

    def watch_signs(self, model: nn.Module) -> None:
        """(Re)start reading, on the forwards that follow, where the one-sided L2 can kill (`lightning_demp.signs`);
        nothing to read for another regularizer or without a pull, or once they are known (a checkpoint keeps them)."""
        if self.sign_watch is not None:
            self.sign_watch.remove()
        needless = self.config.regularizer not in ONE_SIDED or self.config.reg_max == 0
        self.sign_watch = None if needless or self.signed_inputs is not None else InputSigns(model)

    def _settle_signs(self, watch: InputSigns, any_process: Callable[[Tensor], Tensor]) -> None:
        watch.remove()
        negative = any_process(torch.tensor(watch.negative, dtype=torch.bool)).tolist()  # the same on every rank
        self.signed_inputs = [name for name, flag in zip(watch.names, negative, strict=True) if flag]
        self.sign_watch, self._unpulled_stale = None, True

    def before_step_(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        step: int,
        any_process: Callable[[Tensor], Tensor] = SINGLE_PROCESS.any_process,
    ) -> None:
        """Add λ_t·∇R to the gradients; note the live entries (non-zero gradient) for the noise after the step.

        ``any_process`` unites the input signs over processes on the first step (`lightning_demp.signs`).
        """
        assert self.reg_schedule is not None, "lay the schedule out first (`lay_out`, or `DemonPruner.prepare`)"
        assert self.noise_schedule is not None
        if self.sign_watch is not None and self.sign_watch.seen:
            self._settle_signs(self.sign_watch, any_process)
        if self._unpulled_stale:  # a focus pulls the units it chose to remove, so that they fade before they go
            layers = [*(self.signed_inputs or []), *self._output_layers]  # no signs before a forward: pulled
            unpulled = unkillable_params(model, layers, self.config.regularizer)
            self.unpulled_ids = set() if self.focus is not None else unpulled
            self._penalized, self._unpulled_stale = None, False
        if self._ended is not None:
            self.history.append({**self._ended, "until_step": step})
            self._ended = None
        self.last_reg_strength = self.reg_schedule.value(step) * self.scale
        self.last_noise_std = self.noise_schedule.value(step) * self.scale
        rows = self.focus_rows()
        if (self.last_reg_strength == 0 and self.last_noise_std == 0) or self.focus_is_empty():
            self._pending_noise = None  # nothing to pull or shake this step (a focus with no unit yet)
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        penalized, dims = self._penalized_of(params, optimizer, model) if self.last_reg_strength > 0 else ([], [])
        factors = self.floor_factors(self._loose_scales(penalized) if rows is None else ())
        if rows is not None:
            params = [p for p in params if id(p) in rows]
            dims = [d for p, d in zip(penalized, dims, strict=True) if id(p) in rows]
            penalized = [p for p in penalized if id(p) in rows]
        if self.last_noise_std > 0:
            masks = live_masks(params)
            if rows is not None:
                masks = [(p, _on_rows(mask, rows[id(p)])) for p, mask in masks]
            self._pending_noise = (step, self.last_noise_std, masks, [factors.get(id(p), 1.0) for p, _ in masks])
        else:
            self._pending_noise = None
        strengths = [self.last_reg_strength * factors.get(id(p), 1.0) for p in penalized]
        weights: list[Tensor | None] | None = None if rows is None else [rows[id(p)] for p in penalized]
        if rows is None and self._exempt_rows:
            weights = [self._exempt_rows.get(id(p)) for p in penalized]
        add_penalty_grad_(penalized, self.config.regularizer, strengths, weights, dims)

    def _penalized_of(
        self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> tuple[list[nn.Parameter], list[int]]:
        """The parameters to penalize and the dimension of each one's units (1 for a transposed convolution's
        weight), found once per set of optimizer parameters (a removal renews them)."""
        key = tuple(map(id, params))
        if self._penalized is None or self._penalized[0] != key:
            penalized = penalized_params(optimizer, model, self.config.regularizer)
            if self.penalized_ids is not None:
                penalized = [p for p in penalized if id(p) in self.penalized_ids]
            penalized = [p for p in penalized if id(p) not in self.unpulled_ids]
            transposed = {
                id(m.weight)
                for m in model.modules()
                if isinstance(m, nn.modules.conv._ConvTransposeNd) and m.groups == 1
            }  # a depthwise one has its channels on dim 0
            self._penalized = (key, penalized, [1 if id(p) in transposed else 0 for p in penalized])
        return self._penalized[1], self._penalized[2]

    def _loose_scales(self, penalized: list[nn.Parameter]) -> list[nn.Parameter]:
        """The pulled norm scales of no group (``"l1_norm_scale"``): the norms of a coupled residual stream other than
        the one its group is read off (a block's last BatchNorm, say). The floor holds each channel by channel, as a
        layer of its own: the pull would otherwise silence a whole branch, and the layers before it would lose the
        loss gradient that the floor and the rounds of death read."""
        if self.config.regularizer != "l1_norm_scale":
            return []
        if self._loose is None or self._loose[0] is not penalized:  # found once per set of penalized parameters
            grouped = {id(p) for parameters, _ in self.groups.values() for p in parameters.params}
            self._loose = (penalized, [p for p in penalized if p.dim() == 1 and id(p) not in grouped])
        return [p for p in self._loose[1] if p.grad is not None]

    def floor_factors(self, loose: Sequence[nn.Parameter] = ()) -> dict[int, float]:
        """For the parameters of each group the live floor holds back, the share of the pressure left (by id); each
        of the ``loose`` parameters (`_loose_scales`) is held as a group of its own."""
        factors: dict[int, float] = {}
        strength = self.last_reg_strength
        death = 1.0 if self.focus is not None else self.config.max_death_fraction  # a focus picks who dies
        if (self.config.live_floor <= 0 and death >= 1) or strength <= 0:
            return factors
        held = [
            (parameters, initial, pulled)
            for parameters, initial in self.groups.values()
            if (pulled := parameters.pulled(self.config.regularizer)) is not None
            and pulled.grad is not None
            and id(pulled) not in self.unpulled_ids
        ]
        held += [(GroupParameters([scale], scale, scale), scale.numel(), scale) for scale in loose]
        dims = [parameters.unit_dim_of(pulled) for parameters, _, pulled in held]
        resisted = resistances([pulled for _, _, pulled in held], self.config.regularizer, dims)
        for (parameters, _, pulled), resisting in zip(held, resisted, strict=True):
            if id(pulled) in self._exempt_rows:  # units that stay, unpulled: they count as held
                resisting[list(parameters.fixed_units)] = torch.inf
        shares = floor_shares(
            resisted,
            strength,
            self.config.live_floor,
            [initial for _, initial, _ in held],
            death,
        )
        for (parameters, _, _), share in zip(held, shares, strict=True):
            if share < 1.0:
                factors.update((id(p), share) for p in parameters.params)
        return factors

    def after_step_(self) -> None:
        """σ_t noise on the entries noted before the step (reproducible from the seed and the step)."""
        if self._pending_noise is None:
            return
        step, std, masks, scales = self._pending_noise
        self._pending_noise = None
        inject_noise_(masks, std, self.config.seed, step, scales)

    def drop_pending(self) -> None:
        """Forget the noted live entries and any sign watch (after an exception; the next batch watches anew)."""
        self._pending_noise = None
        if self.sign_watch is not None:
            self.sign_watch.remove()
            self.sign_watch = None

    def __getstate__(self) -> dict[str, Any]:
        """Everything but a sign watch (hooks on this process's model)."""
        return {**self.__dict__, "sign_watch": None}

    def record(self) -> dict[str, Any] | None:
        """The schedule as plain values (for plots of a saved run); the loaded one until a schedule is laid out."""
        if self.reg_schedule is None:
            return self.loaded_record
        return {
            "name": self.config.schedule,
            "reg_max": self.config.reg_max,
            "noise_std": self.config.noise_std,
            "span_steps": self.reg_schedule.span_steps,
            "total_steps": self.total_steps,
            "history": [dict(segment) for segment in self.history],
        }


def _unit_weights(param: nn.Parameter, unit_dim: int, units: Tensor, on: float) -> Tensor:
    """Per unit of ``param`` along ``unit_dim``: ``on`` at ``units``, ``1 - on`` elsewhere, shaped to multiply it."""
    weights = torch.full((param.shape[unit_dim],), 1.0 - on, dtype=param.dtype, device=param.device)
    weights[units.to(param.device)] = on
    return weights.reshape([-1 if d == unit_dim else 1 for d in range(param.dim())])


def _on_rows(mask: Tensor, weights: Tensor) -> Tensor:
    """A live mask kept on the units that ``weights`` select, as the factor to multiply the noise with."""
    return mask.to(weights.dtype) * broadcast_rows(weights, mask)

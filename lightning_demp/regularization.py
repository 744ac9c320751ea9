"""The DemP regularizers as gradients, and the live floor that caps their pull.

A callback cannot edit the user's loss, but adding ``∇(λ_t·R(θ))`` to ``.grad`` before the optimizer step is the
same update as adding ``λ_t·R(θ)`` to the loss (``paper.md`` §1.4). The three regularizers:

* ``"l2"``: ``R = ½‖θ‖²`` (coupled L2, what ``weight_decay`` does in Adam/SGD), gradient ``θ``;
* ``"positive_l2"``: ``R = ½Σ max(θ, 0)²`` (the paper's first variant), gradient ``max(θ, 0)``;
* ``"l1_norm_scale"``: ``R = Σ|γ|`` over BatchNorm/LayerNorm/GroupNorm scales (the later variant), gradient ``sign(γ)``;
* ``"positive_group_l1"``: ``R = Σ_u ‖max(θ_u, 0)‖₂`` over the rows ``θ_u`` of each weight (one row per output
  unit; each bias entry is its own row), gradient ``max(θ_u, 0) / ‖max(θ_u, 0)‖₂``. The same one-sided push toward
  a dead ReLU as ``"positive_l2"``, but the pull on a unit has the same size whatever its weights' size: a unit the
  loss needs (large weights, large loss gradient) is pulled no harder than one it does not, so the pressure
  selects units to kill instead of shrinking all of them (the reason L1 gives sparse solutions and L2 does not).
  The norm-free counterpart of ``"l1_norm_scale"``: use it on models without normalization layers.

The noise on live entries (``paper.md`` §1.5) is `lightning_demp.noise`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_demp.graph import PrunableGraph

RegularizerName = Literal["l2", "positive_l2", "l1_norm_scale", "positive_group_l1"]
REGULARIZER_NAMES: tuple[str, ...] = ("l2", "positive_l2", "l1_norm_scale", "positive_group_l1")
ONE_SIDED: tuple[str, ...] = ("positive_l2", "positive_group_l1")  # they kill by pushing weights to zero or below
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def norm_scales(module: nn.Module) -> list[nn.Parameter]:
    """Return the scale (``weight``) of every affine BatchNorm, LayerNorm and GroupNorm layer.

    Examples:
        >>> len(norm_scales(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.LayerNorm(3))))
        2
    """
    return [m.weight for m in module.modules() if isinstance(m, _NORM_TYPES) and isinstance(m.weight, nn.Parameter)]


def penalized_params(
    optimizer: torch.optim.Optimizer, module: nn.Module, regularizer: RegularizerName
) -> list[nn.Parameter]:
    """Parameters of ``optimizer`` that ``regularizer`` acts on.

    For ``"l1_norm_scale"``, the norm scales. For the L2 variants, every trainable parameter, except those in a
    parameter group the user set to ``weight_decay=0`` on purpose (while the optimizer's default or another group
    decays): a common way to keep biases and norms free of decay, which we respect.

    Examples:
        >>> layer = nn.Linear(2, 3)
        >>> optimizer = torch.optim.AdamW([{"params": [layer.weight]}, {"params": [layer.bias], "weight_decay": 0.0}])
        >>> [p.shape for p in penalized_params(optimizer, layer, "l2")]
        [torch.Size([3, 2])]
    """
    if regularizer == "l1_norm_scale":
        scales = {id(p) for p in norm_scales(module)}
        return [p for group in optimizer.param_groups for p in group["params"] if id(p) in scales and p.requires_grad]
    decays = [float(group.get("weight_decay", 0.0)) for group in optimizer.param_groups]
    decays.append(float(optimizer.defaults.get("weight_decay", 0.0)))
    user_decays = any(value > 0 for value in decays)
    return [
        p
        for group in optimizer.param_groups
        if not (user_decays and float(group.get("weight_decay", 0.0)) == 0.0)
        for p in group["params"]
        if p.requires_grad
    ]


def penalty_grads(
    params: Sequence[Tensor], regularizer: RegularizerName, unit_dims: Sequence[int] | None = None
) -> list[Tensor]:
    """Return ``∇R(θ)`` for each parameter (strength 1); ``unit_dims`` says along which dimension each parameter's
    units run (0 unless given: 1 for a transposed convolution's weight), for the group penalty.

    Examples:
        >>> penalty_grads([torch.tensor([-1.0, 0.5])], "positive_l2")
        [tensor([0.0000, 0.5000])]
        >>> penalty_grads([torch.tensor([[3.0, 4.0], [-1.0, 0.2]])], "positive_group_l1")
        [tensor([[0.6000, 0.8000],
                [0.0000, 1.0000]])]
    """
    with torch.no_grad():
        if regularizer == "l2":
            return [p.detach() for p in params]
        if regularizer == "positive_l2":
            return [p.detach().clamp(min=0) for p in params]
        if regularizer == "l1_norm_scale":
            return list(torch._foreach_sign([p.detach() for p in params]))
        if regularizer == "positive_group_l1":
            dims = unit_dims if unit_dims is not None else [0] * len(params)
            return [_positive_row_directions(p.detach(), dim) for p, dim in zip(params, dims, strict=True)]
    raise ValueError(f"Expected `regularizer` to be one of {REGULARIZER_NAMES}, got {regularizer!r}.")


def _positive_row_directions(value: Tensor, unit_dim: int = 0) -> Tensor:
    """``max(θ_u, 0) / ‖max(θ_u, 0)‖₂`` for each unit's slice ``θ_u`` (along ``unit_dim``) of ``value``; entries of
    a 1-d tensor are units."""
    positive = value.clamp(min=0)
    if positive.dim() <= 1:
        return positive.gt(0).to(value.dtype)
    rows = positive.movedim(unit_dim, 0)
    norms = rows.reshape(rows.shape[0], -1).norm(dim=1).clamp(min=1e-30)
    return (rows / norms.reshape(-1, *([1] * (rows.dim() - 1)))).movedim(0, unit_dim)


def add_penalty_grad_(
    params: Sequence[nn.Parameter],
    regularizer: RegularizerName,
    strength: float | Sequence[float],
    row_weights: Sequence[Tensor | None] | None = None,
    unit_dims: Sequence[int] | None = None,
) -> None:
    """Add ``strength·∇R(θ)`` to each ``.grad`` in place (creating it when the step left it ``None``); ``strength``
    is one number or one per parameter; with ``row_weights``, each parameter's units scaled by its weights (along
    dim 0 for a 1-d weight, else broadcast as shaped; ``None``: every unit at 1); ``unit_dims`` as for
    `penalty_grads`.

    Examples:
        >>> weight = nn.Parameter(torch.tensor([2.0, -2.0]))
        >>> weight.grad = torch.zeros(2)
        >>> add_penalty_grad_([weight], "l2", strength=0.5)
        >>> weight.grad
        tensor([ 1., -1.])
        >>> add_penalty_grad_([weight], "l2", strength=[0.5], row_weights=[torch.tensor([0.0, 1.0])])
        >>> weight.grad
        tensor([ 1., -2.])
    """
    strengths = [float(strength)] * len(params) if isinstance(strength, (int, float)) else list(strength)
    kept = [i for i, value in enumerate(strengths) if value != 0.0]
    if not kept:
        return
    params, strengths = [params[i] for i in kept], [strengths[i] for i in kept]
    if row_weights is not None:
        row_weights = [row_weights[i] for i in kept]
    with torch.no_grad():
        grads = penalty_grads(params, regularizer, None if unit_dims is None else [unit_dims[i] for i in kept])
        if row_weights is not None:
            grads = [g if w is None else g * broadcast_rows(w, g) for g, w in zip(grads, row_weights, strict=True)]
        scaled = torch._foreach_mul(grads, strengths)  # out of place: an ``"l2"`` gradient is the parameter itself
        existing = [(p.grad, g.to(p.grad.dtype)) for p, g in zip(params, scaled, strict=True) if p.grad is not None]
        if existing:  # one fused add over every parameter that has a gradient
            torch._foreach_add_([grad for grad, _ in existing], [g for _, g in existing])
        for param, grad in zip(params, scaled, strict=True):
            if param.grad is None:
                param.grad = grad.to(param.dtype)


def broadcast_rows(weights: Tensor, like: Tensor) -> Tensor:
    """Per-unit ``weights`` shaped to multiply ``like``: a 1-d one along dim 0, one already shaped as it is.

    Examples:
        >>> broadcast_rows(torch.tensor([1.0, 0.0]), torch.ones(2, 3)).shape
        torch.Size([2, 1])
    """
    return weights if weights.dim() == like.dim() else weights.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class GroupParameters:
    """The parameters a group's units live in: its producer's (weight first) and its BatchNorm's.

    Examples:
        >>> layer, norm = nn.Linear(2, 3), nn.BatchNorm1d(3)
        >>> group = GroupParameters([layer.weight, layer.bias, norm.weight, norm.bias], layer.weight, norm.weight)
        >>> group.pulled("l1_norm_scale") is norm.weight, group.pulled("l2") is layer.weight
        (True, True)
    """

    params: list[nn.Parameter]
    producer_weight: nn.Parameter
    norm_weight: nn.Parameter | None
    unit_dim: int = 0  # of the producer's weight: 1 for a transposed convolution
    fixed_units: tuple[int, ...] = ()  # the group's units that stay (`UnitGroup.fixed_units`)

    def unit_dim_of(self, param: nn.Parameter) -> int:
        """The dimension ``param`` holds the units along (the producer's weight's `unit_dim`, else 0)."""
        return self.unit_dim if param is self.producer_weight else 0

    def pulled(self, regularizer: RegularizerName) -> nn.Parameter | None:
        """The parameter whose rows the regularizer pulls toward death: the norm scales for ``"l1_norm_scale"``,
        the producer's weight for the L2 variants."""
        return self.norm_weight if regularizer == "l1_norm_scale" else self.producer_weight


def group_parameters(graph: PrunableGraph) -> dict[str, GroupParameters]:
    """The parameters of each unblocked group's producer and its BatchNorm, by group.

    ``penalize="prunable"`` penalizes only these, and the live floor caps their pull (`floor_share`). Recompute
    after every removal (the surgery replaces parameters).

    Examples:
        >>> from lightning_demp.graph import PrunableGraph
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [p.shape for p in group_parameters(PrunableGraph(model, torch.randn(2, 2)))["0"].params]
        [torch.Size([3, 2]), torch.Size([3])]
    """
    modules = dict(graph.model.named_modules())
    found: dict[str, GroupParameters] = {}
    for group in graph.groups():
        producer, norm = modules[group.name], graph.norm_after(group.name)
        weight = getattr(producer, "weight", None)
        if group.blocked is not None or not isinstance(weight, nn.Parameter):
            continue
        norm_weight = getattr(norm, "weight", None) if norm is not None else None
        params = [p for layer in (producer, norm) if layer is not None for p in layer.parameters(recurse=False)]
        scales = norm_weight if isinstance(norm_weight, nn.Parameter) else None
        transposed = isinstance(producer, nn.modules.conv._ConvTransposeNd) and producer.groups == 1
        found[group.name] = GroupParameters(params, weight, scales, 1 if transposed else 0, group.fixed_units)
    return found


def unkillable_params(model: nn.Module, layers: Sequence[str], regularizer: RegularizerName) -> set[int]:
    """Ids of the parameters of ``layers`` (by name) when ``regularizer`` is one-sided (`ONE_SIDED`): there its
    pull would kill no unit that can go, so it is skipped (`lightning_demp.pressure.Pressure`).

    The layers are those whose inputs go negative (`lightning_demp.signs`: weights at most zero do not silence
    their units) and those whose units reach the model output (never removed; the logits feed no ReLU).

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> unkillable_params(model, ["0"], "positive_l2") == {id(model[0].weight), id(model[0].bias)}
        True
        >>> unkillable_params(model, ["0"], "l2")  # the coupled L2 makes a unit constant, whatever its inputs
        set()
    """
    if regularizer not in ONE_SIDED:
        return set()
    modules = dict(model.named_modules())
    return {id(p) for name in layers if name in modules for p in modules[name].parameters(recurse=False)}


def resistance(pulled: nn.Parameter, regularizer: RegularizerName, unit_dim: int = 0) -> Tensor:
    """Per unit (slice of ``pulled`` along ``unit_dim``): the loss gradient's norm over the penalty gradient's
    (strength 1).

    A unit is pulled toward death while ``λ`` exceeds its resistance; 0 for a unit the loss no longer reaches (a
    dead one), infinite for a unit the regularizer does not pull.

    Examples:
        >>> scales = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        >>> scales.grad = torch.tensor([0.3, 0.0, -2.0])
        >>> resistance(scales, "l1_norm_scale")
        tensor([0.3000, 0.0000, 2.0000])
    """
    assert pulled.grad is not None
    grad, value = pulled.grad.detach(), pulled.detach()
    if grad.dim() == 1:  # norm scales (or a bias): one entry per unit, no norms to take
        loss = grad.abs().float()
        pull = value.ne(0).float() if regularizer == "l1_norm_scale" else penalty_grads([value], regularizer)[0].abs()
    else:
        rows = pulled.shape[unit_dim]
        loss = grad.movedim(unit_dim, 0).reshape(rows, -1).float().norm(dim=1)
        pulls = penalty_grads([value], regularizer, [unit_dim])[0]
        pull = pulls.movedim(unit_dim, 0).reshape(rows, -1).float().norm(dim=1)
    return _loss_over_pull(loss, pull)


def _loss_over_pull(loss: Tensor, pull: Tensor) -> Tensor:
    """``loss / pull`` per unit; infinite where only the loss acts, 0 where neither does."""
    return torch.where(pull > 0, loss / pull.clamp(min=1e-30), torch.where(loss > 0, math.inf, 0.0))


def resistances(
    pulled: Sequence[nn.Parameter], regularizer: RegularizerName, unit_dims: Sequence[int] | None = None
) -> list[Tensor]:
    """`resistance` of each parameter in ``pulled`` (its units along ``unit_dims``, 0 unless given), the
    one-entry-per-unit ones (norm scales) in one batch.

    Examples:
        >>> a, b = nn.Parameter(torch.tensor([1.0, -2.0])), nn.Parameter(torch.tensor([0.5]))
        >>> a.grad, b.grad = torch.tensor([0.3, 0.0]), torch.tensor([-2.0])
        >>> [r.tolist() for r in resistances([a, b], "l1_norm_scale")]
        [[0.30000001192092896, 0.0], [2.0]]
    """
    flat = [i for i, p in enumerate(pulled) if p.dim() == 1 and regularizer == "l1_norm_scale"]
    found: list[Tensor | None] = [None] * len(pulled)
    if len(flat) > 1:
        loss = torch.cat([pulled[i].grad.detach().float() for i in flat]).abs_()  # type: ignore[union-attr]
        # the pull is 1 on a non-zero scale, 0 on a zero one: loss / 0 is infinite, 0 / 0 (neither acts) is 0
        batched = loss.div_(torch.cat([pulled[i].detach() for i in flat]).ne(0)).nan_to_num_(0.0, math.inf)
        for i, part in zip(flat, batched.split([pulled[i].numel() for i in flat]), strict=True):
            found[i] = part
    dims = unit_dims if unit_dims is not None else [0] * len(pulled)
    return [
        r if r is not None else resistance(p, regularizer, dim) for r, p, dim in zip(found, pulled, dims, strict=True)
    ]


def floor_share(resistances: Tensor, strength: float, floor: float, initial_units: int) -> float:
    """The share of the pull ``strength`` a group may get: at most what its ``floor``-th strongest units resist.

    With ``k = ceil(floor · initial_units)``, the pull on the group is capped at the ``k``-th largest resistance, so
    the loss still outweighs the regularizer on at least ``k`` units and the layer cannot be driven to death
    wholesale; a group already below ``k`` units gets no pull. ``floor=0`` keeps the full pull.

    Examples:
        >>> floor_share(torch.tensor([0.5, 0.25, 0.0, 0.0]), strength=1.0, floor=0.5, initial_units=4)
        0.25
        >>> floor_share(torch.tensor([3.0, 2.0, 0.0, 0.0]), strength=1.0, floor=0.5, initial_units=4)
        1.0
    """
    return floor_shares([resistances], strength, floor, [initial_units])[0]


def floor_shares(
    resistances: Sequence[Tensor],
    strength: float,
    floor: float,
    initial_units: Sequence[int],
    max_death_fraction: float = 1.0,
) -> list[float]:
    """`floor_share` of several groups at once: one sort over all of them, the ``k``-th largest of each read off.

    With ``max_death_fraction`` below 1, ``k`` is also at least ``ceil((1 − max_death_fraction) · n)`` for a group
    of ``n`` units: the pull outweighs the loss on at most that fraction of them, so between two removal events a
    layer loses at most that fraction of its units, and those that stay are picked in rounds, training between
    them, instead of all at once.

    Examples:
        >>> floor_shares([torch.tensor([0.5, 0.25, 0.0, 0.0]), torch.tensor([3.0, 2.0])], 1.0, 0.5, [4, 4])
        [0.25, 1.0]
    """
    needed = [math.ceil(floor * initial) for initial in initial_units]
    if (floor <= 0 and max_death_fraction >= 1) or strength <= 0 or not resistances:
        return [1.0] * len(resistances)
    lengths = tuple(r.numel() for r in resistances)
    held = tuple(max(k, math.ceil((1.0 - max_death_fraction) * n - 1e-9)) for k, n in zip(needed, lengths, strict=True))
    slots, kth_index = _padding(lengths, held, resistances[0].device)
    padded = torch.full((len(lengths), max(1, *lengths)), -math.inf, device=resistances[0].device)
    padded.view(-1)[slots] = torch.cat([r.reshape(-1).float() for r in resistances])  # each group's row
    kth = padded.sort(dim=1, descending=True).values.gather(1, kth_index).reshape(-1).tolist()
    return [
        1.0 if hold <= 0 else 0.0 if units < k else min(1.0, value / strength)
        for k, hold, units, value in zip(needed, held, lengths, kth, strict=True)
    ]


@functools.lru_cache(maxsize=32)
def _padding(lengths: tuple[int, ...], needed: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Where each group's entries go in a ``groups × longest`` matrix (flat), and the column of each one's
    ``k``-th largest once its row is sorted; the same for every step until a removal changes the widths."""
    width = max(1, *lengths)
    slots = torch.cat([torch.arange(n) + row * width for row, n in enumerate(lengths)])
    columns = torch.tensor([max(0, min(k, n) - 1) for k, n in zip(needed, lengths, strict=True)])
    return slots.to(device), columns.reshape(-1, 1).to(device)

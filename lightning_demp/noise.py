"""Live-only noise (``paper.md`` §1.5): after the step, ``σ_t·N(0, 1)`` on each parameter entry whose loss
gradient was non-zero, not scaled by the learning rate, from a generator seeded by ``(seed, step)`` so that every
process draws the same values.

The noise runs on every optimizer step, so its cost is laid out for the step: the live masks of all parameters
in two fused (``torch._foreach_*``) passes, one draw per device and dtype for all of their entries (split into
views, not one draw per parameter), and one fused multiply-add (``torch._foreach_addcmul_``). On a CPU the draw
itself is most of what is left (``benchmarks/results/step_pieces.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


def live_masks(params: Iterable[nn.Parameter]) -> list[tuple[nn.Parameter, Tensor]]:
    """Pair each parameter that has a gradient with the mask of its entries whose gradient is non-zero: 1 there,
    0 elsewhere, in the gradient's dtype (a factor to multiply the noise with).

    Examples:
        >>> weight, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
        >>> weight.grad = torch.tensor([0.0, -2.0, 0.0])  # ``unused`` got no gradient at all
        >>> [(param is weight, mask.tolist()) for param, mask in live_masks([weight, unused])]
        [(True, [0.0, 1.0, 0.0])]
    """
    with_grads = [p for p in params if p.grad is not None]
    if not with_grads:
        return []
    with torch.no_grad():
        masks = torch._foreach_sign([p.grad for p in with_grads])  # type: ignore[misc]  # ±1 where non-zero
        torch._foreach_abs_(masks)
    return list(zip(with_grads, masks, strict=True))


def noise_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, step)``: the same draws on every process.

    Examples:
        >>> a = torch.randn(2, generator=noise_generator(0, 5, torch.device("cpu")))
        >>> b = torch.randn(2, generator=noise_generator(0, 5, torch.device("cpu")))
        >>> torch.equal(a, b)
        True
    """
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return generator


def inject_noise_(
    masked_params: Sequence[tuple[nn.Parameter, Tensor]],
    std: float,
    seed: int,
    step: int,
    scales: Sequence[float] | None = None,
) -> None:
    """Add ``std·N(0, 1)`` to the masked entries of each parameter, in place, reproducibly from ``(seed, step)``;
    with ``scales``, each parameter's noise multiplied by its scale (a mask may be boolean or hold factors).

    The parameters of one device and dtype share one draw, in their order here: the same ``(seed, step)`` and the
    same parameters give the same noise.

    Examples:
        >>> weight = nn.Parameter(torch.zeros(4))
        >>> inject_noise_([(weight, torch.tensor([True, False, True, False]))], std=1.0, seed=0, step=0)
        >>> (weight[1].item(), weight[3].item()), bool(weight[0] != 0)
        ((0.0, 0.0), True)
    """
    if std == 0.0 or not masked_params:
        return
    kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, (param, _) in enumerate(masked_params):
        kinds.setdefault((param.device, param.dtype), []).append(index)
    with torch.no_grad():
        for (device, dtype), indices in kinds.items():
            params: list[Tensor] = [masked_params[i][0] for i in indices]
            sizes = [p.numel() for p in params]
            draws = torch.randn(sum(sizes), generator=noise_generator(seed, step, device), device=device, dtype=dtype)
            noise = [part.view_as(p) for part, p in zip(draws.split(sizes), params, strict=True)]
            masks = [_as_factor(masked_params[i][1], dtype) for i in indices]
            factors = [std if scales is None else std * scales[i] for i in indices]
            torch._foreach_addcmul_(params, noise, masks, factors)


def _as_factor(mask: Tensor, dtype: torch.dtype) -> Tensor:
    return mask if mask.dtype == dtype else mask.to(dtype)

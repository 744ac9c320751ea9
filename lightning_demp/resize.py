"""Resize on load: shrink a freshly built, full-size model to the widths of a state dict saved after removals."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


def layer_width(module: nn.Module) -> int | None:
    """Output width of a Linear or Conv layer (``None`` for any other module).

    Examples:
        >>> layer_width(nn.Linear(4, 8)), layer_width(nn.Conv1d(2, 5, 3)), layer_width(nn.ReLU())
        (8, 5, None)
    """
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    return None


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every Linear/Conv layer, by name.

    Examples:
        >>> layer_widths(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        {'0': 8, '2': 2}
    """
    return {name: int(width) for name, module in model.named_modules() if (width := layer_width(module)) is not None}


def resize_like_(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Shrink the layers of ``model`` to the shapes found in ``state_dict``, so that it can be loaded.

    Which entries survive does not matter: every one is overwritten by the load that follows. Only Linear, Conv,
    BatchNorm and LayerNorm layers are resized; other mismatches are left for ``load_state_dict`` to report.

    Args:
        model: A freshly built, full-size model.
        state_dict: A state dict saved from a pruned copy of it.
        prefix: Prefix of ``model``'s keys in ``state_dict``.

    Returns:
        The names of the resized modules.

    Examples:
        >>> pruned = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> resize_like_(fresh, pruned.state_dict())
        ['0', '2']
        >>> fresh.load_state_dict(pruned.state_dict())
        <All keys matched successfully>
    """
    resized = []
    for name, module in model.named_modules():
        key = f"{prefix}{name}." if name else prefix
        changed = False
        for param_name, param in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            saved = state_dict.get(key + param_name)
            if not isinstance(saved, Tensor) or saved.shape == param.shape or saved.dim() != param.dim():
                continue
            slices = tuple(slice(0, size) for size in saved.shape)
            new_value = param.detach()[slices].clone()
            if isinstance(param, nn.Parameter):
                setattr(module, param_name, nn.Parameter(new_value, requires_grad=param.requires_grad))
            else:
                module.register_buffer(
                    param_name, new_value, persistent=param_name not in module._non_persistent_buffers_set
                )
            changed = True
        if not changed:
            continue
        _sync_size_attributes(module)
        resized.append(name)
    return resized


_RESIZE_FLAG = "_demp_resize_on_load"


def _resize_on_load_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: shrink to the incoming shapes before the values are copied."""
    resize_like_(module, state_dict, prefix)


def enable_resize_on_load(module: nn.Module) -> torch.utils.hooks.RemovableHandle | None:
    """Let ``module.load_state_dict`` accept a state dict saved after units were removed (idempotent).

    Call it in your LightningModule's ``__init__`` to make ``LightningModule.load_from_checkpoint`` work on pruned
    checkpoints, and to run under ``strategy="ddp_spawn"`` (whose main process reloads the trained weights into the
    original, full-size module). `DemonPruning` calls it in ``setup`` otherwise.

    Returns:
        The hook's handle when it was registered now, ``None`` when it already was.

    Examples:
        >>> pruned = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = enable_resize_on_load(fresh)
        >>> fresh.load_state_dict(pruned.state_dict())
        <All keys matched successfully>
        >>> fresh[0].out_features, enable_resize_on_load(fresh) is None
        (3, True)
    """
    if getattr(module, _RESIZE_FLAG, False):
        return None
    handle = module.register_load_state_dict_pre_hook(_resize_on_load_hook)
    object.__setattr__(module, _RESIZE_FLAG, True)
    return handle


def disable_resize_on_load(module: nn.Module, handle: torch.utils.hooks.RemovableHandle) -> None:
    """Remove a hook registered by `enable_resize_on_load`.

    Examples:
        >>> fresh = nn.Linear(4, 8)  # a pruned state dict (4 → 3) no longer fits it afterwards
        >>> handle = enable_resize_on_load(fresh)
        >>> disable_resize_on_load(fresh, handle)
        >>> resize_on_load_enabled(fresh)
        False
        >>> fresh.load_state_dict(nn.Linear(4, 3).state_dict())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: Error(s) in loading state_dict for Linear:...
    """
    handle.remove()
    object.__setattr__(module, _RESIZE_FLAG, False)


def resize_on_load_enabled(module: nn.Module) -> bool:
    """Whether `enable_resize_on_load` was called on ``module`` (also on a pickled copy of it).

    Examples:
        >>> import pickle
        >>> model = nn.Linear(4, 2)
        >>> resize_on_load_enabled(model)
        False
        >>> _ = enable_resize_on_load(model)
        >>> resize_on_load_enabled(model), resize_on_load_enabled(pickle.loads(pickle.dumps(model)))
        (True, True)
    """
    return bool(getattr(module, _RESIZE_FLAG, False))


def _sync_size_attributes(module: nn.Module) -> None:
    """Update ``in_features``/``out_channels``/``num_features``/... from the module's (resized) weights."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        out_dim, in_dim = (1, 0) if module.transposed else (0, 1)
        module.out_channels = module.weight.shape[out_dim]
        module.in_channels = module.weight.shape[in_dim] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        tensor = module.weight if module.weight is not None else module.running_mean
        if tensor is not None:
            module.num_features = tensor.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)

"""Resize on load: give a model the widths of the state dict it loads, saved before or after removals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_demp.selection import ChannelSelect


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


def input_width(module: nn.Module) -> int | None:
    """Input width of a Linear or Conv layer (``None`` for any other module).

    Examples:
        >>> input_width(nn.Linear(6, 2)), input_width(nn.Conv1d(4, 8, 3)), input_width(nn.ReLU())
        (6, 4, None)
    """
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels
    return None


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every Linear/Conv layer, by name.

    Examples:
        >>> layer_widths(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        {'0': 8, '2': 2}
    """
    return {name: int(width) for name, module in model.named_modules() if (width := layer_width(module)) is not None}


_CHANGED = "_demp_changed_dims"  # on a model: {state-dict key: dims} its removals changed (the ledger's record)
_INCOMING = "_demp_incoming_changed_dims"  # on a model, during a Lightning load: the checkpoint's record


def tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter and buffer, by state-dict key.

    Examples:
        >>> tensor_shapes(nn.Linear(2, 3))
        {'weight': (3, 2), 'bias': (3,)}
    """
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: tuple(tensor.shape) for name, tensor in named}


def changed_dims(before: Mapping[str, tuple[int, ...]], after: Mapping[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """The dimensions whose size differs between two `tensor_shapes` of one model, by key.

    Examples:
        >>> changed_dims({"0.weight": (8, 4), "2.weight": (2, 8)}, {"0.weight": (6, 4), "2.weight": (2, 6)})
        {'0.weight': [0], '2.weight': [1]}
    """
    found = {}
    for key, shape in after.items():
        old = before.get(key)
        if old is not None and len(old) == len(shape) and old != shape:
            found[key] = [dim for dim, (a, b) in enumerate(zip(old, shape, strict=True)) if a != b]
    return found


def merge_dims(record: dict[str, list[int]], more: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """``record`` with ``more`` added to it, in place; returned.

    Examples:
        >>> merge_dims({"a": [0]}, {"a": [1], "b": [0]})
        {'a': [0, 1], 'b': [0]}
    """
    for key, dims in more.items():
        record[key] = sorted({*record.get(key, []), *(int(d) for d in dims)})
    return record


def note_changed_dims(model: nn.Module, record: Mapping[str, Sequence[int]]) -> None:
    """Keep on ``model`` which widths its removals changed, so that loading a checkpoint from before one may grow
    exactly those back (and nothing else).

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))  # pruned from 8 units
        >>> note_changed_dims(model, {"0.weight": [0], "0.bias": [0], "2.weight": [1]})
        >>> wider = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict()
        >>> resize_like_(model, wider), model[0].out_features
        (['0', '2'], 8)
    """
    object.__setattr__(model, _CHANGED, merge_dims(dict(getattr(model, _CHANGED, {})), record))


def resize_like_(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    prefix: str = "",
    allowed: Mapping[str, Sequence[int]] | None = None,
) -> list[str]:
    """Resize the layers of ``model`` to the shapes found in ``state_dict``, so that it can be loaded.

    A fresh, full-size model shrinks to a pruned checkpoint's widths; a pruned model grows back to a checkpoint
    written before a removal (a best-``k`` save from early in the run). Which values the resized tensors hold does
    not matter: every one is overwritten by the load that follows. Only Linear, Conv, BatchNorm and LayerNorm
    layers are resized; other mismatches are left for ``load_state_dict`` to report.

    Args:
        model: The model to load into.
        state_dict: A state dict saved from a copy of it with other widths.
        prefix: Prefix of ``model``'s keys in ``state_dict``.

        allowed: The dimensions DemP changed, by key (``changed_dims`` in a DemP checkpoint's callback state,
            joined with the model's own record). A mismatch anywhere else is a checkpoint of another architecture:
            a ``ValueError`` naming the tensor. ``None`` with no record on the model: any Linear/Conv/norm width.

    Returns:
        The names of the resized modules.

    Raises:
        ValueError: A width DemP never changes differs (with ``allowed``, or a record on the model).

    Examples:
        >>> pruned = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> resize_like_(fresh, pruned.state_dict())
        ['0', '2']
        >>> fresh.load_state_dict(pruned.state_dict())
        <All keys matched successfully>
        >>> resize_like_(fresh, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict())  # back
        ['0', '2']
        >>> fresh[0].out_features
        8
    """
    record = merge_dims(dict(getattr(model, _CHANGED, {})), allowed or {})
    checked = allowed is not None or bool(record)
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
            local = f"{name}.{param_name}" if name else param_name
            differing = [dim for dim in range(saved.dim()) if saved.shape[dim] != param.shape[dim]]
            if checked and not set(differing) <= set(record.get(local, [])):
                raise ValueError(
                    f"The checkpoint's `{prefix}{local}` has shape {tuple(saved.shape)}, the model's "
                    f"{tuple(param.shape)}: DemP never changed dimension {differing} of it, so the checkpoint "
                    "belongs to another architecture (another `num_classes`, input size or width?). Build the "
                    "model with the arguments of the run that wrote it."
                )
            new_value = param.detach().new_zeros(saved.shape)  # wider (a checkpoint from before a removal) or not
            overlap = tuple(slice(0, min(a, b)) for a, b in zip(saved.shape, param.shape, strict=True))
            new_value[overlap] = param.detach()[overlap]
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
    """``load_state_dict`` pre-hook: take the incoming shapes before the values are copied."""
    incoming = module.__dict__.pop(_INCOMING, None)
    resize_like_(module, state_dict, prefix, allowed=incoming)


def record_of_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, list[int]] | None:
    """The ``changed_dims`` a DemP callback saved in a Lightning checkpoint (``None`` without one).

    Examples:
        >>> record_of_checkpoint({"callbacks": {"DemonPruning": {"kept_units": {}, "changed_dims": {"0.weight": [0]}}}})
        {'0.weight': [0]}
        >>> record_of_checkpoint({"state_dict": {}}) is None
        True
    """
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, Mapping) and "kept_units" in state and "changed_dims" in state:
            return {key: list(dims) for key, dims in state["changed_dims"].items()}
    return None


class _StashRecord:
    """A LightningModule's ``on_load_checkpoint`` (Lightning calls it before the weights load) that first hands the
    checkpoint's record to the resize hook, then runs the class's own hook."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, checkpoint: dict[str, Any]) -> Any:
        record = record_of_checkpoint(checkpoint)
        if record is not None:
            self.module.__dict__[_INCOMING] = record
        return type(self.module).on_load_checkpoint(self.module, checkpoint)  # type: ignore[attr-defined]


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
    if callable(getattr(type(module), "on_load_checkpoint", None)):  # a LightningModule
        module.__dict__["on_load_checkpoint"] = _StashRecord(module)
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
    if isinstance(module.__dict__.get("on_load_checkpoint"), _StashRecord):
        del module.__dict__["on_load_checkpoint"]


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


def reorderable_tensors(module: nn.Module, is_out: bool) -> list[tuple[str, int]] | None:
    """``(attribute, dimension)`` of every tensor that follows a reordering of ``module``'s output (``is_out``) or
    input units, or ``None`` when the module's units cannot be reordered in place.

    Examples:
        >>> reorderable_tensors(nn.Linear(2, 3), is_out=True), reorderable_tensors(nn.Linear(2, 3), is_out=False)
        ([('weight', 0), ('bias', 0)], [('weight', 1)])
    """
    if isinstance(module, ChannelSelect):
        return []
    if isinstance(module, nn.Linear):
        return [("weight", 0), ("bias", 0)] if is_out else [("weight", 1)]
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1 or module.transposed:
            return None
        return [("weight", 0), ("bias", 0)] if is_out else [("weight", 1)]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]
    if isinstance(module, nn.PReLU):
        return [("weight", 0)] if module.num_parameters > 1 else []
    if not any(True for _ in module.parameters(recurse=False)) and not any(True for _ in module.buffers(False)):
        return []  # holds no per-unit tensor (activation, pooling, ...)
    return None

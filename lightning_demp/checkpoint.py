"""Loading pruned checkpoints without a Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_demp.decouple import decouple_residuals_
from lightning_demp.resize import record_of_checkpoint, resize_like_
from lightning_demp.selection import ChannelSelect


def load_pruned_checkpoint(
    model: nn.Module, checkpoint_path: str | Path, map_location: Any = "cpu", example_input: Any = None
) -> nn.Module:
    """Load a checkpoint written during a DemP run into a freshly built, full-size ``model``; returns ``model``.

    The model is shrunk to the checkpoint's widths, then the weights are copied. Only the widths the run's
    removals changed may differ (the checkpoint's record says which): any other mismatch, such as another
    ``num_classes``, is a ``ValueError`` naming the tensor. The file is read with
    ``torch.load(..., weights_only=True)``: nothing in a DemP checkpoint needs pickle. Accepts a Lightning
    checkpoint (``{"state_dict": ...}``) or a plain state dict. A checkpoint of a ``decouple_residuals=True`` run
    holds `ChannelSelect` shortcuts: ``model`` is first rewritten the same way, traced on ``example_input`` (or on
    its ``example_input_array``).

    Examples:
        >>> import tempfile, os
        >>> pruned = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> path = os.path.join(tempfile.mkdtemp(), "pruned.ckpt")
        >>> torch.save({"state_dict": pruned.state_dict()}, path)
        >>> model = load_pruned_checkpoint(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), path)
        >>> model[0].out_features
        3
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint)
    if any(key.endswith(".in_ids") for key in state_dict) and not _has_selections(model):
        example = example_input if example_input is not None else getattr(model, "example_input_array", None)
        if example is None:
            raise ValueError(
                "The checkpoint comes from a run with `decouple_residuals=True` (it holds `ChannelSelect` shortcuts), "
                f"and `{type(model).__name__}` must be rewritten the same way before it loads: pass "
                "`example_input=` (an input of its `forward`), or set `example_input_array` on it."
            )
        decouple_residuals_(model, example)
    resize_like_(model, state_dict, allowed=record_of_checkpoint(checkpoint))
    model.load_state_dict(state_dict)
    return model


def _has_selections(model: nn.Module) -> bool:
    return any(isinstance(module, ChannelSelect) for module in model.modules())

"""Loading pruned checkpoints without a Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_demp.resize import record_of_checkpoint, resize_like_


def load_pruned_checkpoint(model: nn.Module, checkpoint_path: str | Path, map_location: Any = "cpu") -> nn.Module:
    """Load a checkpoint written during a DemP run into a freshly built, full-size ``model``; returns ``model``.

    The model is shrunk to the checkpoint's widths, then the weights are copied. Only the widths the run's
    removals changed may differ (the checkpoint's record says which): any other mismatch, such as another
    ``num_classes``, is a ``ValueError`` naming the tensor. The file is read with
    ``torch.load(..., weights_only=True)``: nothing in a DemP checkpoint needs pickle. Accepts a Lightning
    checkpoint (``{"state_dict": ...}``) or a plain state dict.

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
    resize_like_(model, state_dict, allowed=record_of_checkpoint(checkpoint))
    model.load_state_dict(state_dict)
    return model

"""`quiet_trainer`: a Trainer for scripts, tests and benchmarks that prints nothing and writes only where asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer


def quiet_trainer(root_dir: str | Path, **kwargs: Any) -> Trainer:
    """A Trainer on one CPU process without logger, checkpoints, progress bar or model summary, rooted at
    ``root_dir``; ``kwargs`` override any of these and add the rest.

    Examples:
        >>> import tempfile
        >>> trainer = quiet_trainer(tempfile.mkdtemp(), max_epochs=2)
        >>> trainer.max_epochs, trainer.logger is None, trainer.checkpoint_callback is None
        (2, True, True)
    """
    options: dict[str, Any] = {
        "default_root_dir": root_dir,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    options.update(kwargs)
    return Trainer(**options)

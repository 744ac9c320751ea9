"""Fit the planted MLP with DemonPruning under `strategy="ddp"` (2 CPU processes); rank 0 writes a JSON report.

Run by tests/test_ddp.py as a subprocess: Lightning re-launches this script for rank 1.
Usage: python tests/scripts/ddp_fit.py OUTPUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from lightning.pytorch import Trainer, seed_everything

from helpers.lightning import AssertRanksAgree, RandomDataModule, model_checksum, planted_mlp
from lightning_demp import DemonPruning


def main() -> None:
    seed_everything(0)
    model = planted_mlp()
    callback = DemonPruning(regularizer="positive_l2", reg_max=0.05, noise_std=1e-3, verbose=False)
    agree = AssertRanksAgree()
    trainer = Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=3,
        callbacks=[callback, agree],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=RandomDataModule())
    widths = torch.tensor([model.net[0].out_features, model.net[2].out_features], dtype=torch.float64)
    gathered = trainer.strategy.all_gather(
        torch.cat([widths, torch.tensor([model_checksum(model)], dtype=torch.float64)])
    )
    if trainer.is_global_zero:
        Path(sys.argv[1]).write_text(
            json.dumps(
                {
                    "per_rank": gathered.tolist(),
                    "checked_epochs": agree.checked_epochs,
                    "kept_units": callback.kept_units,
                    "events": len(callback.events),
                }
            )
        )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""Write the small checkpoints in ``tests/data`` that ``test_legacy_checkpoints.py`` loads.

They were written with lightning-demp 0.1.0 before the core/callback redesign (`git log tests/data`), so that
the tests prove checkpoints of earlier releases still resume and load. Rerunning this script with a newer
version writes checkpoints of that version instead; do that only on purpose.

    .venv/bin/python tests/scripts/make_legacy_checkpoints.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.lightning import RandomDataModule, planted_mlp, planted_residual_cnn
from lightning_demp import DemonPruning
from lightning_demp.demos import ArrayDataModule

DATA = Path(__file__).resolve().parents[1] / "data"


class SignalDataModule(ArrayDataModule):
    def load_arrays(self):  # type: ignore[no-untyped-def]
        import numpy as np

        rng = np.random.default_rng(0)
        x = rng.standard_normal((128, 16)).astype(np.float32)
        y = (x[:, :4].sum(axis=1) > 0).astype(np.int64) + 2 * (x[:, 4] > 0)
        return x[:96], y[:96], x[96:], y[96:]


def write(name: str, model, datamodule, **callback_args) -> None:  # type: ignore[no-untyped-def]
    seed_everything(0)
    directory = DATA / name
    checkpoint = ModelCheckpoint(dirpath=directory, filename="last", save_top_k=0, save_last=False)
    callback = DemonPruning(verbose=False, plot=False, **callback_args)
    trainer = Trainer(
        max_epochs=2,
        callbacks=[callback, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
    )
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(DATA / f"{name}.ckpt")
    model.eval()
    with torch.no_grad():  # what the loaded network must compute
        inputs = torch.randn(4, *model.example_input_array.shape[1:], generator=torch.Generator().manual_seed(1))
        torch.save({"inputs": inputs, "outputs": model(inputs)}, DATA / f"{name}_outputs.pt")
    print(name, callback.state_dict()["kept_units"])


if __name__ == "__main__":
    DATA.mkdir(exist_ok=True)
    torch.use_deterministic_algorithms(True)
    write("legacy_mlp", planted_mlp(), RandomDataModule(), regularizer="positive_l2", reg_max=0.05, noise_std=1e-3)
    write(
        "legacy_residual_cnn",
        planted_residual_cnn(),
        SignalDataModule(batch_size=32),
        regularizer="l1_norm_scale",
        reg_max=0.01,
        noise_std=0.0,
    )

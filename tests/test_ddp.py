"""DDP on CPU (gloo, 2 processes): identical plans, parameters, optimizer state and widths on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from helpers.lightning import (
    AssertRanksAgree,
    RandomDataModule,
    assert_saved_only_when_settled,
    planted_mlp,
    planted_residual_cnn,
    planted_transformer,
    quiet_trainer,
)
from helpers.models import kill_linear_units_
from lightning_demp import DemonPruning, SettledEarlyStopping, SettledModelCheckpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")
SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


def fit_in_two_spawned_processes(tmp_path, model, callback, max_epochs, datamodule=None) -> None:
    """Fit under ``ddp_spawn`` (2 CPU processes) with ``AssertRanksAgree`` after ``callback`` at every epoch end."""
    trainer = two_process_trainer(tmp_path, [callback, AssertRanksAgree()], max_epochs, enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule or RandomDataModule())  # an assertion failing in a worker fails here


def two_process_trainer(tmp_path, callbacks, max_epochs: int, **options) -> Trainer:
    """A quiet ``ddp_spawn`` Trainer on 2 CPU processes."""
    return Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **options,
    )


def test_ddp_spawn_settled_callbacks_decide_alike_on_every_rank_and_save_only_after_the_schedule(tmp_path):
    callback = DemonPruning(
        regularizer="positive_l2", reg_max=1e-3, schedule_span=0.5, prune_every_n_epochs=1, verbose=False, plot=False
    )
    best = SettledModelCheckpoint(dirpath=tmp_path / "best", monitor="val_acc", mode="max", save_top_k=-1)
    stop = SettledEarlyStopping(monitor="val_acc", mode="max", patience=10)
    trainer = two_process_trainer(tmp_path, [callback, best, stop, AssertRanksAgree()], max_epochs=4)
    trainer.fit(planted_mlp(), datamodule=RandomDataModule())  # a rank deciding alone would hang the collectives
    assert_saved_only_when_settled(tmp_path / "best")


def test_ddp_spawn_keeps_ranks_identical_after_every_removal_and_returns_the_pruned_model(tmp_path):
    model = planted_mlp()
    callback = DemonPruning(regularizer="positive_l2", reg_max=0.05, noise_std=1e-3, verbose=False)
    fit_in_two_spawned_processes(tmp_path, model, callback, max_epochs=2)
    assert model.net[0].out_features <= 10  # the main process holds the pruned weights
    assert model.net[2].in_features == model.net[0].out_features
    assert torch.isfinite(model(torch.randn(3, 6))).all()


@pytest.mark.parametrize(
    ("build", "num_features"), [(planted_transformer, 40), (planted_residual_cnn, 16)], ids=["heads", "reordering"]
)
def test_ddp_spawn_keeps_ranks_identical_when_heads_go_and_channels_are_reordered(tmp_path, build, num_features):
    model = build()
    callback = DemonPruning(regularizer="l2", reg_max=0.0, noise_std=0.0, verbose=False, plot=False)
    data = RandomDataModule(num_features=num_features, num_classes=4)
    fit_in_two_spawned_processes(tmp_path, model, callback, max_epochs=1, datamodule=data)
    if build is planted_transformer:  # the main process holds the pruned weights, heads included
        assert model.blocks[0].attn.heads == 1 and model.blocks[0].attn.qkv.out_features == 3 * 8
    else:
        assert model.net.block1.shortcut.segments == ((0, 0, 7),)


def test_ddp_spawn_keeps_ranks_identical_when_a_target_limits_the_removal(tmp_path):
    model = planted_mlp()
    kill_linear_units_(model.net[0], [3, 5])
    kill_linear_units_(model.net[2], [6])
    callback = DemonPruning(
        regularizer="positive_l2",
        reg_max=0.05,
        noise_std=1e-3,
        target_sparsity=0.1,
        target_metric="units",
        verbose=False,
        plot=False,
    )
    fit_in_two_spawned_processes(tmp_path, model, callback, max_epochs=2)
    # 6 units of 22 planted dead: a 10 % target (2.2 units) is reached by the third removed unit, and nothing goes after
    assert 22 - (model.net[0].out_features + model.net[2].out_features) == 3


def test_ddp_spawn_keeps_ranks_identical_when_live_units_close_a_target_shortfall(tmp_path):
    model = planted_mlp()
    callback = DemonPruning(
        regularizer="positive_l2", reg_max=0.0, noise_std=0.0, target_sparsity=0.4, verbose=False, plot=False
    )
    fit_in_two_spawned_processes(tmp_path, model, callback, max_epochs=4)
    # 3 units planted dead, nothing else dies (reg_max=0): the rest of the 40 % comes from the shortfall removal,
    # decided on rank 0's reduced statistics and checked equal on both ranks after every epoch (AssertRanksAgree)
    assert 22 - (model.net[0].out_features + model.net[2].out_features) > 3


def test_ddp_spawn_refuses_a_module_that_cannot_take_pruned_shapes_before_training(tmp_path):
    model = planted_mlp()
    object.__setattr__(model, "_demp_resize_on_load", False)
    model._load_state_dict_pre_hooks.clear()
    callbacks = [DemonPruning(regularizer="positive_l2", verbose=False)]
    trainer = two_process_trainer(tmp_path, callbacks, max_epochs=1, enable_checkpointing=False)
    with pytest.raises(Exception, match="Call `lightning_demp.enable_resize_on_load"):  # raised in the workers
        trainer.fit(model, datamodule=RandomDataModule())


def test_ddp_subprocess_launcher_keeps_ranks_identical(tmp_path):
    output = tmp_path / "report.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(output)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert output.exists(), result.stderr[-3000:]
    assert "self.log('demp/" not in result.stderr  # identical values logged with a max reduce: Lightning is quiet
    report = json.loads(output.read_text())
    rank0, rank1 = report["per_rank"]
    assert rank0 == rank1
    assert report["checked_epochs"] == [0, 1, 2]
    assert {1, 8}.isdisjoint(report["kept_units"]["net.0"])
    assert report["events"] >= 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_ddp_on_gpus_keeps_ranks_identical(tmp_path):
    model = planted_mlp()
    trainer = quiet_trainer(
        tmp_path,
        strategy="ddp_spawn",
        accelerator="gpu",
        devices=2,
        max_epochs=2,
        callbacks=[
            DemonPruning(regularizer="positive_l2", reg_max=0.05, noise_std=1e-3, verbose=False),
            AssertRanksAgree(),
        ],
    )
    trainer.fit(model, datamodule=RandomDataModule())
    assert model.net[0].out_features <= 10


class NonNegativeOnRankZero(torch.utils.data.Dataset):
    """Gaussian samples, made non-negative on rank 0: each rank's first batch tells another story of the signs."""

    def __init__(self, size: int = 96) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(size, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rank_zero = torch.distributed.is_initialized() and torch.distributed.get_rank() == 0
        return (self.x[index].abs() if rank_zero else self.x[index]), self.y[index]


def test_ddp_spawn_pulls_the_same_layers_on_every_rank_when_only_one_rank_sees_negative_inputs(tmp_path):
    # Rank 0's first batch alone would say the first layer reads non-negative inputs, rank 1's that it does not:
    # the signs are united before the first step, or the ranks would pull different parameters and drift apart.
    callback = DemonPruning(regularizer="positive_l2", reg_max=0.5, noise_std=0.0, verbose=False, plot=False)
    trainer = two_process_trainer(tmp_path, [callback, AssertRanksAgree()], max_epochs=2, enable_checkpointing=False)
    data = torch.utils.data.DataLoader(NonNegativeOnRankZero(), batch_size=16)
    trainer.fit(planted_mlp(), train_dataloaders=data)  # an assertion failing in a worker fails here

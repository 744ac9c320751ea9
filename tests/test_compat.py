"""DemonPruning combined with the Trainer features people use: each one trains and prunes."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from helpers.lightning import RandomDataModule, planted_mlp, quiet_trainer, train_with_callback
from lightning_demp import DemonPruning
from lightning_demp._strategy import check_supported
from lightning_demp.demos import MLPClassifier

FAST = {"regularizer": "positive_l2", "reg_max": 0.05, "noise_std": 1e-3}


def assert_pruned(model, callback):
    assert {1, 8}.isdisjoint(callback.kept_units["net.0"])
    assert model.net[0].out_features == len(callback.kept_units["net.0"])
    optimizer_params = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in model.parameters()}


@pytest.mark.parametrize(
    "trainer_kwargs",
    [
        {"precision": "bf16-mixed"},
        {"accumulate_grad_batches": 3},
        {"gradient_clip_val": 0.5},
        {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"},
    ],
    ids=["bf16-mixed", "grad-accumulation", "clip-norm", "clip-value"],
)
def test_trainer_features(tmp_path, trainer_kwargs):
    _, model, callback = train_with_callback(
        tmp_path, model=planted_mlp(), max_epochs=2, trainer_kwargs=trainer_kwargs, **FAST
    )
    assert_pruned(model, callback)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a GPU")
def test_fp16_mixed_on_gpu(tmp_path):
    _, model, callback = train_with_callback(
        tmp_path,
        model=planted_mlp(),
        max_epochs=2,
        trainer_kwargs={"precision": "16-mixed", "accelerator": "gpu"},
        **FAST,
    )
    assert_pruned(model, callback)


class TwoGroupsAndSchedulers(MLPClassifier):
    def __init__(self, interval: str) -> None:
        super().__init__(input_dim=6, hidden_sizes=[12, 10], num_classes=3)
        self.interval = interval

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in self.named_parameters() if n.endswith("bias")]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_parameter_groups_and_lr_schedulers_keep_working(tmp_path, interval):
    from helpers.models import kill_linear_units_, make_alive_

    model = make_alive_(TwoGroupsAndSchedulers(interval))
    kill_linear_units_(model.net[0], [1, 8])
    trainer, model, callback = train_with_callback(tmp_path, model=model, max_epochs=2, **FAST)
    assert_pruned(model, callback)
    optimizer = trainer.optimizers[0]
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    steps = trainer.global_step if interval == "step" else trainer.current_epoch
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**steps)
    assert all(
        n.endswith("weight")
        for n, p in model.named_parameters()
        if any(p is q for q in optimizer.param_groups[0]["params"])
    )


def test_compiled_module_recompiles_after_a_removal(tmp_path):
    model = planted_mlp()
    model.compile()
    _, model, callback = train_with_callback(tmp_path, model=model, max_epochs=2, **FAST)
    assert_pruned(model, callback)
    x = torch.randn(4, 6)
    model.eval()
    torch.testing.assert_close(model(x), model.net(x))  # compiled forward == eager forward


def test_several_fit_calls_on_one_trainer_and_callback(tmp_path):
    model = planted_mlp()
    callback = DemonPruning(verbose=False, **FAST)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback])
    trainer.fit(model, datamodule=RandomDataModule())
    first = dict(callback.kept_units)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, datamodule=RandomDataModule())
    assert_pruned(model, callback)
    assert all(set(callback.kept_units[name]) <= set(kept) for name, kept in first.items())
    assert len(model._load_state_dict_pre_hooks) == 1  # no stacked hooks


def test_fast_dev_run(tmp_path):
    model = planted_mlp()
    trainer = quiet_trainer(
        tmp_path,
        fast_dev_run=True,
        callbacks=[DemonPruning(verbose=False, **FAST)],
        enable_checkpointing=True,
        logger=True,
    )
    trainer.fit(model, datamodule=RandomDataModule())
    assert model.net[0].out_features == 10


@pytest.mark.parametrize("name", ["FSDPStrategy", "ModelParallelStrategy"])
def test_sharding_strategies_are_refused_with_their_name_and_an_alternative(name):
    import lightning.pytorch.strategies as strategies

    strategy = getattr(strategies, name)()
    with pytest.raises(RuntimeError, match=rf"does not support the strategy `{name}`.*strategy=\"ddp\""):
        check_supported(strategy)
    check_supported(DDPStrategy())

"""The step cadence: `prune_every_n_train_steps` removes mid-epoch, so a one-epoch fine-tune shrinks more than once."""

from __future__ import annotations

import pytest
from lightning.pytorch import Callback

from helpers.lightning import planted_mlp, train_with_callback
from helpers.models import kill_linear_units_
from lightning_demp import DemonPruning


class KillFirstUnitAtBatch(Callback):
    """Kill the first unit ``net.0`` has now, before training batch ``batch_idx`` (the model trains at lr 0)."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx and trainer.current_epoch == 0:
            kill_linear_units_(pl_module.net[0], [0])


@pytest.mark.parametrize("check_mode", ["eval_pass", "train_forwards"])
def test_a_one_epoch_fit_shrinks_at_every_nth_step(tmp_path, check_mode):
    trainer, model, callback = train_with_callback(
        tmp_path,
        model=planted_mlp(lr=0.0),
        max_epochs=1,
        trainer_kwargs={"callbacks": [KillFirstUnitAtBatch(batch_idx=2)]},
        reg_max=0.0,
        noise_std=0.0,
        prune_every_n_train_steps=2,
        check_mode=check_mode,
        check_batches=1,
    )
    assert trainer.num_training_batches == 6
    assert [(event.step, event.epoch) for event in callback.events] == [(2, 0), (4, 0)]  # both mid-epoch
    assert callback.events[0].removed == {"net.0": 2, "net.2": 1}  # the planted units
    assert callback.events[1].removed == {"net.0": 1}  # the unit killed before step 3
    assert callback.ledger.checks_run == 3  # after steps 2 and 4, and the final check at the epoch's end
    assert model.net[0].out_features == 12 - 3
    optimizer = trainer.optimizers[0]
    for parameter in model.parameters():  # the optimizer state follows the shrunk parameters
        assert optimizer.state[parameter]["exp_avg"].shape == parameter.shape


def test_the_epoch_cadence_is_unchanged_by_default(tmp_path):
    trainer, model, callback = train_with_callback(
        tmp_path,
        model=planted_mlp(lr=0.0),
        max_epochs=2,
        trainer_kwargs={"callbacks": [KillFirstUnitAtBatch(batch_idx=2)]},
        reg_max=0.0,
        noise_std=0.0,
    )
    assert [event.step for event in callback.events] == [6]  # one event per epoch end; the second removes nothing


def test_one_cadence_at_a_time_named_in_the_error():
    with pytest.raises(ValueError, match="Set `prune_every_n_epochs` or `prune_every_n_train_steps`, not both"):
        DemonPruning(prune_every_n_epochs=2, prune_every_n_train_steps=10)
    with pytest.raises(ValueError, match="Expected `prune_every_n_train_steps` to be an int >= 1, got 0"):
        DemonPruning(prune_every_n_train_steps=0)
    assert DemonPruning(prune_every_n_train_steps=10).cadence == "prune_every_n_train_steps=10"


def test_a_compiled_model_recompiles_without_hitting_the_limit_as_it_shrinks(tmp_path):
    import torch

    model = planted_mlp(lr=0.0)
    from torch._dynamo.utils import counters

    model.compile(backend="eager")  # dynamo's guards and recompiles, without a C++ compiler
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        trainer, _, callback = train_with_callback(
            tmp_path,
            model=model,
            max_epochs=2,
            trainer_kwargs={"callbacks": [KillFirstUnitAtBatch(batch_idx=2)]},
            reg_max=0.0,
            noise_std=0.0,
            prune_every_n_train_steps=2,
        )
    assert len(callback.events) == 2 and model.net[0].out_features == 9  # shrank twice while compiled
    assert counters["stats"]["unique_graphs"] <= 1 + len(callback.events)  # the first graph, then one per event
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), model.net(x))  # the compiled call computes the pruned network

"""What a user reads when fit ends: an accuracy labelled with the network it belongs to, why nothing was removed,
a plot only where a logger or a directory says, and a log without noise."""

from __future__ import annotations

import warnings

import pytest

from helpers.lightning import RandomDataModule, planted_mlp, quiet_trainer, small_mlp, train_with_callback
from lightning_demp import DemonPruning
from lightning_demp.monitoring import PROGRESS_BAR_KEY
from lightning_demp.report import NO_LOGGER_NOTE


def test_an_accuracy_measured_before_the_final_removal_says_so(tmp_path, capsys):
    trainer, model, callback = train_with_callback(
        tmp_path, reg_max=0.0, noise_std=0.0, target_sparsity=0.3, target_metric="units", force_target=True,
        verbose=True,
    )  # fmt: skip
    last = callback.events[-1]  # live units went at the end of the last epoch, after its validation
    assert last.reason in {"shortfall", "force_target"} and last.epoch == trainer.current_epoch - 1
    out = capsys.readouterr().out
    assert "val_acc (measured before 1 later removal): " in out
    assert "final network: not validated since" in out
    assert "\nval_acc: " not in out


def test_an_accuracy_measured_on_the_final_network_matches_validate(tmp_path, capsys):
    data = RandomDataModule()
    trainer, model, callback = train_with_callback(
        tmp_path, model=planted_mlp(lr=0.0), datamodule=data, reg_max=0.0, noise_std=0.0, verbose=True, max_epochs=2
    )
    assert callback.events and callback.events[-1].epoch == 0  # removed before the last validation
    out = capsys.readouterr().out
    final = trainer.validate(model, datamodule=data, verbose=False)[0]["val_acc"]
    assert f"val_acc: {final:.4f}" in out
    assert "before 1 later removal" not in out


def test_a_run_that_removes_nothing_says_why_in_the_log_and_the_summary(tmp_path, capsys):
    with pytest.warns(UserWarning, match="DemonPruning removed nothing in this fit") as caught:
        train_with_callback(
            tmp_path, model=small_mlp(lr=0.0), reg_max=0.0, noise_std=0.0, prune_every_n_epochs=5, max_epochs=1,
            verbose=True,
        )  # fmt: skip
    message = str(next(w.message for w in caught if "removed nothing" in str(w.message)))
    assert "only 1 dead check ran in 1 epoch (prune_every_n_epochs=5)" in message
    assert "reg_max=0 and noise_std=0: nothing pushes units toward death" in message
    assert "docs/faq.md#nothing-pruned" in message
    assert message in capsys.readouterr().out


def test_a_run_that_removes_units_does_not_warn_that_nothing_was_removed(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_with_callback(tmp_path, model=planted_mlp(), reg_max=0.0, noise_std=0.0)
    assert not [w for w in caught if "removed nothing" in str(w.message)]


def test_without_a_logger_no_plot_file_is_written_and_the_summary_says_how_to_get_one(tmp_path, capsys):
    callback = DemonPruning(regularizer="positive_l2", reg_max=0.0, noise_std=0.0)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(planted_mlp(), datamodule=RandomDataModule())
    assert callback.plot_path is None
    assert not list(tmp_path.rglob("*.png"))
    assert NO_LOGGER_NOTE in capsys.readouterr().out


def test_a_plot_directory_is_used_without_a_logger(tmp_path, capsys):
    callback = DemonPruning(regularizer="positive_l2", reg_max=0.0, noise_std=0.0, plot=str(tmp_path / "plots"))
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(planted_mlp(), datamodule=RandomDataModule())
    assert callback.plot_path == str(tmp_path / "plots" / "demp_units.png")
    assert f"plotted in {callback.plot_path}" in capsys.readouterr().out
    assert [path.name for path in tmp_path.rglob("*.png")] == ["demp_units.png"]


def test_the_progress_bar_gets_one_short_key_and_the_loggers_do_not(tmp_path):
    trainer, model, callback = train_with_callback(tmp_path, model=planted_mlp(), reg_max=0.0, noise_std=0.0)
    bar = {key for key in trainer.progress_bar_metrics if key.startswith("demp/")}
    assert bar == {PROGRESS_BAR_KEY}
    assert trainer.progress_bar_metrics[PROGRESS_BAR_KEY] == pytest.approx(1 - callback.measured_sparsity(model))
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert PROGRESS_BAR_KEY not in logged.split(",") and "demp/params_removed_frac" in logged


def test_a_removal_line_counts_in_words_that_agree():
    from lightning_demp.ledger import PruningLedger, RemovalEvent

    ledger = PruningLedger(initial_widths={"fc": 4}, kept_units={"fc": [0, 1, 2]})
    event = RemovalEvent(step=1, epoch=0, reason="dead", removed={"fc": 1}, widths={"fc": 3}, params=9,
                         flops_kept=0.8, seconds=0.0)  # fmt: skip
    assert event.describe(1, 0, ledger).startswith("removed 1 unit from 1 layer:")
    assert event.describe(2, 1, ledger).startswith("removed 2 units from 1 layer and 1 dead attention head:")

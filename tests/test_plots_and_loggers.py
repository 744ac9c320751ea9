"""Plots of a run and the logger integration (CSV and TensorBoard): keys grouped under demp/, image sent."""

from __future__ import annotations

import matplotlib.image
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from helpers.lightning import RandomDataModule, planted_mlp, quiet_trainer
from lightning_demp import DemonPruning
from lightning_demp.plots import plot_checkpoint, plot_run, units_over_steps


def fit_with_logger(tmp_path, logger, **kwargs):
    callback = DemonPruning(regularizer="positive_l2", reg_max=0.05, noise_std=1e-3, verbose=False, **kwargs)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=3,
        callbacks=[callback, checkpoint],
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=True,
    )
    trainer.fit(planted_mlp(), datamodule=RandomDataModule())
    return trainer, callback


def test_plot_file_is_written_in_the_log_dir_and_shows_every_layer_and_event(tmp_path):
    trainer, callback = fit_with_logger(tmp_path, CSVLogger(tmp_path))
    png = tmp_path / "lightning_logs" / "version_0" / "demp_units.png"
    assert callback.plot_path == str(png)
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 500

    figure = plot_run(callback.state_dict())
    top = figure.axes[0]
    bottom = next(axis for axis in figure.axes if axis.get_ylabel() == "λ_t")
    steps, widths = units_over_steps(callback.state_dict())
    assert [text.get_text() for text in top.get_legend().get_texts()] == [
        f"{name}: {widths[name][0]} → {widths[name][-1]}" for name in ("net.0", "net.2")
    ]
    assert top.get_lines()[0].get_ydata()[0] == 100.0  # the share kept, from 100 %
    assert steps == [0, *(event.step for event in callback.events)]
    assert widths["net.0"][0] == 12 and widths["net.0"][-1] == len(callback.kept_units["net.0"])
    line = top.get_lines()[0]
    assert list(line.get_xdata())[-1] == trainer.global_step  # drawn to the end of training
    assert bottom.get_lines()[0].get_label() == "λ (regularization)"


def test_a_saved_run_is_plotted_from_its_checkpoint(tmp_path):
    fit_with_logger(tmp_path, False)
    figure = plot_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 0
    assert len(figure.axes[0].get_lines()) == 2


def test_tensorboard_gets_the_metrics_under_demp_and_the_figure(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _ = fit_with_logger(tmp_path, TensorBoardLogger(tmp_path))
    accumulator = EventAccumulator(trainer.logger.log_dir)
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {
        "demp/reg_strength",
        "demp/noise_std",
        "demp/units/net.0",
        "demp/params_removed_frac",
        "demp/flops_kept_frac",
        "demp/units_kept_frac",
    } <= scalars
    assert "demp/units" in accumulator.Tags()["images"]


def test_plot_can_be_turned_off_and_is_validated(tmp_path):
    _, callback = fit_with_logger(tmp_path, CSVLogger(tmp_path), plot=False)
    assert callback.plot_path is None
    assert not (tmp_path / "lightning_logs" / "version_0" / "demp_units.png").exists()
    with pytest.raises(TypeError, match="Expected `plot` to be a bool or a directory"):
        DemonPruning(plot=3)


def test_fifty_layers_are_drawn_as_a_heat_map_with_every_layer_labelled():
    from matplotlib.collections import QuadMesh

    names = [f"blocks.{index}.conv" for index in range(50)]
    state = {
        "initial_widths": dict.fromkeys(names, 64),
        "events": [{"step": 10, "widths": {name: 64 - index for index, name in enumerate(names)}}],
        "schedule": None,
    }
    figure = plot_run(state)
    top = figure.axes[0]
    assert top.get_legend() is None and not top.get_lines()  # no 50 tangled lines and an overflowing legend
    (mesh,) = [child for child in top.get_children() if isinstance(child, QuadMesh)]
    kept = mesh.get_array().reshape(50, 2)
    assert kept[0].tolist() == [100.0, 100.0] and kept[49, 1] == pytest.approx(100 * 15 / 64)
    assert [label.get_text() for label in top.get_yticklabels()][49] == "blocks.49.conv: 64 → 15"


def test_a_few_layers_stay_lines_with_a_legend():
    state = {"initial_widths": {"a": 8, "b": 4, "c": 2}, "events": [{"step": 3, "widths": {"a": 5}}], "schedule": None}
    top = plot_run(state).axes[0]
    assert len(top.get_lines()) == 3 and top.get_legend() is not None


def test_the_plot_shows_the_validation_accuracy_recorded_after_each_validation(tmp_path):
    trainer, callback = fit_with_logger(tmp_path, CSVLogger(tmp_path))
    history = callback.state_dict()["validation"]
    assert [point["name"] for point in history] == ["val_acc"] * 3  # one per epoch of the 3
    assert history[-1]["value"] == pytest.approx(float(trainer.callback_metrics["val_acc"]))
    figure = plot_run(callback.state_dict())
    middle = figure.axes[1]
    assert middle.get_ylabel() == "val_acc (%)"
    assert list(middle.get_lines()[0].get_ydata()) == pytest.approx([100 * point["value"] for point in history])
    restored = DemonPruning(regularizer="positive_l2")
    restored.load_state_dict(callback.state_dict())
    assert restored.validation_history == history  # kept in checkpoints, so plot_checkpoint draws it too

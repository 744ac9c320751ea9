"""The `lightning-demp` command: LightningCLI builds DemonPruning from YAML and fits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_demp import DemonPruning
from lightning_demp.cli import default_config_path, main

REPO = Path(__file__).resolve().parents[1]


def test_cli_fits_one_epoch_from_a_yaml_config_with_the_callback_configured(tmp_path, capsys):
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "digits_mlp.yaml"),
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks.init_args.prune_every_n_epochs=1",
        ]
    )
    out = capsys.readouterr().out
    assert "DemonPruning summary" in out
    assert "parameters kept" in out
    assert list(tmp_path.glob("lightning_logs/version_0/metrics.csv")) or list(tmp_path.glob("**/config.yaml"))


def test_cli_rejects_a_bad_callback_value_naming_the_argument(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "digits_mlp.yaml"),
                "--trainer.callbacks.init_args.schedule=cubic",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert "schedule" in capsys.readouterr().err


def test_embedded_default_config_is_shipped_and_matches_the_repo_copy():
    assert Path(default_config_path()).read_text() == (REPO / "configs" / "mnist1d_cnn.yaml").read_text()


def test_module_entry_point_prints_help():
    result = subprocess.run(
        [sys.executable, "-m", "lightning_demp", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "fit" in result.stdout


def test_print_config_shows_every_callback_argument(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "digits_mlp.yaml"), "--print_config"])
    out = capsys.readouterr().out
    for name in (
        "regularizer",
        "reg_max",
        "schedule",
        "schedule_span",
        "noise_std",
        "prune_every_n_epochs",
        "dead_threshold",
        "check_batches",
        "min_units",
        "exclude",
        "seed",
    ):
        assert f"{name}:" in out
    assert DemonPruning.__name__ in out


@pytest.mark.parametrize("config", ["mnist1d_cnn.yaml", "mnist1d_mlp.yaml", "mnist1d_transformer.yaml"])
def test_every_offline_config_fits_a_few_batches_with_a_removal_check(tmp_path, capsys, config):
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / config),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks.init_args.prune_every_n_epochs=1",
        ]
    )
    assert "DemonPruning summary" in capsys.readouterr().out  # the final dead check ran and reported


def test_settled_callbacks_are_configured_from_yaml_and_save_only_settled_epochs(tmp_path):
    config = tmp_path / "settled.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  max_epochs: 4
  limit_train_batches: 3
  limit_val_batches: 1
  logger: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_demp.DemonPruning
      init_args:
        regularizer: positive_l2
        reg_max: 1.0e-4
        schedule_span: 0.5
        prune_every_n_epochs: 1
    - class_path: lightning_demp.SettledModelCheckpoint
      init_args:
        dirpath: {tmp_path / "best"}
        monitor: val_acc
        mode: max
        filename: "{{epoch}}"
        save_top_k: -1
    - class_path: lightning_demp.SettledEarlyStopping
      init_args:
        monitor: val_acc
        mode: max
        patience: 1
model:
  class_path: lightning_demp.demos.MLPClassifier
  init_args:
    input_dim: 64
    hidden_sizes: [32]
data:
  class_path: lightning_demp.demos.DigitsDataModule
"""
    )
    main(["fit", "--config", str(config)])
    saved = sorted(path.name for path in (tmp_path / "best").iterdir())
    # the schedule spans epochs 0-1: a ModelCheckpoint would keep epoch 0; this one starts once a check since the
    # schedule's end removes nothing
    assert "epoch=0.ckpt" not in saved
    assert saved[-1] == "epoch=3.ckpt"


def _print_config(capsys, args: list[str]) -> dict:
    import yaml

    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_a_users_own_model_and_data_keep_their_own_defaults_not_the_embedded_configs(capsys):
    config = _print_config(
        capsys, ["--model", "helpers.lightning.UserMLP", "--data", "helpers.lightning.RandomDataModule"]
    )
    assert config["model"]["init_args"]["lr"] == 3e-3  # UserMLP's default; the embedded CNN config says 0.01
    assert config["data"]["init_args"]["batch_size"] == 32  # RandomDataModule's default; the embedded says 128
    assert not config["trainer"]["callbacks"]  # nothing from the embedded CNN recipe sneaks in


def test_a_users_config_file_is_not_mixed_with_the_embedded_one(capsys):
    import yaml

    own = yaml.safe_load((REPO / "configs" / "digits_mlp.yaml").read_text())
    config = _print_config(capsys, ["--config", str(REPO / "configs" / "digits_mlp.yaml")])
    assert config["model"]["class_path"] == own["model"]["class_path"]
    assert "betas" not in own["model"].get("init_args", {})
    embedded = yaml.safe_load(Path(default_config_path()).read_text())
    assert config["model"]["init_args"].get("betas") != embedded["model"]["init_args"]["betas"]


def test_without_config_model_or_data_the_embedded_default_applies(capsys):
    import yaml

    embedded = yaml.safe_load(Path(default_config_path()).read_text())
    config = _print_config(capsys, ["--trainer.max_epochs=2"])
    assert config["model"]["class_path"] == embedded["model"]["class_path"]
    assert config["trainer"]["max_epochs"] == 2


def test_a_bad_callback_value_ends_in_one_short_error_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_demp", "fit", "--trainer.callbacks.init_args.reg_max=-1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: DemonPruning: Expected `reg_max` to be a number in [0.0, inf), got -1.0."]
    assert len(result.stderr.splitlines()) <= 4


def test_a_misspelled_callback_argument_suggests_the_accepted_name(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--trainer.callbacks.init_args.reg_maxx=1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert "`lightning_demp.DemonPruning` has no argument `reg_maxx`. Did you mean `reg_max`?" in err
    assert len(err.splitlines()) <= 3


def test_help_speaks_of_demp_and_version_prints_the_package_version(capsys):
    from lightning_demp import __version__

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Demon's Pruning" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-demp {__version__}"

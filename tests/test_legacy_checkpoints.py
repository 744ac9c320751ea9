"""Checkpoints written by lightning-demp 0.1.0, before the core/callback redesign, still load and resume.

The files in ``tests/data`` were written by ``tests/scripts/make_legacy_checkpoints.py`` with that release.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.lightning import RandomDataModule, quiet_trainer, small_mlp, tiny_residual_cnn
from lightning_demp import DemonPruning, load_pruned_checkpoint

DATA = Path(__file__).parent / "data"


def _signal_datamodule():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_legacy", Path(__file__).parent / "scripts" / "make_legacy_checkpoints.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SignalDataModule(batch_size=32)


CASES = {
    "legacy_mlp": (small_mlp, RandomDataModule, {"regularizer": "positive_l2", "reg_max": 0.05, "noise_std": 1e-3}),
    "legacy_residual_cnn": (
        tiny_residual_cnn,
        _signal_datamodule,
        {"regularizer": "l1_norm_scale", "reg_max": 0.01, "noise_std": 0.0},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_legacy_checkpoint_loads_for_inference_and_computes_what_it_computed(name):
    build, _, _ = CASES[name]
    model = load_pruned_checkpoint(build(), DATA / f"{name}.ckpt").eval()
    reference = torch.load(DATA / f"{name}_outputs.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(reference["inputs"]), reference["outputs"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_legacy_checkpoint_resumes_with_its_removal_history(tmp_path, name):
    build, datamodule, callback_args = CASES[name]
    saved = torch.load(DATA / f"{name}.ckpt", weights_only=False)["callbacks"]["DemonPruning"]
    callback = DemonPruning(verbose=False, plot=False, **callback_args)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[callback])
    model = build()
    trainer.fit(model, datamodule=datamodule(), ckpt_path=DATA / f"{name}.ckpt")
    state = callback.state_dict()
    assert trainer.global_step > 0
    assert state["initial_widths"] == saved["initial_widths"]
    assert state["initial_params"] == saved["initial_params"]
    assert state["events"][: len(saved["events"])] == saved["events"]  # the history is kept, not rewritten
    for group, kept in saved["kept_units"].items():  # later removals only take units away
        assert set(state["kept_units"][group]) <= set(kept)
    modules = dict(model.named_modules())
    for group, kept in state["kept_units"].items():
        layer = modules[group]
        width = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
        assert width == len(kept)

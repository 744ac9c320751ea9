"""Shared helpers for the benchmark scripts: build a run from a YAML config, time it, record the machine."""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import lightning
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from lightning_demp import DemonPruning
from lightning_demp.accounting import count_flops_per_sample, count_parameters

RESULTS = Path(__file__).resolve().parent / "results"


def instantiate(spec: dict[str, Any]) -> Any:
    """Build ``class_path`` with ``init_args``, as LightningCLI does."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**spec.get("init_args", {}))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def run_config(
    config: dict[str, Any],
    *,
    seed: int,
    with_demp: bool,
    max_epochs: int | None = None,
    callback_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit the config's model on its data, with or without its DemonPruning callback; return the figures."""
    seed_everything(seed, workers=True)
    model = instantiate(config["model"])
    data = instantiate(config["data"])
    example = model.example_input_array
    params_before, flops_before = count_parameters(model), count_flops_per_sample(model, example)
    callbacks = []
    if with_demp:
        spec = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DemonPruning"))
        args = {**spec.get("init_args", {}), "seed": seed, "verbose": False, **(callback_overrides or {})}
        callbacks.append(DemonPruning(**args))
    trainer = Trainer(
        max_epochs=max_epochs or config["trainer"]["max_epochs"],
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]
    params_after, flops_after = count_parameters(model), count_flops_per_sample(model, example)
    result = {
        "seed": seed,
        "demp": with_demp,
        "test_acc": accuracy,
        "params": params_after,
        "params_removed": 1 - params_after / params_before,
        "flops_per_sample": flops_after,
        "flops_removed": 1 - flops_after / flops_before,
        "fit_seconds": fit_seconds,
    }
    if callbacks:
        result["units_removed"] = 1 - callbacks[0].units_kept_fraction()
        result["widths"] = {name: len(kept) for name, kept in callbacks[0].kept_units.items()}
    return result


def load_config(path: Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2))
    return path

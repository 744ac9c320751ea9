"""Shared helpers for the benchmark scripts: build a run from a YAML config, time it, record the machine."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning
import torch
import yaml
from lightning.pytorch import Callback, seed_everything

from lightning_demp import DemonPruning
from lightning_demp.accounting import count_flops_per_sample, count_parameters
from lightning_demp.demos.quiet import quiet_trainer

RESULTS = Path(__file__).resolve().parent / "results"


# DemonPruning pushing on every step with nothing removed inside the timed steps: the overhead benchmarks' setting
STEADY_PRESSURE: dict[str, Any] = {
    "regularizer": "l1_norm_scale",
    "reg_max": 0.03,
    "noise_std": 5e-5,
    "schedule": "constant",
    "prune_every_n_epochs": 10_000,
    "check_mode": "train_forwards",
    "verbose": False,
    "plot": False,
}


class StepTimer(Callback):
    """Wall time of each training step, from the Trainer's batch start to its batch end, with the step's epoch."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps.append((trainer.current_epoch, time.perf_counter() - self._start))


def with_recorded_betas(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with torch's default Adam betas (0.9, 0.999), which the committed frontier, target and speed results
    were measured with.

    The demo config moved to betas (0.9, 0.95) after them (validation dips less: results/validation_dip_variants.md);
    those scripts keep the recorded recipe so that their committed results reproduce (for the MLP and transformer
    configs, which set no betas, this changes nothing). Drop the call to rerun them on the current demo recipe.
    """
    return {**config, "model": _override(config["model"], {"betas": [0.9, 0.999]})}


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


def machine_line(info: dict[str, Any]) -> str:
    """``info`` (from `machine`) as one readable line for the result tables."""
    threads = f", {info['torch_threads']} torch thread(s)" if "torch_threads" in info else ""
    return (
        f"Machine: {info.get('processor', '?')} on {info.get('platform', '?')}, {info.get('cpu_count', '?')} CPU(s)"
        f"{threads}; torch {info.get('torch', '?')}, lightning {info.get('lightning', '?')}, "
        f"python {info.get('python', '?')}."
    )


def _override(spec: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    return {**spec, "init_args": {**spec.get("init_args", {}), **(overrides or {})}}


def run_config(
    config: dict[str, Any],
    *,
    seed: int,
    with_demp: bool,
    max_epochs: int | None = None,
    callback_overrides: dict[str, Any] | None = None,
    extra_callbacks: Any = None,
    keep: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
    data_overrides: dict[str, Any] | None = None,
    return_callback_state: bool = False,
) -> dict[str, Any]:
    """Fit the config's model on its data, with or without its DemonPruning callback; return the figures.

    ``extra_callbacks(model, epochs)`` returns more callbacks (the peers). ``keep``, when given, receives the
    trained model and the DemonPruning callback. ``return_callback_state`` adds the callback's ``state_dict()`` under
    ``"callback_state"`` (what `lightning_demp.plots.plot_run` draws; it crosses process boundaries).
    """
    seed_everything(seed, workers=True)
    model = instantiate(_override(config["model"], model_overrides))
    data = instantiate(_override(config["data"], data_overrides))
    epochs = max_epochs or config["trainer"]["max_epochs"]
    example = model.example_input_array
    params_before, flops_before = count_parameters(model), count_flops_per_sample(model, example)
    callbacks: list[Callback] = []
    demp: DemonPruning | None = None
    if with_demp:
        spec = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DemonPruning"))
        args = {
            **spec.get("init_args", {}),
            "seed": seed,
            "verbose": False,
            "plot": False,
            **(callback_overrides or {}),
        }
        demp = DemonPruning(**args)
        callbacks.append(demp)
    if extra_callbacks is not None:
        callbacks.extend(extra_callbacks(model, epochs))
    trainer = quiet_trainer(".", max_epochs=epochs, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]
    params_after, flops_after = count_parameters(model), count_flops_per_sample(model, example)
    result: dict[str, Any] = {
        "seed": seed,
        "demp": with_demp,
        "test_acc": accuracy,
        "params": params_after,
        "params_removed": 1 - params_after / params_before,
        "flops_per_sample": flops_after,
        "flops_removed": 1 - flops_after / flops_before,
        "fit_seconds": fit_seconds,
    }
    result["zeroed"] = sum(int((p == 0).sum()) for p in model.parameters()) / params_before
    if demp is not None:
        result["units_removed"] = 1 - demp.ledger.units_kept_fraction()
        result["widths"] = {name: len(kept) for name, kept in demp.kept_units.items()}
        result["events"] = [event.to_dict() for event in demp.events]
        if demp.kept_heads:
            result["heads"] = {name: len(kept) for name, kept in demp.kept_heads.items()}
            result["initial_heads"] = dict(demp.ledger.initial_heads)
        if return_callback_state:
            result["callback_state"] = demp.state_dict()
    print(
        f"[run] seed {seed} demp={with_demp} {callback_overrides or ''} acc {accuracy:.4f} "
        f"params removed {result['params_removed']:.3f} ({fit_seconds:.0f} s)",
        flush=True,
    )
    if keep is not None:
        keep["model"], keep["callback"] = model, demp
    return result


def load_config(path: Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2))
    return path


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 10) -> float:
    """Median wall time of ``call()`` over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_report(name: str, lines: list[str], machine_info: dict[str, Any]) -> None:
    """Write ``lines`` and a closing machine line to ``results/<name>``, and print them."""
    text = "\n".join([*lines, machine_line(machine_info), ""])
    (RESULTS / name).write_text(text)
    print(text)


def _single_thread_worker() -> None:
    torch.set_num_threads(1)


def run_parallel(function: Callable[..., Any], calls: Sequence[dict[str, Any]], jobs: int = 1) -> list[Any]:
    """``function(**call)`` for every call, in order; with ``jobs > 1`` in that many processes of one thread.

    Accuracy benchmarks use this to fill both cores; fit times measured this way are not speed figures (the
    speed benchmarks run alone, in one process). ``function`` and the call values must pickle: module-level
    functions or ``functools.partial`` of them, never lambdas.
    """
    if jobs <= 1:
        return [function(**call) for call in calls]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_single_thread_worker) as pool:
        futures = [pool.submit(function, **call) for call in calls]
        return [future.result() for future in futures]


def run_configs(tasks: Sequence[dict[str, Any]], jobs: int = 1) -> list[dict[str, Any]]:
    """`run_config` for every task (its keyword arguments), through `run_parallel`."""
    return run_parallel(run_config, tasks, jobs)


def run_grouped(keyed_tasks: Sequence[tuple[Any, dict[str, Any]]], jobs: int = 1) -> dict[Any, list[dict[str, Any]]]:
    """`run_configs` over ``(key, task)`` pairs; the runs grouped by key, in task order."""
    grouped: dict[Any, list[dict[str, Any]]] = {}
    for (key, _), run in zip(keyed_tasks, run_configs([task for _, task in keyed_tasks], jobs)):
        grouped.setdefault(key, []).append(run)
    return grouped


def default_jobs() -> int:
    """Worker processes for accuracy benchmarks: one per core (``BENCH_JOBS`` overrides)."""
    return int(os.environ.get("BENCH_JOBS", os.cpu_count() or 1))

"""Validation during the schedule, with and without BatchNorm recalibration (the demo CNN on MNIST-1D).

Near the λ peak, eval-mode accuracy can fall far below the train-mode network's (BatchNorm running statistics stop
describing the network). This runs the default config with ``recalibrate_bn`` on and off, records ``val_acc`` after
every epoch, and reports the lowest validation accuracy while the schedule is active against the final accuracy,
and the time spent recalibrating per epoch. Writes ``benchmarks/results/validation_dip.json``, ``.md`` and ``.png``.

    python benchmarks/validation_dip.py           # 4 seeds, 60 epochs (about 10 min on 2 CPU cores)
    python benchmarks/validation_dip.py --quick   # 1 seed, 10 epochs
    python benchmarks/validation_dip.py --dense   # the same loop without DemP, for reference
    python benchmarks/validation_dip.py --variants   # recalibrated, with the recipe changed one knob at a time
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS,
    _override,
    default_jobs,
    instantiate,
    load_config,
    machine,
    run_parallel,
    write_json,
    write_report,
)

import lightning_demp.core as core_module
from lightning_demp import DemonPruning
from lightning_demp.demos.quiet import quiet_trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mnist1d_cnn.yaml"

# name: (DemonPruning overrides, model overrides); every variant runs with recalibration on
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "the demo's recipe (betas=(0.9, 0.95))": ({}, {}),
    "betas=(0.9, 0.999) (torch's default)": ({}, {"betas": [0.9, 0.999]}),
    "betas=(0.9, 0.9)": ({}, {"betas": [0.9, 0.9]}),
    "noise_std=0": ({"noise_std": 0.0}, {}),
    "reg_max=0, noise_std=0 (nothing dies)": ({"reg_max": 0.0, "noise_std": 0.0}, {}),
}


class ValAccuracy(Callback):
    """``val_acc`` after every validation; with ``on_training_set``, also the same network's accuracy on the training
    set, in eval mode with the same running statistics: a dip in both is the network's own, not stale BatchNorm
    statistics (a forward pass over the whole training set per epoch, so only the runs that report it pay for it)."""

    def __init__(self, on_training_set: bool = False) -> None:
        self.on_training_set = on_training_set
        self.history: list[tuple[int, float]] = []
        self.train_history: list[float] = []

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self.history.append((trainer.global_step, float(trainer.callback_metrics["val_acc"])))
            if not self.on_training_set:
                return
            inputs, targets = trainer.datamodule.train_set.tensors  # type: ignore[attr-defined]
            with torch.no_grad():
                predictions = pl_module(inputs.to(pl_module.device)).argmax(dim=-1).cpu()
            self.train_history.append(float((predictions == targets).float().mean()))


def run(
    config: dict[str, Any],
    seed: int,
    recalibrate: bool,
    epochs: int,
    callback_overrides: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
    dense: bool = False,
    variant: str | None = None,
) -> dict[str, Any]:
    """One training of the demo config, its callback and model arguments overridden; with ``dense`` the same loop
    without DemP (``recalibrate_bn`` is then None). A ``variant`` run also records the training-set accuracy."""
    seed_everything(seed)
    model, data = instantiate(_override(config["model"], model_overrides)), instantiate(config["data"])
    spec = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DemonPruning"))
    demp = DemonPruning(
        **{
            **spec["init_args"],
            "seed": seed,
            "verbose": False,
            "plot": False,
            "recalibrate_bn": recalibrate,
            **(callback_overrides or {}),
        }
    )
    accuracy = ValAccuracy(on_training_set=variant is not None)
    spent = [0.0]
    original = core_module.recalibrate_batchnorm_

    def timed(*args: Any, **kwargs: Any) -> int:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    core_module.recalibrate_batchnorm_ = timed
    try:
        trainer = quiet_trainer(".", max_epochs=epochs, callbacks=[accuracy] if dense else [demp, accuracy])
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        fit_seconds = time.perf_counter() - start
    finally:
        core_module.recalibrate_batchnorm_ = original
    # dense: the steps DemP's schedule would have spanned in this loop
    span = round(spec["init_args"]["schedule_span"] * trainer.global_step) if dense else demp.pruner.pressure.span_steps
    during = [acc for step, acc in accuracy.history if step <= span]
    return {
        "seed": seed,
        "recalibrate_bn": None if dense else recalibrate,
        "variant": variant,
        "history": accuracy.history,
        "train_history": accuracy.train_history,
        "span_steps": span,
        "min_val_acc_during_schedule": min(during),
        "final_val_acc": accuracy.history[-1][1],
        "recalibration_seconds": spent[0],
        "recalibrations": 0 if dense else demp.pruner.recalibrations,
        "recalibration_seconds_per_epoch": spent[0] / epochs,
        "fit_seconds": fit_seconds,
        "params_removed": 1 - sum(p.numel() for p in model.parameters()) / 150218,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="runs in parallel, one thread each")
    parser.add_argument("--replot", action="store_true", help="redraw the .md and .png from the saved JSON")
    parser.add_argument(
        "--recalibration-batches",
        type=int,
        help="recalibrated runs only, with this many batches (files end in _recal<N>): does recalibrating on more "
        "batches shrink the dip?",
    )
    parser.add_argument(
        "--dense",
        action="store_true",
        help="the same loop without DemP (files end in _dense): how low does validation go without any pruning?",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="recalibrated runs of the recipe with one knob changed at a time (files end in _variants): does any "
        "of them keep validation closer to the final accuracy?",
    )
    args = parser.parse_args()
    suffix = (
        ("_quick" if args.quick else "")
        + (f"_recal{args.recalibration_batches}" if args.recalibration_batches else "")
        + ("_dense" if args.dense else "")
        + ("_variants" if args.variants else "")
    )
    if args.replot:
        render(suffix)
        return
    config = load_config(CONFIG)
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = 10 if args.quick else config["trainer"]["max_epochs"]
    recalibration = {"recalibration_batches": args.recalibration_batches} if args.recalibration_batches else {}
    if args.variants:
        calls = [
            {
                "config": config,
                "seed": seed,
                "recalibrate": True,
                "epochs": epochs,
                "callback_overrides": callback_overrides,
                "model_overrides": model_overrides,
                "variant": name,
            }
            for name, (callback_overrides, model_overrides) in VARIANTS.items()
            for seed in seeds
        ]
    else:
        settings = (True,) if args.recalibration_batches or args.dense else (False, True)
        calls = [
            {
                "config": config,
                "seed": seed,
                "recalibrate": recalibrate,
                "epochs": epochs,
                "callback_overrides": recalibration,
                "dense": args.dense,
            }
            for seed in seeds
            for recalibrate in settings
        ]
    runs = run_parallel(run, calls, args.jobs)  # with jobs > 1 the recalibration cost is a one-thread figure
    for r in runs:
        print({k: v for k, v in r.items() if k != "history"}, flush=True)
    write_json(f"validation_dip{suffix}.json", {"epochs": epochs, "seeds": seeds, "machine": machine(), "runs": runs})
    render(suffix)


def after_warm_up(run: dict[str, Any], points: float = 5.0) -> float:
    """Lowest val accuracy during the schedule once the network has learned: from the first validation within
    ``points`` of the final accuracy (the first epochs of any training run are low, with or without DemP)."""
    return min(once_learned(run, points), default=float("nan"))


def learned_start(run: dict[str, Any], points: float = 5.0) -> tuple[int, list[float]]:
    """Val accuracies during the schedule, and the index of the first one within ``points`` of the final accuracy."""
    during = [acc for step, acc in run["history"] if step <= run["span_steps"]]
    return next((i for i, acc in enumerate(during) if acc >= run["final_val_acc"] - points / 100), len(during)), during


def once_learned(run: dict[str, Any], points: float = 5.0) -> list[float]:
    """Val accuracies during the schedule from the first one within ``points`` of the final accuracy."""
    start, during = learned_start(run, points)
    return during[start:]


def train_accuracy_at_the_lowest(run: dict[str, Any]) -> float:
    """Eval-mode accuracy on the training set at the epoch of the lowest once-learned validation accuracy."""
    start, during = learned_start(run)
    if start == len(during) or not run.get("train_history"):
        return float("nan")
    lowest = min(range(start, len(during)), key=during.__getitem__)
    return float(run["train_history"][lowest])


def render_variants(payload: dict[str, Any], suffix: str) -> None:
    """The table of ``validation_dip<suffix>.json`` (``--variants``): one row per recipe variant, recalibration on."""
    runs, epochs = payload["runs"], payload["epochs"]
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"# Validation during the schedule, recipe variants: residual CNN, MNIST-1D ({len(seeds)} seeds, {epochs} "
        "epochs, recalibration on)",
        "",
        "Each row changes one knob of the demo's recipe (`configs/mnist1d_cnn.yaml`).",
        "",
        "| variant | lowest once learned (%) | training-set accuracy then (%) | final val acc (%) | gap (pt) | epochs "
        "once learned > 3 pt under the final (%) | params removed (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["variant"] for r in runs):
        chosen = [r for r in runs if r["variant"] == name]
        learned = [after_warm_up(r) for r in chosen]
        final = statistics.mean(r["final_val_acc"] for r in chosen)
        far = [
            sum(acc < r["final_val_acc"] - 0.03 for acc in once_learned(r)) / max(1, len(once_learned(r)))
            for r in chosen
        ]
        lines.append(
            f"| {name} | {100 * statistics.mean(learned):.1f} (per seed: "
            f"{', '.join(f'{100 * v:.1f}' for v in learned)}) | "
            f"{', '.join(f'{100 * train_accuracy_at_the_lowest(r):.1f}' for r in chosen)} | {100 * final:.2f} | "
            f"{100 * (final - statistics.mean(learned)):.1f} | {100 * statistics.mean(far):.0f} | "
            f"{100 * statistics.mean(r['params_removed'] for r in chosen):.1f} |"
        )
    lines += [
        "",
        "*Once learned*: from the first validation within 5 points of the run's final accuracy to the end of the "
        "schedule. *Training-set accuracy then*: per seed, the same network at the epoch of its lowest validation "
        "accuracy, in eval mode with the same running statistics, on the 4,000 training samples. Runs were side by "
        "side, one thread each.",
        "",
    ]
    write_report(f"validation_dip{suffix}.md", lines, payload["machine"])


def render(suffix: str) -> None:
    """Write the table and the plot from ``validation_dip<suffix>.json``."""
    payload = json.loads((RESULTS / f"validation_dip{suffix}.json").read_text())
    if "_variants" in suffix:
        render_variants(payload, suffix)
        return
    runs, epochs = payload["runs"], payload["epochs"]
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"# Validation during the schedule: residual CNN, MNIST-1D ({len(seeds)} seeds, {epochs} epochs)",
        "",
        *(
            [f"Recalibration on {suffix.rpartition('_recal')[2]} batches (the default is 4).", ""]
            if "_recal" in suffix
            else []
        ),
        "| recalibrate_bn | lowest val acc during the schedule (%) | lowest once learned (%) | final val acc (%) | "
        "gap once learned (pt) | recalibration cost per epoch (s) | fit time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in sorted({r["recalibrate_bn"] for r in runs}, key=str):
        chosen = [r for r in runs if r["recalibrate_bn"] == setting]
        label = "no DemP (the same loop)" if setting is None else str(setting)
        low = statistics.mean(r["min_val_acc_during_schedule"] for r in chosen)
        learned = [after_warm_up(r) for r in chosen]
        final = statistics.mean(r["final_val_acc"] for r in chosen)
        per_seed = ", ".join(f"{100 * r['min_val_acc_during_schedule']:.1f}" for r in chosen)
        lines.append(
            f"| {label} | {100 * low:.1f} (per seed: {per_seed}) | "
            f"{100 * statistics.mean(learned):.1f} (per seed: {', '.join(f'{100 * v:.1f}' for v in learned)}) | "
            f"{100 * final:.2f} | {100 * (final - statistics.mean(learned)):.1f} | "
            f"{statistics.mean(r['recalibration_seconds_per_epoch'] for r in chosen):.3f} | "
            f"{statistics.mean(r['fit_seconds'] for r in chosen):.1f} |"
        )
    lines += [
        "",
        "*Once learned*: from the first validation within 5 points of the run's final accuracy to the end of the "
        "schedule (the lowest value over the whole schedule is the first epoch's, before the network has learned). "
        "Runs were side by side, one thread each: the recalibration cost is a one-thread figure.",
        "",
    ]
    write_report(f"validation_dip{suffix}.md", lines, payload["machine"])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.8))
    for r in runs:
        steps, accs = zip(*r["history"])
        axis.plot(
            steps,
            [100 * a for a in accs],
            color={None: "tab:blue", True: "tab:green", False: "tab:grey"}[r["recalibrate_bn"]],
            alpha=0.8,
            label=(
                f"no DemP, seed {r['seed']}"
                if r["recalibrate_bn"] is None
                else f"recalibrate_bn={r['recalibrate_bn']}, seed {r['seed']}"
            ),
        )
    axis.axvline(runs[0]["span_steps"], color="black", linestyle=":", label="end of schedule")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("val accuracy (%)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(RESULTS / f"validation_dip{suffix}.png", dpi=110)


if __name__ == "__main__":
    main()

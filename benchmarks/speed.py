"""Training speed, inference speed and callback overhead of DemP on the MNIST-1D residual CNN (CPU).

1. **Training:** wall-clock time of a full DemP fit vs. the dense fit at equal epochs (interleaved, same process),
   next to the training-FLOP ratio (sum over steps of the forward FLOPs of the architecture in use).
2. **Inference:** the final compact model vs. the dense model vs. ModelPruning's masked model (dense shapes; with its
   pruning hooks active, and after ``make_pruning_permanent``), at batch 1 and 256, next to the FLOP ratio.
3. **Overhead:** step time with DemonPruning attached while no removal happens (hooks, regularization, noise,
   logging) vs. plain training, interleaved repeats, median.

    python benchmarks/speed.py           # about 8 min on 2 CPU cores
    python benchmarks/speed.py --quick   # 10-epoch fits, fewer repeats
    python benchmarks/speed.py --round-to [--quick]   # widths kept multiples of 8 and 16: see round_to.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, seed_everything
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    STEADY_PRESSURE,
    StepTimer,
    instantiate,
    load_config,
    machine,
    run_config,
    with_recorded_betas,
    write_json,
    write_report,
)

from lightning_demp import DemonPruning
from lightning_demp.accounting import count_flops_per_sample
from lightning_demp.demos.quiet import quiet_trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mnist1d_cnn.yaml"


def training_flop_ratio(events: list[dict[str, Any]], total_steps: int) -> float:
    """Dense training FLOPs / DemP training FLOPs, with FLOPs per step piecewise constant between removals."""
    used, kept, previous = 0.0, 1.0, 0
    for event in events:
        used += kept * (event["step"] - previous)
        kept, previous = event["flops_kept"], event["step"]
    used += kept * (total_steps - previous)
    return total_steps / used


def median_forward_seconds(model: nn.Module, batch: torch.Tensor, repeats: int) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(3):
            model(batch)
        for _ in range(repeats):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_times(config: dict[str, Any], with_demp: bool, epochs: int) -> list[float]:
    seed_everything(0)
    model, data = instantiate(config["model"]), instantiate(config["data"])
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if with_demp:  # regularization and noise active, hooks and logging on; no removal event inside the timed run
        callbacks.insert(0, DemonPruning(**STEADY_PRESSURE))
    trainer = quiet_trainer(".", max_epochs=epochs, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    return [seconds for _, seconds in timer.steps][5:]  # drop warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--round-to", action="store_true", help="measure round_to=1/8/16 instead (round_to.py)")
    args = parser.parse_args()
    if args.round_to:
        import round_to

        round_to.main(["--quick"] if args.quick else [])
        return
    torch.set_num_threads(2)
    config = with_recorded_betas(load_config(CONFIG))
    epochs = 10 if args.quick else config["trainer"]["max_epochs"]
    repeats = 2 if args.quick else 5

    # 1. Training speed: dense and DemP fits, interleaved.
    fits: dict[str, list[float]] = {"dense": [], "demp": []}
    keep: dict[str, Any] = {}
    flop_ratios = []
    for repeat in range(1 if args.quick else 2):
        fits["dense"].append(run_config(config, seed=repeat, with_demp=False, max_epochs=epochs)["fit_seconds"])
        demp_run = run_config(config, seed=repeat, with_demp=True, max_epochs=epochs, keep=keep)
        fits["demp"].append(demp_run["fit_seconds"])
        total_steps = epochs * 32
        flop_ratios.append(training_flop_ratio(demp_run["events"], total_steps))
    train_speedup = statistics.median(fits["dense"]) / statistics.median(fits["demp"])
    flop_speedup = statistics.median(flop_ratios)

    # 2. Inference: compact vs. dense vs. ModelPruning's masked model (same zeroed unit fraction, dense shapes).
    compact = keep["model"].net
    dense = instantiate(config["model"]).net
    unit_fraction = 1 - keep["callback"].ledger.units_kept_fraction()

    def masked_copy(model: nn.Module) -> nn.Module:  # a masked module's weight is not a leaf: copy, then mask
        copied = copy.deepcopy(model)
        for module in copied.modules():
            if isinstance(module, (nn.Conv1d, nn.Linear)) and module is not copied.head:
                torch.nn.utils.prune.ln_structured(module, "weight", amount=unit_fraction, n=1, dim=0)
        return copied

    masked = masked_copy(dense)
    permanent = masked_copy(dense)  # the same masks (L1 norms of the same weights), then made permanent
    for module in permanent.modules():
        if hasattr(module, "weight_orig"):
            torch.nn.utils.prune.remove(module, "weight")
    example = torch.zeros(1, 40)
    flop_ratio = count_flops_per_sample(dense, example) / count_flops_per_sample(compact, example)
    inference: dict[str, dict[str, float]] = {}
    for batch_size in (1, 256):
        batch = torch.randn(batch_size, 40)
        reps = 200 if batch_size == 1 else 30
        times: dict[str, list[float]] = {"dense": [], "compact": [], "masked": [], "masked_permanent": []}
        for _ in range(repeats):  # interleaved
            for name, model in (
                ("dense", dense),
                ("compact", compact),
                ("masked", masked),
                ("masked_permanent", permanent),
            ):
                times[name].append(median_forward_seconds(model, batch, reps))
        inference[str(batch_size)] = {name: statistics.median(values) for name, values in times.items()}

    # 3. Overhead when no removal happens: per-step time, interleaved repeats.
    overhead_epochs = 2 if args.quick else 4
    plain_medians, demp_medians = [], []
    for _ in range(repeats):
        plain_medians.append(statistics.median(step_times(config, False, overhead_epochs)))
        demp_medians.append(statistics.median(step_times(config, True, overhead_epochs)))
    overhead = statistics.median(demp_medians) / statistics.median(plain_medians) - 1

    payload = {
        "quick": args.quick,
        "epochs": epochs,
        "machine": machine(),
        "training": {
            "fit_seconds": fits,
            "speedup": train_speedup,
            "flop_speedup": flop_speedup,
            "speedup_over_flop_speedup": train_speedup / flop_speedup,
            "flop_ratios": flop_ratios,
        },
        "inference": {"seconds": inference, "flop_ratio": flop_ratio, "unit_fraction_removed": unit_fraction},
        "overhead": {"plain_step_median_s": plain_medians, "demp_step_median_s": demp_medians, "overhead": overhead},
    }
    suffix = "_quick" if args.quick else ""
    write_json(f"speed{suffix}.json", payload)
    lines = [
        f"# Speed on CPU: MNIST-1D residual CNN ({epochs} epochs)",
        "",
        "## Training (full fit, dense vs. DemP, interleaved)",
        "",
        "| dense fit (s) | DemP fit (s) | speedup | training-FLOP speedup | speedup / FLOP speedup |",
        "|---|---|---|---|---|",
        f"| {statistics.median(fits['dense']):.1f} | {statistics.median(fits['demp']):.1f} | {train_speedup:.2f}× | "
        f"{flop_speedup:.2f}× | {train_speedup / flop_speedup:.2f} |",
        "",
        f"## Inference (forward, eval, no grad; FLOP ratio dense/compact {flop_ratio:.2f}×)",
        "",
        "| batch | dense (ms) | compact (ms) | ModelPruning masked (ms) | masked, permanent (ms) | compact speedup | speedup / FLOP ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch_label, row in inference.items():
        speedup = row["dense"] / row["compact"]
        lines.append(
            f"| {batch_label} | {1e3 * row['dense']:.3f} | {1e3 * row['compact']:.3f} | {1e3 * row['masked']:.3f} | "
            f"{1e3 * row['masked_permanent']:.3f} | {speedup:.2f}× | {speedup / flop_ratio:.2f} |"
        )
    lines += [
        "",
        "## Callback overhead when no removal happens (median step time, interleaved)",
        "",
        "| plain step (ms) | with DemonPruning (ms) | overhead |",
        "|---|---|---|",
        f"| {1e3 * statistics.median(plain_medians):.2f} | {1e3 * statistics.median(demp_medians):.2f} | "
        f"{100 * overhead:+.1f} % |",
        "",
    ]
    write_report(f"speed{suffix}.md", lines, machine())


if __name__ == "__main__":
    main()

"""What ``round_to`` (widths kept multiples of N) costs in removal and gains in speed, for N = 1, 8 and 16 (CPU).

1. **Cost in removal:** the demo CNN config (MNIST-1D) trained with DemP and ``round_to=N``: the parameters
   removed and the test accuracy, against ``round_to=1`` (same seeds).
2. **Gain in speed:** training-step time (forward, backward, SGD step) of a compute-bound VGG-11 on synthetic
   32×32 images, at an irregular width profile a DemP run could leave (each layer at about 30 % of its width, odd
   counts) and at the same profile rounded up to multiples of 8 and 16. Interleaved repeats, median and range;
   the FLOP ratios beside them say how much of a difference is just the extra units.

    python benchmarks/round_to.py           # about 10 min on 2 CPU cores
    python benchmarks/round_to.py --quick   # smoke run
    python benchmarks/speed.py --round-to   # the same
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_jobs, load_config, machine, run_configs, with_recorded_betas, write_json, write_report

from lightning_demp.accounting import count_flops_per_sample, count_parameters
from lightning_demp.demos.cifar_models import VGG

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mnist1d_cnn.yaml"
MULTIPLES = (1, 8, 16)
VGG11: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def pruned_profile(config: list[int | str], keep: float) -> list[int | str]:
    """Each conv width times ``keep``, nudged to irregular counts (as DemP leaves them), at least 3."""
    widths: list[int | str] = []
    for index, entry in enumerate(config):
        if isinstance(entry, int):
            widths.append(max(3, round(entry * keep * (1 + 0.15 * math.sin(3 * index + 1)))))
        else:
            widths.append(entry)
    return widths


def rounded_up(config: list[int | str], multiple: int) -> list[int | str]:
    """Each width rounded up to a multiple of ``multiple`` (what ``round_to`` keeps)."""
    return [-(-entry // multiple) * multiple if isinstance(entry, int) else entry for entry in config]


def step_seconds(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Median seconds of one training step over ``steps`` steps, after 3 warm-up steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    times = []
    for index in range(steps + 3):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(batch), labels).backward()
        optimizer.step()
        if index >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed_part(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    base = pruned_profile(VGG11, keep=0.3)
    batch, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    models = {n: VGG(rounded_up(base, n), hidden=[64]) for n in MULTIPLES}
    example = batch[:1]
    figures: dict[str, Any] = {
        str(n): {
            "widths": [w for w in rounded_up(base, n) if isinstance(w, int)],
            "params": count_parameters(model),
            "flops": count_flops_per_sample(model, example),
            "step_seconds": [],
        }
        for n, model in models.items()
    }
    for _ in range(2 if quick else 5):  # interleaved repeats
        for n, model in models.items():
            figures[str(n)]["step_seconds"].append(step_seconds(model, batch, labels, 3 if quick else 15))
    return figures


def cost_part(quick: bool, seeds: int, epochs: int) -> dict[str, list[dict[str, Any]]]:
    config = with_recorded_betas(load_config(CONFIG))
    keys = [(n, seed) for n in MULTIPLES for seed in range(seeds)]
    tasks: list[dict[str, Any]] = [
        {"config": config, "seed": seed, "with_demp": True, "max_epochs": epochs, "callback_overrides": {"round_to": n}}
        for n, seed in keys
    ]
    grouped: dict[str, list[dict[str, Any]]] = {str(n): [] for n in MULTIPLES}
    for (n, _), run in zip(keys, run_configs(tasks, default_jobs()), strict=True):
        grouped[str(n)].append(run)
    return grouped


def _spread(values: list[float]) -> str:
    return f"{1e3 * statistics.median(values):.1f} ({1e3 * min(values):.1f}–{1e3 * max(values):.1f})"


def report(payload: dict[str, Any], name: str) -> None:
    speed, cost = payload["speed"], payload["cost"]
    base_time = statistics.median(speed["1"]["step_seconds"])
    lines = [
        f"# Widths kept multiples of N (`round_to`): cost in removal, gain in speed ({payload['epochs']} epochs)",
        "",
        "## Cost in removal: the demo CNN on MNIST-1D with `round_to=N`",
        "",
        "| N | params removed (%) | test acc (%) | seeds |",
        "|---|---|---|---|",
    ]
    for n, runs in cost.items():
        removed = [100 * run["params_removed"] for run in runs]
        accuracy = [100 * run["test_acc"] for run in runs]
        lines.append(
            f"| {n} | {statistics.mean(removed):.1f} ({min(removed):.1f}–{max(removed):.1f}) | "
            f"{statistics.mean(accuracy):.2f} ({min(accuracy):.2f}–{max(accuracy):.2f}) | {len(runs)} |"
        )
    lines += [
        "",
        "## Gain in speed: VGG-11 training step, batch 32 of 32×32, at a pruned width profile rounded up to N",
        "",
        "| N | conv widths | params | FLOPs vs N=1 | step (ms), median (range) | step time vs N=1 | time per FLOP vs N=1 |",
        "|---|---|---|---|---|---|---|",
    ]
    base_flops = speed["1"]["flops"]
    for n, row in speed.items():
        time_ratio = statistics.median(row["step_seconds"]) / base_time
        flop_ratio = row["flops"] / base_flops
        widths = ", ".join(str(w) for w in row["widths"])
        lines.append(
            f"| {n} | {widths} | {row['params']:,} | {flop_ratio:.3f} | {_spread(row['step_seconds'])} | "
            f"{time_ratio:.3f} | {time_ratio / flop_ratio:.3f} |"
        )
    lines += [
        "",
        "A time-per-FLOP ratio below 1 means the rounded widths run faster per FLOP than the irregular ones (the "
        "hardware gain); the FLOP column is what the units kept above the multiple cost. The step times come "
        "from one process, interleaved repeats.",
        "",
    ]
    write_report(f"{name}.md", lines, payload["machine"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--replot", action="store_true", help="redraw the table from the saved JSON")
    args = parser.parse_args(argv)
    name = "round_to_quick" if args.quick else "round_to"
    if args.replot:
        import json

        report(json.loads((Path(__file__).parent / "results" / f"{name}.json").read_text()), name)
        return
    torch.set_num_threads(2)
    epochs = 2 if args.quick else args.epochs
    speed = speed_part(args.quick)  # alone on the machine, before the accuracy runs fill both cores
    cost = cost_part(args.quick, 1 if args.quick else args.seeds, epochs)
    payload = {"quick": args.quick, "epochs": epochs, "machine": machine(), "speed": speed, "cost": cost}
    write_json(f"{name}.json", payload)
    report(payload, name)


if __name__ == "__main__":
    main()

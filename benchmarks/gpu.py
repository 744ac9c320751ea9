"""DemP on one accelerator: dense vs. compact training steps, compact vs. freshly built, and the callback's overhead.

The CIFAR ResNet-18 (`lightning_demp.demos.cifar_models.CIFARResNet`) on synthetic 32×32 batches, with bf16
autocast and channels_last on CUDA (fp32 on CPU):

1. **Training step, dense vs. compact:** the model pruned by DemP's own removal event at the width profiles a run
   reaches (about 50, 80 and 95 % of the parameters removed; the dead units are planted in every BatchNorm, then
   `DemonPruner.removal_event` removes them), timed against the dense model, next to the training-FLOP ratio.
2. **Compact vs. built:** the compact model against a model built at full size and shrunk to the same shapes before
   any training (`resize_like_` + ``load_state_dict``): what the in-place surgery costs, if anything.
3. **Overhead:** a training step with DemP's per-step work (λ·∇R before the step, σ noise after it) against the
   plain step, on the dense model, no removal.

Medians over interleaved repeats, with their range. Writes ``results/gpu.md`` and ``.json`` with the device name.

    python benchmarks/gpu.py           # on a GPU: under 5 minutes
    python benchmarks/gpu.py --quick   # any machine, CPU included: a smoke run (results/gpu_quick.*)
    python benchmarks/gpu.py           # on a machine without a GPU: the same on CPU, fp32 (results/train_speed_cpu.*)
    python benchmarks/gpu.py --round-to 1 8 16   # widths kept multiples of N (results/round_to_speed[_cpu].*)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json, write_report

from lightning_demp import DemonPruner, PruningConfig, resize_like_
from lightning_demp.accounting import count_flops_per_sample, count_parameters
from lightning_demp.demos.cifar_models import CIFARResNet

KEEP_FRACTIONS = (0.7, 0.45, 0.22)  # channels kept per BatchNorm: about 50, 80 and 95 % of the parameters removed


def resnet18(width_scale: float) -> nn.Module:
    return CIFARResNet([2, 2, 2, 2], widths=[max(4, int(w * width_scale)) for w in (64, 128, 256, 512)])


def plant_and_remove(
    model: nn.Module, keep: float, example: torch.Tensor, batches: list[torch.Tensor], round_to: int = 1
) -> nn.Module:
    """Make ``1 - keep`` of the channels of every BatchNorm dead (scale 0, shift -1), then let DemP remove them
    (keeping each width a multiple of ``round_to``)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                dead = torch.arange(int(module.num_features * keep), module.num_features)
                module.weight[dead], module.bias[dead] = 0.0, -1.0
    config = PruningConfig(
        reg_max=0.0, noise_std=0.0, check_batches=len(batches), recalibrate_bn=False, round_to=round_to
    )
    pruner = DemonPruner(config)
    pruner.prepare(model, example, total_steps=1)
    for batch in batches:
        pruner.remember_batch((batch, None))
    pruner.removal_event(model, [], step=1, epoch=0, final=True)
    pruner.release()
    return model


def built_like(compact: nn.Module, width_scale: float) -> nn.Module:
    """A model built at full size and shrunk to ``compact``'s shapes before any training."""
    fresh = resnet18(width_scale)
    resize_like_(fresh, compact.state_dict())
    fresh.load_state_dict(compact.state_dict())
    return fresh


class Stepper:
    """One training step (SGD with momentum) of a model on a fixed batch, optionally with DemP's per-step work."""

    def __init__(self, model: nn.Module, device: torch.device, batch: torch.Tensor, labels: torch.Tensor) -> None:
        self.model = model.to(device).train()
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            batch = batch.to(memory_format=torch.channels_last)
        self.batch, self.labels = batch.to(device), labels.to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.pruner: DemonPruner | None = None
        self.step_index = 0

    def with_demp(self, example: torch.Tensor) -> Stepper:
        self.pruner = DemonPruner(PruningConfig(reg_max=0.03, noise_std=5e-5, schedule="constant"))
        self.pruner.prepare(self.model, example.to(self.batch.device), total_steps=10**6)
        return self

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
        with autocast:
            loss = nn.functional.cross_entropy(self.model(self.batch), self.labels)
        loss.backward()
        if self.pruner is not None:
            self.pruner.regularize_(self.optimizer, self.model, self.step_index)
        self.optimizer.step()
        if self.pruner is not None:
            self.pruner.add_noise_()
        self.step_index += 1


def median_seconds(step: Callable[[], None], steps: int, cuda: bool) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(steppers: dict[str, Stepper], repeats: int, steps: int, cuda: bool) -> Iterator[tuple[str, float]]:
    for _ in range(repeats):
        for name, stepper in steppers.items():
            yield name, median_seconds(stepper, steps, cuda)


# An assumed width trajectory for the whole-run estimate, as fractions of the training steps: dense until the
# one-cycle peak (30 %: with a target, nothing is pulled before it), then each profile in turn until the end.
TRAJECTORY = ((None, 0.3), (KEEP_FRACTIONS[0], 0.2), (KEEP_FRACTIONS[1], 0.2), (KEEP_FRACTIONS[2], 0.3))


def whole_run(sizes: dict[str, dict[str, float]], median: dict[str, float]) -> list[str]:
    """The end-to-end training speedup over `TRAJECTORY`: dense time over the time-weighted compact steps."""
    step_time, flops = 0.0, 0.0
    for keep, share in TRAJECTORY:
        key = "dense" if keep is None else f"keep {keep:.2f} compact"
        step_time += share * median[key]
        flops += share / (1.0 if keep is None else sizes[f"keep {keep:.2f}"]["flop_ratio"])
    speedup, flop_speedup = median["dense"] / step_time, 1 / flops
    steps = ", ".join(
        f"{100 * share:.0f} % {'dense' if keep is None else f'keep {keep:.2f}'}" for keep, share in TRAJECTORY
    )
    return [
        f"Whole-run estimate over an assumed trajectory ({steps} of the steps): {speedup:.2f}× faster training "
        f"for a {flop_speedup:.2f}× training-FLOP speedup ({speedup / flop_speedup:.2f} of it).",
        "",
    ]


def round_to_main(args: argparse.Namespace, device: torch.device, batch: torch.Tensor, labels: torch.Tensor) -> None:
    """``--round-to N ...``: the compact models at each profile with their widths rounded up to multiples of N."""
    cuda, (width_scale, repeats, steps) = device.type == "cuda", settings(args.quick, device)
    example, check_batches = batch[:2], [torch.randn(32, 3, 32, 32) for _ in range(2)]
    dense_flops = count_flops_per_sample(resnet18(width_scale), example)
    steppers: dict[str, Stepper] = {}
    flops: dict[str, float] = {}
    for keep in KEEP_FRACTIONS:
        for multiple in args.round_to:
            compact = plant_and_remove(resnet18(width_scale), keep, example, check_batches, round_to=multiple)
            key = f"keep {keep:.2f}, N={multiple}"
            flops[key] = count_flops_per_sample(compact, example)
            steppers[key] = Stepper(compact, device, batch, labels)
    seconds: dict[str, list[float]] = {name: [] for name in steppers}
    for name, value in interleaved(steppers, repeats, steps, cuda):
        seconds[name].append(value)
    median = {key: statistics.median(values) for key, values in seconds.items()}
    name = "round_to_speed" + ("_quick" if args.quick else "" if cuda else "_cpu")
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    write_json(f"{name}.json", {"device": device_name, "seconds": seconds, "flops": flops, "machine": machine()})
    lines = [
        f"# Widths rounded to multiples of N on {device_name}: CIFAR ResNet-18 (width ×{width_scale}), "
        f"batch {len(batch)}",
        "",
        "The compact models of `gpu.py`, each removal event run with `round_to=N` (a width stops at the multiple "
        f"at or above what it would leave). {repeats} interleaved repeats of {steps} steps; medians with their range.",
        "",
        "| profile | N | FLOP ratio dense/model | step (ms), median (range) | step vs N=1 | time per FLOP vs N=1 |",
        "|---|---|---|---|---|---|",
    ]
    for keep in KEEP_FRACTIONS:
        base = f"keep {keep:.2f}, N={args.round_to[0]}"
        for multiple in args.round_to:
            key = f"keep {keep:.2f}, N={multiple}"
            per_flop = (median[key] / flops[key]) / (median[base] / flops[base])
            lines.append(
                f"| keep {keep:.2f} | {multiple} | {dense_flops / flops[key]:.2f} | {1e3 * median[key]:.2f} "
                f"({1e3 * min(seconds[key]):.2f}–{1e3 * max(seconds[key]):.2f}) | "
                f"{median[key] / median[base]:.3f} | {per_flop:.3f} |"
            )
    write_report(f"{name}.md", [*lines, ""], machine())


def settings(quick: bool, device: torch.device) -> tuple[float, int, int]:
    """Width scale, repeats and steps per repeat."""
    cuda = device.type == "cuda"
    width_scale = 0.25 if quick else 1.0
    repeats, steps = (2, 3) if quick else (5, 20 if cuda else 4)  # a CPU step of the dense model: about 0.4 s
    return width_scale, repeats, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run on any machine (a quarter-width model)")
    parser.add_argument("--round-to", type=int, nargs="+", help="only compare widths rounded to these multiples")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    width_scale, repeats, steps = settings(args.quick, device)
    batch_size = 16 if args.quick else 256 if cuda else 32
    torch.manual_seed(0)
    batch, labels = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    if args.round_to:
        round_to_main(args, device, batch, labels)
        return
    example = batch[:2]
    check_batches = [torch.randn(32, 3, 32, 32) for _ in range(2)]

    dense_model = resnet18(width_scale)
    dense_flops, dense_params = count_flops_per_sample(dense_model, example), count_parameters(dense_model)
    steppers: dict[str, Stepper] = {"dense": Stepper(dense_model, device, batch, labels)}
    sizes: dict[str, dict[str, float]] = {"dense": {"params_removed": 0.0, "flop_ratio": 1.0}}
    for keep in KEEP_FRACTIONS:
        compact = plant_and_remove(resnet18(width_scale), keep, example, check_batches)
        label = f"keep {keep:.2f}"
        sizes[label] = {
            "params_removed": 1 - count_parameters(compact) / dense_params,
            "flop_ratio": dense_flops / count_flops_per_sample(compact, example),
        }
        built = built_like(compact, width_scale)
        steppers[f"{label} compact"] = Stepper(compact, device, batch, labels)
        steppers[f"{label} built"] = Stepper(built, device, batch, labels)
    steppers["dense + DemP per-step work"] = Stepper(resnet18(width_scale), device, batch, labels).with_demp(example)
    seconds: dict[str, list[float]] = {name: [] for name in steppers}
    for name, value in interleaved(steppers, repeats, steps, cuda):
        seconds[name].append(value)

    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    payload: dict[str, Any] = {
        "quick": args.quick,
        "device": device_name,
        "precision": "bf16 autocast, channels_last" if cuda else "fp32",
        "batch_size": batch_size,
        "width_scale": width_scale,
        "sizes": sizes,
        "step_seconds": seconds,
        "machine": machine(),
    }
    name = "gpu_quick" if args.quick else ("gpu" if cuda else "train_speed_cpu")
    write_json(f"{name}.json", payload)
    median = {key: statistics.median(values) for key, values in seconds.items()}
    lines = [
        f"# DemP on {device_name}: CIFAR ResNet-18 (width ×{width_scale}), batch {batch_size}, {payload['precision']}",
        "",
        "| model | params removed (%) | FLOP ratio dense/model | step (ms), median (range) | speedup vs dense | "
        "speedup / FLOP ratio |",
        "|---|---|---|---|---|---|",
    ]
    for label, size in sizes.items():
        for kind in ("compact", "built") if label != "dense" else ("",):
            key = f"{label} {kind}".strip()
            speedup = median["dense"] / median[key]
            lines.append(
                f"| {key} | {100 * size['params_removed']:.1f} | {size['flop_ratio']:.2f} | "
                f"{1e3 * median[key]:.2f} ({1e3 * min(seconds[key]):.2f}–{1e3 * max(seconds[key]):.2f}) | "
                f"{speedup:.2f}× | {speedup / size['flop_ratio']:.2f} |"
            )
    overhead = median["dense + DemP per-step work"] / median["dense"] - 1
    lines += ["", f"Per-step overhead of DemP's λ·∇R and noise on the dense model: {100 * overhead:+.1f} %.", ""]
    lines += whole_run(sizes, median)
    write_report(f"{name}.md", lines, payload["machine"])


if __name__ == "__main__":
    main()

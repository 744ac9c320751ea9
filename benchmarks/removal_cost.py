"""Cost of one DemP removal event on the CIFAR ResNet-18 and VGG-16, against a training step and an epoch (CPU).

A removal event, as ``DemonPruner.removal_event`` runs it: the dead check (an eval-mode pass over
``check_batches`` training batches with the activity hooks attached), planning (group statistics → dead units),
the surgery (``remove_units_``), the reordering that keeps each ``ChannelSelect`` one contiguous run
(``order_routed_channels_``), the optimizer remap (AdamW moments sliced in place), rewrapping DDP
(a no-op on one device, not timed) and the bookkeeping after a removal (a new activity monitor for the new widths
and a FLOP recount). Building the dependency graph happens once per fit and is reported apart.

Procedure, per model: AdamW (lr 5e-3, wd 5e-4), two training steps on random batch-128 inputs (the second is timed:
"one training step"), then, on a fresh ``copy.deepcopy`` of the model and optimizer each time, ~10 % of the channels
of every BatchNorm inside the residual blocks (each block's ``bn1``: ``bn2`` and shortcut BNs feed the residual
stream, where a planted channel is not dead) or of VGG's feature extractor are made dead (scale 0, shift -1), and
each piece of the event is timed with ``time.perf_counter``. The event is repeated on 3 fresh copies; medians are
reported. Outputs are checked to be unchanged by the removal (eval mode), outside the timings.

    python benchmarks/removal_cost.py           # ResNet-18 and VGG-16, 3 repeats (a few minutes on 2 CPU cores)
    python benchmarks/removal_cost.py --quick   # ResNet-18 only, 1 repeat

Writes ``benchmarks/results/removal_cost.json`` and ``removal_cost.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_json

from lightning_demp import DemonPruner, PruningConfig
from lightning_demp.accounting import count_flops_per_sample, count_parameters
from lightning_demp.demos.cifar_models import cifar_resnet18, cifar_vgg16_bn
from lightning_demp.detection import ActivationMonitor, dead_check
from lightning_demp.graph import PrunableGraph
from lightning_demp.optim import remap_optimizer_
from lightning_demp.permutation import order_routed_channels_
from lightning_demp.policy import decide_removal
from lightning_demp.removal import remove_units_

STEPS_PER_EPOCH = 390  # 50,000 CIFAR-10 training images at batch 128
CHECK_BATCHES = 3
DEAD_FRACTION = 0.10
HOOK_PAIRS = 7  # alternating forwards with and without the activity hooks
MODELS: dict[str, Callable[[], nn.Module]] = {"ResNet-18": cifar_resnet18, "VGG-16-BN": cifar_vgg16_bn}
PIECES = ["dead_check", "plan", "remove_units", "reorder", "remap_optimizer", "bookkeeping"]
LABELS = {
    "graph_build": "graph build (`PrunableGraph`, once per fit)",
    "dead_check": f"dead check (eval pass, {CHECK_BATCHES} × 128 images, hooks on)",
    "plan": "planning (`graph.groups()` + `decide_removal`)",
    "remove_units": "surgery (`remove_units_`)",
    "reorder": "reordering for the selections (`order_routed_channels_`)",
    "remap_optimizer": "optimizer remap (`remap_optimizer_`, AdamW)",
    "ddp_rewrap": "DDP rewrap",
    "bookkeeping": "bookkeeping (new monitor + FLOP recount)",
}


def random_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch_size, 3, 32, 32, generator=generator), torch.randint(
        0, 10, (batch_size,), generator=generator
    )


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """One forward, backward and AdamW step; returns its seconds."""
    model.train()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()
    return time.perf_counter() - start


def plant_dead_(model: nn.Module, fraction: float, generator: torch.Generator) -> dict[str, int]:
    """Kill ``fraction`` of the channels of every block-internal BatchNorm (scale 0, shift -1); returns counts."""
    if hasattr(model, "features"):  # VGG: every BatchNorm of the feature extractor
        norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    else:  # ResNet: the first BatchNorm of every residual block (its channels stay inside the block)
        norms = {name: m for name, m in model.named_modules() if name.startswith("layer") and name.endswith(".bn1")}
    planted = {}
    with torch.no_grad():
        for name, norm in norms.items():
            count = max(1, round(fraction * norm.num_features))
            units = torch.randperm(norm.num_features, generator=generator)[:count]
            norm.weight[units] = 0.0
            norm.bias[units] = -1.0
            planted[name] = count
    return planted


def removal_event(
    model: nn.Module, optimizer: torch.optim.Optimizer, check: list[torch.Tensor], example: torch.Tensor
) -> dict[str, Any]:
    """Time each piece of one removal event on ``model`` (already planted); returns seconds and counts."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    graph = PrunableGraph(model, example)
    monitor = ActivationMonitor(graph.readers())
    seconds["graph_build"] = time.perf_counter() - start  # with the first monitor, as DemonPruning's setup does

    removable = {g.name for g in graph.groups() if g.blocked is None}

    start = time.perf_counter()
    stats = dead_check(model, monitor, check, lambda module, batch: module(batch))
    seconds["dead_check"] = time.perf_counter() - start

    start = time.perf_counter()
    plan = decide_removal(model, graph.groups(), stats, threshold=0.0, min_units=1, removable=removable).plan.units
    seconds["plan"] = time.perf_counter() - start

    start = time.perf_counter()
    remaps = remove_units_(graph, plan)
    seconds["remove_units"] = time.perf_counter() - start

    start = time.perf_counter()
    _, order_remaps = order_routed_channels_(graph)
    seconds["reorder"] = time.perf_counter() - start

    start = time.perf_counter()
    remap_optimizer_(optimizer, remaps + order_remaps)
    seconds["remap_optimizer"] = time.perf_counter() - start

    start = time.perf_counter()
    ActivationMonitor(graph.readers())
    count_flops_per_sample(model, example)
    seconds["bookkeeping"] = time.perf_counter() - start

    return {"seconds": seconds, "removed": {name: len(idxs) for name, idxs in plan.items()}}


def whole_event_seconds(
    model: nn.Module, optimizer: torch.optim.Optimizer, check: list[torch.Tensor], example: torch.Tensor
) -> tuple[float, int]:
    """``DemonPruner.removal_event`` itself on ``model`` (already planted), given the dead check's statistics: the
    check's forwards, and the BatchNorm recalibration's, are left out. Timed at a fit's second removal: the first
    one (untimed) removes the planted units and checks the FLOP tally against torch's counter, then more channels
    die in the same layers and the timed event removes them. Returns its seconds and the units it removed."""
    pruner = DemonPruner(PruningConfig(reg_max=0.0, noise_std=0.0, check_batches=len(check), recalibrate_bn=False))
    pruner.prepare(model, example, total_steps=1)
    for batch in check:
        pruner.remember_batch((batch, None))
    pruner.removal_event(model, [optimizer], pruner.statistics(model), step=1, epoch=0, final=True)
    plant_dead_(model, DEAD_FRACTION / 2, torch.Generator().manual_seed(1))  # more, in the layers already shrunk
    stats = pruner.statistics(model)
    start = time.perf_counter()
    event = pruner.removal_event(model, [optimizer], stats, step=2, epoch=1, final=True)
    seconds = time.perf_counter() - start
    pruner.release()
    return seconds, 0 if event is None else sum(event.removed.values())


def hooks_seconds_per_batch(model: nn.Module, batch: torch.Tensor, pairs: int = HOOK_PAIRS) -> float:
    """What the activity hooks add to one forward of ``batch``: the median over ``pairs`` alternating forwards with
    and without them (a difference of two whole dead-check timings is too noisy on a shared machine)."""
    monitor = ActivationMonitor(PrunableGraph(model, batch[:2]).readers())
    differences = []
    with torch.no_grad():
        model(batch)  # warm-up
        for index in range(pairs):
            seconds = {}
            for hooked in (True, False) if index % 2 == 0 else (False, True):
                start = time.perf_counter()
                if hooked:
                    with monitor.observe():
                        model(batch)
                else:
                    model(batch)
                seconds[hooked] = time.perf_counter() - start
            differences.append(seconds[True] - seconds[False])
    return max(0.0, statistics.median(differences))


def measure(name: str, repeats: int, step_batch: int, seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MODELS[name]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=5e-4)
    params_before = count_parameters(model)
    train_step(model, optimizer, random_batch(step_batch, generator))
    step_seconds = train_step(model, optimizer, random_batch(step_batch, generator))
    print(f"{name}: one training step at batch {step_batch}: {step_seconds:.2f} s", flush=True)

    check = [random_batch(128, generator)[0] for _ in range(CHECK_BATCHES)]
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for batch in check:
            model(batch)
    plain_eval_seconds = time.perf_counter() - start  # the dead check's pass without the activity hooks
    hooks_per_batch = hooks_seconds_per_batch(model, check[0])
    example = torch.randn(2, 3, 32, 32, generator=generator)
    probe = check[0][:8]  # units are removed for being dead on the check batches: compare on them
    events = []
    for repeat in range(repeats):
        fresh_model, fresh_optimizer = copy.deepcopy((model, optimizer))
        planted = plant_dead_(fresh_model, DEAD_FRACTION, generator)
        fresh_model.eval()
        with torch.no_grad():  # in float64: the removed channels are exact zeros, the rest is rounding
            expected = copy.deepcopy(fresh_model).double()(probe.double())
        twin_model, twin_optimizer = copy.deepcopy((fresh_model, fresh_optimizer))  # the same planted model
        event = removal_event(fresh_model, fresh_optimizer, check, example)
        event["whole_event_seconds"], event["whole_event_removed"] = whole_event_seconds(
            twin_model, twin_optimizer, check, example
        )
        assert event["whole_event_removed"] > 0, "the second removal removed nothing"
        del twin_model, twin_optimizer
        with torch.no_grad():
            torch.testing.assert_close(copy.deepcopy(fresh_model).eval().double()(probe.double()), expected)
        missing = {layer: n for layer, n in planted.items() if n > event["removed"].get(_conv_of(layer), 0)}
        assert not missing, f"planted units not removed: {missing}"
        train_step(fresh_model, fresh_optimizer, random_batch(8, generator))  # the pruned model still trains
        event["planted"] = sum(planted.values())
        by_conv = {_conv_of(layer): n for layer, n in planted.items()}
        event["removed_not_planted"] = {
            group: n - by_conv.get(group, 0) for group, n in event["removed"].items() if n > by_conv.get(group, 0)
        }
        event["params_after"] = count_parameters(fresh_model)
        events.append(event)
        total = sum(event["seconds"][piece] for piece in PIECES)
        print(
            f"  event {repeat + 1}/{repeats}: {total:.2f} s (+ graph build {event['seconds']['graph_build']:.2f} s), "
            f"removed {sum(event['removed'].values())} units",
            flush=True,
        )
        del fresh_model, fresh_optimizer

    median = {key: statistics.median(e["seconds"][key] for e in events) for key in ["graph_build", *PIECES]}
    event_seconds = statistics.median(sum(e["seconds"][piece] for piece in PIECES) for e in events)
    with_graph = statistics.median(sum(e["seconds"][p] for p in ["graph_build", *PIECES]) for e in events)
    epoch_seconds = STEPS_PER_EPOCH * step_seconds * (128 / step_batch)
    # check_mode="train_forwards": no eval pass; the hooks ride on the last training forwards of the epoch.
    without_check = statistics.median(sum(e["seconds"][p] for p in PIECES if p != "dead_check") for e in events)
    train_forwards_seconds = without_check + CHECK_BATCHES * hooks_per_batch
    return {
        "model": name,
        "params_before": params_before,
        "params_after": events[0]["params_after"],
        "units_planted": events[0]["planted"],
        "units_removed": sum(events[0]["removed"].values()),
        "removed_not_planted": events[0]["removed_not_planted"],
        "repeats": repeats,
        "median_seconds": median,
        "event_seconds": event_seconds,
        "event_with_graph_seconds": with_graph,
        "plain_eval_pass_seconds": plain_eval_seconds,
        "step_batch": step_batch,
        "step_seconds": step_seconds,
        "epoch_seconds_estimate": epoch_seconds,
        "hooks_seconds_per_batch": hooks_per_batch,
        "event_without_check_seconds": without_check,
        "event_train_forwards_seconds": train_forwards_seconds,
        "whole_event_seconds": [e["whole_event_seconds"] for e in events],
        "event_over_step": event_seconds / step_seconds,
        "event_over_epoch": event_seconds / epoch_seconds,
        "event_with_graph_over_epoch": with_graph / epoch_seconds,
        "events": events,
    }


def _conv_of(norm_name: str) -> str:
    """The conv whose channels a planted BatchNorm carries: ``layer1.0.bn1`` → ``layer1.0.conv1``, ``features.1`` →
    ``features.0``."""
    if norm_name.endswith(".bn1"):
        return norm_name[: -len("bn1")] + "conv1"
    prefix, _, index = norm_name.rpartition(".")
    return f"{prefix}.{int(index) - 1}"


def _top(counts: dict[str, int], n: int = 3) -> str:
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    text = ", ".join(f"`{name}` {count:,}" for name, count in ranked[:n])
    return text + (", ..." if len(ranked) > n else "") if ranked else "none"


def markdown(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    names = [r["model"] for r in results]
    repeats = results[0]["repeats"]
    lines = [
        "# Cost of one removal event (CPU)",
        "",
        f"CIFAR-shaped random inputs, AdamW; {DEAD_FRACTION:.0%} of the channels of every block-internal BatchNorm "
        f"planted dead; median of {repeats} event(s) on fresh copies (`python benchmarks/removal_cost.py`).",
        "",
        "| seconds | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key in ["graph_build", *PIECES[:-1], "ddp_rewrap", PIECES[-1]]:
        if key == "ddp_rewrap":
            cells = ["0 (no-op on one device)"] * len(results)
        else:
            cells = [f"{r['median_seconds'][key]:.3f}" for r in results]
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    rows = [
        ("**event total, without graph build**", lambda r: f"**{r['event_seconds']:.2f}**"),
        (
            f"for reference: the same eval pass without hooks ({CHECK_BATCHES} × 128 images)",
            lambda r: f"{r['plain_eval_pass_seconds']:.2f}",
        ),
        ("event total, with graph build", lambda r: f"{r['event_with_graph_seconds']:.2f}"),
        (
            f"activity hooks per observed batch (median of {HOOK_PAIRS} alternating forwards with and without them)",
            lambda r: f"{r['hooks_seconds_per_batch']:.3f}",
        ),
        (
            "event without the check (planning + surgery + reordering + remap + bookkeeping)",
            lambda r: f"{r['event_without_check_seconds']:.2f}",
        ),
        (
            "**`DemonPruner.removal_event` itself, given the check's statistics**, at a fit's second removal "
            "(more channels dead in the layers the first one shrank; median, range over the repeats)",
            lambda r: (
                f"**{statistics.median(r['whole_event_seconds']):.3f}** "
                f"({min(r['whole_event_seconds']):.3f}–{max(r['whole_event_seconds']):.3f})"
            ),
        ),
        (
            f'**event total, `check_mode="train_forwards"`** (hooks on the last {CHECK_BATCHES} training forwards, no eval pass)',
            lambda r: f"**{r['event_train_forwards_seconds']:.2f}**",
        ),
        (
            "one training step (forward + backward + AdamW)",
            lambda r: f"{r['step_seconds']:.2f} (batch {r['step_batch']})",
        ),
        (
            f"one epoch, estimated ({STEPS_PER_EPOCH} steps at batch 128)",
            lambda r: f"{r['epoch_seconds_estimate']:.0f}",
        ),
        ("event / training step", lambda r: f"{r['event_over_step']:.2f}×"),
        ("event / epoch", lambda r: f"{r['event_over_epoch']:.2%}"),
        ("event with graph build / epoch", lambda r: f"{r['event_with_graph_over_epoch']:.2%}"),
        ("units planted / removed", lambda r: f"{r['units_planted']} / {r['units_removed']}"),
        ("parameters before → after", lambda r: f"{r['params_before']:,} → {r['params_after']:,}"),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")
    notes = [
        "",
        "Notes:",
        f"- The dead check dominates and grows linearly with `check_batches` ({CHECK_BATCHES} here; the callback's "
        "default is 12, the paper's CIFAR check sees 1,536 images = 12 batches of 128).",
        '- With `check_mode="train_forwards"` the statistics come from the epoch\'s last training forwards, so the '
        "event pays only the hooks' reductions on those batches, not a forward pass of its own; that is the row to "
        'hold against the 1 s goal. The eval pass of `check_mode="eval_pass"` (the paper\'s check) costs what '
        "`check_batches` forwards cost on the machine: several seconds on 2 CPU cores for ResNet-18.",
        "- The epoch estimate scales the timed step to 390 steps of batch 128"
        + (
            " (the step was timed at a smaller batch and scaled linearly)."
            if any(r["step_batch"] != 128 for r in results)
            else "."
        ),
        "- Besides the planted units, the check finds units that are dead on these random inputs after the two "
        "AdamW steps (lr 5e-3), and removes them too: "
        + "; ".join(
            f"{r['model']}: {sum(r['removed_not_planted'].values()):,} ({_top(r['removed_not_planted'])})"
            for r in results
        )
        + ".",
        "- Outputs are checked unchanged by each removal (eval mode), and the pruned model takes a training step.",
        f"- Machine: {info['platform']}, {info['cpu_count']} CPU(s), torch {info['torch']} "
        f"({info['torch_threads']} threads); load average at start {info['load_average']}. Other processes "
        "sharing the 2 cores slow every figure, not always by the same factor; treat them as rough.",
    ]
    return "\n".join(lines + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ResNet-18 only, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vgg-step-batch", type=int, default=128, help="batch of VGG's timed step (scaled to 128)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    info = {**machine(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    names = ["ResNet-18"] if args.quick else list(MODELS)
    repeats = 1 if args.quick else args.repeats
    results = [measure(name, repeats, args.vgg_step_batch if name.startswith("VGG") else 128) for name in names]
    payload = {"machine": info, "check_batches": CHECK_BATCHES, "dead_fraction": DEAD_FRACTION, "results": results}
    suffix = "_quick" if args.quick else ""
    path = write_json(f"removal_cost{suffix}.json", payload)
    (RESULTS / f"removal_cost{suffix}.md").write_text(markdown(results, info))
    print(markdown(results, info))
    print(f"Wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()

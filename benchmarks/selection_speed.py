"""What the decoupled residual channels cost: a compact model with `ChannelSelect` shortcuts against a statically
pruned model of the same widths (CPU).

The demo CNN (``ResidualCNNBackbone``, decoupled) has units removed at random through the surgery, so that each
block's input and output channel sets differ, as after a decoupled DemP run, in two configurations: a share of every
prunable group (``--fraction``), and the widths the committed demo run ended with (``demo_vs_dense.json``, seed 0:
a block input stream about half gone, its output stream nearly whole). The
*static* model is a deep copy whose every block adds the first ``k`` channels of its input into the first ``k``
of its branch in place (``k`` the smaller width): the cheapest sum a statically pruned network of those widths
could have. Both are timed in alternating single calls (median of the per-pair ratios) for inference at batch 1 and 256 (eval, no grad)
and for a training step (forward, backward, AdamW) at batch 128.

Writes ``benchmarks/results/selection_speed.json`` and ``.md``.

    python benchmarks/selection_speed.py           # about 2 min on 2 CPU cores
    python benchmarks/selection_speed.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_json, write_report

from lightning_demp.demos import ResidualBlock1d, ResidualCNNBackbone
from lightning_demp.graph import PrunableGraph
from lightning_demp.permutation import order_routed_channels_
from lightning_demp.removal import remove_units_
from lightning_demp.selection import ChannelSelect


class StaticSum(nn.Module):
    """The cheapest residual sum from ``in_channels`` to ``out_channels`` channels, as a statically pruned network
    would have it: ``branch[:, :k] += x[:, :k]`` in place, with ``k`` the smaller width (no gather, no padding)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels

    def add_to_(self, branch: Tensor, x: Tensor) -> Tensor:
        shared = min(self.in_channels, self.out_channels)
        branch[:, :shared] += x[:, :shared]
        return branch


def _static_block_forward(block: ResidualBlock1d, x: Tensor) -> Tensor:
    assert isinstance(block.shortcut, StaticSum)
    branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    return F.relu(block.shortcut.add_to_(branch, x))


DEMO_RESULTS = RESULTS / "demo_vs_dense.json"


def demo_widths() -> dict[str, int]:
    """The layer widths the committed demo run (seed 0, DemP) ended with, keyed by the backbone's layer names."""
    runs = json.loads(DEMO_RESULTS.read_text())["runs"]
    widths = next(run for run in runs if run["demp"] and run["seed"] == 0)["widths"]
    return {name.removeprefix("net."): width for name, width in widths.items()}


def pruned_pair(
    seed: int, fraction: float | None = None, widths: dict[str, int] | None = None, reorder: bool = True
) -> tuple[nn.Module, nn.Module, dict[str, dict[str, Any]]]:
    """The compact decoupled model with random units removed, and its static twin.

    Either ``fraction`` of every group's units go, or each group keeps ``widths[group]`` units. With ``reorder``
    the units are then reordered as `DemonPruning` does after each removal (`order_routed_channels_`), so that each
    selection routes one contiguous run; without it, the routed channels stay scattered.
    """
    torch.manual_seed(seed)
    model = ResidualCNNBackbone(width=64, decoupled=True)
    graph = PrunableGraph(model, torch.zeros(2, 40))
    generator = torch.Generator().manual_seed(seed)
    plan = {}
    for group in graph.groups():
        if group.blocked is None and group.num_units > 1:
            if widths is not None:
                count = group.num_units - widths.get(group.name, group.num_units)
            else:
                assert fraction is not None
                count = min(group.num_units - 1, round(fraction * group.num_units))
            plan[group.name] = torch.randperm(group.num_units, generator=generator)[:count].sort().values
    remove_units_(graph, plan)
    if reorder:
        order_routed_channels_(graph)
    static = copy.deepcopy(model)
    sides = {}
    for name, module in list(static.named_modules()):
        if isinstance(module, ChannelSelect):
            parent_name, _, child = name.rpartition(".")
            parent = static.get_submodule(parent_name) if parent_name else static
            setattr(parent, child, StaticSum(module.in_channels, module.out_channels))
            assert isinstance(parent, ResidualBlock1d)
            parent.forward = types.MethodType(_static_block_forward, parent)  # type: ignore[method-assign]
            sides[name] = {
                "in": module.in_channels,
                "out": module.out_channels,
                "routed": module.routed_channels,
                "runs": len(module.segments),
                "path at batch 256": module.sum_path(torch.zeros(256, module.in_channels, 20)),
            }
    return model.eval(), static.eval(), sides


def paired(run_compact: Callable[[], object], run_static: Callable[[], object], pairs: int) -> dict[str, float]:
    """Alternate single calls of each; medians of each and of the per-pair ratio (slow drifts cancel)."""
    for _ in range(5):
        run_compact(), run_static()
    compact_s, static_s, ratios = [], [], []
    for index in range(pairs):
        order = (run_compact, run_static) if index % 2 == 0 else (run_static, run_compact)
        seconds = {}
        for run in order:
            start = time.perf_counter()
            run()
            seconds[run] = time.perf_counter() - start
        compact_s.append(seconds[run_compact])
        static_s.append(seconds[run_static])
        ratios.append(seconds[run_static] / seconds[run_compact])
    return {
        "compact_s": statistics.median(compact_s),
        "static_s": statistics.median(static_s),
        "speed": statistics.median(ratios),
    }


def step_of(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Tensor, target: Tensor) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch), target).backward()
        optimizer.step()

    return step


def measure(compact: nn.Module, static: nn.Module, runs: int, scale: int) -> list[dict[str, Any]]:
    """Inference at batch 1 and 256 and a training step, each measured ``runs`` times; one row per setting."""
    x = torch.randn(256, 40)
    with torch.no_grad():
        torch.testing.assert_close(compact(x).shape, static(x).shape)
    train_models = {"compact": copy.deepcopy(compact).train(), "static": copy.deepcopy(static).train()}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-3) for name, model in train_models.items()}
    batch_128, target_128 = torch.randn(128, 40), torch.randint(0, 10, (128,))
    measured: dict[str, list[dict[str, float]]] = {}
    for _ in range(runs):  # whole measurements repeated: this machine's speed drifts between them
        with torch.no_grad():
            measured.setdefault("inference batch 1", []).append(
                paired(lambda: compact(x[:1]), lambda: static(x[:1]), 250 * scale)
            )
            measured.setdefault("inference batch 256", []).append(
                paired(lambda: compact(x), lambda: static(x), 50 * scale)
            )
        measured.setdefault("training step batch 128", []).append(
            paired(
                step_of(train_models["compact"], optimizers["compact"], batch_128, target_128),
                step_of(train_models["static"], optimizers["static"], batch_128, target_128),
                25 * scale,
            )
        )
    rows = []
    for setting, repeats in measured.items():
        speeds = [run["speed"] for run in repeats]
        rows.append(
            {
                "setting": setting,
                "compact_s": statistics.median(run["compact_s"] for run in repeats),
                "static_s": statistics.median(run["static_s"] for run in repeats),
                "speed": statistics.median(speeds),
                "speed_min": min(speeds),
                "speed_max": max(speeds),
                "speeds": speeds,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fraction", type=float, default=0.6, help="share of every group's units removed")
    parser.add_argument("--runs", type=int, default=5, help="how many times the whole measurement is repeated")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs, scale = (1, 1) if args.quick else (args.runs, 4)
    share = f"{100 * args.fraction:.0f} % of every group removed at random"
    configurations = {
        f"{share}, units reordered after removal (what `DemonPruning` does)": pruned_pair(0, fraction=args.fraction),
        "the demo run's final widths (units chosen at random), reordered": pruned_pair(0, widths=demo_widths()),
        f"{share}, routed channels left scattered (no reordering)": pruned_pair(
            0, fraction=args.fraction, reorder=False
        ),
    }
    results: list[dict[str, Any]] = []
    for label, (compact, static, sides) in configurations.items():
        params = sum(p.numel() for p in compact.parameters())
        rows = measure(compact, static, runs, scale)
        results.append({"configuration": label, "selections": sides, "params": params, "rows": rows})
    suffix = "_quick" if args.quick else ""
    write_json(f"selection_speed{suffix}.json", {"machine": machine(), "fraction": args.fraction, "results": results})
    lines = [
        "# Decoupled residual channels: compact model vs. a statically pruned model of the same widths (CPU)",
        "",
        "Demo CNN with units removed at random through the surgery, then (as `DemonPruning` does after each "
        "removal) reordered so that each selection's routed channels form one contiguous run on both sides. The "
        "compact model's blocks add the routed shortcut channels into the branch output in place (`residual_sum`: "
        "slice adds for a few runs, a gather otherwise); the static twin's blocks add the "
        "first k input channels into the first k branch channels in place (k the smaller width), the cheapest sum "
        "a statically pruned network of those widths could have. Single calls of the two models alternate "
        "(the order flips every pair); a measurement gives the median time of each and the median of the per-pair "
        f"speed ratio; the measurement is repeated {runs} times, and the tables give the median over those, with "
        "the lowest and highest speed ratio.",
    ]
    for result in results:
        lines += [
            "",
            f"**{result['configuration']}** ({result['params']:,} parameters left; selections: "
            + ", ".join(
                f"`{name}` {side['in']} → {side['out']} channels, {side['routed']} routed in {side['runs']} "
                f"run(s), `{side['path at batch 256']}` path at batch 256"
                for name, side in result["selections"].items()
            )
            + ")",
            "",
            "| setting | compact, ChannelSelect (ms) | static, same widths (ms) | compact speed / static speed | "
            "lowest – highest over the repeats |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['setting']} | {1e3 * r['compact_s']:.3f} | {1e3 * r['static_s']:.3f} | {r['speed']:.3f} | "
            f"{r['speed_min']:.3f} – {r['speed_max']:.3f} |"
            for r in result["rows"]
        ]
    write_report(f"selection_speed{suffix}.md", [*lines, ""], machine())


if __name__ == "__main__":
    main()

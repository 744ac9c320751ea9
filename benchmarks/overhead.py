"""DemonPruning's per-step overhead when no removal happens, on the demo CNN (CPU), and where it goes.

Two measurements of the same thing, in one process:

1. **Paired fits.** A plain fit and a fit with `DemonPruning` (the demo's regularizer, λ and noise held constant so
   that both act on every step, no removal inside the timed steps), alternating A-B-B-A so that a drift of the
   machine falls on both sides. Per pair, the ratio of the median step times; the figure is the median ratio over
   the pairs, with its range.
2. **In-situ pieces.** Inside the DemonPruning fits, the wall time of each of the callback's per-step hooks (batch
   start, the penalty before the optimizer step, the noise after it, batch end with the logging): the median call
   after the warm-up (the first batch start traces the model, once).

Steps are timed from the Trainer's batch start to its batch end (data loading excluded). The first steps (warm-up)
and the last epoch (the end-of-fit dead check observes its batches) are left out on both sides. Each run appends
to ``results/overhead.json`` and rewrites ``overhead.md`` with every recorded run, so that consecutive runs can be
compared.

    python benchmarks/overhead.py           # about 6 min on 2 CPU cores
    python benchmarks/overhead.py --quick   # 2 pairs of 2-epoch fits (not recorded with the others)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, STEADY_PRESSURE, StepTimer, instantiate, load_config, machine, write_report

from lightning_demp import DemonPruning
from lightning_demp.demos.quiet import quiet_trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mnist1d_cnn.yaml"
WARMUP_STEPS = 5


class TimedDemonPruning(DemonPruning):
    """`DemonPruning` that records the wall time of each call of its per-step hooks, by hook."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def _timed(self, name: str, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = call()
        self.seconds[name].append(time.perf_counter() - start)
        return result

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        add_noise = self.pruner.add_noise_  # the optimizer's step post-hook calls this
        self.pruner.add_noise_ = lambda: self._timed("noise after the step", add_noise)  # type: ignore[method-assign]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._timed(
            "batch start",
            lambda: super(TimedDemonPruning, self).on_train_batch_start(trainer, pl_module, batch, batch_idx),
        )

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._timed(
            "penalty, live masks, floor",
            lambda: super(TimedDemonPruning, self).on_before_optimizer_step(trainer, pl_module, optimizer),
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._timed(
            "batch end (logging)",
            lambda: super(TimedDemonPruning, self).on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx),
        )


def fit_steps(config: dict[str, Any], with_demp: bool, epochs: int) -> tuple[list[float], dict[str, float]]:
    """Step times of one fit (warm-up and last epoch left out) and, with DemP, its hooks' seconds per step."""
    seed_everything(0)
    model, data = instantiate(config["model"]), instantiate(config["data"])
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    demp = None
    if with_demp:
        demp = TimedDemonPruning(**STEADY_PRESSURE)
        callbacks.insert(0, demp)
    trainer = quiet_trainer(
        ".",
        max_epochs=epochs,
        callbacks=callbacks,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=config["trainer"].get("log_every_n_steps", 50),
    )
    trainer.fit(model, datamodule=data)
    kept = [seconds for epoch, seconds in timer.steps[WARMUP_STEPS:] if epoch < epochs - 1]
    pieces = {} if demp is None else {name: statistics.median(s[WARMUP_STEPS:]) for name, s in demp.seconds.items()}
    return kept, pieces


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=None, help="A-B pairs (default 8; 2 with --quick)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_config(CONFIG)
    pairs = args.pairs or (2 if args.quick else 8)
    epochs = 2 if args.quick else 4
    ratios: list[float] = []
    plain_all: list[float] = []
    demp_all: list[float] = []
    pieces: dict[str, list[float]] = defaultdict(list)
    for pair in range(pairs):
        order = (False, True) if pair % 2 == 0 else (True, False)  # A-B, then B-A
        medians = {}
        for with_demp in order:
            steps, hook_seconds = fit_steps(config, with_demp, epochs)
            medians[with_demp] = statistics.median(steps)
            (demp_all if with_demp else plain_all).extend(steps)
            for name, seconds in hook_seconds.items():
                pieces[name].append(seconds)
        ratios.append(medians[True] / medians[False])
        print(f"pair {pair}: plain {1e3 * medians[False]:.2f} ms, DemP {1e3 * medians[True]:.2f} ms", flush=True)
    run = {
        "commit": commit().strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "pairs": pairs,
        "epochs": epochs,
        "ratios": ratios,
        "overhead_median": statistics.median(ratios) - 1,
        "plain_step_median_s": statistics.median(plain_all),
        "demp_step_median_s": statistics.median(demp_all),
        "hook_seconds_per_step": {name: statistics.median(values) for name, values in pieces.items()},
        "machine": machine(),
    }
    path = RESULTS / ("overhead_quick.json" if args.quick else "overhead.json")
    runs = json.loads(path.read_text())["runs"] if path.exists() and not args.quick else []
    runs.append(run)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    write_report(path.with_suffix(".md").name, report_lines(runs), machine())


def report_lines(runs: list[dict[str, Any]]) -> list[str]:
    names = list(runs[-1]["hook_seconds_per_step"])
    lines = [
        "# DemonPruning's per-step overhead when no removal happens (demo CNN, CPU, 2 threads)",
        "",
        "Paired fits (A-B-B-A), 4 epochs each, noise on, λ and σ constant, logging every "
        "`log_every_n_steps` of the demo config; overhead = median over the pairs of (DemP median step / plain "
        "median step) − 1, with the pairs' range.",
        "",
        "| run (commit) | pairs | plain step (ms) | DemP step (ms) | overhead | pairs' range |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        low, high = min(run["ratios"]) - 1, max(run["ratios"]) - 1
        lines.append(
            f"| {run['date']} ({run['commit']}) | {run['pairs']} | {1e3 * run['plain_step_median_s']:.2f} | "
            f"{1e3 * run['demp_step_median_s']:.2f} | {100 * run['overhead_median']:+.1f} % | "
            f"{100 * low:+.1f} … {100 * high:+.1f} % |"
        )
    lines += [
        "",
        "Where it goes, measured inside the DemP fits (each hook's median call, then the median over the fits; the "
        "activity hooks are attached only on the batches a dead check observes, none of them here):",
        "",
        "| run (commit) | " + " | ".join(names) + " | sum | sum / plain step |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for run in runs:
        seconds = [run["hook_seconds_per_step"].get(name, float("nan")) for name in names]
        lines.append(
            f"| {run['date']} ({run['commit']}) | "
            + " | ".join(f"{1e3 * s:.3f} ms" for s in seconds)
            + f" | {1e3 * sum(seconds):.3f} ms | {100 * sum(seconds) / run['plain_step_median_s']:.1f} % |"
        )
    return [*lines, ""]


if __name__ == "__main__":
    main()

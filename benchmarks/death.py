"""Death dynamics on MNIST-1D, as in the paper: how many units die with λ, learning rate, batch size, Adam vs.
SGD, and with noise alone.

The MLP of ``configs/mnist1d_mlp.yaml`` (two ReLU layers of 256) trains with DemonPruning (one-sided L2,
``positive_l2``); the fraction of units removed at the end is the fraction that died and stayed dead. One factor
varies per plot, the others stay at the config's values. Writes ``benchmarks/results/death.json``, ``death.md``
and one PNG per factor (``death_<factor>.png``).

    python benchmarks/death.py           # 2 seeds, 20 epochs (about 10 min on 2 CPU cores)
    python benchmarks/death.py --quick   # 1 seed, 4 epochs
    python benchmarks/death.py --replot  # redraw the .md and PNGs from death.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, default_jobs, load_config, machine, run_grouped, write_json, write_report

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mnist1d_mlp.yaml"

# factor -> (x label, [(x value, model overrides, data overrides, callback overrides)])
FACTORS: dict[str, tuple[str, list[tuple[float, dict[str, Any], dict[str, Any], dict[str, Any]]]]] = {
    "reg": (
        "λ_max (positive_l2)",
        [(lam, {}, {}, {"reg_max": lam, "noise_std": 0.0}) for lam in (0.0, 0.01, 0.03, 0.1, 0.3)],
    ),
    "lr": (
        "learning rate (Adam)",
        [(lr, {"lr": lr}, {}, {"reg_max": 0.01, "noise_std": 0.0}) for lr in (1e-3, 3e-3, 1e-2, 3e-2)],
    ),
    "batch": ("batch size", [(b, {}, {"batch_size": b}, {"reg_max": 0.01, "noise_std": 0.0}) for b in (32, 128, 512)]),
    "optimizer": (
        "optimizer",
        [
            (0, {"optimizer": "adam"}, {}, {"reg_max": 0.01, "noise_std": 0.0}),
            (1, {"optimizer": "sgd", "lr": 0.03}, {}, {"reg_max": 0.01, "noise_std": 0.0}),
        ],
    ),
    "noise": (
        "σ_max (noise alone, λ = 0)",
        [(s, {}, {}, {"reg_max": 0.0, "noise_std": s}) for s in (0.0, 1e-3, 3e-3, 1e-2)],
    ),
}
OPTIMIZER_NAMES = {"adam": "Adam", "sgd": "SGD momentum"}


def category_names(factor: str) -> dict[float, str] | None:
    """For a factor whose values stand for names (the optimizer), each value's name with its learning rate."""
    if factor != "optimizer":
        return None
    config_lr = load_config(CONFIG)["model"]["init_args"]["lr"]
    return {
        x: f"{OPTIMIZER_NAMES[model['optimizer']]} (lr {model.get('lr', config_lr):g})"
        for x, model, _, _ in FACTORS[factor][1]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="runs in parallel, one thread each")
    parser.add_argument("--replot", action="store_true", help="redraw the .md and PNGs from the saved JSON")
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    if args.replot:
        render(json.loads((RESULTS / f"death{suffix}.json").read_text()), suffix)
        return
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = 4 if args.quick else args.epochs
    config = load_config(CONFIG)
    keyed_tasks: list[tuple[tuple[str, float], dict[str, Any]]] = []
    for factor, (_, points) in FACTORS.items():
        for x, model_overrides, data_overrides, callback_overrides in points:
            for seed in seeds:
                keyed_tasks.append(
                    (
                        (factor, x),
                        {
                            "config": config,
                            "seed": seed,
                            "with_demp": True,
                            "max_epochs": epochs,
                            "model_overrides": model_overrides,
                            "data_overrides": data_overrides,
                            "callback_overrides": {"prune_every_n_epochs": 2, **callback_overrides},
                        },
                    )
                )
    grouped = run_grouped(keyed_tasks, args.jobs)
    results: dict[str, list[dict[str, Any]]] = {}
    for (factor, x), runs in grouped.items():
        row = {
            "x": x,
            "units_removed": statistics.mean(r["units_removed"] for r in runs),
            "units_removed_per_seed": [r["units_removed"] for r in runs],
            "test_acc": statistics.mean(r["test_acc"] for r in runs),
        }
        results.setdefault(factor, []).append(row)
        print(factor, row, flush=True)
    payload = {"epochs": epochs, "seeds": seeds, "machine": machine(), "results": results}
    write_json(f"death{suffix}.json", payload)
    render(payload, suffix)


def render(payload: dict[str, Any], suffix: str) -> None:
    """``death<suffix>.md`` and one PNG per factor: units dead against the factor's values (bars for named ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# Death dynamics: MNIST-1D MLP ({len(payload['seeds'])} seeds, {payload['epochs']} epochs)", ""]
    for factor, rows in payload["results"].items():
        label, names = FACTORS[factor][0], category_names(factor)
        dead = [100 * r["units_removed"] for r in rows]
        figure, axis = plt.subplots(figsize=(5, 3.5))
        if names is not None:
            axis.bar([names[r["x"]] for r in rows], dead, color="tab:red", width=0.5)
        else:
            axis.plot([r["x"] for r in rows], dead, "o-", color="tab:red")
            if factor in ("reg", "lr", "noise") and all(r["x"] > 0 for r in rows):
                axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("units dead and removed (%)")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(RESULTS / f"death_{factor}{suffix}.png", dpi=110)
        plt.close(figure)
        lines += [f"## {label}", "", "| value | units removed (%) | test acc (%) |", "|---|---|---|"]
        lines += [
            f"| {names[r['x']] if names else r['x']} | {100 * r['units_removed']:.1f} | {100 * r['test_acc']:.1f} |"
            for r in rows
        ]
        lines.append("")
    write_report(f"death{suffix}.md", lines, payload["machine"])


if __name__ == "__main__":
    main()

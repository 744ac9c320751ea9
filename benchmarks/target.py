"""Sparsity targets on MNIST-1D: the sparsity reached against the target, and the accuracy at that sparsity against
the ``reg_max`` sweep of the frontier benchmark.

For the CNN (decoupled residual channels, the demo's default), the MLP and two models nothing was tuned on (a plain
CNN, ``unseen_models.PlainCNN1d``, and a tapered norm-free MLP, ``unseen_models.TaperedMLP``), ``DemonPruning(target_sparsity=t, target_metric=m)`` trains with the config's recipe,
but ``reg_max`` and ``noise_std`` at the callback's defaults, for each target ``t`` and seed, with the same epochs
and seeds as ``frontier.py``. Torch-Pruning's magnitude pruner at the same sparsity is read off ``frontier_cnn.json``
/ ``frontier_mlp.json`` the same way (its coupled-CNN runs for the CNN). The accuracy a hand-tuned ``reg_max`` gives at the same sparsity is read off the frontier's
DemP sweep (``frontier_cnn_decoupled.json``, ``frontier_mlp.json``: run those first) by linear interpolation
between its two nearest points (the nearest point when the reached sparsity lies outside the sweep, flagged).

Writes ``benchmarks/results/target.json`` and ``target.md``.

    python benchmarks/target.py --models cnn mlp unseen unseen_mlp   # targets 0.5 to 0.95, 3 seeds, 30 epochs
    python benchmarks/target.py --models unseen --metric flops --append   # a plain CNN nothing was tuned on
    python benchmarks/target.py --models mlp --targets 0.8 --force-target --append   # the opt-in final step
    python benchmarks/target.py --models transformer --targets 0.3 0.5 --epochs 20 --name target_transformer
    python benchmarks/target.py --quick   # MLP only, 1 seed, 6 epochs, smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS,
    default_jobs,
    load_config,
    machine,
    run_grouped,
    with_recorded_betas,
    write_json,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "cnn": (REPO / "configs" / "mnist1d_cnn.yaml", "frontier_cnn_decoupled.json", {"decoupled": True}),
    "mlp": (REPO / "configs" / "mnist1d_mlp.yaml", "frontier_mlp.json", {}),
    "unseen": (REPO / "benchmarks" / "unseen_cnn.yaml", "", {}),  # a plain CNN nothing was tuned on
    "unseen_mlp": (REPO / "benchmarks" / "unseen_mlp.yaml", "", {}),  # a tapered norm-free MLP, likewise
    "transformer": (REPO / "configs" / "mnist1d_transformer.yaml", "frontier_transformer.json", {}),
}
PEER_FRONTIERS = {
    "cnn": "frontier_cnn.json",
    "mlp": "frontier_mlp.json",
    "transformer": "frontier_transformer.json",
}  # Torch-Pruning magnitude, same recipe
DEFAULTS = {"reg_max": 0.03, "noise_std": 5e-5}  # DemonPruning's own defaults, whatever the config's sweep point
NO_PRESSURE = {"reg_max": 0.0, "noise_std": 0.0}  # nothing is pushed to die: the shortfall removal does it all


def sweep_accuracy(frontier: dict[str, Any], sparsity: float, method: str = "DemP") -> tuple[float, bool]:
    """Accuracy of the frontier's DemP ``reg_max`` sweep at ``sparsity`` (interpolated on the sweep's upper envelope),
    and whether it extrapolates."""
    candidates = [
        (s["params_removed"], s["test_acc"])
        for s in frontier["summaries"]
        if s["method"].startswith(method) and "no noise" not in s["method"]
    ]
    # the sweep's upper envelope: a point beaten on both axes by another (a collapsed run) is not what tuning gives
    points = sorted(
        (x, y) for x, y in candidates if not any(x2 >= x and y2 > y for x2, y2 in candidates if (x2, y2) != (x, y))
    )
    if sparsity <= points[0][0]:
        return points[0][1], sparsity < points[0][0]
    if sparsity >= points[-1][0]:
        return points[-1][1], sparsity > points[-1][0]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= sparsity <= x1:
            weight = (sparsity - x0) / (x1 - x0) if x1 > x0 else 0.0
            return y0 + weight * (y1 - y0), False
    raise AssertionError("unreachable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cnn", "mlp"])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--metric", choices=["params", "flops"], default="params")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--prune-every", type=int, default=2, help="epochs between removal events")
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="runs in parallel, one thread each")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--replot", action="store_true", help="redo the table from the saved runs")
    parser.add_argument("--force-target", action="store_true", help="opt-in final step that meets the target")
    parser.add_argument(
        "--no-pressure", action="store_true", help="reg_max=0, noise_std=0: the late removal of live units alone"
    )
    parser.add_argument("--append", action="store_true", help="add these rows to the saved results")
    parser.add_argument("--dense", action="store_true", help="only the models' dense runs (no DemP), added")
    parser.add_argument("--name", default="target", help="results file name (another epoch count needs its own)")
    args = parser.parse_args()
    if args.replot:
        render(args.name + ("_quick" if args.quick else ""))
        return
    if args.dense:
        add_dense_runs(args.models, args.seeds, args.epochs, args.jobs)
        return
    models = ["mlp"] if args.quick else args.models
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = 6 if args.quick else args.epochs

    keyed_tasks: list[tuple[tuple[str, float], dict[str, Any]]] = []  # defaults: only the regularizer comes from
    # the config (the MLP has no norms to regularize)
    for model in models:
        config_path, _, model_overrides = MODELS[model]
        config = with_recorded_betas(load_config(config_path))
        for target in args.targets:
            for seed in seeds:
                keyed_tasks.append(
                    (
                        (model, target),
                        {
                            "config": config,
                            "seed": seed,
                            "with_demp": True,
                            "max_epochs": epochs,
                            "model_overrides": model_overrides,
                            "callback_overrides": {
                                **(NO_PRESSURE if args.no_pressure else DEFAULTS),
                                "target_sparsity": target,
                                "target_metric": args.metric,
                                "prune_every_n_epochs": args.prune_every,
                                "force_target": args.force_target,
                            },
                        },
                    )
                )
    runs = run_grouped(keyed_tasks, args.jobs)

    suffix = "_quick" if args.quick else ""
    tag = ("+force_target" if args.force_target else "") + ("" if args.metric == "params" else f"+{args.metric}")
    tag += "+no_pressure" if args.no_pressure else ""
    new_runs = {f"{m}@{t}{tag}": r for (m, t), r in runs.items()}
    name = args.name + suffix
    path = RESULTS / f"{name}.json"
    if args.append and path.exists():  # add these rows to the saved results (same epochs and seeds)
        payload = json.loads(path.read_text())
        payload["runs"].update(new_runs)
    else:
        payload = {
            "epochs": epochs,
            "seeds": seeds,
            "prune_every_n_epochs": args.prune_every,
            "jobs": args.jobs,
            "machine": machine(),
            "runs": new_runs,
        }
    write_json(f"{name}.json", payload)
    render(name)


def add_dense_runs(models: list[str], seeds: list[int], epochs: int, jobs: int) -> None:
    """The same recipes without DemP, saved beside the target runs (``dense``) as the reference accuracy."""
    path = RESULTS / "target.json"
    payload = json.loads(path.read_text())
    tasks = [
        (
            model,
            {
                "config": with_recorded_betas(load_config(MODELS[model][0])),
                "seed": seed,
                "with_demp": False,
                "max_epochs": epochs,
                "model_overrides": MODELS[model][2],
            },
        )
        for model in models
        for seed in seeds
    ]
    payload.setdefault("dense", {}).update(run_grouped(tasks, jobs))
    write_json("target.json", payload)
    render("")


def render(name: str) -> None:
    """Write ``<name>.md`` from the saved runs and the frontier results as they are now."""
    payload = json.loads((RESULTS / f"{name}.json").read_text())
    epochs, seeds = payload["epochs"], payload["seeds"]
    rows = []
    for key, model_runs in payload["runs"].items():
        model, target_text = key.split("@")
        target_text, *tags = target_text.split("+")
        forced, metric = "force_target" in tags, "flops" if "flops" in tags else "params"
        pressure = " (`reg_max=0`, `noise_std=0`)" if "no_pressure" in tags else ""
        target = float(target_text)
        frontier_path = RESULTS / MODELS[model][1]
        frontier = json.loads(frontier_path.read_text()) if MODELS[model][1] and frontier_path.exists() else None
        peers_path = RESULTS / PEER_FRONTIERS.get(model, "none")
        peers = json.loads(peers_path.read_text()) if peers_path.exists() else None
        reached = [r[f"{metric}_removed"] for r in model_runs]
        accuracy = [r["test_acc"] for r in model_runs]
        mean_reached = statistics.mean(reached)
        row: dict[str, Any] = {
            "model": model
            + (" (`force_target=True`)" if forced else "")
            + (" (FLOPs)" if metric == "flops" else "")
            + pressure,
            "target": target,
            "reached": mean_reached,
            "reached_per_seed": reached,
            "within_2pt": all(abs(value - target) <= 0.02 for value in reached),
            "test_acc": statistics.mean(accuracy),
            "test_acc_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
        }
        if frontier is not None and frontier["epochs"] == epochs and metric == "params":
            row["sweep_acc"], row["sweep_extrapolated"] = sweep_accuracy(frontier, mean_reached)
        if peers is not None and peers["epochs"] == epochs and metric == "params":
            row["peer_acc"], row["peer_extrapolated"] = sweep_accuracy(peers, mean_reached, "TP magnitude")
        rows.append(row)
    payload["rows"] = rows
    write_json(f"{name}.json", payload)
    lines = [
        f"# Sparsity targets on MNIST-1D ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}, {epochs} epochs, "
        f"`reg_max` and `noise_std` at their defaults, a removal event every {payload['prune_every_n_epochs']} epochs)",
        "",
        "| model | target (%) | reached (%), mean | per seed (%) | all seeds within ±2 pt | test acc (%) | "
        "`reg_max` sweep acc at the same sparsity (%) | Δ (pt) | Torch-Pruning magnitude acc there (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sweep = row.get("sweep_acc")
        sweep_text = "n/a (run frontier.py first)" if sweep is None else f"{100 * sweep:.2f}"
        if row.get("sweep_extrapolated"):
            sweep_text += " (nearest point: outside the sweep)"
        delta = "" if sweep is None else f"{100 * (row['test_acc'] - sweep):+.2f}"
        peer = row.get("peer_acc")
        peer_text = (
            "" if peer is None else f"{100 * peer:.2f}" + (" (outside its points)" if row["peer_extrapolated"] else "")
        )
        lines.append(
            f"| {row['model']} | {100 * row['target']:.0f} | {100 * row['reached']:.1f} | "
            f"{', '.join(f'{100 * v:.1f}' for v in row['reached_per_seed'])} | {'yes' if row['within_2pt'] else 'no'} | "
            f"{100 * row['test_acc']:.2f} ± {100 * row['test_acc_std']:.2f} | {sweep_text} | {delta} | {peer_text} |"
        )
    dense = {model: [run["test_acc"] for run in runs] for model, runs in payload.get("dense", {}).items() if runs}
    if dense:
        lines += [
            "",
            "Dense, the same recipe without DemP: "
            + ", ".join(
                f"{model} {100 * statistics.mean(accs):.2f} ± {100 * (statistics.stdev(accs) if len(accs) > 1 else 0):.2f} %"
                for model, accs in dense.items()
            )
            + ".",
        ]
    lines += [
        "",
        "The sweep's accuracy is interpolated between the two DemP `reg_max` points of the frontier benchmark that "
        "bracket the reached sparsity (same model, seeds and epochs; runs without noise, and points beaten on both "
        "axes by another, such as a collapsed run, left out).",
        "",
    ]
    write_report(f"{name}.md", lines, payload["machine"])


if __name__ == "__main__":
    main()

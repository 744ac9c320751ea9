"""Accuracy vs. sparsity frontier on MNIST-1D: DemP against dense training and the peers.

Every method trains the same model with the same optimizer, learning-rate schedule, batch size and number of
epochs (the config's), over several seeds:

* dense (no pruning);
* DemP, sweeping ``reg_max`` (and noise on/off);
* Lightning's ``ModelPruning`` (L1 structured over output units, each epoch, to DemP's unit sparsity);
* Torch-Pruning magnitude pruning during training (optimizer rebuilt after each step), two ratios;
* Torch-Pruning's BN-scale pruner (network slimming) — CNN only (the MLP has no BatchNorm).

Writes ``benchmarks/results/frontier_<model>.json``, ``.md`` (table) and ``.png`` (accuracy vs. the fraction of
parameters and of FLOPs removed).

    python benchmarks/frontier.py --model cnn           # 3 seeds, 30 epochs (about 25 min on 2 CPU cores)
    python benchmarks/frontier.py --model mlp
    python benchmarks/frontier.py --model transformer   # MLP hidden units of the blocks (after GELU)
    python benchmarks/frontier.py --model cnn --decoupled   # ChannelSelect shortcuts, DemP sweep only
    python benchmarks/frontier.py --model cnn --quick   # 1 seed, 4 epochs, smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS,
    default_jobs,
    load_config,
    machine,
    machine_line,
    run_configs,
    with_recorded_betas,
    write_json,
)
from peers import model_pruning_callbacks, torch_pruning_callbacks

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "cnn": REPO / "configs" / "mnist1d_cnn.yaml",
    "mlp": REPO / "configs" / "mnist1d_mlp.yaml",
    "transformer": REPO / "configs" / "mnist1d_transformer.yaml",
}
# DemP sweeps: (label, callback overrides)
SWEEPS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "cnn": [
        ("DemP λ=0.01", {"reg_max": 0.01}),
        ("DemP λ=0.03", {"reg_max": 0.03}),
        ("DemP λ=0.03 no noise", {"reg_max": 0.03, "noise_std": 0.0}),
        ("DemP λ=0.1", {"reg_max": 0.1}),
    ],
    "mlp": [
        ("DemP λ=0.01", {"reg_max": 0.01}),
        ("DemP λ=0.03", {"reg_max": 0.03}),
        ("DemP λ=0.03 no noise", {"reg_max": 0.03, "noise_std": 0.0}),
        ("DemP λ=0.1", {"reg_max": 0.1}),
    ],
    "transformer": [  # coupled L2 shrinks a unit's fc1 row until its GELU output is constant: folded and removed
        ("DemP λ=0.03", {"regularizer": "l2", "reg_max": 0.03, "saturation_tolerance": 1e-3}),
        ("DemP λ=0.1", {"regularizer": "l2", "reg_max": 0.1, "saturation_tolerance": 1e-3}),
        ("DemP λ=0.3", {"regularizer": "l2", "reg_max": 0.3, "saturation_tolerance": 1e-3}),
    ],
}
# Decoupled residual channels (ChannelSelect shortcuts): the same recipe, a sweep reaching further.
DECOUPLED_SWEEP: list[tuple[str, dict[str, Any]]] = [
    ("DemP decoupled λ=0.01", {"reg_max": 0.01}),
    ("DemP decoupled λ=0.03", {"reg_max": 0.03}),
    ("DemP decoupled λ=0.05", {"reg_max": 0.05}),
]
REFERENCE = {
    "cnn": "DemP λ=0.03",
    "mlp": "DemP λ=0.03",
    "transformer": "DemP λ=0.1",
}  # ModelPruning matches this point's unit sparsity


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"method": label, "seeds": len(runs)}
    for key in ("test_acc", "params_removed", "flops_removed", "zeroed", "fit_seconds"):
        summary[key], summary[key + "_std"] = mean_std([run[key] for run in runs])
    return summary


def plot(summaries: list[dict[str, Any]], title: str, path: Path, floor: float | None = None) -> None:
    """Accuracy against parameters and FLOPs removed; points below ``floor`` are drawn on the bottom edge (▼)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    families = {
        "dense": "black",
        "DemP decoupled": "tab:orange",
        "DemP": "tab:red",
        "ModelPruning": "tab:green",
        "TP magnitude": "tab:blue",
        "TP BN-scale": "tab:purple",
    }
    for axis, key, xlabel in (
        (axes[0], "removed_params", "parameters removed"),
        (axes[1], "flops_removed", "forward FLOPs removed"),
    ):
        for summary in summaries:
            family = next(name for name in families if summary["method"].startswith(name))
            x = (
                summary["zeroed"]
                if key == "removed_params" and family == "ModelPruning"
                else summary["params_removed" if key == "removed_params" else "flops_removed"]
            )
            off_scale = floor is not None and summary["test_acc"] < floor
            y = floor * 100 if off_scale and floor is not None else summary["test_acc"] * 100
            axis.errorbar(
                x * 100,
                y,
                yerr=None if off_scale else summary["test_acc_std"] * 100,
                fmt="v" if off_scale else "o",
                color=families[family],
                capsize=3,
            )
            label = summary["method"].replace(family, "").strip()
            axis.annotate(
                f"{label} ({100 * summary['test_acc']:.1f} %)" if off_scale else label,
                (x * 100, y),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        if floor is not None:
            axis.set_ylim(floor * 100 - 0.5, 100.2)
        axis.set_xlabel(f"{xlabel} (%)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=n) for n, c in families.items()]
    axes[1].legend(handles=handles, fontsize=8, loc="lower left")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), default="cnn")
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--decoupled",
        action="store_true",
        help="CNN only: ChannelSelect shortcuts; DemP sweep only (dense and peers as in the coupled run)",
    )
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="runs in parallel, one thread each")
    parser.add_argument("--replot", action="store_true", help="redraw the .md and .png from the saved JSON")
    parser.add_argument(
        "--add-reg-max", type=float, nargs="+", help="add DemP points at these reg_max values to the saved run"
    )
    parser.add_argument("--penalize", choices=["all", "prunable"], help="with --add-reg-max: DemonPruning(penalize=)")
    args = parser.parse_args()
    if args.replot:
        name = f"frontier_{args.model}{'_decoupled' if args.decoupled else ''}{'_quick' if args.quick else ''}"
        render(name, json.loads((RESULTS / f"{name}.json").read_text()))
        return
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = 4 if args.quick else args.epochs
    config = with_recorded_betas(load_config(CONFIGS[args.model]))
    runs: dict[str, list[dict[str, Any]]] = {}

    def record(label: str, run: dict[str, Any]) -> None:
        run["method"] = label
        runs.setdefault(label, []).append(run)
        print(
            f"{label} seed {run['seed']}: acc {run['test_acc']:.4f} params removed {run['params_removed']:.3f} "
            f"flops removed {run['flops_removed']:.3f} zeroed {run['zeroed']:.3f} ({run['fit_seconds']:.0f} s)",
            flush=True,
        )

    model_overrides = {"decoupled": args.decoupled} if args.model == "cnn" else {}
    sweep = DECOUPLED_SWEEP if args.decoupled else SWEEPS[args.model]
    if args.add_reg_max:  # more DemP points, merged into the committed results of the same run
        extend(args, config, model_overrides, epochs)
        return
    common = {"config": config, "max_epochs": epochs, "model_overrides": model_overrides}
    labels, tasks = [], []
    for seed in seeds:
        if not args.decoupled:
            labels.append("dense")
            tasks.append({**common, "seed": seed, "with_demp": False})
        for label, overrides in sweep:
            labels.append(label)
            tasks.append({**common, "seed": seed, "with_demp": True, "callback_overrides": overrides})
    for label, run in zip(labels, run_configs(tasks, args.jobs)):
        record(label, run)
    if args.decoupled:
        finish(args, runs, seeds, epochs, "_decoupled")
        return
    unit_sparsity = statistics.mean(run["units_removed"] for run in runs[REFERENCE[args.model]])
    prune_epochs = max(1, (2 * epochs) // 3)
    peers: list[tuple[str, Any]] = [
        (
            f"ModelPruning L1 ({unit_sparsity:.0%} units)",
            partial(model_pruning_callbacks, unit_sparsity=unit_sparsity, prune_epochs=prune_epochs),
        ),
    ]
    methods = {
        "cnn": [("magnitude", 0.5), ("magnitude", 0.8), ("bn_scale", 0.5)],
        "mlp": [("magnitude", 0.5), ("magnitude", 0.8)],
        "transformer": [("magnitude", 0.5)],
    }[args.model]
    for method, ratio in methods:
        name = "TP magnitude" if method == "magnitude" else "TP BN-scale"
        factory = partial(torch_pruning_callbacks, method=method, pruning_ratio=ratio, prune_epochs=prune_epochs)
        peers.append((f"{name} r={ratio}", factory))
    labels, tasks = [], []
    for seed in seeds:
        for label, factory in peers:
            labels.append(label)
            tasks.append({**common, "seed": seed, "with_demp": False, "extra_callbacks": factory})
    for label, run in zip(labels, run_configs(tasks, args.jobs)):
        record(label, run)
    finish(args, runs, seeds, epochs, "")


def extend(args: argparse.Namespace, config: dict[str, Any], model_overrides: dict[str, Any], epochs: int) -> None:
    """Add DemP points at ``--add-reg-max`` values to ``frontier_<model>[_decoupled].json`` (same seeds and epochs)."""
    name = f"frontier_{args.model}{'_decoupled' if args.decoupled else ''}{'_quick' if args.quick else ''}"
    payload = json.loads((RESULTS / f"{name}.json").read_text())
    base = (DECOUPLED_SWEEP if args.decoupled else SWEEPS[args.model])[0][1]
    prefix = "DemP decoupled" if args.decoupled else "DemP"
    labels, tasks = [], []
    for seed in payload["seeds"]:
        for reg_max in args.add_reg_max:
            labels.append(f"{prefix} λ={reg_max:g}" + (f" penalize={args.penalize}" if args.penalize else ""))
            tasks.append(
                {
                    "config": config,
                    "max_epochs": payload["epochs"],
                    "model_overrides": model_overrides,
                    "seed": seed,
                    "with_demp": True,
                    "callback_overrides": {
                        **base,
                        "reg_max": reg_max,
                        **({"penalize": args.penalize} if args.penalize else {}),
                    },
                }
            )
    for label, run in zip(labels, run_configs(tasks, args.jobs)):
        run["method"] = label
        payload["runs"].setdefault(label, []).append(run)
    payload["summaries"] = sorted(
        (summarize(label, label_runs) for label, label_runs in payload["runs"].items()),
        key=lambda s: (not s["method"].startswith("dense"), not s["method"].startswith("DemP"), s["params_removed"]),
    )
    write_json(f"{name}.json", payload)
    render(name, payload)


def finish(
    args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], seeds: list[int], epochs: int, variant: str
) -> None:
    summaries = [summarize(label, label_runs) for label, label_runs in runs.items()]
    suffix = "_quick" if args.quick else ""
    name = f"frontier_{args.model}{variant}{suffix}"
    payload = {
        "model": args.model,
        "variant": variant,
        "epochs": epochs,
        "seeds": seeds,
        "jobs": args.jobs,
        "machine": machine(),
        "summaries": summaries,
        "runs": runs,
    }
    write_json(f"{name}.json", payload)
    render(name, payload)


def best_within(summaries: list[dict[str, Any]], dense_acc: float, points: float = 1.0) -> dict[str, Any] | None:
    """The point removing the most parameters at no more than ``points`` below dense accuracy (mean over seeds)."""
    eligible = [s for s in summaries if s["method"] != "dense" and s["test_acc"] >= dense_acc - points / 100]
    return max(eligible, key=lambda s: s["params_removed"], default=None)


def render(name: str, payload: dict[str, Any]) -> None:
    """Write ``<name>.md`` and ``<name>.png`` from a frontier payload (also for the decoupled run: with the coupled
    run's dense, DemP and peer points next to it, from ``frontier_<model>.json``)."""
    summaries = list(payload["summaries"])
    seeds, epochs, model = payload["seeds"], payload["epochs"], payload["model"]
    coupled_path = RESULTS / f"frontier_{model}.json"
    if "_decoupled" in name and coupled_path.exists():
        coupled = json.loads(coupled_path.read_text())
        summaries += [
            {**s, "method": s["method"] if not s["method"].startswith("DemP") else s["method"] + " (coupled)"}
            for s in coupled["summaries"]
        ]
    dense = next((s for s in summaries if s["method"] == "dense"), None)
    dense_acc = dense["test_acc"] if dense else float("nan")
    lines = [
        f"# Frontier: {model.upper()} on MNIST-1D ({len(seeds)} seeds, {epochs} epochs, same optimizer and LR schedule)",
        "",
        "| method | test acc (%) | Δ vs dense (pt) | params removed (%) | FLOPs removed (%) | weights zeroed (%) |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['method']} | {100 * s['test_acc']:.2f} ± {100 * s['test_acc_std']:.2f} | "
            f"{100 * (s['test_acc'] - dense_acc):+.2f} | {100 * s['params_removed']:.1f} ± {100 * s['params_removed_std']:.1f} | "
            f"{100 * s['flops_removed']:.1f} | {100 * s['zeroed']:.1f} |"
        )
    lines += ["", "Most parameters removed at no more than 1 point below dense (mean accuracy over the seeds):", ""]
    families = ["DemP decoupled", "DemP", "TP magnitude", "TP BN-scale"]
    for family in families:
        members = [
            s
            for s in summaries
            if s["method"].startswith(family) and not (family == "DemP" and s["method"].startswith("DemP decoupled"))
        ]
        best = best_within(members, dense_acc) if members else None
        if members:
            lines.append(
                f"- {family}: "
                + (
                    f"{100 * best['params_removed']:.1f} % of parameters ({best['method']}, {100 * best['test_acc']:.2f} %)"
                    if best
                    else "no point within 1 point of dense"
                )
            )
    head_runs = {label: runs for label, runs in payload["runs"].items() if any("heads" in run for run in runs)}
    if head_runs:
        lines += ["", "Attention heads left by DemP (`HeadedAttention`; dead heads are removed whole), per seed:", ""]
        for label, runs in head_runs.items():
            counts = [sum(run["heads"].values()) for run in runs if "heads" in run]
            total = sum(runs[0].get("initial_heads", {}).values()) if runs[0].get("initial_heads") else None
            lines.append(f"- {label}: {', '.join(str(c) for c in counts)}" + (f" of {total}" if total else ""))
    lines += [
        "",
        "ModelPruning keeps dense shapes: it removes no parameter or FLOP physically; its zeroed weights are "
        "shown in the last column (and used as its x-position in the plot).",
        "",
        f"Runs: {payload.get('jobs', 1)} side by side, one thread each (fit times in the JSON are not speed figures). "
        + machine_line(payload["machine"]),
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    plot(
        summaries,
        f"MNIST-1D {model.upper()}: accuracy vs. removal ({len(seeds)} seeds, {epochs} epochs)",
        RESULTS / f"{name}.png",
        floor=dense_acc - 0.08 if dense else None,
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

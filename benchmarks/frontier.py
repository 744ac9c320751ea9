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
    python benchmarks/frontier.py --model cnn --fair    # the fair frontier: one lr grid, each method's own knob
    python benchmarks/frontier.py --model mlp --fair    # (results/frontier_fair_<model>.*; resumes a stopped run)

``--fair`` gives every method (DemP one-cycle, DemP with the authors' constant λ and σ, DemP ``target_sparsity``,
Torch-Pruning magnitude and BN-scale, ModelPruning) the same learning-rate grid and a grid of its own strength knob
of the same size: seed 0 runs the whole grid, each method's seed-0 Pareto points around 50–95 % removed are then run
on the other seeds, and each method's frontier is the Pareto line of those means (the protocol is in the .md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
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
    run_config,
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


FAMILIES = {  # the legacy frontier's method families, in table order, with their colours and markers
    "dense": ("black", "*"),
    "DemP decoupled": ("tab:orange", "s"),
    "DemP": ("tab:red", "o"),
    "ModelPruning": ("tab:green", "P"),
    "TP magnitude": ("tab:blue", "^"),
    "TP BN-scale": ("tab:purple", "v"),
}


def family_of(method: str) -> str:
    """The family of a frontier row (``DemP decoupled`` before ``DemP``; ``(coupled)`` rows are ``DemP``)."""
    return next(name for name in FAMILIES if method.startswith(name))


def row_order(summary: dict[str, Any]) -> tuple[int, bool, float]:
    """Table order: by family, the coupled DemP rows after the decoupled ones, then by parameters removed."""
    return (
        list(FAMILIES).index(family_of(summary["method"])),
        "(coupled)" in summary["method"],
        summary["params_removed"],
    )


def plot(summaries: list[dict[str, Any]], title: str, path: Path, floor: float | None = None) -> None:
    """Accuracy against parameters and FLOPs removed, one line per method family through its Pareto points (the
    points it dominates faint); points below ``floor`` are drawn on the bottom edge (▼, their accuracy in the table). No text over the points:
    the legend, outside the axes, names only the families drawn. ModelPruning removes nothing physically and is left
    out (the table has it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    groups: dict[str, list[dict[str, Any]]] = {}
    for summary in summaries:
        family = family_of(summary["method"])
        if family == "DemP" and "(coupled)" in summary["method"]:
            family = "DemP coupled"
        if family != "ModelPruning" and "no noise" not in summary["method"]:
            groups.setdefault(family, []).append(summary)
    if floor is not None and all(s["test_acc"] >= floor for members in groups.values() for s in members):
        floor = None  # nothing to put on the edge: the axis fits the points
    drawn = []
    for axis, key, xlabel in (
        (axes[0], "params_removed", "parameters removed"),
        (axes[1], "flops_removed", "forward FLOPs removed"),
    ):
        for family, members in groups.items():
            color, marker = FAMILIES["DemP" if family == "DemP coupled" else family]
            members = sorted(members, key=lambda s: s[key])
            low = [floor is not None and s["test_acc"] < floor for s in members]
            xs = [100 * s[key] for s in members]
            ys = [100 * (floor if off and floor is not None else s["test_acc"]) for s, off in zip(members, low)]
            style: Any = "--" if family == "DemP coupled" else "-"
            label = {"DemP": "DemP (reg_max sweep)", "DemP decoupled": "DemP decoupled (reg_max sweep)"}.get(
                family, family
            )
            envelope = pareto([{"x": x, "acc": s["test_acc"], "y": y, "id": id(s)} for x, y, s in zip(xs, ys, members)])
            on_line = {p["id"] for p in envelope}
            axis.plot(
                [p["x"] for p in envelope],
                [p["y"] for p in envelope],
                color=color,
                linestyle=style,
                linewidth=1,
            )
            for x, y, s, off in zip(xs, ys, members, low):
                faint = id(s) not in on_line
                axis.errorbar(
                    x,
                    y,
                    yerr=None if off or faint else 100 * s["test_acc_std"],
                    fmt="v" if off else marker,
                    color=color,
                    alpha=0.35 if faint else 1.0,
                    capsize=3,
                    markersize=6 if family != "dense" else 9,
                )
            if axis is axes[0]:
                drawn.append(plt.Line2D([], [], color=color, marker=marker, linestyle=style, label=label))
        if floor is not None:
            axis.set_ylim(floor * 100 - 0.5, min(100.2, 100 * max(s["test_acc"] for s in summaries) + 0.5))
            axis.axhline(floor * 100, color="grey", linewidth=0.6, linestyle=":")
        axis.set_xlabel(f"{xlabel} (%)")
        axis.set_xlim(-2, 100)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    if floor is not None:
        drawn.append(
            plt.Line2D([], [], color="grey", marker="v", linestyle="", label=f"below {100 * floor:.1f} % (edge)")
        )
    figure.legend(handles=drawn, loc="lower center", ncol=min(4, len(drawn)), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


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
    parser.add_argument("--fair", action="store_true", help="the fair frontier (same lr grid, each method's knob)")
    parser.add_argument("--methods", nargs="+", help="with --fair: only these methods (and dense)")
    parser.add_argument("--tune-only", action="store_true", help="with --fair: the seed-0 grid only")
    args = parser.parse_args()
    if args.fair:
        fair_main(args)
        return
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
    """Add DemP points at ``--add-reg-max`` values to ``frontier_<model>[_decoupled].json`` (same seeds and epochs);
    a value already there is run again and replaces its old runs."""
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
    for label in set(labels):  # a value already in the results is run again: its new runs replace the old
        payload["runs"].pop(label, None)
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
    summaries.sort(key=row_order)
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
        "shown in the last column, and it is left out of the plot. Rows: by method, then parameters removed.",
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
        floor=dense_acc - 0.08 if dense and model == "cnn" else None,  # the MLP and transformer: every point
    )
    print("\n".join(lines))


# --- The fair frontier (``--fair``) --------------------------------------------------------------------------------
# Every method gets the same learning-rate grid (factors of the config's lr) and a grid of its own strength knob of
# the same size. Seed 0 runs the whole grid; each method's seed-0 Pareto points that bracket the levels below are
# then run with the other seeds; the frontier is each method's Pareto line over those 3-seed means.
# Fractions of parameters removed where the methods are compared, per model (the transformer's prunable units, its
# MLP hidden units, hold about 65 % of its parameters: its goal is at 30 % removed).
FAIR_LEVELS_OF = {"cnn": (0.5, 0.7, 0.8, 0.9, 0.95), "mlp": (0.5, 0.7, 0.8, 0.9, 0.95), "transformer": (0.3, 0.5)}
# Issue #17's goals: the levels where DemP's best line must be at magnitude's, and how far under it may stay.
FAIR_GOALS = {"cnn": (FAIR_LEVELS_OF["cnn"], 0.0), "mlp": ((0.5, 0.7), 0.005), "transformer": ((0.3,), 0.005)}
FAIR_LR_FACTORS = {"cnn": (1.0, 2.0), "mlp": (1.0, 3.0, 10.0), "transformer": (1.0, 3.0)}
# Strength grids: Torch-Pruning's ratio r of every group removes about 1 - (1 - r)^2 of the parameters here.
FAIR_STRENGTHS: dict[str, dict[str, tuple[float, ...]]] = {
    "cnn": {
        "DemP one-cycle": (0.01, 0.05, 0.1),
        "DemP constant": (0.01, 0.03, 0.1),
        "DemP target": (0.5, 0.8, 0.95),
        "TP magnitude": (0.3, 0.55, 0.78),
        "TP BN-scale": (0.3, 0.55, 0.78),
        "ModelPruning": (0.3, 0.55, 0.78),
    },
    "mlp": {  # the MLP's goals are at 50 and 70 % removed
        "DemP one-cycle": (0.01, 0.1, 1.0),
        "DemP constant": (0.001, 0.01, 0.1),
        "DemP target": (0.5, 0.7, 0.9),
        "TP magnitude": (0.3, 0.45, 0.68),
        "ModelPruning": (0.3, 0.45, 0.68),
    },
    "transformer": {  # r of the MLP hidden units removes about 0.65 r of the parameters
        "DemP one-cycle": (0.01, 0.03, 0.1),
        "DemP constant": (0.003, 0.01, 0.03),
        "DemP target": (0.3, 0.5, 0.7),
        "TP magnitude": (0.4, 0.6, 0.8),
        "ModelPruning": (0.4, 0.6, 0.8),
    },
}
# The sweeps' regularizer where the config's removes nothing: GELU units are never exactly zero, and a one-sided L2
# saturates none, so the transformer's sweeps use the coupled L2 of its frontier (a unit whose fc1 row shrinks until
# its output is constant is folded and removed). The target recipe keeps the config's regularizer.
FAIR_SWEEP_OVERRIDES: dict[str, dict[str, Any]] = {
    "cnn": {},
    "mlp": {},
    "transformer": {"regularizer": "l2", "saturation_tolerance": 1e-3},
}
FAIR_KNOBS = {
    "DemP one-cycle": "λ",
    "DemP constant": "λ",
    "DemP target": "target",
    "TP magnitude": "r",
    "TP BN-scale": "r",
    "ModelPruning": "units",
}
FAIR_COLORS = {
    "dense": "black",
    "DemP best": "tab:red",
    "DemP one-cycle": "tab:orange",
    "DemP constant": "tab:brown",
    "DemP target": "tab:red",
    "TP magnitude": "tab:blue",
    "TP BN-scale": "tab:purple",
    "ModelPruning": "tab:green",
}
FAIR_ORDER = ["dense", "TP magnitude", "DemP target", "DemP one-cycle", "DemP constant", "TP BN-scale", "ModelPruning"]
DEMP_METHODS = ("DemP one-cycle", "DemP constant", "DemP target")
FAIR_MODEL_OVERRIDES: dict[str, dict[str, Any]] = {
    "cnn": {"decoupled": True},
    "mlp": {},
    "transformer": {},
}  # the demo models as their configs build them


def fair_task(
    model: str, config: dict[str, Any], method: str, strength: float, lr: float, seed: int, epochs: int
) -> dict[str, Any]:
    """`run_config`'s arguments for one point of the fair grid."""
    task: dict[str, Any] = {
        "config": config,
        "seed": seed,
        "max_epochs": epochs,
        "model_overrides": {**FAIR_MODEL_OVERRIDES[model], "lr": lr},
        "with_demp": method.startswith("DemP"),
    }
    prune_epochs = max(1, (2 * epochs) // 3)
    if method == "DemP one-cycle":  # the config's recipe, one-cycle λ and σ over 90 % of the steps
        task["callback_overrides"] = {**FAIR_SWEEP_OVERRIDES[model], "reg_max": strength}
    elif method == "DemP constant":  # the authors' ResNet-18 recipe: λ and σ constant over the whole run
        task["callback_overrides"] = {
            **FAIR_SWEEP_OVERRIDES[model],
            "reg_max": strength,
            "schedule": "constant",
            "schedule_span": 1.0,
        }
    elif method == "DemP target":  # as target.py: reg_max and noise_std at the callback's defaults
        task["callback_overrides"] = {
            "reg_max": 0.03,
            "noise_std": 5e-5,
            "target_sparsity": strength,
            "prune_every_n_epochs": 2,
        }
    elif method in ("TP magnitude", "TP BN-scale"):
        task["extra_callbacks"] = partial(
            torch_pruning_callbacks,
            method="magnitude" if method == "TP magnitude" else "bn_scale",
            pruning_ratio=strength,
            prune_epochs=prune_epochs,
        )
    elif method == "ModelPruning":
        task["extra_callbacks"] = partial(model_pruning_callbacks, unit_sparsity=strength, prune_epochs=prune_epochs)
    elif method != "dense":
        raise ValueError(f"unknown method {method!r}")
    return task


def single_thread_worker() -> None:
    """Worker initializer: one torch thread per process, as `_common.run_parallel` does."""
    import torch

    torch.set_num_threads(1)


def run_key(method: str, strength: float, lr: float, seed: int) -> str:
    return f"{method}|{strength:g}|{lr:g}|{seed}"


def config_label(method: str, strength: float, lr: float) -> str:
    knob = "" if method == "dense" else f"{FAIR_KNOBS[method]}={strength:g}, "
    return f"{knob}lr={lr:g}"


def run_and_save(tasks: list[tuple[str, dict[str, Any]]], jobs: int, payload: dict[str, Any], name: str) -> None:
    """Run ``(key, task)`` pairs, ``jobs`` at a time, saving ``payload`` after each finished run (resumable)."""
    if not tasks:
        return

    def done(key: str, run: dict[str, Any]) -> None:
        method, strength, lr, _seed = key.split("|")
        run.update(method=method, strength=float(strength), lr=float(lr))
        run.pop("events", None)
        payload["runs"][key] = run
        write_json(f"{name}.json", payload)
        print(
            f"{key}: acc {run['test_acc']:.4f} params removed {run['params_removed']:.3f} zeroed {run['zeroed']:.3f} "
            f"({run['fit_seconds']:.0f} s)",
            flush=True,
        )

    if jobs <= 1:
        for key, task in tasks:
            done(key, run_config(**task))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=single_thread_worker) as pool:
        futures = {pool.submit(run_config, **task): key for key, task in tasks}
        for future in as_completed(futures):
            done(futures[future], future.result())


def x_of(run: dict[str, Any]) -> float:
    """Where a run sits on the frontier: parameters removed physically (ModelPruning: the weights it zeroes)."""
    return run["zeroed"] if run["method"] == "ModelPruning" else run["params_removed"]


def pareto(points: list[dict[str, Any]], x: str = "x", y: str = "acc") -> list[dict[str, Any]]:
    """The points no other beats or ties on both axes, by ``x`` ascending."""
    front = [
        p
        for p in points
        if not any(q is not p and q[x] >= p[x] and q[y] >= p[y] and (q[x], q[y]) != (p[x], p[y]) for q in points)
    ]
    return sorted(front, key=lambda p: p[x])


def bracketing(front: list[dict[str, Any]], levels: tuple[float, ...]) -> list[dict[str, Any]]:
    """The Pareto points the interpolation at ``levels`` uses: the nearest on each side of each level."""
    chosen: list[dict[str, Any]] = []
    for level in levels:
        below = [p for p in front if p["x"] <= level]
        above = [p for p in front if p["x"] >= level]
        for pick in (below[-1] if below else None, above[0] if above else None):
            if pick is not None and pick not in chosen:
                chosen.append(pick)
    return sorted(chosen, key=lambda p: p["x"])


def fair_points(payload: dict[str, Any], seeds: list[int] | None = None) -> list[dict[str, Any]]:
    """One point per (method, strength, lr): mean and std over the given seeds that ran (all when None)."""
    grouped: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for run in payload["runs"].values():
        if seeds is None or run["seed"] in seeds:
            grouped.setdefault((run["method"], run["strength"], run["lr"]), []).append(run)
    points = []
    for (method, strength, lr), runs in grouped.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        acc, acc_std = mean_std([r["test_acc"] for r in runs])
        x, x_std = mean_std([x_of(r) for r in runs])
        points.append(
            {
                "method": method,
                "strength": strength,
                "lr": lr,
                "config": config_label(method, strength, lr),
                "seeds": [r["seed"] for r in runs],
                "acc": acc,
                "acc_std": acc_std,
                "x": x,
                "x_std": x_std,
                "flops": statistics.mean(r["flops_removed"] for r in runs),
                "zeroed": statistics.mean(r["zeroed"] for r in runs),
                "per_seed_acc": [r["test_acc"] for r in runs],
            }
        )
    return sorted(points, key=lambda p: (FAIR_ORDER.index(p["method"]), p["x"], p["lr"]))


FAIR_TOLERANCE = 0.005  # a point up to half a point of removal short of a level is read at that level


def interpolate(front: list[dict[str, Any]], level: float, anchor: dict[str, Any] | None) -> dict[str, Any] | None:
    """Accuracy on the Pareto line ``front`` at ``level`` removed, linear between the two points around it; below the
    first point, between ``anchor`` (dense, at 0 %) and it. None past the last point (not reached).

    Per seed: the same two configurations, the same weight, each seed's accuracies (mean ± std over the seeds).
    A point at most `FAIR_TOLERANCE` short of ``level`` counts there when it is higher than the line (``"near"``: the
    knobs land within about half a point of where they aim); ``"strict"`` keeps the interpolation alone."""
    strict: dict[str, Any] | None = None
    line = ([anchor] if anchor is not None else []) + front
    for left, right in itertools.pairwise(line):
        if left["x"] <= level <= right["x"]:
            weight = (level - left["x"]) / (right["x"] - left["x"]) if right["x"] > left["x"] else 1.0
            per_seed = [a + weight * (b - a) for a, b in zip(left["per_seed_acc"], right["per_seed_acc"], strict=False)]
            strict = {
                "acc": left["acc"] + weight * (right["acc"] - left["acc"]),
                "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                "between": [left["config"] if left is not anchor else "dense", right["config"]],
            }
            break
    near = [p for p in front if level - FAIR_TOLERANCE <= p["x"] < level]
    best = max(near, key=lambda p: p["acc"], default=None)
    if best is not None and (strict is None or best["acc"] > strict["acc"] + 5e-4):
        return {
            "acc": best["acc"],
            "std": best["acc_std"],
            "between": [best["config"]] * 2,
            "near": best["x"],
            "strict": None if strict is None else strict["acc"],
        }
    if strict is not None:
        strict["strict"] = strict["acc"]
    return strict


def fair_main(args: argparse.Namespace) -> None:
    """``--fair``: tune every method on seed 0 over the same grid, confirm each one's Pareto points on the others."""
    model = args.model
    if model not in FAIR_STRENGTHS:
        raise SystemExit(f"--fair covers {sorted(FAIR_STRENGTHS)}")
    name = f"frontier_fair_{model}{'_quick' if args.quick else ''}"
    path = RESULTS / f"{name}.json"
    if args.replot:
        fair_render(name, json.loads(path.read_text()))
        return
    epochs = 4 if args.quick else args.epochs
    seeds = args.seeds[:2] if args.quick else args.seeds
    config = with_recorded_betas(load_config(CONFIGS[model]))
    base_lr = config["model"]["init_args"]["lr"]
    lrs = [base_lr * factor for factor in FAIR_LR_FACTORS[model]]
    methods = [m for m in FAIR_ORDER if m == "dense" or m in FAIR_STRENGTHS[model]]
    if args.methods:
        methods = [m for m in methods if m in args.methods or m == "dense"]
    strengths = {"dense": (0.0,), **FAIR_STRENGTHS[model]}
    if args.quick:
        strengths = {m: values[-1:] for m, values in strengths.items()}
        lrs = lrs[-1:]
    payload: dict[str, Any]
    if path.exists():
        payload = json.loads(path.read_text())
        if payload["epochs"] != epochs:
            raise SystemExit(f"{path.name} holds {payload['epochs']}-epoch runs")
    else:
        payload = {"model": model, "epochs": epochs, "seeds": seeds, "lrs": lrs, "runs": {}}
    payload.update(
        jobs=args.jobs,
        machine=machine(),
        lrs=lrs,
        strengths={m: list(strengths[m]) for m in methods},
        model_overrides=FAIR_MODEL_OVERRIDES[model],
    )
    tune_seed, confirm_seeds = seeds[0], seeds[1:]
    tasks = [
        (run_key(m, s, lr, tune_seed), fair_task(model, config, m, s, lr, tune_seed, epochs))
        for m in methods
        for s in strengths[m]
        for lr in lrs
        if run_key(m, s, lr, tune_seed) not in payload["runs"]
    ]
    print(f"tuning on seed {tune_seed}: {len(tasks)} runs to go", flush=True)
    run_and_save(tasks, args.jobs, payload, name)
    if args.tune_only:
        fair_render(name, payload)
        return
    chosen = fair_chosen(payload, tune_seed)
    payload["chosen"] = [(p["method"], p["strength"], p["lr"]) for p in chosen]
    tasks = [
        (
            run_key(p["method"], p["strength"], p["lr"], seed),
            fair_task(model, config, p["method"], p["strength"], p["lr"], seed, epochs),
        )
        for p in chosen
        if p["method"] in methods
        for seed in confirm_seeds
        if run_key(p["method"], p["strength"], p["lr"], seed) not in payload["runs"]
    ]
    print(f"confirming on seeds {confirm_seeds}: {len(tasks)} runs to go", flush=True)
    run_and_save(tasks, args.jobs, payload, name)
    payload["confirmed"] = all(
        run_key(p["method"], p["strength"], p["lr"], seed) in payload["runs"] for p in chosen for seed in confirm_seeds
    )
    write_json(f"{name}.json", payload)
    fair_render(name, payload)


def fair_chosen(payload: dict[str, Any], tune_seed: int) -> list[dict[str, Any]]:
    """Per method, the seed-0 Pareto points that bracket the comparison levels; dense at its best learning rate."""
    points = fair_points(payload, [tune_seed])
    chosen = []
    for method in FAIR_ORDER:
        members = [p for p in points if p["method"] == method]
        if not members:
            continue
        if method == "dense":
            chosen.append(max(members, key=lambda p: p["acc"]))
        else:
            chosen += bracketing(pareto(members), FAIR_LEVELS_OF[payload["model"]])
    return chosen


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def fair_seeds(payload: dict[str, Any]) -> list[int]:
    """The seeds the figures average: all of them once every chosen point but ModelPruning's (which is not on the
    frontier) ran on each; the tuning seed before."""
    seeds: list[int] = payload["seeds"]
    chosen = [c for c in payload.get("chosen", []) if c[0] != "ModelPruning"]
    done = chosen and all(run_key(m, st, lr, seed) in payload["runs"] for m, st, lr in chosen for seed in seeds)
    return seeds if done else seeds[:1]


def fair_frontiers(payload: dict[str, Any]) -> dict[str, Any]:
    """The 3-seed figures: points run on every seed, each method's Pareto line, DemP's best line, dense."""
    seeds = fair_seeds(payload)
    full = [p for p in fair_points(payload, seeds) if sorted(p["seeds"]) == sorted(seeds)]
    dense_points = [p for p in full if p["method"] == "dense"]
    dense = max(dense_points, key=lambda p: p["acc"]) if dense_points else None
    lines = {}
    for method in FAIR_ORDER[1:]:
        members = [p for p in full if p["method"] == method]
        if members:
            lines[method] = pareto(members)
    demp = [p for p in full if p["method"] in DEMP_METHODS]
    if demp:
        lines["DemP best"] = pareto(demp)
    return {"points": full, "dense": dense, "lines": lines}


def fair_render(name: str, payload: dict[str, Any]) -> None:
    """Write ``<name>.md`` and ``<name>.png`` from a fair-frontier payload."""
    model, epochs, seeds = payload["model"], payload["epochs"], fair_seeds(payload)
    levels = FAIR_LEVELS_OF[model]
    figures = fair_frontiers(payload)
    dense, lines = figures["dense"], figures["lines"]
    tune = fair_points(payload, payload["seeds"][:1])
    chosen = {tuple(c) for c in payload.get("chosen", [])}
    factors = ", ".join(f"{lr:g}" for lr in payload["lrs"])
    structure = " (decoupled residual channels, the demo's default)" if model == "cnn" else ""
    out = [
        f"# Fair frontier: {model.upper()}{structure} on MNIST-1D, {epochs} epochs, {plural(len(seeds), 'seed')}",
        "",
        "**Protocol.** Every method trains the same model with the config's optimizer, LR schedule, batch size and "
        f"epochs (Adam betas as recorded: `with_recorded_betas`), over the same learning-rate grid ({factors}) and a "
        "grid of its own strength knob of the same size "
        + "; ".join(
            f"{m} {FAIR_KNOBS[m]} ∈ {{{', '.join(f'{s:g}' for s in v)}}}"
            for m, v in payload["strengths"].items()
            if m != "dense"
        )
        + f". Seed {seeds[0]} runs the whole grid (every method, every learning rate: dense too). Each method's "
        f"seed-{seeds[0]} Pareto points (accuracy against parameters removed) that bracket "
        + ", ".join(f"{100 * level:.0f}" for level in levels)
        + f" % removed, and dense at its best learning rate, then run on seeds {', '.join(str(s) for s in payload['seeds'][1:])} "
        "too; the figures below are means ± std over the seeds, and each method's line is the Pareto line of its "
        "confirmed points. *DemP best* is, at each level, the best of the three DemP recipes (its recipe in brackets). Accuracy at a level is "
        "interpolated linearly between the two points of a line around it (below a line's first point: between dense "
        "at 0 % and that point); past a line's last point it is *not reached*. DemP one-cycle: the config's recipe "
        "(one-cycle λ and σ over 90 % of the steps). DemP constant: the authors' ResNet-18 recipe, λ and σ constant "
        'over the whole run (`schedule="constant"`, `schedule_span=1.0`). DemP target: `target_sparsity` with '
        "`reg_max` and `noise_std` at their defaults, a removal event every 2 epochs (as `target.py`). Torch-Pruning "
        "and ModelPruning prune at the end of each of the first two thirds of the epochs (as `frontier.py`)."
        + (
            " The one-cycle and constant sweeps add "
            + ", ".join(f"`{key}={value!r}`" for key, value in FAIR_SWEEP_OVERRIDES[model].items())
            + " (`FAIR_SWEEP_OVERRIDES`: the "
            "config's regularizer removes nothing on this model)."
            if FAIR_SWEEP_OVERRIDES[model]
            else ""
        ),
        "",
    ]
    dense_acc = dense["acc"] if dense else float("nan")
    if len(seeds) < len(payload["seeds"]):
        out += [
            f"**Partial:** the seed-{seeds[0]} grid only (the other seeds are not run yet): the figures below are single "
            "runs, not means.",
            "",
        ]
    if dense:
        out += [
            f"Dense at its best learning rate ({dense['config']}): {100 * dense['acc']:.2f} ± {100 * dense['acc_std']:.2f} %"
            f" ({plural(len(dense['seeds']), 'seed')}). Seed {seeds[0]} at each learning rate: "
            + ", ".join(f"{p['config']} {100 * p['acc']:.2f} %" for p in tune if p["method"] == "dense")
            + ".",
            "",
        ]
    table_methods = [m for m in ("DemP best", *DEMP_METHODS, "TP magnitude", "TP BN-scale") if m in lines]
    values: dict[str, list[dict[str, Any] | None]] = {
        m: [interpolate(lines[m], level, dense) for level in levels] for m in table_methods if m != "DemP best"
    }
    if "DemP best" in lines:  # at each level, the best of the three DemP recipes' lines
        values["DemP best"] = [demp_best(values, index) for index in range(len(levels))]
    out += [
        f"## Accuracy at each level of parameters removed ({plural(len(seeds), 'seed')}, on each method's Pareto line)",
        "",
        "| method | "
        + " | ".join(f"{100 * level:.0f} % (%)" for level in levels)
        + " | most removed within 1 pt of dense (%) |",
        "|---|" + "---|" * (len(levels) + 1),
    ]
    for method in table_methods:
        cells = [
            "not reached"
            if v is None
            else f"{100 * v['acc']:.2f} ± {100 * v['std']:.2f}"
            + (f" † ({100 * v['near']:.1f} %)" if "near" in v else "")
            + (f" ({v['recipe'].removeprefix('DemP ')})" if "recipe" in v else "")
            for v in values[method]
        ]
        within = [p for p in lines[method] if p["acc"] >= dense_acc - 0.01]
        best = max(within, key=lambda p: p["x"], default=None)
        best_text = "none" if best is None else f"{100 * best['x']:.1f} ({best['config']}, {100 * best['acc']:.2f} %)"
        if method == "DemP best" and best is not None:
            best_text = f"{100 * best['x']:.1f} ({best['method']}, {best['config']}, {100 * best['acc']:.2f} %)"
        out.append(f"| {method} | " + " | ".join(cells) + f" | {best_text} |")
    notes = [
        f"{method} at {100 * level:.0f} %: " + ("not reached" if v["strict"] is None else f"{100 * v['strict']:.2f} %")
        for method in table_methods
        for level, v in zip(levels, values[method], strict=True)
        if v is not None and "near" in v
    ]
    if notes:
        out += [
            "",
            f"† a point at most {100 * FAIR_TOLERANCE:.1f} point of removal short of the level (its removal in "
            "brackets), read at the level because it is above the line there. Interpolation alone: "
            + "; ".join(notes)
            + ".",
        ]
    out += ["", "## Verdict against the goals", ""]
    out += fair_verdict(model, values, lines, dense_acc)
    out += [
        "",
        f"## Points run on every seed ({plural(len(seeds), 'seed')}), by method, then parameters removed",
        "",
        "| method | configuration | test acc (%) | Δ vs dense (pt) | params removed (%) | FLOPs removed (%) | on its line |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in figures["points"]:
        if p["method"] == "ModelPruning":
            continue
        on_line = any(p is q for q in lines.get(p["method"], []))
        out.append(
            f"| {p['method']} | {p['config']} | {100 * p['acc']:.2f} ± {100 * p['acc_std']:.2f} | "
            f"{100 * (p['acc'] - dense_acc):+.2f} | {100 * p['x']:.1f} ± {100 * p['x_std']:.1f} | "
            f"{100 * p['flops']:.1f} | {'yes' if on_line else 'no'} |"
        )
    recipe = lines.get("DemP best", [])
    if recipe:
        out += [
            "",
            "DemP's best line is made of: "
            + "; ".join(f"{p['method']} {p['config']} ({100 * p['x']:.1f} %, {100 * p['acc']:.2f} %)" for p in recipe)
            + ".",
        ]
    mp = [p for p in figures["points"] if p["method"] == "ModelPruning"]
    mp_tune = [p for p in tune if p["method"] == "ModelPruning"]
    if mp or mp_tune:
        out += [
            "",
            "## ModelPruning (masks, dense shapes)",
            "",
            "Lightning's `ModelPruning` zeroes weights but removes no parameter or FLOP physically: on the frontier it "
            "sits at 0 % removed, so it is left out of the plot. Its points on the weights it zeroes, "
            + (
                f"{len(seeds)}-seed means of its confirmed points:"
                if mp
                else f"seed {seeds[0]}, its tuning grid; its other seeds were not run, for time:"
            ),
            "",
            "| configuration | test acc (%) | Δ vs dense (pt) | weights zeroed (%) | params removed (%) |",
            "|---|---|---|---|---|",
        ]
        for p in mp or mp_tune:
            out.append(
                f"| {p['config']} | {100 * p['acc']:.2f} ± {100 * p['acc_std']:.2f} | {100 * (p['acc'] - dense_acc):+.2f} | "
                f"{100 * p['zeroed']:.1f} | 0.0 |"
            )
    out += fair_collapse(payload)
    out += [
        "",
        f"## The seed-{seeds[0]} grid, by method, then parameters removed",
        "",
        f"| method | configuration | test acc (%) | params removed (%) | FLOPs removed (%) | weights zeroed (%) | seed-{seeds[0]} Pareto | run on every seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in FAIR_ORDER:
        members = [p for p in tune if p["method"] == method]
        front = pareto(members)
        for p in sorted(members, key=lambda p: (p["x"], p["lr"])):
            on_front = any(p is q for q in front) and method != "dense"
            out.append(
                f"| {method} | {p['config']} | {100 * p['acc']:.2f} | {100 * (p['x'] if method != 'ModelPruning' else 0.0):.1f} | "
                f"{100 * p['flops']:.1f} | {100 * p['zeroed']:.1f} | {'yes' if on_front else ''} | "
                f"{'yes' if (method, p['strength'], p['lr']) in chosen else ''} |"
            )
    out += [
        "",
        f"Runs: {payload.get('jobs', 1)} side by side, one thread each (fit times in the JSON are not speed figures). "
        + machine_line(payload["machine"]),
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(out))
    fair_plot(payload, figures, tune, RESULTS / f"{name}.png")
    print("\n".join(out))


def fair_collapse(payload: dict[str, Any]) -> list[str]:
    """Issue #17's collapse check on every run of the two `reg_max` sweeps: at each learning rate, the runs that end
    under 50 % while a smaller strength of the same recipe keeps 95 % of dense, and the lowest run; with the runs
    kept from before ``max_death_fraction=0.5`` became the default, each seed-0 run before and after."""
    dense = {r["lr"]: r["test_acc"] for r in payload["runs"].values() if r["method"] == "dense" and r["seed"] == 0}
    sweeps = [r for r in payload["runs"].values() if r["method"] in ("DemP one-cycle", "DemP constant")]
    if not sweeps or not dense:
        return []
    collapsed = [
        r
        for r in sweeps
        if r["test_acc"] < 0.5
        and any(
            q["method"] == r["method"]
            and q["lr"] == r["lr"]
            and q["strength"] < r["strength"]
            and q["test_acc"] >= 0.95 * dense.get(r["lr"], 1.0)
            for q in sweeps
        )
    ]
    lowest = min(sweeps, key=lambda r: r["test_acc"])
    out = [
        "",
        "## No collapse: the `reg_max` sweeps' lowest runs",
        "",
        f"Over {len(sweeps)} runs of the one-cycle and constant sweeps (every seed), the lowest ends at "
        f"{100 * lowest['test_acc']:.1f} % ({lowest['method']}, {config_label(lowest['method'], lowest['strength'], lowest['lr'])}, "
        f"seed {lowest['seed']}, {100 * x_of(lowest):.1f} % removed). Runs under 50 % while a smaller strength of the "
        "same recipe and learning rate keeps 95 % of dense: "
        + (
            ", ".join(
                f"{r['method']} {config_label(r['method'], r['strength'], r['lr'])} seed {r['seed']}" for r in collapsed
            )
            or "none"
        )
        + ".",
    ]
    before = payload.get("runs_before_death_cap", {})
    pairs = [
        (payload["runs"][key], run)
        for key, run in sorted(before.items())
        if key in payload["runs"] and run["seed"] == 0
    ]
    if pairs:
        out += [
            "",
            "These sweeps ran with `max_death_fraction=0.5`, the default since; the JSON keeps their earlier runs "
            "(`max_death_fraction=1`, the live floor alone) under `runs_before_death_cap`. Seed 0, before → now:",
            "",
            "| method | configuration | test acc (%) | params removed (%) |",
            "|---|---|---|---|",
        ]
        for now, old in pairs:
            out.append(
                f"| {now['method']} | {config_label(now['method'], now['strength'], now['lr'])} | "
                f"{100 * old['test_acc']:.1f} → {100 * now['test_acc']:.1f} | {100 * x_of(old):.1f} → {100 * x_of(now):.1f} |"
            )
    return out


def demp_best(values: dict[str, list[dict[str, Any] | None]], index: int) -> dict[str, Any] | None:
    """The highest of the DemP recipes' values at the ``index``-th level, tagged with its recipe."""
    found = [(value, m) for m in DEMP_METHODS if m in values for value in [values[m][index]] if value is not None]
    if not found:
        return None
    value, method = max(found, key=lambda pair: float(pair[0]["acc"]))
    return {**value, "recipe": method}


def envelope(lines: dict[str, list[dict[str, Any]]], dense: dict[str, Any] | None) -> list[tuple[float, float]]:
    """The upper envelope of the DemP recipes' lines (interpolation alone), sampled every half point of removal."""
    points = []
    for step in range(201):
        level = step / 200
        found = [interpolate(lines[m], level, dense) for m in DEMP_METHODS if m in lines]
        accs = [v["strict"] for v in found if v is not None and v.get("strict") is not None]
        if accs:
            points.append((100 * level, 100 * max(accs)))
    return points


def where(value: dict[str, Any]) -> str:
    """`` (†, at 94.7 % removed)`` for a value read off a point short of its level, else nothing."""
    return f" (†, at {100 * value['near']:.1f} % removed)" if "near" in value else ""


def fair_verdict(
    model: str, values: dict[str, list[dict[str, Any] | None]], lines: dict[str, list[dict[str, Any]]], dense_acc: float
) -> list[str]:
    """The done-when lines of issue #17 (`FAIR_GOALS`), met or missed by how much."""
    demp, magnitude = values.get("DemP best"), values.get("TP magnitude")
    if demp is None or magnitude is None:
        return ["- not enough runs yet for a verdict"]
    levels, allowed = FAIR_GOALS[model]
    out = []
    for level in levels:
        index = FAIR_LEVELS_OF[model].index(level)
        ours, theirs = demp[index], magnitude[index]
        if ours is None:
            out.append(f"- {100 * level:.0f} %: missed, DemP's best line does not reach it")
            continue
        if theirs is None:
            out.append(f"- {100 * level:.0f} %: met, DemP {100 * ours['acc']:.2f} %; magnitude does not reach it")
            continue
        gap = ours["acc"] - theirs["acc"]
        verdict = "met" if gap >= -allowed - 1e-9 else f"missed by {100 * (-gap - allowed):.2f} pt"
        out.append(
            f"- {100 * level:.0f} %: {verdict}: DemP {100 * ours['acc']:.2f} %{where(ours)} vs magnitude "
            f"{100 * theirs['acc']:.2f} %{where(theirs)} "
            f"({100 * gap:+.2f} pt" + (", goal: within 0.5 pt or ahead)" if model != "cnn" else ", goal: at or above)")
        )
    if model == "cnn":
        within = [p for p in lines["DemP best"] if p["acc"] >= dense_acc - 0.01]
        best = max(within, key=lambda p: p["x"], default=None)
        removed = best["x"] if best else 0.0
        out.append(
            f"- ≥ 90 % removed within 1 point of dense: {'met' if removed >= 0.9 else 'missed'}: "
            + (
                f"{100 * removed:.1f} % ({best['method']}, {best['config']}, {100 * (best['acc'] - dense_acc):+.2f} pt)"
                if best
                else "no point"
            )
        )
    return out


def fair_plot(payload: dict[str, Any], figures: dict[str, Any], tune: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against parameters removed, one Pareto line per method; the right panel zoomed near dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, seeds = payload["model"], fair_seeds(payload)
    dense, lines = figures["dense"], figures["lines"]
    markers = {"DemP target": "o", "DemP one-cycle": "s", "DemP constant": "D", "TP magnitude": "^", "TP BN-scale": "v"}
    zoom = 2.5 if model == "cnn" else 8.0
    start = 100 * min(FAIR_LEVELS_OF[model]) - 10  # the zoomed panel: from just under the first level
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    drawn = [m for m in markers if m in lines]
    for index, axis in enumerate(axes):
        if "DemP best" in lines:
            best = envelope(lines, dense)
            axis.plot(
                [x for x, _ in best],
                [y for _, y in best],
                color="tab:red",
                linewidth=7,
                alpha=0.18,
                solid_capstyle="round",
                label="DemP best (the best DemP recipe at each point)" if index == 0 else None,
                zorder=1,
            )
        for method in drawn:
            color = FAIR_COLORS[method]
            grid = [p for p in tune if p["method"] == method]
            axis.scatter(
                [100 * p["x"] for p in grid],
                [100 * p["acc"] for p in grid],
                marker=markers[method],
                s=18,
                facecolors="none",
                edgecolors=color,
                alpha=0.35,
                linewidths=0.8,
                zorder=2,
            )
            line = lines[method]
            if dense:
                axis.plot(
                    [0.0, 100 * line[0]["x"]],
                    [100 * dense["acc"], 100 * line[0]["acc"]],
                    color=color,
                    linewidth=1.0,
                    linestyle=":",
                    zorder=2,
                )
            axis.errorbar(
                [100 * p["x"] for p in line],
                [100 * p["acc"] for p in line],
                yerr=[100 * p["acc_std"] for p in line],
                color=color,
                marker=markers[method],
                markersize=5,
                capsize=2,
                linewidth=1.4,
                label=f"{method} ({len(seeds)} seeds)" if index == 0 else None,
                zorder=3,
            )
        if dense:
            axis.axhline(
                100 * dense["acc"],
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"dense, {dense['config']} ({100 * dense['acc']:.2f} %)" if index == 0 else None,
            )
        for level in FAIR_LEVELS_OF[model]:
            axis.axvline(100 * level, color="grey", linewidth=0.6, alpha=0.35, zorder=0)
        axis.set_xlabel("parameters removed (%)")
        axis.set_xlim(0, 100)
        axis.grid(alpha=0.25)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title("whole range", fontsize=10)
    if dense:
        top = max([dense["acc"]] + [p["acc"] + p["acc_std"] for line in lines.values() for p in line])
        axes[1].set_ylim(100 * dense["acc"] - zoom, min(100.0, 100 * max(top + 0.002, dense["acc"] + zoom / 500)))
        axes[1].set_xlim(start, 100)
    axes[1].set_title(f"zoom: within {zoom:g} points of dense, {start:.0f}–100 % removed", fontsize=10)
    axes[0].scatter(
        [],
        [],
        marker="o",
        facecolors="none",
        edgecolors="grey",
        alpha=0.6,
        label=f"seed-{seeds[0]} grid points (faint)",
    )
    figure.legend(loc="lower center", ncol=4, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    figure.suptitle(
        f"MNIST-1D {model.upper()}, {payload['epochs']} epochs: each method's Pareto line over the same lr grid "
        f"({len(seeds)}-seed means ± std)",
        fontsize=11,
    )
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()

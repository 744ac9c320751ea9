"""Collapse or trade-off: a ``reg_max`` sweep with the live floor off (``live_floor=0``, the paper) and on (the
default), on the MNIST-1D residual CNN (decoupled channels) and MLP, same seeds and epochs as the frontier, and on
the two models of ``unseen_models.py`` nothing was tuned on (``--models unseen unseen_mlp``).

For each model, ``reg_max`` in its sweep, seed and floor, the config's recipe trains with ``DemonPruning(reg_max=λ,
live_floor=f)``; the table gives test accuracy, parameters removed and the smallest layer's kept fraction. With
``--death-fractions``, also ``max_death_fraction`` (the share of a layer's units the pull may outweigh the loss on;
1 leaves only the floor, 0.5 is the default); a rerun replaces only the rows of the settings it runs.

Writes ``benchmarks/results/collapse.json`` and ``collapse.md``.

    python benchmarks/collapse.py                 # CNN and MLP, 2 seeds, 30 epochs
    python benchmarks/collapse.py --quick         # MLP only, 1 seed, 6 epochs, smoke test
    python benchmarks/collapse.py --seeds 0 1 2 --floors 0.05 --death-fractions 0.5   # the rounds, added
    python benchmarks/collapse.py --models unseen unseen_mlp --seeds 0 1 2 --floors 0.05 --death-fractions 1 0.5
"""

from __future__ import annotations

import argparse
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
MODELS: dict[str, tuple[Path, dict[str, Any], list[float]]] = {
    "cnn": (REPO / "configs" / "mnist1d_cnn.yaml", {"decoupled": True}, [0.05, 0.08, 0.1, 0.15, 0.2]),
    "mlp": (REPO / "configs" / "mnist1d_mlp.yaml", {}, [0.3, 1.0, 3.0]),
    "unseen": (REPO / "benchmarks" / "unseen_cnn.yaml", {}, [0.05, 0.1, 0.2]),  # a plain CNN, never tuned on
    "unseen_mlp": (REPO / "benchmarks" / "unseen_mlp.yaml", {}, [0.3, 1.0, 3.0]),  # a tapered norm-free MLP
}
FLOORS = [0.0, 0.05]


def smallest_kept(run: dict[str, Any]) -> float:
    """The smallest kept fraction over the removable layers."""
    first = run["events"][0]["widths"] if run["events"] else run["widths"]
    initial = {name: width + run["events"][0]["removed"].get(name, 0) for name, width in first.items()}
    return min(run["widths"][name] / initial[name] for name in initial) if initial else 1.0


def render(payload: dict[str, Any], name: str = "collapse.md") -> None:
    lines = [
        f"# Collapse or trade-off: `reg_max` with and without the live floor ({len(payload['seeds'])} seeds, "
        f"{payload['epochs']} epochs)",
        "",
        "| model | `reg_max` | `live_floor` | `max_death_fraction` | test acc (%) | per seed | params removed (%) "
        "| smallest layer kept (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        runs = row["runs"]
        accs = [100 * r["test_acc"] for r in runs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {row['model']} | {row['reg_max']:g} | {row['live_floor']:g} | {row.get('max_death_fraction', 1.0):g} "
            f"| {statistics.mean(accs):.2f} ± {spread:.2f} "
            f"| {', '.join(f'{a:.1f}' for a in accs)} "
            f"| {100 * statistics.mean(r['params_removed'] for r in runs):.1f} "
            f"| {100 * min(smallest_kept(r) for r in runs):.1f} |"
        )
    lines += [
        "",
        "`live_floor=0` is the paper's behaviour; 0.05 is the default. `max_death_fraction` 1 leaves "
        "the floor alone; 0.5 (the default since these runs) lets the pull outweigh the loss on at most half of a layer's units, so the pull kills "
        "at most half of them per removal event (every 2 epochs here). The smallest layer's kept fraction is the "
        "minimum over seeds of the removable layer with the fewest units left, as a fraction of its initial width. "
        "`unseen` is the plain CNN of `unseen_models.py` and `unseen_mlp` the tapered norm-free MLP, models nothing "
        "was tuned on (dense, same recipe and 3 seeds, in `target.md`: 98.40 % and 67.97 %).",
        "",
    ]
    write_report(name, lines, payload["machine"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cnn", "mlp"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=default_jobs())
    parser.add_argument("--reg-max", type=float, nargs="+", help="instead of each model's sweep")
    parser.add_argument("--floors", type=float, nargs="+", default=FLOORS)
    parser.add_argument("--death-fractions", type=float, nargs="+", default=[1.0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--replot", action="store_true")
    args = parser.parse_args()
    name = "collapse_quick.json" if args.quick else "collapse.json"
    if args.replot:
        render(json.loads((RESULTS / name).read_text()), name.replace(".json", ".md"))
        return
    models = ["mlp"] if args.quick else args.models
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = 6 if args.quick else args.epochs
    keyed = []
    for model in models:
        path, overrides, sweep = MODELS[model]
        config = with_recorded_betas(load_config(path))
        for reg_max in args.reg_max or sweep:
            for floor, death in ((f, d) for f in args.floors for d in args.death_fractions):
                for seed in seeds:
                    task = {
                        "config": config,
                        "seed": seed,
                        "with_demp": True,
                        "max_epochs": epochs,
                        "model_overrides": overrides,
                        "callback_overrides": {
                            "reg_max": reg_max,
                            "live_floor": floor,
                            "max_death_fraction": death,
                            "prune_every_n_epochs": 2,
                        },
                    }
                    keyed.append(((model, reg_max, floor, death), task))
    grouped = run_grouped(keyed, args.jobs)
    rows = [
        {"model": m, "reg_max": r, "live_floor": f, "max_death_fraction": d, "runs": runs}
        for (m, r, f, d), runs in grouped.items()
    ]
    if (RESULTS / name).exists():  # rows of other models or settings stay (a rerun replaces only its own)
        run = {(row["model"], row["live_floor"], row["max_death_fraction"]) for row in rows}
        kept = [
            row
            for row in json.loads((RESULTS / name).read_text())["rows"]
            if (row["model"], row["live_floor"], row.get("max_death_fraction", 1.0)) not in run
        ]
        rows = sorted(
            kept + rows,
            key=lambda row: (
                sorted(MODELS).index(row["model"]),
                row["reg_max"],
                row["live_floor"],
                -row.get("max_death_fraction", 1.0),
            ),
        )
    payload = {"seeds": seeds, "epochs": epochs, "rows": rows, "machine": machine()}
    write_json(name, payload)
    render(payload, name.replace(".json", ".md"))


if __name__ == "__main__":
    main()

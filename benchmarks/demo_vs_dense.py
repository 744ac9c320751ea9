"""The demo's figures: DemP vs. the same training loop without DemP, on the embedded default config.

Runs ``configs/mnist1d_cnn.yaml`` (residual CNN, MNIST-1D generated offline) with and without its DemonPruning
callback, same seeds, same epochs, same optimizer (``--jobs`` runs side by side, one thread each, so fit times are
not speed figures: ``speed.py`` measures speed), and writes
``benchmarks/results/demo_vs_dense.json`` and ``.md``.

    python benchmarks/demo_vs_dense.py            # 3 seeds, 60 epochs (about 15 min on 2 CPU cores)
    python benchmarks/demo_vs_dense.py --quick    # 1 seed, 10 epochs
    python benchmarks/demo_vs_dense.py --replot   # redraw demo_units.png from the saved first DemP run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import json
from typing import Any

from _common import RESULTS, default_jobs, instantiate, load_config, machine, run_configs, write_json, write_report

REPO = Path(__file__).resolve().parents[1]


def summarize(runs: list[dict], key: str) -> str:
    values = [run[key] for run in runs]
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def state_of_saved_run(config: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """What `plot_run` draws, rebuilt from a saved run's events and its config: the starting widths are the first
    event's widths plus what it removed; the schedule is the config's, laid over its epochs."""
    first = run["events"][0]
    initial = {name: width + first["removed"].get(name, 0) for name, width in first["widths"].items()}
    callback = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("DemonPruning"))["init_args"]
    data = instantiate(config["data"])
    data.setup("fit")
    total = config["trainer"]["max_epochs"] * len(data.train_dataloader())
    schedule = {
        "name": callback.get("schedule", "one_cycle"),
        "reg_max": callback.get("reg_max", 0.03),
        "noise_std": callback.get("noise_std", 5e-5),
        "span_steps": round(callback.get("schedule_span", 0.9) * total),
        "total_steps": total,
    }
    return {"initial_widths": initial, "events": run["events"], "schedule": schedule}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mnist1d_cnn.yaml")
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="runs in parallel, one thread each")
    parser.add_argument("--replot", action="store_true", help="redraw demo_units.png from the saved runs")
    args = parser.parse_args()
    if args.replot:
        from lightning_demp.plots import plot_run

        saved = json.loads((RESULTS / "demo_vs_dense.json").read_text())
        first = next(run for run in saved["runs"] if run["demp"])
        plot_run(state_of_saved_run(load_config(REPO / saved["config"]), first), RESULTS / "demo_units.png")
        return
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = 10 if args.quick else None
    config = load_config(args.config)
    tasks = [  # dense and DemP of one seed side by side
        {
            "config": config,
            "seed": seed,
            "with_demp": with_demp,
            "max_epochs": epochs,
            "return_callback_state": with_demp and seed == seeds[0],
        }
        for seed in seeds
        for with_demp in (False, True)
    ]
    runs = run_configs(tasks, args.jobs)
    for run in runs:
        state = run.pop("callback_state", None)
        if state is not None and not args.quick:  # the picture in the README
            from lightning_demp.plots import plot_run

            plot_run(state, RESULTS / "demo_units.png")
    dense = [r for r in runs if not r["demp"]]
    demp = [r for r in runs if r["demp"]]
    payload = {"config": str(args.config.relative_to(REPO)), "quick": args.quick, "machine": machine(), "runs": runs}
    suffix = "_quick" if args.quick else "" if seeds == [0, 1, 2] else "_seeds" + "".join(map(str, seeds))
    write_json(f"demo_vs_dense{suffix}.json", payload)
    table = [
        "| run | test acc | params removed | FLOPs removed | units removed | fit time (s) |",
        "|---|---|---|---|---|---|",
        f"| dense | {summarize(dense, 'test_acc')} | 0 | 0 | 0 | {summarize(dense, 'fit_seconds')} |",
        f"| DemP | {summarize(demp, 'test_acc')} | {summarize(demp, 'params_removed')} | "
        f"{summarize(demp, 'flops_removed')} | {summarize(demp, 'units_removed')} | {summarize(demp, 'fit_seconds')} |",
    ]
    title = f"# Demo vs. dense ({len(seeds)} seed(s), {epochs or config['trainer']['max_epochs']} epochs)"
    write_report(f"demo_vs_dense{suffix}.md", [title, "", *table, ""], payload["machine"])


if __name__ == "__main__":
    main()

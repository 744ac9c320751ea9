"""Pictures of a DemP run: live units per layer over training, with the λ/σ schedules beneath.

The figure is drawn from the callback's ``state_dict()`` (the same plain dict stored in checkpoints), so a run can
be plotted at the end of training or later from a saved checkpoint with `plot_checkpoint`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_demp.schedules import make_schedule

log = logging.getLogger(__name__)
LINES_UP_TO = 12  # layers drawn as lines; more become the rows of a heat map


def units_over_steps(state: Mapping[str, Any]) -> tuple[list[int], dict[str, list[int]]]:
    """Steps of the removal events (starting at 0) and, per layer, the units kept after each.

    Examples:
        >>> state = {"initial_widths": {"fc1": 8}, "events": [{"step": 10, "widths": {"fc1": 5}}]}
        >>> units_over_steps(state)
        ([0, 10], {'fc1': [8, 5]})
    """
    steps = [0]
    widths = {name: [int(width)] for name, width in state["initial_widths"].items()}
    for event in state["events"]:
        steps.append(int(event["step"]))
        for name, series in widths.items():
            series.append(int(event.get("widths", {}).get(name, series[-1])))
    return steps, widths


def schedule_values(schedule: Mapping[str, Any], steps: Sequence[int]) -> tuple[list[float], list[float]]:
    """λ_t and σ_t at ``steps`` from a saved schedule record: each earlier schedule of a run resumed with other
    settings (its ``history``) up to the step it ended at, then the current one.

    Examples:
        >>> record = {"name": "constant", "reg_max": 0.3, "noise_std": 0.0, "span_steps": 10,
        ...           "history": [{"name": "constant", "reg_max": 0.1, "noise_std": 0.0, "span_steps": 10,
        ...                        "until_step": 4}]}
        >>> schedule_values(record, [0, 3, 4, 9, 10])[0]
        [0.1, 0.1, 0.3, 0.3, 0.0]
    """
    segments = sorted(schedule.get("history", []), key=lambda segment: int(segment["until_step"]))
    built = [
        (
            int(part.get("until_step", math.inf)) if part is not schedule else math.inf,
            make_schedule(part["name"], float(part["reg_max"]), int(part["span_steps"])),
            make_schedule(part["name"], float(part["noise_std"]), int(part["span_steps"])),
        )
        for part in [*segments, schedule]
    ]
    reg_values, noise_values = [], []
    for step in steps:
        _, reg, noise = next(part for part in built if step < part[0])
        reg_values.append(reg.value(step))
        noise_values.append(noise.value(step))
    return reg_values, noise_values


def validation_point(metrics: Mapping[str, Any], step: int) -> dict[str, Any] | None:
    """The run's validation accuracy at ``step`` for the plot: the first logged ``val*acc*`` metric, or ``None``.

    Examples:
        >>> validation_point({"train_loss": 0.3, "val_acc": torch.tensor(0.875)}, step=40)
        {'step': 40, 'name': 'val_acc', 'value': 0.875}
    """
    for name, value in metrics.items():
        if name.startswith("val") and "acc" in name:
            return {"step": int(step), "name": str(name), "value": float(value)}
    return None


def plot_run(state: Mapping[str, Any], path: str | Path | None = None) -> Any:
    """Draw the share of units each layer keeps (top), the validation accuracy when the state recorded it
    (middle), and λ_t/σ_t (bottom); save as PNG when ``path`` is given.

    Up to `LINES_UP_TO` layers are lines with a legend; more are the rows of a heat map of the share kept.

    Args:
        state: ``DemonPruning.state_dict()``, or the ``"DemonPruning"`` entry of a checkpoint's ``"callbacks"``.
        path: Where to write the PNG.

    Returns:
        The matplotlib ``Figure``.

    Examples:
        >>> import os, tempfile
        >>> import matplotlib.pyplot as plt
        >>> state = {
        ...     "initial_widths": {"fc1": 8, "fc2": 6},
        ...     "events": [{"step": 30, "widths": {"fc1": 5, "fc2": 6}}, {"step": 60, "widths": {"fc1": 3, "fc2": 4}}],
        ...     "schedule": {"name": "one_cycle", "reg_max": 0.03, "noise_std": 5e-5, "span_steps": 90,
        ...                  "total_steps": 100},
        ... }
        >>> path = os.path.join(tempfile.mkdtemp(), "units.png")
        >>> figure = plot_run(state, path)
        >>> len(figure.axes), os.path.getsize(path) > 0  # live units, λ_t and σ_t (on a twin axis)
        (3, True)
        >>> plt.close(figure)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, widths = units_over_steps(state)
    schedule = state.get("schedule") or {}
    total = int(schedule.get("total_steps") or max(steps[-1], 1))
    many = len(widths) > LINES_UP_TO
    height = max(6.0, 2.8 + 0.17 * len(widths)) if many else 6.0
    validation = list(state.get("validation") or [])  # (step, accuracy) after each validation, when recorded
    rows, ratios = (3, [3, 1.2, 1.4]) if validation else (2, [3, 1.4])
    figure, axes = plt.subplots(
        rows, 1, figsize=(10, height + 1.5 * (rows - 2)), sharex=True, height_ratios=ratios,
        layout="constrained" if many else None,
    )  # fmt: skip
    top, bottom = axes[0], axes[-1]
    if validation:
        middle = axes[1]
        middle.plot([p["step"] for p in validation], [100 * p["value"] for p in validation], color="black", marker=".")
        middle.set_ylabel(f"{validation[-1]['name']} (%)")
        middle.grid(alpha=0.3)
    initial = {name: max(1, series[0]) for name, series in widths.items()}
    if many:  # one row per layer, coloured by the share kept: readable for 50 layers, where lines would tangle
        kept_rows = [[100.0 * width / initial[name] for width in series] for name, series in widths.items()]
        mesh = top.pcolormesh([*steps, total], range(len(widths) + 1), kept_rows, cmap="viridis", vmin=0, vmax=100)
        labels = [f"{name}: {series[0]} → {series[-1]}" for name, series in widths.items()]
        top.set_yticks([row + 0.5 for row in range(len(widths))], labels=labels, fontsize=7)
        top.invert_yaxis()
        figure.colorbar(mesh, ax=top, location="top", label="units kept (%)", fraction=0.05, aspect=60)
        figure.suptitle("DemonPruning: units kept per layer (rows: units at the start → at the end)")
    else:
        for name, series in widths.items():  # kept share, so that layers of any width compare on one axis
            kept = [100.0 * width / initial[name] for width in [*series, series[-1]]]
            top.step([*steps, total], kept, where="post", label=f"{name}: {series[0]} → {series[-1]}")
        top.set_ylabel("units kept (%)")
        top.set_ylim(0, 105)
        top.set_title("DemonPruning: units kept per layer (legend: units at the start → at the end)")
        top.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        top.grid(alpha=0.3)
    if schedule:
        xs = torch.linspace(0, total, 200).round().long().tolist()
        reg_values, noise_values = schedule_values(schedule, xs)
        bottom.plot(xs, reg_values, color="tab:red", label="λ (regularization)")
        bottom.set_ylabel("λ_t", color="tab:red")
        twin = bottom.twinx()
        reg_peak, noise_peak = max(reg_values), max(noise_values)
        proportional = reg_peak > 0 and all(
            abs(noise * reg_peak - reg * noise_peak) <= 1e-9 * reg_peak * max(noise_peak, 1e-30)
            for reg, noise in zip(reg_values, noise_values, strict=True)
        )
        if proportional and noise_peak > 0:  # one curve read on both axes instead of two lines on top of each other
            low, high = bottom.get_ylim()
            twin.set_ylim(low * noise_peak / reg_peak, high * noise_peak / reg_peak)
            twin.set_ylabel("σ_t (same curve)", color="tab:blue")
        else:
            twin.plot(xs, noise_values, color="tab:blue", linestyle="--", label="σ (noise)")
            twin.set_ylabel("σ_t (dashed)", color="tab:blue")
    for step in steps[1:]:
        bottom.axvline(step, color="grey", alpha=0.3, linewidth=0.8)
    bottom.set_xlabel("optimizer step")
    if not many:  # the heat map's figure is laid out by matplotlib's constrained layout (labels, colour bar)
        figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def plot_checkpoint(checkpoint_path: str | Path, png_path: str | Path) -> Any:
    """Plot a saved run from a Lightning checkpoint written with DemonPruning attached.

    Examples:
        >>> import os, tempfile
        >>> state = {"initial_widths": {"fc1": 8}, "events": [{"step": 10, "widths": {"fc1": 5}}], "schedule": None}
        >>> folder = tempfile.mkdtemp()
        >>> torch.save({"callbacks": {"DemonPruning": state}}, os.path.join(folder, "last.ckpt"))
        >>> figure = plot_checkpoint(os.path.join(folder, "last.ckpt"), os.path.join(folder, "units.png"))
        >>> os.path.getsize(os.path.join(folder, "units.png")) > 0
        True
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    states = [value for key, value in checkpoint.get("callbacks", {}).items() if "DemonPruning" in key]
    if not states:
        raise ValueError(f"No DemonPruning state in `{checkpoint_path}`: was the callback attached when it was saved?")
    return plot_run(states[0], png_path)


def save_run_plot(state: Mapping[str, Any], directory: Path, loggers: Sequence[Any] = (), step: int = 0) -> str | None:
    """Draw `plot_run` into ``directory/demp_units.png`` and send it to loggers that take figures (TensorBoard).

    Returns:
        The PNG's path, or ``None`` when matplotlib is not installed (a message says so).

    Examples:
        >>> import tempfile
        >>> state = {"initial_widths": {"fc1": 8}, "events": [{"step": 3, "widths": {"fc1": 5}}], "schedule": None}
        >>> save_run_plot(state, Path(tempfile.mkdtemp())).endswith("demp_units.png")
        True
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("DemonPruning: install matplotlib to get the units-over-training plot.")
        return None
    figure = plot_run(state)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "demp_units.png"
    figure.savefig(path, dpi=120)
    for logger in loggers:
        add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
        if callable(add_figure):
            add_figure("demp/units", figure, global_step=step)
    plt.close(figure)
    return str(path)

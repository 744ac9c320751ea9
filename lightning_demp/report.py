"""End-of-fit summary: accuracy, units, parameters and FLOPs kept per layer, wall time; read off the ledger."""

from __future__ import annotations

import time

import lightning.pytorch as pl
from torch import nn

from lightning_demp.accounting import count_parameters
from lightning_demp.ledger import PruningLedger


def _example_run() -> tuple[PruningLedger, pl.Trainer, nn.Module]:
    """The state the examples below summarize: a ledger after removals, a trainer with ``val_acc`` logged."""
    import torch

    ledger = PruningLedger(
        initial_widths={"fc1": 8, "fc2": 4}, kept_units={"fc1": [1, 6], "fc2": [0, 1, 2, 3]}, initial_params=20
    )
    module = nn.Linear(4, 2)  # 10 parameters left of the initial 20
    trainer = pl.Trainer(logger=False, enable_progress_bar=False)
    trainer.callback_metrics["val_acc"] = torch.tensor(0.9)  # as logged by validation
    return ledger, trainer, module


def summary_rows(ledger: PruningLedger) -> list[tuple[str, int, int, str]]:
    """One row per prunable group: name, initial units, kept units, kept fraction.

    Examples:
        >>> ledger = PruningLedger(initial_widths={"fc1": 8, "fc2": 4}, kept_units={"fc1": [1, 6], "fc2": [0, 1, 2, 3]})
        >>> summary_rows(ledger)
        [('fc1', 8, 2, '25%'), ('fc2', 4, 4, '100%')]
    """
    rows = []
    for name, initial in ledger.initial_widths.items():
        kept = len(ledger.kept_units.get(name, []))
        rows.append((name, initial, kept, f"{kept / initial:.0%}" if initial else "-"))
    return rows


def summary_text(
    ledger: PruningLedger, trainer: pl.Trainer, module: nn.Module, fit_start_time: float | None = None
) -> str:
    """Render the summary as plain text (also the fallback when ``rich`` is not installed).

    Examples:
        >>> ledger, trainer, module = _example_run()  # 2 of 8 and 4 of 4 units kept, 10 of 20 parameters
        >>> print(summary_text(ledger, trainer, module))
        layer                              units    kept  kept %
        fc1                                    8       2     25%
        fc2                                    4       4    100%
        <BLANKLINE>
        val_acc: 0.9000
        units kept: 50.0%
        parameters kept: 10 / 20 (50.0%)
        forward FLOPs kept: 100.0%
    """
    lines = [f"{'layer':<32} {'units':>7} {'kept':>7} {'kept %':>7}"]
    lines += [
        f"{name:<32} {initial:>7} {kept:>7} {fraction:>7}" for name, initial, kept, fraction in summary_rows(ledger)
    ]
    totals = summary_totals(ledger, trainer, module, fit_start_time)
    lines += ["", *(f"{key}: {value}" for key, value in totals.items())]
    return "\n".join(lines)


def summary_totals(
    ledger: PruningLedger, trainer: pl.Trainer, module: nn.Module, fit_start_time: float | None = None
) -> dict[str, str]:
    """Totals shown under the table: accuracy metrics, units, parameters, FLOPs, wall time since ``fit_start_time``
    (a ``time.perf_counter()`` reading; no wall time without it). FLOPs are 100 % until they were measured.

    Examples:
        >>> ledger, trainer, module = _example_run()  # 2 of 8 and 4 of 4 units kept, 10 of 20 parameters
        >>> summary_totals(ledger, trainer, module)  # doctest: +NORMALIZE_WHITESPACE
        {'val_acc': '0.9000', 'units kept': '50.0%', 'parameters kept': '10 / 20 (50.0%)',
         'forward FLOPs kept': '100.0%'}
    """
    totals: dict[str, str] = {}
    for key, value in trainer.callback_metrics.items():
        if "acc" in key and not key.startswith("demp/"):
            totals[key] = f"{float(value):.4f}"
    params = count_parameters(module)
    initial = ledger.initial_params or params
    totals["units kept"] = f"{ledger.units_kept_fraction():.1%}"
    totals["parameters kept"] = f"{params:,} / {initial:,} ({params / initial:.1%})"
    totals["forward FLOPs kept"] = f"{ledger.flops_kept_fraction():.1%}"
    if fit_start_time is not None:
        totals["wall time"] = f"{time.perf_counter() - fit_start_time:.1f} s"
    return totals


def print_summary(
    ledger: PruningLedger,
    trainer: pl.Trainer,
    module: nn.Module,
    fit_start_time: float | None = None,
    plot_path: str | None = None,
) -> None:
    """Print the summary with ``rich`` when it is installed, as plain text otherwise; then where the run's plot is.

    Examples:
        >>> ledger, trainer, module = _example_run()  # 2 of 8 and 4 of 4 units kept, 10 of 20 parameters
        >>> import contextlib, io
        >>> output = io.StringIO()
        >>> with contextlib.redirect_stdout(output):
        ...     print_summary(ledger, trainer, module)
        >>> "DemonPruning summary" in output.getvalue(), "parameters kept: 10 / 20 (50.0%)" in output.getvalue()
        (True, True)
    """
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is optional
        print(summary_text(ledger, trainer, module, fit_start_time))
        if plot_path is not None:
            print(f"DemonPruning: live units per layer over training, plotted in {plot_path}")
        return
    table = Table(title="DemonPruning summary")
    for column in ("layer", "units", "kept", "kept %"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for name, initial, kept, fraction in summary_rows(ledger):
        table.add_row(name, str(initial), str(kept), fraction)
    console = Console()
    console.print(table)
    for key, value in summary_totals(ledger, trainer, module, fit_start_time).items():
        console.print(f"{key}: {value}")
    if plot_path is not None:
        console.print(f"DemonPruning: live units per layer over training, plotted in {plot_path}")

"""End of fit: the plot where a logger or a directory says, the summary (accuracy, units, parameters and FLOPs
kept per layer, wall time; read off the ledger) and, when nothing was removed, why.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_demp.accounting import count_parameters
from lightning_demp.config import PruningConfig
from lightning_demp.core import DemonPruner
from lightning_demp.diagnosis import nothing_removed_message, nothing_removed_reasons
from lightning_demp.ledger import PruningLedger
from lightning_demp.plots import save_run_plot


@runtime_checkable
class FitRecord(Protocol):
    """What the end-of-fit report reads off the callback.

    Examples:
        >>> from lightning_demp import DemonPruning
        >>> isinstance(DemonPruning(), FitRecord)
        True
    """

    pruner: DemonPruner
    config: PruningConfig
    plot: bool | str
    plot_path: str | None
    verbose: bool
    fit_start_time: float | None

    @property
    def cadence(self) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...


NO_LOGGER_NOTE = "DemonPruning: no logger, so the units plot was not saved; pass plot='<directory>' to save it."


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
    ledger: PruningLedger,
    trainer: pl.Trainer,
    module: nn.Module,
    fit_start_time: float | None = None,
    stale_removals: int = 0,
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
    totals = summary_totals(ledger, trainer, module, fit_start_time, stale_removals)
    lines += ["", *(f"{key}: {value}" for key, value in totals.items())]
    return "\n".join(lines)


def summary_totals(
    ledger: PruningLedger,
    trainer: pl.Trainer,
    module: nn.Module,
    fit_start_time: float | None = None,
    stale_removals: int = 0,
) -> dict[str, str]:
    """Totals shown under the table: accuracy metrics, units, parameters, FLOPs, wall time since ``fit_start_time``
    (a ``time.perf_counter()`` reading; no wall time without it). FLOPs are 100 % until they were measured.

    ``stale_removals`` counts the removal events after the metrics were logged: the accuracy then belongs to an
    earlier network, and its label says so.

    Examples:
        >>> ledger, trainer, module = _example_run()  # 2 of 8 and 4 of 4 units kept, 10 of 20 parameters
        >>> summary_totals(ledger, trainer, module)  # doctest: +NORMALIZE_WHITESPACE
        {'val_acc': '0.9000', 'units kept': '50.0%', 'parameters kept': '10 / 20 (50.0%)',
         'forward FLOPs kept': '100.0%'}
        >>> list(summary_totals(ledger, trainer, module, stale_removals=1))[0]
        'val_acc (measured before 1 later removal)'
    """
    totals: dict[str, str] = {}
    before = f" (measured before {stale_removals} later removal{'s' if stale_removals > 1 else ''})"
    for key, value in trainer.callback_metrics.items():
        if "acc" in key and not key.startswith("demp/"):
            totals[key + (before if stale_removals else "")] = f"{float(value):.4f}"
    if stale_removals and totals:
        totals["final network"] = "not validated since; `trainer.validate(model, datamodule=...)` measures it"
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
    stale_removals: int = 0,
    notes: Sequence[str] = (),
) -> None:
    """Print the summary with ``rich`` when it is installed, as plain text otherwise; then where the run's plot
    is, and ``notes`` (such as why nothing was removed).

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
        print(summary_text(ledger, trainer, module, fit_start_time, stale_removals))
        for line in [*_plot_lines(plot_path), *notes]:
            print(line)
        return
    table = Table(title="DemonPruning summary")
    for column in ("layer", "units", "kept", "kept %"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for name, initial, kept, fraction in summary_rows(ledger):
        table.add_row(name, str(initial), str(kept), fraction)
    console = Console()
    console.print(table)
    for key, value in summary_totals(ledger, trainer, module, fit_start_time, stale_removals).items():
        console.print(f"{key}: {value}", markup=False, soft_wrap=True)
    for line in [*_plot_lines(plot_path), *notes]:
        console.print(line, markup=False, soft_wrap=True)


def _plot_lines(plot_path: str | None) -> list[str]:
    return [] if plot_path is None else [f"DemonPruning: live units per layer over training, plotted in {plot_path}"]


def check_plot(plot: object) -> bool | str:
    """Validate `DemonPruning`'s ``plot``: a bool, or a directory to save the plot in.

    Examples:
        >>> check_plot(True), check_plot("plots/run1")
        (True, 'plots/run1')
        >>> check_plot(3)
        Traceback (most recent call last):
        ...
        TypeError: Expected `plot` to be a bool or a directory (str or path), got 3.
    """
    if isinstance(plot, bool):
        return plot
    if isinstance(plot, (str, os.PathLike)) and str(plot):
        return str(plot)
    raise TypeError(f"Expected `plot` to be a bool or a directory (str or path), got {plot!r}.")


def plot_directory(plot: bool | str, trainer: pl.Trainer) -> Path | None:
    """Where the plot goes: the given directory, the logger's directory with ``plot=True``, else nowhere.

    Asks ``trainer.log_dir`` (a collective under DDP) whenever a logger is attached: call it on every process.

    Examples:
        >>> plot_directory(True, pl.Trainer(logger=False)) is None, plot_directory("out", pl.Trainer(logger=False))
        (True, PosixPath('out'))
    """
    log_dir = trainer.log_dir if trainer.loggers else None
    if isinstance(plot, str):
        return Path(plot)
    return Path(log_dir or trainer.default_root_dir) if plot and trainer.loggers else None


def report_end_of_fit(
    callback: FitRecord,
    trainer: pl.Trainer,
    module: nn.Module,
    directory: Path | None,
    removals_before_validation: int | None,
) -> None:
    """On the main process when fit ends: save the plot (``callback.plot_path``), warn when nothing was removed,
    print the summary when ``callback.verbose``.

    Examples:
        >>> import warnings
        >>> from lightning_demp import DemonPruning
        >>> callback = DemonPruning(reg_max=0.0, verbose=False)  # a fit that removed nothing, without a logger
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     report_end_of_fit(callback, pl.Trainer(logger=False), nn.Linear(2, 2), None, None)
        >>> print(str(caught[-1].message).splitlines()[0]), callback.plot_path
        DemonPruning removed nothing in this fit. Likely causes:
        (None, None)
    """
    ledger = callback.pruner.ledger
    notes: list[str] = []
    if directory is not None:
        callback.plot_path = save_run_plot(callback.state_dict(), directory, trainer.loggers, trainer.global_step)
    elif callback.plot is True:
        notes.append(NO_LOGGER_NOTE)
    if not ledger.events:
        reasons = nothing_removed_reasons(
            ledger, callback.config, module, epochs_run=trainer.current_epoch, cadence=callback.cadence
        )
        rank_zero_warn(nothing_removed_message(reasons))
        notes.append(nothing_removed_message(reasons))
    if callback.verbose:
        stale = len(ledger.events) - removals_before_validation if removals_before_validation is not None else 0
        print_summary(ledger, trainer, module, callback.fit_start_time, callback.plot_path, stale, notes)

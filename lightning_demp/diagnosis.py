"""Why a run removed nothing: the likely causes, read off the run's record, for the log and the summary."""

from __future__ import annotations

from torch import nn

from lightning_demp.config import PruningConfig
from lightning_demp.ledger import PruningLedger

FAQ_ENTRY = "the FAQ entry 'Nothing gets pruned' (docs/faq.md#nothing-pruned)"
_EXACT_ZERO_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Threshold)
_L2_FAMILY = ("positive_l2", "l2")


def nothing_removed_reasons(
    ledger: PruningLedger, config: PruningConfig, model: nn.Module, *, epochs_run: int, cadence: str
) -> list[str]:
    """The likely causes, most likely first, of a run that ended with every unit in place.

    Args:
        ledger: The run's record (groups, checks made).
        config: The run's settings.
        model: The trained model (searched for activations that output exact zeros).
        epochs_run: Training epochs the fit ran.
        cadence: How often it checked, in the user's terms (``"prune_every_n_epochs=5"``).

    Examples:
        >>> ledger = PruningLedger(initial_widths={"fc1": 8}, kept_units={"fc1": list(range(8))}, checks_run=1)
        >>> model = nn.Sequential(nn.Linear(2, 8), nn.GELU(), nn.Linear(8, 2))
        >>> for reason in nothing_removed_reasons(
        ...     ledger, PruningConfig(regularizer="positive_l2", reg_max=1e-3), model,
        ...     epochs_run=4, cadence="prune_every_n_epochs=5"):
        ...     print(reason.split(":")[0])
        only 1 dead check ran in 4 epochs (prune_every_n_epochs=5)
        reg_max=0.001 is small for regularizer='positive_l2'
        the model has no ReLU-like module
    """
    reasons = []
    if not ledger.initial_widths:
        reasons.append(
            "no group of units is prunable: each is blocked (the output layer, LayerNorm/attention/embedding "
            "couplings, tied weights) or excluded; print `PrunableGraph(model, example_input).groups()` to see why"
        )
    checks = ledger.checks_run
    if checks <= 2:
        reasons.append(
            f"only {checks} dead check{'s' if checks != 1 else ''} ran in {epochs_run} epoch"
            f"{'s' if epochs_run != 1 else ''} ({cadence}): units die mostly after the λ peak (30 % into the "
            "schedule span); train longer or check more often"
        )
    if config.reg_max == 0:
        what = "and noise_std=0: nothing" if config.noise_std == 0 else ": no regularizer"
        reasons.append(f"reg_max=0 {what} pushes units toward death; only units dead from the start can go")
    elif config.regularizer in _L2_FAMILY and config.reg_max < 0.01:
        reasons.append(
            f"reg_max={config.reg_max:g} is small for regularizer={config.regularizer!r}: the L2 variants need "
            "values 30 to 100 times larger than 'l1_norm_scale'"
        )
    else:
        reasons.append(
            f"reg_max={config.reg_max:g} may be too weak for this optimizer and learning rate: raise it on a log "
            "grid (×3 per step), or raise the learning rate or lower the batch size"
        )
    if config.saturation_tolerance is None and not any(isinstance(m, _EXACT_ZERO_ACTIVATIONS) for m in model.modules()):
        reasons.append(
            "the model has no ReLU-like module: GELU, SiLU, tanh or sigmoid units almost never output an exact "
            "zero; set saturation_tolerance (e.g. 1e-3) to remove units saturated at a constant"
        )
    return reasons


def nothing_removed_message(reasons: list[str]) -> str:
    """One message for the log and the summary: the causes as a numbered list, then where to read more.

    Examples:
        >>> print(nothing_removed_message(["reg_max=0: nothing pushes units toward death"]))
        DemonPruning removed nothing in this fit. Likely causes:
          1. reg_max=0: nothing pushes units toward death
        See the FAQ entry 'Nothing gets pruned' (docs/faq.md#nothing-pruned).
    """
    lines = ["DemonPruning removed nothing in this fit. Likely causes:"]
    lines += [f"  {number}. {reason}" for number, reason in enumerate(reasons, start=1)]
    return "\n".join([*lines, f"See {FAQ_ENTRY}."])

"""Where DemonPruning's per-step cost goes, piece by piece, on the demo CNN's parameters (CPU).

``speed.py`` measures the callback's overhead on whole training steps; this times what runs on every step by itself:
the penalty gradient (``penalized_params`` + ``add_penalty_grad_``), the live masks (``live_masks``), the noise
(``inject_noise_``), the live floor's resistances (``Pressure.floor_factors``, with the scale and with the L2
regularizer), and for reference one draw of as many normal numbers as there are parameter entries. Median of
repeated calls, 2 threads. Writes ``benchmarks/results/step_pieces.json`` and ``.md``.

    python benchmarks/step_pieces.py           # a few seconds
    python benchmarks/step_pieces.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_seconds, write_json, write_report

from lightning_demp import DemonPruner, PruningConfig
from lightning_demp.demos import ResidualCNNClassifier
from lightning_demp.noise import inject_noise_, live_masks
from lightning_demp.regularization import add_penalty_grad_, penalized_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats = 50 if args.quick else 500
    model = ResidualCNNClassifier()  # the demo config's model and optimizer (AdamW, weight decay 5e-4)
    params = list(model.parameters())
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=5e-4)
    masks = live_masks(params)
    entries = sum(p.numel() for p in params)
    generator = torch.Generator().manual_seed(0)
    floors = {}
    for regularizer in ("l1_norm_scale", "l2"):
        pruner = DemonPruner(PruningConfig(regularizer=regularizer))
        pruner.prepare(model, model.example_input_array)
        pruner.pressure.last_reg_strength = 0.01
        floors[regularizer] = pruner.pressure
    pieces = {
        "penalty gradient (`l1_norm_scale`)": lambda: add_penalty_grad_(
            penalized_params(optimizer, model, "l1_norm_scale"), "l1_norm_scale", 0.01
        ),
        "live masks": lambda: live_masks(params),
        "noise on live entries": lambda: inject_noise_(masks, 1e-5, 0, 5),
        "live floor, `l1_norm_scale` (resistance of every BatchNorm scale)": lambda: floors[
            "l1_norm_scale"
        ].floor_factors(),
        "live floor, `l2` (resistance of every producer row)": lambda: floors["l2"].floor_factors(),
        f"for reference: {entries:,} normal numbers": lambda: torch.randn(entries, generator=generator),
    }
    results = {name: 1e3 * median_seconds(function, repeats) for name, function in pieces.items()}
    suffix = "_quick" if args.quick else ""
    write_json(f"step_pieces{suffix}.json", {"machine": machine(), "entries": entries, "ms": results})
    lines = [
        f"# DemonPruning's per-step pieces on the demo CNN ({entries:,} parameter entries, CPU, 2 threads)",
        "",
        "| piece | median (ms) |",
        "|---|---|",
        *(f"| {name} | {value:.3f} |" for name, value in results.items()),
        "",
    ]
    write_report(f"step_pieces{suffix}.md", lines, machine())


if __name__ == "__main__":
    main()

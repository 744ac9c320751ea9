"""Why `ChannelSelect.add_to_` scatter-adds only a few channels: `index_add_` on the channel dimension (CPU).

Times ``branch.index_add_(1, index, source)`` for a growing number of routed channels against one in-place slice
add of the same data (``branch[:, :k] += source``), at batch 256 with 128 channels of 20 positions, the shape of the
demo CNN's second block. Writes ``benchmarks/results/index_add_cost.json`` and ``.md``.

    python benchmarks/index_add_cost.py           # about 10 s on 2 CPU cores
    python benchmarks/index_add_cost.py --quick
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_seconds, write_json, write_report


def index_add(branch: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> None:
    branch.index_add_(1, index, source)


def slice_add_(branch: torch.Tensor, routed: int, source: torch.Tensor) -> None:
    branch[:, :routed].add_(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats = 50 if args.quick else 400
    branch = torch.randn(256, 128, 20)
    rows = []
    for routed in (8, 32, 64, 128):
        index = torch.arange(routed) * (128 // routed)
        source = torch.randn(256, routed, 20)
        scatter = median_seconds(functools.partial(index_add, branch, index, source), repeats, warmup=20)
        slice_add = median_seconds(functools.partial(slice_add_, branch, routed, source), repeats, warmup=20)
        rows.append({"routed": routed, "index_add_s": scatter, "slice_add_s": slice_add})
    suffix = "_quick" if args.quick else ""
    write_json(f"index_add_cost{suffix}.json", {"machine": machine(), "rows": rows})
    lines = [
        "# `index_add_` on the channel dimension against one slice add (CPU, batch 256, 128 × 20)",
        "",
        "| routed channels | index_add_ (µs) | slice add (µs) | index_add_ per channel (µs) |",
        "|---|---|---|---|",
        *(
            f"| {r['routed']} | {1e6 * r['index_add_s']:.1f} | {1e6 * r['slice_add_s']:.1f} | "
            f"{1e6 * r['index_add_s'] / r['routed']:.2f} |"
            for r in rows
        ),
        "",
    ]
    write_report(f"index_add_cost{suffix}.md", lines, machine())


if __name__ == "__main__":
    main()

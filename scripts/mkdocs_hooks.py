"""MkDocs hooks: benchmark result files become sections of the page that includes them, with their plots.

A line ``--8<-- "benchmarks/results/<name>.md"`` in a page is replaced by that file with its headings moved
below the page's current heading level (so 15 result files add no top-level headings), followed by the PNGs the
same script drew (``<name>.png``, or ``<name>_<what>.png`` when no result file of that name exists). The PNGs of
``benchmarks/results/`` are added to the site, so the images resolve and ``mkdocs build --strict`` checks them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
_INCLUDE = re.compile(r'^--8<-- "benchmarks/results/(?P<name>[\w.-]+)\.md"\s*$')
_HEADING = re.compile(r"^(?P<hashes>#{1,6}) (?P<title>.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def result_plots(stem: str) -> list[Path]:
    """The PNGs drawn with the result file ``stem``: ``stem.png``, and ``stem_<what>.png`` that no other result
    file claims (``frontier_cnn`` does not take ``frontier_cnn_decoupled.png``)."""
    plots = [RESULTS / f"{stem}.png"] if (RESULTS / f"{stem}.png").exists() else []
    for png in sorted(RESULTS.glob(f"{stem}_*.png")):
        if not (RESULTS / f"{png.stem}.md").exists():
            plots.append(png)
    return plots


def included_result(stem: str, level: int) -> str:
    """The result file ``stem`` with its headings moved below ``level``, then its plots."""
    lines, in_code = [], False
    for line in (RESULTS / f"{stem}.md").read_text().splitlines():
        in_code ^= bool(_FENCE.match(line))
        heading = None if in_code else _HEADING.match(line)
        if heading:
            depth = min(6, len(heading["hashes"]) + level)
            line = f"{'#' * depth} {heading['title']}"
        lines.append(line)
    for png in result_plots(stem):
        lines += ["", f"![{png.stem} (benchmarks/results/{png.name})](benchmarks/results/{png.name})"]
    return "\n".join(lines)


def on_files(files: Files, config: Any) -> Files:
    for png in sorted(RESULTS.glob("*.png")):
        files.append(
            File(
                f"benchmarks/results/{png.name}",
                src_dir=str(REPO),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if '--8<-- "benchmarks/results/' not in markdown:
        return markdown
    lines, level, in_code = [], 0, False
    for line in markdown.splitlines():
        in_code ^= bool(_FENCE.match(line))
        heading = None if in_code else _HEADING.match(line)
        if heading:
            level = len(heading["hashes"])
        include = None if in_code else _INCLUDE.match(line)
        lines.append(included_result(include["name"], level) if include else line)
    return "\n".join(lines)

"""Every Python snippet in the README and the docs runs as printed, page by page, top to bottom.

A page's snippets share one namespace, as a reader's session would. Pages whose text speaks of *your* model and
data (``model``, ``datamodule``) get the demo's residual CNN and MNIST-1D under those names, nothing more. The
Trainer is the real one with fewer batches and at most two epochs, so that the suite stays fast.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch
import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
# What the text around a page's snippets says the reader already has.
YOUR_MODEL_AND_DATA = {"README.md", "docs/index.md", "docs/quickstart.md", "docs/faq.md"}
_BLOCK = re.compile(r"^(?P<indent> *)```python\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)


def snippets(page: str) -> list[str]:
    """The ``python`` code blocks of ``page``, dedented (blocks inside list items are indented)."""
    blocks = []
    for match in _BLOCK.finditer((REPO / page).read_text()):
        indent = len(match["indent"])
        blocks.append("\n".join(line[indent:] for line in match["code"].splitlines()))
    return blocks


class FastTrainer(lightning.pytorch.Trainer):
    """The real Trainer, with at most 2 epochs of 3 batches (and 2 validation batches), no progress bar."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["max_epochs"] = min(kwargs.get("max_epochs") or 2, 2)
        kwargs.update(limit_train_batches=3, limit_val_batches=2, enable_progress_bar=False)
        super().__init__(*args, **kwargs)


def test_the_docs_have_snippets_to_run():
    assert sum(len(snippets(page)) for page in PAGES) >= 12


@pytest.mark.parametrize("page", [page for page in PAGES if snippets(page)])
def test_every_snippet_of_the_page_runs_as_printed(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lightning.pytorch, "Trainer", FastTrainer)
    namespace: dict[str, Any] = {"__name__": "__snippet__"}
    if page in YOUR_MODEL_AND_DATA:
        from lightning_demp.demos import MNIST1DDataModule, ResidualCNNClassifier

        namespace.update(model=ResidualCNNClassifier(width=16), datamodule=MNIST1DDataModule())
    for number, code in enumerate(snippets(page), start=1):
        try:
            exec(compile(code, f"{page} snippet {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page}, snippet {number} fails as printed:\n{code}") from error

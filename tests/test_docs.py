"""Documentation: every public name of the package shows how it is used, in a doctest that pytest runs."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import lightning_demp

REPO = Path(__file__).resolve().parents[1]


def _public_modules() -> list[ModuleType]:
    """Every module of the package whose name does not start with ``_`` (so not ``__main__`` or ``_strategy``)."""
    names = sorted(info.name for info in pkgutil.iter_modules(lightning_demp.__path__) if not info.name.startswith("_"))
    return [importlib.import_module(f"{lightning_demp.__name__}.{name}") for name in names]


def _public_definitions(module: ModuleType) -> list[tuple[str, object]]:
    """The public classes and functions defined in ``module`` itself (not imported into it)."""
    return [
        (name, obj)
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
    ]


def test_every_public_name_has_a_runnable_example():
    modules = _public_modules()
    assert modules, "no module of lightning_demp was found"
    missing = [
        f"{module.__name__}.{name}"
        for module in modules
        for name, obj in _public_definitions(module)
        if ">>>" not in (inspect.getdoc(obj) or "")
    ]
    assert not missing, "public names without a `>>>` example in their docstring:\n  " + "\n  ".join(missing)


def test_only_the_graph_and_its_two_torch_pruning_helpers_import_torch_pruning():
    importers = [
        module.__name__
        for module in [*_public_modules(), importlib.import_module("lightning_demp._strategy")]
        if re.search(r"^\s*(import|from)\s+torch_pruning\b", inspect.getsource(module), re.MULTILINE)
    ]
    assert sorted(importers) == ["lightning_demp.graph", "lightning_demp.handlers", "lightning_demp.search"]


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The documentation site, built as `scripts/test.sh` builds it (strict)."""
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return site


def _visible_text(html: str) -> str:
    return re.sub(r"<(pre|code)[^>]*>.*?</\1>", "", html, flags=re.S)


def test_no_page_shows_raw_latex(built_site):
    latex = re.compile(r"\\(lambda|sigma|cdot|mathrm|frac|sum|theta|mathcal)\b|\$\$")
    found = {
        str(page.relative_to(built_site)): latex.findall(_visible_text(page.read_text()))
        for page in built_site.rglob("*.html")
    }
    assert not {page: hits for page, hits in found.items() if hits}


def test_every_image_on_every_page_exists(built_site):
    missing = []
    for page in built_site.rglob("*.html"):
        for source in re.findall(r'<img[^>]*\ssrc="([^"]+)"', page.read_text()):
            if not source.startswith(("http:", "https:", "data:")) and not (page.parent / source).resolve().exists():
                missing.append(f"{page.relative_to(built_site)}: {source}")
    assert not missing


def test_the_benchmarks_page_has_one_title_every_result_plot_and_no_raw_dicts(built_site):
    html = (built_site / "benchmarks" / "index.html").read_text()
    assert len(re.findall(r"<h1[ >]", html)) == 1  # the included result files sit below the page's sections
    shown = set(re.findall(r'<img[^>]*\ssrc="results/([^"]+)"', html))
    included = set(
        re.findall(r'--8<-- "benchmarks/results/([\w.-]+)\.md"', (REPO / "docs" / "benchmarks.md").read_text())
    )
    drawn = {
        png.name for png in (REPO / "benchmarks" / "results").glob("*.png") if png.name[: -len(".png")] in included
    }
    assert drawn and drawn <= shown
    assert "Machine: {" not in html

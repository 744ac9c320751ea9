"""Documentation: every public name of the package shows how it is used, in a doctest that pytest runs."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from types import ModuleType

import lightning_demp


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


def test_graph_is_the_only_module_that_imports_torch_pruning():
    importers = [
        module.__name__
        for module in [*_public_modules(), importlib.import_module("lightning_demp._strategy")]
        if re.search(r"^\s*(import|from)\s+torch_pruning\b", inspect.getsource(module), re.MULTILINE)
    ]
    assert importers == ["lightning_demp.graph"]

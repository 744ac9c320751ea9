"""Module-name patterns (``exclude``): which modules of a model a glob pattern names."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

__all__ = ["match_modules"]


def match_modules(model: nn.Module, patterns: Iterable[str]) -> dict[str, list[str]]:
    """Return, for each glob pattern, the names of the modules of ``model`` it matches.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> match_modules(model, ["0", "2*", "head"])
        {'0': ['0'], '2*': ['2'], 'head': []}
    """
    names = [name for name, _ in model.named_modules() if name]
    return {pattern: [name for name in names if fnmatch.fnmatchcase(name, pattern)] for pattern in patterns}

"""Temporary changes to a module tree: train/eval flags given back to every module, metrics hidden while tracing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit, whatever the block changed.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> _ = model[1].eval()  # a submodule the user keeps in eval mode
        >>> with kept_modes(model):
        ...     _ = model.train()
        >>> model.training, model[1].training
        (True, False)
    """
    flags = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> with eval_mode(model):
        ...     model.training, model[0].training
        (False, False)
        >>> model.training, model[0].training
        (True, True)
    """
    with kept_modes(model):
        model.eval()
        yield


@contextmanager
def metrics_hidden(model: nn.Module) -> Iterator[None]:
    """Take torchmetrics metrics out of ``model``'s module tree while Torch-Pruning builds its graph.

    ``Metric.__eq__`` builds a compositional metric (always truthy), and Torch-Pruning compares modules with ``==``
    and ``in`` when it registers customized layers: a LightningModule holding metrics would have every layer
    treated as ignored. Metrics take no part in ``forward``, so the trace is the same without them; they are put
    back, in their places, on exit. Nothing outside ``model`` changes.
    """
    from torchmetrics import Metric

    hidden: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, Metric):
                hidden.append((parent, name, child))
    positions = {id(parent): list(parent._modules) for parent, _, _ in hidden}
    for parent, name, _ in hidden:
        del parent._modules[name]
    try:
        yield
    finally:
        restored: dict[int, nn.Module] = {}
        for parent, name, child in hidden:
            parent._modules[name] = child
            restored[id(parent)] = parent
        for parent_id, parent in restored.items():  # keep the registration order (state_dict key order)
            order = positions[parent_id]
            items = sorted(parent._modules.items(), key=lambda item: order.index(item[0]))
            parent._modules.clear()
            parent._modules.update(items)


@contextmanager
def cache_off(model: nn.Module) -> Iterator[None]:
    """Switch off a Hugging Face key-value cache (``config.use_cache``) of every submodule while the dependency graph
    is traced, and give each config its own value back.

    The cache serves generation, not training: it concatenates keys along the sequence, which Torch-Pruning reads
    as a concatenation of units and cannot map. Keys and values are split into heads, so their units are never
    removed either way.

    Examples:
        >>> model = nn.Linear(2, 2)
        >>> model.config = type("Config", (), {"use_cache": True})()
        >>> with cache_off(model):
        ...     model.config.use_cache
        False
        >>> model.config.use_cache
        True
    """
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    saved = {key: config.use_cache for key, config in configs.items() if getattr(config, "use_cache", None) is True}
    try:
        for key in saved:
            configs[key].use_cache = False
        yield
    finally:
        for key, value in saved.items():
            configs[key].use_cache = value


@contextmanager
def tracing_modes(model: nn.Module) -> Iterator[None]:
    """The model as the dependency graph traces it: metrics hidden, eval mode, no key-value cache.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> with tracing_modes(model):
        ...     model[1].training
        False
    """
    with metrics_hidden(model), eval_mode(model), cache_off(model):
        yield

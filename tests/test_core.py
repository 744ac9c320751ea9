"""The framework-free core: DemP on a plain ``nn.Module`` with a plain training loop, no Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.lightning import quiet_trainer
from lightning_demp import DemonPruner, DemonPruning, PruningConfig

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_demp"
SETTINGS = {"regularizer": "positive_l2", "reg_max": 0.3, "noise_std": 1e-3, "schedule": "one_cycle", "seed": 3}


class Net(nn.Module):
    """A plain module: no Lightning anywhere."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LitNet(pl.LightningModule):
    """The same network in a LightningModule, trained by the same loop inside a Trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net().net
        self.example_input_array = torch.zeros(2, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-2)


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(192, 6, generator=generator)
    y = (x @ torch.randn(6, 3, generator=generator)).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def plain_loop(epochs: int) -> tuple[Net, DemonPruner, torch.optim.Optimizer]:
    model, loader = Net(), data()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    pruner = DemonPruner(PruningConfig(**SETTINGS))
    pruner.prepare(model, torch.zeros(2, 6), total_steps=epochs * len(loader))
    step = 0
    for epoch in range(epochs):
        pruner.forget_batches()
        for x, y in loader:
            pruner.remember_batch((x, y))
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pruner.regularize_(optimizer, model, step)
            optimizer.step()
            pruner.add_noise_()
            step += 1
        pruner.removal_event(model, [optimizer], step=step, epoch=epoch, final=epoch == epochs - 1)
    return model, pruner, optimizer


def test_the_core_prunes_a_plain_module_in_a_plain_loop_as_the_callback_does(tmp_path):
    model, pruner, optimizer = plain_loop(epochs=4)
    assert pruner.ledger.events  # units died and went
    for name, kept in pruner.ledger.kept_units.items():  # the module is physically smaller, and consistent
        assert dict(model.named_modules())[name].out_features == len(kept)
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in model.parameters())

    callback = DemonPruning(verbose=False, plot=False, prune_every_n_epochs=1, **SETTINGS)
    lit = LitNet()
    quiet_trainer(tmp_path, max_epochs=4, callbacks=[callback]).fit(lit, train_dataloaders=data())
    assert callback.kept_units == pruner.ledger.kept_units  # the same units, removed at the same events
    assert [event.step for event in callback.events] == [event.step for event in pruner.ledger.events]
    for plain, lightning in zip(model.parameters(), lit.parameters(), strict=True):
        torch.testing.assert_close(plain, lightning)


def test_a_plain_module_without_training_keeps_its_function_when_dead_units_go():
    model = Net().eval()
    with torch.no_grad():
        model.net[0].bias[[2, 5, 7]] = -1e3  # three dead hidden units
    x = torch.randn(64, 6)
    before = model(x)
    pruner = DemonPruner(PruningConfig(regularizer="positive_l2", recalibrate_bn=False))
    pruner.prepare(model, x[:2], total_steps=1)
    pruner.remember_batch((x, None))
    event = pruner.removal_event(model, [], step=0, epoch=0)
    assert event is not None and event.removed == {"net.0": 3}
    torch.testing.assert_close(model(x), before)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_demp"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("lightning_demp"))
    return found


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_package_has_no_import_circle():
    graph = {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}
    graph = {
        name: {target for target in targets if target in graph and target != name} for name, targets in graph.items()
    }
    graph["lightning_demp"] = set()  # the package's __init__ only re-exports; modules import each other directly
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, f"import circle: {' -> '.join([*path, target])}"
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_core_and_its_parts_do_not_import_lightning():
    framework_free = ["core", "config", "ledger", "policy", "target", "saturation", "sizes", "units", "graph"]
    framework_free += ["removal", "permutation", "resize", "detection", "regularization", "schedules", "optim"]
    for name in framework_free:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            modules += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not any(module.split(".")[0] in ("lightning", "pytorch_lightning") for module in modules), name


def test_no_module_is_much_over_400_lines():
    lengths = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert max(lengths.values()) <= 420, lengths
    assert lengths["callback.py"] <= 390  # about 60 of them are the argument docs LightningCLI's help reads

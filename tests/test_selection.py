"""Decoupled residual channels: a block's input and output channels shrink independently, outputs preserved."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_surgery import remove_dead_
from torch import Tensor, nn

from helpers.lightning import RandomDataModule, planted_residual_cnn, quiet_trainer, tiny_residual_cnn
from helpers.models import ResidualCNN, kill_bn_units_, randomize_bn_
from lightning_demp import DemonPruning
from lightning_demp.decouple import DecouplingError, decouple_residuals_
from lightning_demp.demos import DemoClassifier, ResidualCNNBackbone
from lightning_demp.demos.cifar_models import CIFARResNet, cifar_resnet18
from lightning_demp.graph import PrunableGraph
from lightning_demp.optim import remap_optimizer_
from lightning_demp.permutation import order_routed_channels_, permute_units_
from lightning_demp.removal import remove_units_
from lightning_demp.resize import enable_resize_on_load, layer_widths, resize_like_
from lightning_demp.selection import ChannelSelect, residual_sum


def test_a_stream_channel_dead_at_the_block_input_goes_while_the_block_output_keeps_it():
    model = ResidualCNNBackbone(width=6, num_classes=3)
    randomize_bn_(model)
    kill_bn_units_(model.stem_bn, [1, 4])  # dead at block1's input only (block1's output adds bn2's positive shift)
    x = torch.randn(32, 1, 16)
    model.eval()
    before = model(x)
    removed = remove_dead_(model, x)
    assert removed == {"stem": 2}
    assert model.stem.out_channels == 4 and model.block1.conv1.in_channels == 4
    assert model.block1.conv2.out_channels == 6  # the block's output side is intact
    assert (model.block1.shortcut.in_channels, model.block1.shortcut.out_channels) == (4, 6)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_a_channel_dead_at_the_block_output_goes_from_conv2_bn2_the_selection_and_every_reader():
    model = ResidualCNNBackbone(width=6, num_classes=3)
    randomize_bn_(model)
    kill_bn_units_(model.block1.bn2, [2], shift=-50.0)  # relu(x + bn2) is 0 whatever the shortcut carries
    x = torch.randn(32, 1, 16)
    model.eval()
    before = model(x)
    remove_dead_(model, x)
    assert model.block1.conv2.out_channels == 5 and model.down.in_channels == 5
    assert model.block1.shortcut.out_channels == 5 and model.block1.shortcut.in_channels == 6
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_resnet18_identity_and_projection_shortcuts_stride_changes_and_chains_of_blocks():
    model = cifar_resnet18(num_classes=10)
    randomize_bn_(model)
    kill_bn_units_(model.bn1, [0, 5])  # stem: read by layer1[0] (identity selection)
    kill_bn_units_(model.layer1[1].bn2, [7], shift=-50.0)  # output of a block chain, read by layer2[0] (stride 2)
    kill_bn_units_(model.layer2[0].bn1, [3])  # inside a block with a projection shortcut
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    before = model(x)
    remove_dead_(model, x)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    assert model.conv1.out_channels == model.layer1[0].shortcut.in_channels <= 62  # planted at the stem
    assert model.layer1[0].conv2.out_channels == model.layer1[0].shortcut.out_channels  # output side intact
    assert model.layer2[0].conv1.in_channels == model.layer2[0].shortcut[0].in_channels <= 63
    assert model.layer2[0].conv1.out_channels <= 127
    assert isinstance(model.layer1[0].shortcut, ChannelSelect)


def test_a_pruned_decoupled_model_loads_into_a_fresh_one():
    pruned = ResidualCNNBackbone(width=6, num_classes=3)
    randomize_bn_(pruned)
    kill_bn_units_(pruned.stem_bn, [1])
    x = torch.randn(16, 1, 16)
    remove_dead_(pruned, x)
    fresh = ResidualCNNBackbone(width=6, num_classes=3)
    resize_like_(fresh, pruned.state_dict())
    fresh.load_state_dict(pruned.state_dict())
    pruned.eval()
    fresh.eval()
    assert layer_widths(fresh) == layer_widths(pruned)
    torch.testing.assert_close(fresh(x), pruned(x))


def test_selection_groups_are_decoupled_in_the_graph():
    groups = {g.name: g for g in PrunableGraph(ResidualCNNBackbone(width=4), torch.randn(2, 1, 8)).groups()}
    assert {r.reader for r in groups["stem"].readers} == {"block1.conv1", "block1.shortcut"}
    assert {r.reader for r in groups["block1.conv2"].readers} == {"down"}


class PlainResidualClassifier(DemoClassifier):
    """A user model with plain ``x + f(x)`` residuals (no selections)."""

    def __init__(self) -> None:
        super().__init__(num_classes=4, optimizer="adam", lr_schedule="constant", weight_decay=0.0)
        self.net = ResidualCNN(width=6)
        self.example_input_array = torch.zeros(2, 1, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(1) if x.dim() == 2 else x)


def test_decouple_residuals_rewrites_a_plain_model_without_changing_its_outputs():
    model = PlainResidualClassifier()
    randomize_bn_(model)
    x = torch.randn(8, 1, 16)
    model.eval()
    before = model(x)
    assert decouple_residuals_(model, model.example_input_array) == 1
    assert any(isinstance(m, ChannelSelect) for m in model.modules())
    assert torch.equal(model(x), before)
    assert decouple_residuals_(model, model.example_input_array) == 0  # idempotent
    rewritten = next(m for m in model.modules() if isinstance(m, torch.fx.GraphModule))
    assert [n.target for n in rewritten.graph.nodes if n.op == "call_function"].count(residual_sum) == 1


class _ReluBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.relu(self.fc(x))  # autograd keeps the ReLU output: no in-place sum into it


def test_the_rewrite_fuses_the_sum_only_where_the_branch_may_be_overwritten():
    wrapper = nn.Sequential(_ReluBranch())
    x = torch.randn(3, 4, requires_grad=True)
    before = wrapper(x)
    assert decouple_residuals_(wrapper, x.detach()) == 1
    rewritten = wrapper[0]
    assert isinstance(rewritten, torch.fx.GraphModule)
    assert residual_sum not in [n.target for n in rewritten.graph.nodes]
    assert [n.target for n in rewritten.graph.nodes if n.op == "call_module"] == ["fc", "demp_select_0"]
    after = wrapper(x)
    assert torch.equal(after, before)
    after.sum().backward()  # trains: nothing autograd needs was overwritten


def test_decoupled_rewrite_then_removal_of_a_channel_dead_at_the_block_input_only():
    model = PlainResidualClassifier()
    randomize_bn_(model)
    decouple_residuals_(model, model.example_input_array)
    kill_bn_units_(model.net.stem_bn, [2])
    x = torch.randn(32, 1, 16)
    model.eval()
    before = model(x)
    remove_dead_(model, x)
    assert model.net.stem.out_channels == 5 and model.net.conv2.out_channels == 6
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x) if x.sum() > 0 else x  # data-dependent control flow


def test_a_model_fx_cannot_trace_is_refused_with_the_reason():
    with pytest.raises(DecouplingError, match="could not trace `Sequential` with torch.fx"):
        decouple_residuals_(nn.Sequential(nn.Sequential(Untraceable())), torch.ones(2, 4))


def test_the_callback_rewrites_and_a_rewritten_pruned_checkpoint_resumes(tmp_path):
    model = PlainResidualClassifier()
    callback = DemonPruning(
        regularizer="l1_norm_scale", reg_max=0.0, noise_std=0.0, decouple_residuals=True, verbose=False, plot=False
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback, checkpoint], enable_checkpointing=True)
    with torch.no_grad():
        model.net.stem_bn.weight[1] = 0.0
        model.net.stem_bn.bias[1] = -5.0
    model.net.stem_bn.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), 0.0))
    model.net.stem_bn.bias.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), 0.0))
    trainer.fit(model, datamodule=RandomDataModule(num_features=16, num_classes=4))
    assert any(isinstance(m, ChannelSelect) for m in model.modules())
    assert 1 not in callback.kept_units["net.stem"]
    resumed = PlainResidualClassifier()
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[DemonPruning(regularizer="l1_norm_scale", decouple_residuals=True, verbose=False, plot=False)],
    )
    trainer.fit(
        resumed, datamodule=RandomDataModule(num_features=16, num_classes=4), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert resumed.net.stem.out_channels <= model.net.stem.out_channels


def test_a_selection_routes_channels_by_id_the_same_at_every_batch_size():
    select = ChannelSelect(10)
    select.keep_inputs_(torch.tensor([0, 2, 3, 5, 7, 9]))
    select.keep_outputs_(torch.tensor([1, 2, 3, 4, 5, 9]))  # outputs 1 and 4 have no input left: zeros
    x = torch.randn(16, 6, 7)
    expected = torch.zeros(16, 6, 7)
    for out_position, channel in enumerate(select.out_ids.tolist()):
        if channel in select.in_ids.tolist():
            expected[:, out_position] = x[:, select.in_ids.tolist().index(channel)]
    assert torch.equal(select(x), expected)  # the batched row gather
    assert torch.equal(torch.cat([select(x[i : i + 1]) for i in range(16)]), expected)  # index_select, batch 1


def _select(channels: int, inputs: list[int], outputs: list[int]) -> ChannelSelect:
    """A selection over ``channels`` ids that kept input ids ``inputs`` and output ids ``outputs``."""
    select = ChannelSelect(channels)
    select.keep_inputs_(torch.tensor(inputs))
    select.keep_outputs_(torch.tensor(outputs))
    return select


_KEPT = [0, 2, 3, 5, 7, 9, 10, 11]


@pytest.mark.parametrize(
    ("channels", "inputs", "outputs", "path_at_batch_1", "path_at_batch_16"),
    [
        (12, _KEPT, _KEPT, "identity", "identity"),
        (12, _KEPT, [0, 2, 3, 5, 7, 9, 10], "slices", "slices"),  # one run, one input unread
        (12, _KEPT, [2, 3, 4, 9, 10, 11], "slices", "slices"),  # two runs around an output with no source
        (12, _KEPT, [1, 2, 4, 6, 8], "slices", "slices"),  # one output routed
        (12, _KEPT, list(range(12)), "scatter", "gather"),  # five runs, most outputs routed
        (24, list(range(0, 16, 2)), list(range(24)), "scatter", "scatter"),  # eight runs, few routed of many
    ],
)
def test_the_fused_residual_sum_equals_branch_plus_selection_in_values_and_gradients(
    channels, inputs, outputs, path_at_batch_1, path_at_batch_16
):
    select = _select(channels, inputs, outputs)
    for batch, path in ((1, path_at_batch_1), (16, path_at_batch_16)):
        x = torch.randn(batch, select.in_channels, 5, requires_grad=True)
        assert select.sum_path(x) == path
        weight = torch.randn(select.out_channels, 1, requires_grad=True)
        upstream = torch.randn(batch, select.out_channels, 5)
        for fused, plain in zip(
            _sum_and_grads(select, x, weight, upstream, True), _sum_and_grads(select, x, weight, upstream, False)
        ):
            assert torch.equal(fused, plain)


def _sum_and_grads(
    select: ChannelSelect, x: Tensor, weight: Tensor, upstream: Tensor, fused: bool
) -> tuple[Tensor, ...]:
    branch = weight * torch.ones(x.shape[0], select.out_channels, 5)  # a fresh tensor, as a BatchNorm output is
    out = residual_sum(branch, select, x) if fused else branch + select(x)
    grads = torch.autograd.grad((out * upstream).sum(), (x, weight))
    return (out.detach(), *grads)


def _routed_select() -> ChannelSelect:
    return _select(12, _KEPT, list(range(12)))


def test_the_residual_sum_calls_the_selection_as_a_module_while_hooks_observe_it():
    select = _routed_select()
    seen: list[int] = []
    handle = select.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    x, branch = torch.randn(2, 8, 3), torch.randn(2, 12, 3)
    expected = branch + select(x)
    seen.clear()
    assert torch.equal(residual_sum(branch.clone(), select, x), expected)
    assert seen == [8]  # Torch-Pruning's tracing and the dead check's monitors see the selection
    handle.remove()
    assert torch.equal(residual_sum(branch.clone(), select, x), expected)
    assert seen == [8]  # unobserved: fused, the module is not called


def test_the_package_blocks_sum_in_place_when_unobserved_and_keep_outputs_after_removal():
    model = ResidualCNNBackbone(width=8, num_classes=3).eval()
    randomize_bn_(model)
    kill_bn_units_(model.stem_bn, [1, 4])
    kill_bn_units_(model.block2.bn2, [2, 9], shift=-50.0)
    x = torch.randn(32, 1, 16)
    before = model(x)
    remove_dead_(model, x)
    assert model.block1.shortcut.in_channels < model.block1.shortcut.out_channels
    calls: list[str] = []
    original = ChannelSelect.forward
    try:
        ChannelSelect.forward = lambda self, inputs: calls.append("plain") or original(self, inputs)  # type: ignore[method-assign]
        after = model(x[:4])  # a small batch: no path of the fused sum calls the selection's forward
    finally:
        ChannelSelect.forward = original  # type: ignore[method-assign]
    assert calls == []  # the compact model's blocks take the fused sum
    torch.testing.assert_close(after, before[:4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def _remove_at_random_(graph: PrunableGraph, fraction: float, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    plan = {
        group.name: torch.randperm(group.num_units, generator=generator)[: int(fraction * group.num_units)]
        .sort()
        .values
        for group in graph.groups()
        if group.blocked is None
    }
    return remove_units_(graph, plan)


@pytest.mark.parametrize(
    ("build", "example"),
    [
        (lambda: ResidualCNNBackbone(width=16, num_classes=4), torch.randn(8, 1, 40)),
        (lambda: CIFARResNet([2, 2, 2, 2], [8, 16, 32, 64]), torch.randn(8, 3, 16, 16)),  # a chain of two selections
    ],
    ids=["demo-cnn", "resnet"],
)
def test_reordering_routes_every_selection_in_one_run_keeping_outputs_and_optimizer_state(build, example):
    torch.manual_seed(0)
    model = build()
    randomize_bn_(model)
    model.eval()
    graph = PrunableGraph(model, example)
    optimizer = torch.optim.Adam(model.parameters())
    remap_optimizer_(optimizer, _remove_at_random_(graph, 0.5, seed=1))
    selections = [m for m in model.modules() if isinstance(m, ChannelSelect)]
    assert any(len(select.segments) > 1 for select in selections)  # random removal scatters the routed channels
    for param in model.parameters():  # tag each state entry with its parameter's values
        optimizer.state[param] = {"exp_avg": param.detach().clone(), "step": torch.tensor(3.0)}
    before = model(example)

    orders, remaps = order_routed_channels_(graph)
    remap_optimizer_(optimizer, remaps)

    assert orders and all(len(select.segments) == 1 for select in selections)
    assert all(select.sum_path(example) in ("identity", "slices") for select in selections)
    torch.testing.assert_close(model(example), before, rtol=1e-5, atol=1e-5)
    for param in model.parameters():  # the state moved with its parameter
        assert torch.equal(optimizer.state[param]["exp_avg"], param.detach())
        assert optimizer.state[param]["step"].item() == 3.0
    again, _ = order_routed_channels_(graph)
    assert again == {}  # already in order


def test_an_order_that_is_not_a_permutation_or_a_group_that_cannot_be_reordered_is_refused():
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.ReLU(), nn.Conv1d(4, 4, 3, groups=4), nn.Conv1d(4, 2, 1))
    graph = PrunableGraph(model, torch.randn(1, 2, 8))
    depthwise_group = graph.groups()[0]  # the depthwise convolution roots the group of `0`'s channels
    assert depthwise_group.name == "2" and not depthwise_group.permutable
    with pytest.raises(ValueError, match=r"\['2'\] cannot be reordered"):
        permute_units_(graph, {"2": torch.tensor([1, 0, 2, 3])})
    with pytest.raises(ValueError, match=r"\['0'\] name no group of units; the groups are \['2', '3'\]"):
        permute_units_(graph, {"0": torch.tensor([1, 0, 2, 3])})
    plain = PrunableGraph(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), torch.randn(2, 2))
    with pytest.raises(ValueError, match="`0` must be a permutation of its 3 units"):
        permute_units_(plain, {"0": torch.tensor([0, 0, 1])})


def test_the_callback_reorders_after_removal_and_kept_units_follow_the_new_order(tmp_path):
    model = planted_residual_cnn()  # stem channel 1 dead: gone at block 1's input only, its output keeps id 1
    original_conv2 = model.net.block1.conv2.weight.detach().clone()
    callback = DemonPruning(regularizer="l1_norm_scale", reg_max=0.0, noise_std=0.0, verbose=False, plot=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback, checkpoint], enable_checkpointing=True)
    trainer.fit(model, datamodule=RandomDataModule(num_features=16, num_classes=4))

    select = model.net.block1.shortcut
    assert 1 not in callback.kept_units["net.stem"] and select.in_channels == 7 and select.out_channels == 8
    assert select.segments == ((0, 0, 7),)  # ids 0, 2..7 first on both sides: one slice add
    kept = callback.kept_units["net.block1.conv2"]
    assert kept[-1] == 1 and sorted(kept) == list(range(8))  # the unrouted output moved last
    assert torch.equal(model.net.block1.conv2.weight.detach(), original_conv2[kept])

    fresh = tiny_residual_cnn()
    enable_resize_on_load(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"])
    assert fresh.net.block1.shortcut.segments == ((0, 0, 7),)
    x = torch.randn(16, 16)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


class _ConcatPoolHead(nn.Module):
    """A decoupled block whose output is read twice by the head, through a concatenation of two poolings."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 8, 3, padding=1)
        self.block = ResidualCNNBackbone(width=8).block1
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(torch.relu(self.stem(x)))
        return self.head(torch.cat([h.amax(dim=2), h.mean(dim=2)], dim=1))


def test_reordering_keeps_the_function_when_a_layer_reads_the_group_twice_through_a_concatenation():
    torch.manual_seed(0)
    model = _ConcatPoolHead().eval()
    randomize_bn_(model)
    x = torch.randn(4, 1, 12)
    graph = PrunableGraph(model, x)
    remove_units_(graph, {"stem": torch.tensor([1, 4]), "block.conv2": torch.tensor([2])})
    before = model(x)
    orders, _ = order_routed_channels_(graph)
    assert "block.conv2" in orders  # the concatenated group moved
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_a_blocked_group_is_never_reordered():
    graph = PrunableGraph(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)), torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"\['2'\] cannot be reordered: `2` produces the model output"):
        permute_units_(graph, {"2": torch.tensor([1, 0])})


class _TwoResiduals(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)
        self.g = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.f(x)
        return x + self.g(torch.relu(x))


class _PooledContext(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x.mean(dim=1, keepdim=True))  # the branch broadcasts over the tokens


def test_the_rewrite_decouples_a_residual_that_follows_a_fused_one_and_never_fuses_a_broadcast():
    chain, x = nn.Sequential(_TwoResiduals()), torch.randn(3, 8)
    before = chain(x)
    assert decouple_residuals_(chain, x) == 2
    assert torch.equal(chain(x), before)
    pooled, tokens = nn.Sequential(_PooledContext()), torch.randn(3, 5, 8)
    before = pooled(tokens)
    assert decouple_residuals_(pooled, tokens) == 1
    assert residual_sum not in [n.target for n in pooled[0].graph.nodes]
    assert torch.equal(pooled(tokens), before)


def test_the_fused_sum_falls_back_to_the_plain_sum_when_the_dtype_would_be_promoted():
    select, x = _select(12, _KEPT, list(range(12))), torch.randn(16, 8, 5)
    branch = torch.randn(16, 12, 5).to(torch.bfloat16)  # as a convolution's output under autocast
    fused = residual_sum(branch.clone(), select, x)
    assert fused.dtype == torch.float32
    assert torch.equal(fused, branch + select(x))


def test_the_rewrite_keeps_attention_layers_whole_and_looks_inside_module_lists():
    from lightning_demp.attention import attention_layers
    from lightning_demp.demos import TransformerClassifier

    model = TransformerClassifier(dim=16, depth=2, heads=2, hidden=32).eval()
    x = torch.randn(3, 40)
    before = model(x)
    assert decouple_residuals_(model, model.example_input_array) == 4  # two residuals in each of the two blocks
    assert sorted(attention_layers(model)) == ["blocks.0.attn", "blocks.1.attn"]
    assert not any(name.startswith("blocks.0.attn.") for g in PrunableGraph(model, x).groups() for name in g.members)
    torch.testing.assert_close(model(x), before)


class SharedReluBottleneck(nn.Module):
    """A torchvision-style bottleneck: one ``self.relu`` applied to tensors of 4 and of 16 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(16, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(x + self.bn2(self.conv2(out)))


def test_a_module_called_twice_keeps_each_calls_input_while_residuals_are_decoupled():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), SharedReluBottleneck(), SharedReluBottleneck()).eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    assert decouple_residuals_(model, x) == 2  # crashed before: the shared ReLU got its first call's input back
    torch.testing.assert_close(model(x), before)


class IdentityShortcutBlock(nn.Module):
    """A Hugging Face ResNet-style block: the shortcut is an ``nn.Identity`` module, the sum ``layer(x) + shortcut(x)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shortcut = nn.Identity()
        self.layer = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(x)
        return self.activation(self.layer(x) + residual)


def test_an_identity_module_shortcut_is_recognised_as_a_residual():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), IdentityShortcutBlock(8), IdentityShortcutBlock(8)).eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    assert decouple_residuals_(model, x) == 2  # found nothing before: the sum read `shortcut(x)`, not `x`
    torch.testing.assert_close(model(x), before)

"""Decoupled residual channels: a block's input and output channels shrink independently, outputs preserved."""

from __future__ import annotations

import torch

from helpers.models import kill_bn_units_, randomize_bn_
from test_surgery import remove_dead_

from lightning_demp.demos import ResidualCNNBackbone
from lightning_demp.models import cifar_resnet18
from lightning_demp.selection import ChannelSelect
from lightning_demp.surgery import PrunableGraph, layer_widths, resize_like_


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

"""Dead attention heads: detection at the output projection's input, exact removal, optimizer and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.lightning import RandomDataModule, planted_transformer, train_with_callback
from helpers.models import kill_heads_
from lightning_demp import DemonPruner, PruningConfig, RemovalPlan
from lightning_demp.accounting import count_flops_per_sample, count_parameters
from lightning_demp.attention import HeadedAttention, head_readers, plan_head_removal, remove_heads_
from lightning_demp.demos import TransformerClassifier
from lightning_demp.detection import ActivationMonitor, dead_check
from lightning_demp.graph import PrunableGraph
from lightning_demp.optim import remap_optimizer_
from lightning_demp.resize import enable_resize_on_load
from lightning_demp.sizes import SizeTable


def test_headed_attention_computes_what_multihead_attention_computes_with_the_same_weights():
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(12, 3, batch_first=True).eval()
    attention = HeadedAttention(12, 3).eval()
    with torch.no_grad():
        attention.qkv.weight.copy_(reference.in_proj_weight)
        attention.qkv.bias.copy_(torch.randn(36))
        reference.in_proj_bias.copy_(attention.qkv.bias)
        attention.proj.weight.copy_(reference.out_proj.weight)
        attention.proj.bias.copy_(torch.randn(12))
        reference.out_proj.bias.copy_(attention.proj.bias)
    x = torch.randn(4, 7, 12)
    torch.testing.assert_close(attention(x), reference(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("heads", "head_dim", "dead"), [(2, 4, [1]), (4, 3, [0, 2]), (4, 2, [3, 1, 0])])
def test_removing_dead_heads_keeps_the_output_and_the_optimizer_state_follows(heads, head_dim, dead):
    torch.manual_seed(0)
    attention = HeadedAttention(8, heads, head_dim=head_dim).eval()
    with torch.no_grad():
        attention.proj.bias.normal_()
    kill_heads_(attention, dead)
    x = torch.randn(5, 6, 8)
    before = attention(x)
    optimizer = torch.optim.Adam(attention.parameters())
    for param in attention.parameters():  # tag each state entry with its parameter's values
        optimizer.state[param] = {"exp_avg": param.detach().clone(), "step": torch.tensor(2.0)}

    remap_optimizer_(optimizer, attention.remove_heads_(torch.tensor(dead)))

    assert attention.heads == heads - len(dead)
    assert attention.qkv.out_features == 3 * attention.heads * head_dim == 3 * attention.proj.in_features
    torch.testing.assert_close(attention(x), before, rtol=1e-5, atol=1e-6)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in attention.parameters()}
    for param in attention.parameters():
        assert torch.equal(optimizer.state[param]["exp_avg"], param.detach())


def test_a_live_head_changes_the_output_when_removed():
    torch.manual_seed(0)
    attention = HeadedAttention(8, 2).eval()
    x = torch.randn(3, 4, 8)
    before = attention(x)
    attention.remove_heads_(torch.tensor([0]))
    assert not torch.allclose(attention(x), before, atol=1e-3)  # the preservation test above is not vacuous


def test_bad_head_removals_are_refused():
    attention = HeadedAttention(8, 2)
    with pytest.raises(ValueError, match=r"Head positions must lie in \[0, 2\), got \[2\]"):
        attention.remove_heads_(torch.tensor([2]))
    with pytest.raises(ValueError, match="Cannot remove all 2 heads"):
        attention.remove_heads_(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="`heads=3` must be positive and divide `dim=8`"):
        HeadedAttention(8, 3)


def test_dead_heads_are_found_at_the_projection_input_and_one_head_always_stays():
    model = nn.Sequential(HeadedAttention(8, 4)).eval()
    kill_heads_(model[0], [1, 2])
    monitor = ActivationMonitor(head_readers(model))
    stats = dead_check(model, monitor, [torch.randn(6, 5, 8) for _ in range(2)], lambda module, batch: module(batch))
    assert plan_head_removal(model, {name: reader.max_abs for name, reader in stats.items()})["0"].tolist() == [1, 2]
    kill_heads_(model[0], [0, 3])  # everything dead: the most active (first, on a tie) stays
    monitor.reset()
    stats = dead_check(model, monitor, [torch.randn(6, 5, 8)], lambda module, batch: module(batch))
    assert plan_head_removal(model, {name: reader.max_abs for name, reader in stats.items()})["0"].tolist() == [1, 2, 3]
    nonfinite = {"0.proj": torch.tensor([float("nan")] + [0.0] * 7)}
    assert plan_head_removal(model, nonfinite) == {}


def test_torch_pruning_sees_an_attention_layer_as_one_layer_and_its_heads_as_no_units():
    model = TransformerClassifier(dim=16, depth=1, heads=4, hidden=32)
    groups = PrunableGraph(model, model.example_input_array).groups()
    assert [g.name for g in groups if g.blocked is None] == ["blocks.0.fc1"]
    assert not any(name.startswith("blocks.0.attn.") for g in groups for name in g.members)
    residual = next(g for g in groups if "blocks.0.attn" in g.members)
    assert "HeadedAttention" in str(residual.blocked)


def test_a_checkpoint_with_removed_heads_loads_into_a_fresh_model():
    torch.manual_seed(0)
    model = TransformerClassifier(dim=16, depth=2, heads=4, hidden=32).eval()
    kill_heads_(model.blocks[1].attn, [0, 3])
    remove_heads_(model, {"blocks.1.attn": torch.tensor([0, 3])})
    fresh = TransformerClassifier(dim=16, depth=2, heads=4, hidden=32).eval()
    enable_resize_on_load(fresh)
    fresh.load_state_dict(model.state_dict())
    assert fresh.blocks[1].attn.heads == 2 and fresh.blocks[0].attn.heads == 4
    x = torch.randn(3, 40)
    torch.testing.assert_close(fresh(x), model(x))


def test_the_callback_removes_a_dead_head_and_the_optimizer_holds_the_new_parameters(tmp_path):
    trainer, model, callback = train_with_callback(
        tmp_path,
        planted_transformer(),
        max_epochs=1,
        datamodule=RandomDataModule(num_features=40, num_classes=4),
        regularizer="l2",
        reg_max=0.0,
        noise_std=0.0,
        plot=False,
    )

    assert model.blocks[0].attn.heads == 1 and model.blocks[1].attn.heads == 2
    assert callback.kept_heads == {"blocks.0.attn": [0], "blocks.1.attn": [0, 1]}
    assert callback.events[-1].heads_removed == {"blocks.0.attn": 1}
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}
    metrics = callback.size_metrics(model)
    assert metrics["demp/heads/blocks.0.attn"] == 1.0 and metrics["demp/heads/blocks.1.attn"] == 2.0


def test_with_a_target_removed_heads_count_toward_the_sparsity():
    model = TransformerClassifier(dim=16, depth=1, heads=2, hidden=32)
    pruner = DemonPruner(PruningConfig(target_sparsity=0.5, target_metric="params"))
    pruner.prepare(model, model.example_input_array)
    assert pruner.target is not None
    table = SizeTable.of(pruner.graph, model.example_input_array[:1])
    without_heads = pruner.target.sparsity_after(pruner.ledger, table, RemovalPlan())
    with_a_head = pruner.target.sparsity_after(
        pruner.ledger, table, RemovalPlan(heads={"blocks.0.attn": torch.tensor([1])})
    )
    assert without_heads == 0.0
    head_params = 3 * 8 * (16 + 1) + 8 * 16  # its q/k/v rows of qkv (with their biases), its columns of proj
    assert with_a_head == pytest.approx(head_params / count_parameters(model), abs=1e-12)


class TorchSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def test_flop_counts_include_the_attention_matmuls_on_cpu_for_ours_and_torchs_attention():
    tokens, dim, heads = 10, 32, 4
    x = torch.randn(2, tokens, dim)
    projections = 2 * tokens * dim * (3 * dim) + 2 * tokens * dim * dim  # per sample: qkv in, one out
    attention = 2 * heads * tokens * tokens * (2 * dim // heads)  # q kᵀ and (softmax) v
    assert count_flops_per_sample(HeadedAttention(dim, heads), x) == projections + attention
    # the fused inference kernel of nn.MultiheadAttention was counted as 0 FLOPs, projections included
    assert count_flops_per_sample(TorchSelfAttention(dim, heads), x) == projections + attention


@pytest.mark.parametrize(
    "make_layer",
    [
        lambda: TorchSelfAttention(32, 4),
        lambda: nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True),
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True), 2, enable_nested_tensor=False
        ),
    ],
    ids=["multihead-attention", "encoder-layer", "encoder"],
)
def test_torch_attention_layers_count_the_same_flops_on_their_fused_and_their_plain_path(make_layer):
    layer, x = make_layer(), torch.randn(2, 10, 32)
    fused = count_flops_per_sample(layer, x)  # eval, no grad: torch's fused inference kernels
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        plain = count_flops_per_sample(layer, x)  # linear layers and scaled_dot_product_attention
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert fused == plain > 0


def test_removing_a_head_removes_its_share_of_the_attention_flops():
    tokens, dim, heads = 10, 32, 4
    model = nn.Sequential(HeadedAttention(dim, heads))
    x = torch.randn(2, tokens, dim)
    before = count_flops_per_sample(model, x)
    remove_heads_(model, {"0": torch.tensor([1])})
    head_dim = dim // heads
    one_head = 2 * tokens * dim * (3 * head_dim) + 2 * tokens * head_dim * dim + 2 * tokens * tokens * 2 * head_dim
    assert count_flops_per_sample(model, x) == before - one_head

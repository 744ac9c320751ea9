"""Hugging Face models built from tiny configs: dead units go where they can, per-head and cached tensors are left
whole, grouped-query attention never hangs the group search, and a failed trace says what to do."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from helpers.models import assert_optimizer_follows, tagged_adam
from lightning_demp import PrunableGraph, TracingError
from lightning_demp.config import PruningConfig
from lightning_demp.core import DemonPruner

transformers = pytest.importorskip("transformers")


def kill_rows_(layer: nn.Linear, units: list[int]) -> None:
    """Units whose pre-activation is never positive: a ReLU (or SiLU-gated product with a zero row) outputs 0."""
    with torch.no_grad():
        layer.weight[units] = 0.0
        if layer.bias is not None:
            layer.bias[units] = -1.0


def dead_on(layer: nn.Module, model: nn.Module, x: torch.Tensor) -> int:
    """How many output units of ``layer`` are at most 0 on every position of ``x`` (a ReLU after it outputs 0)."""
    seen = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return int((torch.cat([s.flatten(0, -2) for s in seen]).amax(dim=0) <= 0).sum())


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def prune_dead_with_adam(model: nn.Module, x: torch.Tensor) -> tuple[DemonPruner, torch.optim.Optimizer]:
    """One removal event on ``model`` (in eval mode), with an Adam whose state tags every parameter."""
    optimizer = tagged_adam(model)
    pruner = DemonPruner(PruningConfig(regularizer="positive_l2", reg_max=0.0, noise_std=0.0))
    pruner.prepare(model, x[:2], total_steps=1)
    pruner.remember_batch((x, None))
    pruner.removal_event(model, [optimizer], step=1, epoch=0, final=True)
    return pruner, optimizer


def test_bert_loses_its_dead_feed_forward_units_and_keeps_a_dead_value_unit_whole_per_head():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_act="relu", max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    layer = model.bert.encoder.layer[0]
    kill_rows_(layer.intermediate.dense, [1, 5, 40])
    with torch.no_grad():  # a value unit that outputs 0 everywhere: before, it went and the head reshape failed
        layer.attention.self.value.weight[3] = 0.0
        layer.attention.self.value.bias[3] = 0.0
    x = torch.randint(0, 50, (6, 8))
    before = logits_of(model, x)
    dead = dead_on(layer.intermediate.dense, model, x)  # the 3 planted units, and any that init left dead
    assert dead >= 3

    pruner, optimizer = prune_dead_with_adam(model, x)

    groups = {group.name: group for group in pruner.graph.groups()}
    value = groups["bert.encoder.layer.0.attention.self.value"]
    assert value.blocked is not None and "reshape into 2×16 pieces" in value.blocked
    assert layer.attention.self.value.out_features == 32
    assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 64 - dead
    torch.testing.assert_close(logits_of(model, x), before, rtol=1e-5, atol=1e-6)
    assert_optimizer_follows(model, optimizer)
    torch.export.export(model, (x,))


def test_vit_loses_its_dead_mlp_units():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48, hidden_act="relu", num_labels=3,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    mlp_in = next(m for name, m in model.named_modules() if name.endswith("layers.0.mlp.fc1"))
    kill_rows_(mlp_in, [0, 7])
    x = torch.randn(5, 3, 8, 8)
    before = logits_of(model, x)
    dead = dead_on(mlp_in, model, x)

    pruner, optimizer = prune_dead_with_adam(model, x)

    assert dead >= 2 and mlp_in.out_features == 48 - dead
    blocked = {g.name: g.blocked for g in pruner.graph.groups() if g.blocked}
    assert any(name.endswith("v_proj") and "reshape into" in reason for name, reason in blocked.items())
    torch.testing.assert_close(logits_of(model, x), before, rtol=1e-5, atol=1e-6)
    assert_optimizer_follows(model, optimizer)
    torch.export.export(model, (x,))


@pytest.mark.parametrize("family", ["Qwen2", "Llama"])
def test_grouped_query_attention_ends_the_group_search_and_the_swiglu_mlp_still_shrinks(family):
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=32,
    )  # the key-value cache stays on, as in the default config
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():  # silu(0) * 0: units whose gated product is 0 on every input
        mlp.gate_proj.weight[[2, 9]] = 0.0
        mlp.up_proj.weight[[2, 9]] = 0.0
    x = torch.randint(0, 64, (2, 12))
    before = logits_of(model, x)

    start = time.perf_counter()
    pruner, optimizer = prune_dead_with_adam(model, x)
    assert time.perf_counter() - start < 60  # before: no end in 9 minutes

    groups = {group.name: group for group in pruner.graph.groups()}
    attention = [g for name, g in groups.items() if name.endswith(("q_proj", "k_proj", "v_proj"))]
    assert attention and all(g.blocked for g in attention)
    assert any("was stopped (an index past the" in (g.blocked or "") for g in attention)  # and said why
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 94
    torch.testing.assert_close(logits_of(model, x), before, rtol=1e-5, atol=1e-6)
    assert_optimizer_follows(model, optimizer)
    torch.export.export(model, (x,), kwargs={"use_cache": False})  # a DynamicCache is no exportable output


def gpt2(**overrides) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0, **overrides
    )
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_with_its_key_value_cache_on_traces_and_keeps_its_cache_setting():
    model = gpt2()  # the default config: use_cache=True
    x = torch.randint(0, 50, (2, 8))
    graph = PrunableGraph(model, x)  # before: a TypeError from Torch-Pruning's concatenation mapping
    assert model.config.use_cache is True
    lm_head = next(group for group in graph.groups() if group.name == "lm_head")
    assert lm_head.blocked is not None and "shares parameters with `transformer.wte`" in lm_head.blocked


def test_an_index_mapping_torch_pruning_cannot_follow_is_named_as_such(monkeypatch):
    from contextlib import nullcontext

    import lightning_demp.graph

    monkeypatch.setattr(lightning_demp.graph, "tracing_modes", lambda model: nullcontext())  # the cache stays on
    with pytest.raises(TracingError, match="could not map unit indices through its forward") as caught:
        PrunableGraph(gpt2(), torch.randint(0, 50, (2, 8)))
    assert "Make `forward` run on" not in str(caught.value)  # the forward ran: that hint would mislead

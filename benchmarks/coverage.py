"""Architecture coverage: for each model, what DemP removes, what it refuses and why, and whether the pruned model
still computes the same function and exports.

For every architecture: units dead from the start are planted (a quarter of the units of each prunable group, made
dead at their producer), one removal event runs (`DemonPruner.removal_event`, no training), and the table records
the groups that are prunable and blocked (with the first reason), the units removed, the largest change of the
outputs (eval mode) and whether ``torch.export`` accepts the pruned model. A model that cannot be traced is
listed with its error. The models are the test suite's patterns (``tests/test_architecture_patterns.py``,
``tests/test_selection.py``, ``tests/test_odd_models.py``), the demo models, and tiny Hugging Face models built
from configs (``tests/test_hf_models.py``).

    python benchmarks/coverage.py    # seconds; writes results/coverage.md and .json
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import machine, write_json, write_report
from test_architecture_patterns import (
    CausalConv1d,
    LogitsAndFeatures,
    SharedOnBothHalves,
    SplitIntoTwoBranches,
    TinyShuffleNet,
    TokensCroppedInTime,
    TwoBranchesAndTheirConcat,
    WithGRU,
    planted_concat_residual,
)
from test_odd_models import ConvGRNConv, UpsamplingDecoder
from test_selection import IdentityShortcutBlock, SharedReluBottleneck

from lightning_demp import DemonPruner, PrunableGraph, PruningConfig, TracingError
from lightning_demp.decouple import decouple_residuals_
from lightning_demp.demos.cifar_models import VGG, CIFARResNet
from lightning_demp.demos.models import MLPClassifier, ResidualCNNClassifier, TransformerClassifier


def with_head(*layers: nn.Module) -> nn.Module:
    """``layers`` then a classifier head (pooling, a Linear of 3 classes), in eval mode."""
    channels = next(m for m in layers if isinstance(m, nn.Conv2d)).out_channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3)).eval()


def decoupled(model: nn.Module) -> nn.Module:
    """``model`` with its residuals rewritten into `ChannelSelect` shortcuts (``decouple_residuals=True``)."""
    decouple_residuals_(model, torch.randn(2, 3, 8, 8))
    return model


ARCHITECTURES: list[tuple[str, Callable[[], nn.Module], Callable[[], torch.Tensor]]] = [
    ("MLP (demo)", lambda: MLPClassifier(input_dim=6, hidden_sizes=[16, 12], num_classes=3), lambda: torch.randn(8, 6)),
    (
        "residual CNN, ChannelSelect shortcuts (demo)",
        lambda: ResidualCNNClassifier(width=16),
        lambda: torch.randn(8, 40),
    ),
    ("transformer (demo)", lambda: TransformerClassifier(), lambda: torch.randn(8, 40)),
    (
        "CIFAR ResNet-18 (quarter width)",
        lambda: CIFARResNet([2, 2, 2, 2], [16, 32, 64, 128]),
        lambda: torch.randn(4, 3, 32, 32),
    ),
    ("VGG (small)", lambda: VGG([16, "M", 32, "M"], hidden=[32]), lambda: torch.randn(4, 3, 32, 32)),
    ("returns (logits, features)", LogitsAndFeatures, lambda: torch.randn(8, 6)),
    ("returns two branches and their concat", TwoBranchesAndTheirConcat, lambda: torch.randn(8, 6)),
    ("one module on both halves of a split", SharedOnBothHalves, lambda: torch.randn(8, 2, 10)),
    ("ShuffleNetV2 units (channel shuffle)", TinyShuffleNet, lambda: torch.randn(4, 3, 8, 8)),
    (
        "bottlenecks with a shared ReLU, decouple_residuals",
        lambda: decoupled(with_head(nn.Conv2d(3, 16, 3, padding=1), SharedReluBottleneck(), SharedReluBottleneck())),
        lambda: torch.randn(4, 3, 8, 8),
    ),
    (
        "nn.Identity shortcuts (HF ResNet style), decouple_residuals",
        lambda: decoupled(with_head(nn.Conv2d(3, 8, 3, padding=1), IdentityShortcutBlock(8), IdentityShortcutBlock(8))),
        lambda: torch.randn(4, 3, 8, 8),
    ),
    ("GRU", WithGRU, lambda: torch.randn(4, 5, 4)),
    ("channels split by fixed sizes into two branches", SplitIntoTwoBranches, lambda: torch.randn(4, 3, 10)),
    ("GRN (ConvNeXtV2's channel mean)", ConvGRNConv, lambda: torch.randn(4, 3, 10)),
    ("decoder with a transposed convolution", UpsamplingDecoder, lambda: torch.randn(4, 3, 8, 8)),
    (
        "concat residual, one branch also returned (units 1, 5 planted dead)",
        lambda: planted_concat_residual()[0],
        lambda: torch.randn(4, 3, 10),
    ),
    ("causal Conv1d stack, outputs cropped in time", CausalConv1d, lambda: torch.randn(4, 3, 20)),
    ("(B, T, C) tokens cropped in time", TokensCroppedInTime, lambda: torch.randn(4, 6, 5)),
]


def hugging_face(name: str) -> nn.Module:
    """A tiny Hugging Face model of family ``name``, built from its config (nothing is downloaded)."""
    import transformers

    lm: dict[str, Any] = {"vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    lm |= {"intermediate_size": 96, "max_position_embeddings": 32}
    if name == "bert":
        bert = transformers.BertConfig(**lm, hidden_act="relu")
        bert.num_labels = 3
        return transformers.BertForSequenceClassification(bert)
    if name == "vit":
        vit = transformers.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=48, hidden_act="relu",
        )  # fmt: skip
        vit.num_labels = 3
        return transformers.ViTForImageClassification(vit)
    if name in ("llama", "qwen2"):
        family = {"llama": "Llama", "qwen2": "Qwen2"}[name]
        config = getattr(transformers, f"{family}Config")(**lm, num_key_value_heads=2)
        model: nn.Module = getattr(transformers, f"{family}ForCausalLM")(config)
        return model
    gpt2 = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    gpt2.bos_token_id = gpt2.eos_token_id = 0
    return transformers.GPT2LMHeadModel(gpt2)


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))


HUGGING_FACE: list[tuple[str, Callable[[], nn.Module], Callable[[], torch.Tensor]]] = [
    ("Hugging Face BERT (ReLU feed-forward)", lambda: hugging_face("bert"), tokens),
    ("Hugging Face ViT (ReLU MLP)", lambda: hugging_face("vit"), lambda: torch.randn(4, 3, 8, 8)),
    ("Hugging Face Llama (SwiGLU, grouped-query attention)", lambda: hugging_face("llama"), tokens),
    ("Hugging Face Qwen2 (SwiGLU, grouped-query attention)", lambda: hugging_face("qwen2"), tokens),
    ("Hugging Face GPT-2 (default config: key-value cache on)", lambda: hugging_face("gpt2"), tokens),
]


def plant_dead_units(model: nn.Module, graph: PrunableGraph) -> None:
    """Make a quarter of the units of each prunable group dead at its root producer (and its BatchNorm)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for group in graph.groups():
            if group.blocked is not None:
                continue
            root, dead = modules[group.name], torch.arange(0, group.num_units, 4)
            norm = graph.norm_after(group.name)
            target = norm if norm is not None else root
            weight, bias = getattr(target, "weight"), getattr(target, "bias", None)  # noqa: B009
            weight[dead] = 0.0
            if isinstance(bias, torch.Tensor):
                bias[dead] = -5.0


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    if hasattr(out, "logits"):  # a Hugging Face ModelOutput
        return [out.logits]
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def cover(build: Callable[[], nn.Module], inputs: Callable[[], torch.Tensor]) -> dict[str, Any]:
    torch.manual_seed(0)
    model, x = build().eval(), inputs()
    try:
        graph = PrunableGraph(model, x[:2])
        groups = graph.groups()
    except TracingError as error:
        return {"error": str(error).split(". ")[0] + "."}
    plant_dead_units(model, graph)
    before = outputs(model, x)
    width_before = sum(group.num_units for group in groups)
    pruner = DemonPruner(PruningConfig(regularizer="l2", reg_max=0.0, noise_std=0.0, recalibrate_bn=False))
    pruner.prepare(model, x[:2], total_steps=1)
    pruner.remember_batch((x, None))
    event = pruner.removal_event(model, [], step=1, epoch=0, final=True)
    after = outputs(model, x)
    cached = getattr(getattr(model, "config", None), "use_cache", False)  # a cache object is no exportable output
    try:
        torch.export.export(model, (x,), kwargs={"use_cache": False} if cached else None)
        exported = "yes"
    except Exception as error:  # reported, not raised: the table says which models do not export
        exported = f"no ({type(error).__name__})"
    blocked = [group for group in groups if group.blocked is not None]
    return {
        "groups": len(groups),
        "prunable": len(groups) - len(blocked),
        "blocked": {group.name: group.blocked for group in blocked},
        "partly_kept": {g.name: [len(g.fixed_units), g.fixed_because] for g in groups if g.fixed_units},
        "units": width_before,
        "removed": 0 if event is None else sum(event.removed.values()),
        "max_output_change": max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True)),
        "exports": exported,
    }


def main() -> None:
    rows = {name: cover(build, inputs) for name, build, inputs in ARCHITECTURES + HUGGING_FACE}
    payload = {"machine": machine(), "architectures": rows}
    write_json("coverage.json", payload)
    lines = [
        "# Architecture coverage: planted dead units, one removal event, no training",
        "",
        "| architecture | groups prunable / all | units removed / in groups | largest output change | "
        "torch.export | blocked groups (first reason); units kept in a prunable group |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | refused before training | – | – | – | {row['error']} |")
            continue
        reasons = "; ".join(
            f"`{group}`: {reason.split('; ')[0]}" for group, reason in list(row["blocked"].items())[:3]
        ) + (f"; and {len(row['blocked']) - 3} more" if len(row["blocked"]) > 3 else "")
        kept = [f"`{group}`: {count} units stay, {why}" for group, (count, why) in row.get("partly_kept", {}).items()]
        reasons = "; ".join(filter(None, [reasons, *kept]))
        lines.append(
            f"| {name} | {row['prunable']} / {row['groups']} | {row['removed']} / {row['units']} | "
            f"{row['max_output_change']:.1e} | {row['exports']} | {reasons or '–'} |"
        )
    lines += [
        "",
        "A quarter of the units of every prunable group is planted dead (weight 0 and shift −5 at the group's "
        "BatchNorm, or at its producer); the removal event then takes them, and the outputs must not change. "
        "A planted unit is dead only where an exact zero follows (a ReLU): the transformer's GELU and the "
        "ShuffleNet units' BatchNorm without a ReLU after it leave a constant, so nothing is removed there "
        "(`saturation_tolerance` would fold such units). In the Hugging Face models only the feed-forward units can go: "
        "the attention projections feed a reshape into heads (or, with grouped-query attention, a group search that "
        "is stopped), and the residual width is coupled with LayerNorm and the embeddings. GPT-2's layers are "
        "Hugging Face `Conv1D` modules, which DemonPruning does not prune: only its tied head is seen, and kept.",
        "",
    ]
    write_report("coverage.md", lines, payload["machine"])


if __name__ == "__main__":
    main()

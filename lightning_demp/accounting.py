"""Size accounting: parameters, forward FLOPs and units, against the widths a run started with."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_demp._modes import eval_mode


def count_parameters(module: nn.Module) -> int:
    """Number of parameter entries of ``module``.

    Examples:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters())


def call_with(module: nn.Module, inputs: Any) -> Any:
    """Call ``module`` on ``inputs`` as Lightning does with ``example_input_array``.

    A tuple or list is unpacked as positional arguments, a mapping (a dict, a Hugging Face ``BatchEncoding``) as
    keyword arguments, anything else is passed as is. A ``forward`` without ``**kwargs`` gets only the keys it
    names, so a batch's ``labels`` do not break ``forward(input_ids, attention_mask)``.

    Examples:
        >>> class Scale(nn.Module):
        ...     def forward(self, x, factor=1.0):
        ...         return x * factor
        >>> call_with(Scale(), (torch.ones(2), 3.0)), call_with(Scale(), {"x": torch.ones(2), "factor": 2.0})
        (tensor([3., 3.]), tensor([2., 2.]))
        >>> call_with(Scale(), torch.ones(2))
        tensor([1., 1.])
    """
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    if isinstance(inputs, Mapping):
        return module(**accepted_keywords(module, inputs))
    return module(inputs)


def accepted_keywords(module: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``inputs`` that ``module.forward`` takes: all of them when it has ``**kwargs``.

    Examples:
        >>> class Encoder(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return input_ids
        >>> sorted(accepted_keywords(Encoder(), {"input_ids": 1, "attention_mask": 2, "labels": 3}))
        ['attention_mask', 'input_ids']
    """
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return dict(inputs)
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return dict(inputs)
    names = {parameter.name for parameter in parameters}
    return {key: value for key, value in inputs.items() if key in names}


def batch_size_of(inputs: Any) -> int:
    """The leading dimension of the first tensor found in ``inputs`` (1 if none).

    Examples:
        >>> batch_size_of(torch.zeros(5, 3)), batch_size_of({"x": torch.zeros(4, 2)})
        (5, 4)
        >>> batch_size_of((2.0, torch.zeros(7)))  # the first tensor, wherever it is
        7
        >>> batch_size_of(torch.tensor(1.0)), batch_size_of("no tensor")
        (1, 1)
    """
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() > 0 else 1
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def attention_flops(
    query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: Any, **kwargs: Any
) -> int:
    """FLOPs of ``softmax(q kᵀ) v``: its two batched matmuls, as torch counts them for the GPU kernels.

    torch's ``FlopCounterMode`` has no formula for the CPU kernel of ``scaled_dot_product_attention``, so on CPU it
    counted nothing for attention; `count_flops_per_sample` adds this one. ``query_shape`` is
    ``(batch, heads, queries, head_dim)``, ``key_shape`` and ``value_shape`` alike with the keys.

    Examples:
        >>> attention_flops((2, 4, 10, 8), (2, 4, 10, 8), (2, 4, 10, 8))  # batch 2, 4 heads, 10 tokens, head dim 8
        25600
    """
    batch, heads, queries, dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (dim + value_dim)


def fused_attention_flops(
    query: Tensor, key: Tensor, value: Tensor, embed_dim: int, num_heads: int, *args: Any, **kwargs: Any
) -> int:
    """FLOPs of ``nn.MultiheadAttention``'s fused inference kernel: q/k/v projections, attention, output projection.

    In eval mode without gradients, ``nn.MultiheadAttention`` runs one fused kernel for which torch's
    ``FlopCounterMode`` has no formula, so it counted nothing for the whole layer; `count_flops_per_sample` adds
    this one. The kernel takes batch-first ``(batch, tokens, embed_dim)`` inputs; nested tensors count 0, as before.

    Examples:
        >>> x = torch.randn(2, 10, 32)
        >>> fused_attention_flops(x, x, x, 32, 4)
        189440
    """
    if query.is_nested or key.is_nested:
        return 0
    batch, queries, keys = query.shape[0], query.shape[-2], key.shape[-2]
    head_dim = embed_dim // num_heads
    projections = 2 * batch * embed_dim * embed_dim * (2 * queries + 2 * keys)  # q, k, v in; the output out
    return projections + attention_flops(
        (batch, num_heads, queries, head_dim), (batch, num_heads, keys, head_dim), (batch, num_heads, keys, head_dim)
    )


def fused_encoder_layer_flops(src: Tensor, embed_dim: int, num_heads: int, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``nn.TransformerEncoderLayer``'s fused inference kernel: self-attention and the feed-forward block.

    Like `fused_attention_flops`, for the kernel that ``nn.TransformerEncoderLayer`` runs in eval mode without
    gradients (norms and activations are not counted, as torch counts neither). The first feed-forward weight is
    the kernel's 15th argument.

    Examples:
        >>> layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True).eval()
        >>> with torch.no_grad():
        ...     count_flops_per_sample(layer, torch.randn(2, 10, 32))
        176640.0
    """
    if src.is_nested:
        return 0
    batch, tokens = src.shape[0], src.shape[-2]
    feedforward = args[11].shape[0]  # ffn_weight_1: (dim_feedforward, embed_dim)
    return fused_attention_flops(src, src, src, embed_dim, num_heads) + 4 * batch * tokens * embed_dim * feedforward


def _raw(formula: Any) -> Any:
    """Mark ``formula`` as taking the tensors themselves (FlopCounterMode's ``get_raw``), not their shapes."""
    formula._get_raw = True
    return formula


_EXTRA_FLOP_FORMULAS = {
    getattr(torch.ops.aten, name): formula
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", attention_flops),
        ("_native_multi_head_attention", _raw(fused_attention_flops)),
        ("_transformer_encoder_layer_fwd", _raw(fused_encoder_layer_flops)),
    )
    if hasattr(torch.ops.aten, name)
}


def count_flops_per_sample(module: nn.Module, inputs: Any) -> float:
    """Forward FLOPs per sample, counted by torch's ``FlopCounterMode`` in eval mode (attention on CPU included).

    Examples:
        >>> count_flops_per_sample(nn.Linear(3, 2), torch.randn(4, 3))
        12.0
    """
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with eval_mode(module), torch.no_grad(), counter:
        call_with(module, inputs)
    return counter.get_total_flops() / batch_size_of(inputs)


def first_input(batch: Any, input_keys: Sequence[str] | None = None) -> Any:
    """The model input of a batch: the batch itself when it is a tensor, its first element (``(x, y)``), or for a
    mapping (a dict, a Hugging Face ``BatchEncoding``) its entries as keyword arguments, only ``input_keys`` when
    given.

    Raises:
        KeyError: A key of ``input_keys`` is not in the batch (the message lists the batch's keys).

    Examples:
        >>> first_input((torch.ones(2, 3), torch.zeros(2))).shape
        torch.Size([2, 3])
        >>> sorted(first_input({"input_ids": 1, "attention_mask": 2, "labels": 3}, ["input_ids", "attention_mask"]))
        ['attention_mask', 'input_ids']
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if input_keys is None:
            return dict(batch)
        missing = [key for key in input_keys if key not in batch]
        if missing:
            raise KeyError(
                f"`DemonPruning(input_keys={list(input_keys)})`: the batch has no {missing}; "
                f"its keys are {list(batch)}."
            )
        return {key: batch[key] for key in input_keys}
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(
        f"Cannot find the model input in a batch of type {type(batch).__name__}; pass `forward=` to `DemonPruner` "
        "(or override `DemonPruning.batch_to_input`)."
    )


def call_on_first_input(model: nn.Module, batch: Any) -> Any:
    """The default forward of the dead check: ``model`` called on `first_input` of ``batch``.

    Examples:
        >>> call_on_first_input(nn.Linear(3, 1), (torch.ones(2, 3), None)).shape
        torch.Size([2, 1])
    """
    return call_with(model, first_input(batch))


def first_samples(inputs: Any, count: int = 2) -> Any:
    """The first ``count`` samples of a tensor, or of every tensor in a tuple, list or dict.

    Examples:
        >>> first_samples({"x": torch.ones(5, 3)}, 2)["x"].shape
        torch.Size([2, 3])
    """
    if isinstance(inputs, Tensor) and inputs.dim() > 0:
        return inputs[:count]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(first_samples(value, count) for value in inputs)
    if isinstance(inputs, Mapping):
        return {key: first_samples(value, count) for key, value in inputs.items()}
    return inputs


def set_flops_per_batch(module: nn.Module, flops_per_sample: float | None, batch_size: int | None) -> None:
    """Keep ``module.flops_per_batch`` (training FLOPs ≈ 3 × forward) current for Lightning's ``ThroughputMonitor``.

    Examples:
        >>> layer = nn.Linear(3, 2)
        >>> set_flops_per_batch(layer, 12.0, batch_size=4)
        >>> layer.flops_per_batch
        144
    """
    if flops_per_sample is not None and batch_size:
        module.flops_per_batch = int(3 * flops_per_sample * batch_size)  # type: ignore[assignment]

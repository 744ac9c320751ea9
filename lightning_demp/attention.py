"""Attention heads that can be removed whole once their output is dead.

``nn.MultiheadAttention`` ties the heads' inner width to the embedding width (``embed_dim = num_heads · head_dim``),
so it cannot lose a head without changing the residual width. `HeadedAttention` keeps the two apart: a ``qkv``
projection from ``dim`` to ``3 · heads · head_dim`` features and a ``proj`` projection back to ``dim``. A head is
*dead* when its slice of ``proj``'s input (the head's attention output) is ``|x| <= threshold`` for every token of
every observed sample: the head then contributes nothing but ``proj``'s bias, and removing its ``q``, ``k`` and
``v`` rows of ``qkv`` and its columns of ``proj`` leaves the block's output unchanged. `DemonPruning` observes
``proj``'s input with the same activity statistics as any other reader and removes dead heads at its removal events;
the residual width, coupled with LayerNorm, is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_demp.optim import ParamRemap, slice_parameter_


class HeadedAttention(nn.Module):
    """Multi-head self-attention whose heads can be removed one by one (`remove_heads_`).

    Computes ``proj(concat_h softmax(q_h k_hᵀ / √head_dim) v_h)`` on ``[batch, tokens, dim]`` inputs with
    ``F.scaled_dot_product_attention``. Initialised as ``nn.MultiheadAttention`` is (Xavier-uniform ``qkv``, zero
    biases), so it is a drop-in for ``nn.MultiheadAttention(dim, heads, batch_first=True)`` used as self-attention.

    Args:
        dim: Width of the input and the output (the residual width).
        heads: Number of heads.
        head_dim: Width of each head; ``dim // heads`` by default.
        dropout: Dropout on the attention weights while training.
        bias: Whether the projections have biases.

    Examples:
        >>> attention = HeadedAttention(dim=8, heads=2)
        >>> x = torch.randn(3, 5, 8)
        >>> attention(x).shape, attention.heads, attention.qkv.out_features
        (torch.Size([3, 5, 8]), 2, 24)
    """

    def __init__(
        self, dim: int, heads: int, head_dim: int | None = None, dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        if heads < 1 or (head_dim is None and dim % heads):
            raise ValueError(f"`heads={heads}` must be positive and divide `dim={dim}` unless `head_dim` is given.")
        self.head_dim = head_dim if head_dim is not None else dim // heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * heads * self.head_dim, bias=bias)
        self.proj = nn.Linear(heads * self.head_dim, dim, bias=bias)
        nn.init.xavier_uniform_(self.qkv.weight)
        if bias:
            nn.init.zeros_(self.qkv.bias)
            nn.init.zeros_(self.proj.bias)

    @property
    def heads(self) -> int:
        """Current number of heads (read off ``qkv``, so a resized or loaded checkpoint is always consistent)."""
        return self.qkv.out_features // (3 * self.head_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention over the tokens of ``x`` (``[batch, tokens, dim]``)."""
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))

    def remove_heads_(self, heads: Tensor) -> list[ParamRemap]:
        """Remove the heads at positions ``heads`` (their ``q``/``k``/``v`` rows of ``qkv``, columns of ``proj``).

        Returns:
            One `ParamRemap` per replaced parameter, for `remap_optimizer_`.

        Raises:
            ValueError: When a position is out of range, or every head would go.

        Examples:
            >>> attention = HeadedAttention(dim=4, heads=2).eval()
            >>> with torch.no_grad():
            ...     attention.qkv.weight[8 + 2:] = 0.0   # head 1's value rows
            ...     attention.qkv.bias[8 + 2:] = 0.0
            >>> x = torch.randn(2, 3, 4)
            >>> before = attention(x)
            >>> len(attention.remove_heads_(torch.tensor([1]))), attention.heads
            (3, 1)
            >>> torch.allclose(attention(x), before, atol=1e-6)
            True
        """
        removed = {int(h) for h in heads.tolist()}
        if any(h < 0 or h >= self.heads for h in removed):
            raise ValueError(f"Head positions must lie in [0, {self.heads}), got {sorted(removed)}.")
        if len(removed) >= self.heads:
            raise ValueError(f"Cannot remove all {self.heads} heads of an attention layer; keep at least one.")
        if not removed:
            return []
        kept = torch.tensor([h for h in range(self.heads) if h not in removed], dtype=torch.long)
        within = torch.arange(self.head_dim)
        columns = (kept[:, None] * self.head_dim + within[None, :]).flatten()
        width = self.heads * self.head_dim
        rows = torch.cat([part * width + columns for part in range(3)])
        return _slice_linear_(self.qkv, rows, dim=0) + _slice_linear_(self.proj, columns, dim=1)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}"


def _slice_linear_(layer: nn.Linear, kept: Tensor, dim: int) -> list[ParamRemap]:
    """Keep output (``dim=0``, bias too) or input (``dim=1``) features ``kept`` of ``layer``."""
    names = ["weight"] + (["bias"] if dim == 0 and layer.bias is not None else [])
    remaps = [slice_parameter_(layer, name, dim, kept) for name in names]
    layer.out_features, layer.in_features = layer.weight.shape
    return remaps


def attention_layers(model: nn.Module) -> dict[str, HeadedAttention]:
    """Every `HeadedAttention` of ``model``, by name.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), HeadedAttention(8, 2))
        >>> list(attention_layers(model))
        ['1']
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, HeadedAttention)}


def head_readers(model: nn.Module) -> dict[str, nn.Linear]:
    """The layer that reads the heads' outputs (``proj``) of every `HeadedAttention`, by its module name.

    Examples:
        >>> list(head_readers(nn.Sequential(HeadedAttention(8, 2))))
        ['0.proj']
    """
    return {f"{name}.proj": module.proj for name, module in attention_layers(model).items()}


def head_activity(attention: HeadedAttention, max_abs: Tensor) -> Tensor:
    """Each head's largest ``|output|``, from the per-feature ``max_abs`` observed at ``proj``'s input.

    Examples:
        >>> head_activity(HeadedAttention(4, 2), torch.tensor([0.0, 0.0, 0.5, 0.1]))
        tensor([0.0000, 0.5000])
    """
    return max_abs.detach().float().cpu().view(attention.heads, attention.head_dim).amax(dim=1)


def plan_head_removal(model: nn.Module, max_abs: Mapping[str, Tensor], threshold: float = 0.0) -> dict[str, Tensor]:
    """Dead heads of every `HeadedAttention` whose ``proj`` input was observed: ``|output| <= threshold`` everywhere.

    The most active head of a layer always stays, so that no attention layer loses all its heads; a layer with
    non-finite statistics keeps them all.

    Examples:
        >>> model = nn.Sequential(HeadedAttention(4, 2))
        >>> plan_head_removal(model, {"0.proj": torch.tensor([0.0, 0.0, 0.3, 0.2])})
        {'0': tensor([0])}
    """
    plan = {}
    for name, attention in attention_layers(model).items():
        observed = max_abs.get(f"{name}.proj")
        if observed is None:
            continue
        activity = head_activity(attention, observed)
        if not bool(torch.isfinite(activity).all()):
            continue
        dead = torch.nonzero(activity <= threshold).flatten()
        if len(dead) == attention.heads:
            dead = dead[dead != int(activity.argmax())]
        if len(dead):
            plan[name] = dead
    return plan


def remove_heads_(model: nn.Module, plan: Mapping[str, Tensor]) -> list[ParamRemap]:
    """Apply a head plan (`plan_head_removal`) to ``model``; returns the records for the optimizer.

    Examples:
        >>> model = nn.Sequential(HeadedAttention(4, 2))
        >>> len(remove_heads_(model, {"0": torch.tensor([0])})), model[0].heads
        (3, 1)
    """
    layers = attention_layers(model)
    remaps: list[ParamRemap] = []
    for name, heads in plan.items():
        remaps += layers[name].remove_heads_(heads)
    return remaps

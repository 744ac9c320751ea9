"""Decoupled residual channels: an identity shortcut as a fixed 0/1 channel selection.

With a plain ``x + f(x)``, a channel of the residual stream can only go when it is dead at the block's input *and*
output, because the sum couples them. The authors' code turns identity shortcuts into fixed 0/1 selections
(``paper.md`` §1.1) so that a block's input channels and output channels shrink independently. ``ChannelSelect``
is that selection: it holds the original ids of its input and output channels and routes each output channel from
the input channel with the same id (zeros when that channel is gone). While nothing is removed it is an identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


class ChannelSelect(nn.Module):
    """Identity shortcut that survives independent removal of its input and output channels.

    Args:
        channels: Number of channels (identity at construction).

    Examples:
        >>> select = ChannelSelect(4)
        >>> x = torch.arange(8.0).reshape(1, 4, 2)
        >>> torch.equal(select(x), x)
        True
        >>> select.keep_inputs_(torch.tensor([0, 2, 3]))   # input channel 1 is gone
        >>> select(x[:, [0, 2, 3]])[0, :, 0]               # output 1 now gets nothing from the shortcut
        tensor([0., 0., 4., 6.])
    """

    in_ids: Tensor
    out_ids: Tensor
    source: Tensor
    absent: Tensor
    present: Tensor
    present_source: Tensor
    unrouted: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("in_ids", torch.arange(channels))
        self.register_buffer("out_ids", torch.arange(channels))
        self._refresh()

    @property
    def in_channels(self) -> int:
        """Current number of input channels."""
        return int(self.in_ids.numel())

    @property
    def out_channels(self) -> int:
        """Current number of output channels."""
        return int(self.out_ids.numel())

    def _refresh(self) -> None:
        match = self.out_ids[:, None] == self.in_ids[None, :]
        present = match.any(dim=1)
        self.register_buffer("source", match.to(torch.uint8).argmax(dim=1), persistent=False)
        self.register_buffer("absent", torch.nonzero(~present).flatten(), persistent=False)
        self.register_buffer("present", torch.nonzero(present).flatten(), persistent=False)
        self.register_buffer("present_source", self.source[self.present], persistent=False)
        self.register_buffer("unrouted", ~present, persistent=False)
        self.identity = self.in_channels == self.out_channels and bool(torch.equal(self.in_ids, self.out_ids))
        self.complete = bool(present.all())
        self.segments = _runs(self.present.tolist(), self.present_source.tolist())

    @property
    def routed_channels(self) -> int:
        """Number of output channels that still receive an input channel."""
        return int(self.present.numel())

    def keep_inputs_(self, kept: Tensor) -> None:
        """Keep only the input channels at positions ``kept``."""
        self.in_ids = self.in_ids[kept.to(self.in_ids.device)]
        self._refresh()

    def keep_outputs_(self, kept: Tensor) -> None:
        """Keep only the output channels at positions ``kept``."""
        self.out_ids = self.out_ids[kept.to(self.out_ids.device)]
        self._refresh()

    def forward(self, x: Tensor) -> Tensor:
        """Route input channels (dimension 1) to output channels by id."""
        if self.identity:
            return x.view_as(x)  # a node of its own in the autograd graph, so Torch-Pruning can trace it
        if x.dim() > 2 and x.shape[0] >= 8:
            return self._gather_rows(x)
        selected = x.index_select(1, self.source)
        if self.complete:
            return selected
        # zero the outputs whose channel is gone: writes only those channels (``selected`` is a fresh tensor)
        return selected.index_fill_(1, self.absent, 0.0)

    def _gather_rows(self, x: Tensor) -> Tensor:
        """``forward`` for ``x`` with trailing dimensions: one gather of whole rows ``x[n, c, ...]``.

        About twice as fast on CPU as ``index_select`` on dim 1, which copies one short run per (sample, channel).
        Outputs whose channel is gone read an appended row of zeros (on CPU, zeroing them afterwards with a broadcast
        ``masked_fill_`` was several times slower, and ``index_fill_`` on the channel dimension no faster).
        """
        batch, channels = x.shape[0], x.shape[1]
        flat = x.reshape(batch * channels, -1)
        rows = torch.arange(batch, device=x.device)[:, None] * channels + self.source[None, :]
        if not self.complete:
            flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
            rows = torch.where(self.unrouted[None, :], batch * channels, rows)  # the zero row
        return flat.index_select(0, rows.flatten()).view(batch, self.out_channels, *x.shape[2:])

    def add_to_(self, branch: Tensor, x: Tensor) -> Tensor:
        """``branch + self(x)``, computed by adding the routed input channels into ``branch`` in place.

        Skips the zero-filled intermediate: only the output channels that still have a source are touched. Use it
        through `residual_sum`, which falls back to the plain form while anything observes the selection.

        Args:
            branch: The residual branch's output, ``[batch, out_channels, ...]``; overwritten. It must be a fresh
                tensor its producer does not keep for backward (a convolution's or BatchNorm's output is; a ReLU's
                is not, and autograd would refuse the in-place update).
            x: The block input, ``[batch, in_channels, ...]``.

        Examples:
            >>> select = ChannelSelect(3)
            >>> select.keep_inputs_(torch.tensor([0, 2]))
            >>> x, branch = torch.ones(1, 2, 1), torch.full((1, 3, 1), 10.0)
            >>> expected = branch + select(x)
            >>> torch.equal(select.add_to_(branch, x), expected)
            True
        """
        path = self.sum_path(x)
        if path == "identity":
            return branch.add_(x)
        if path == "slices":
            for out_start, in_start, length in self.segments:
                branch[:, out_start : out_start + length].add_(x[:, in_start : in_start + length])
            return branch
        if path == "scatter":
            return branch.index_add_(1, self.present, x.index_select(1, self.present_source))
        return branch.add_(self._gather_rows(x))

    def sum_path(self, x: Tensor) -> str:
        """How `add_to_` sums ``x`` into a branch: the cheapest way for these channels and this input.

        * ``"identity"``: nothing removed, one dense add;
        * ``"slices"``: the routed channels form at most `MAX_SLICE_ADDS` runs that are contiguous on both sides
          (`lightning_demp.permutation.order_routed_channels_` arranges one run after each removal): in-place adds
          of slices, as a statically pruned network would do;
        * ``"scatter"``: a gather and a scatter-add over the routed channels only, for few of them, small batches or
          inputs without trailing dimensions (on CPU the scatter-add's cost grows with the routed channels,
          ``benchmarks/index_add_cost.py``);
        * ``"gather"``: one gather of whole rows (`_gather_rows`) and one dense add.

        Examples:
            >>> select = ChannelSelect(4)
            >>> select.sum_path(torch.randn(16, 4, 8))
            'identity'
            >>> select.keep_inputs_(torch.tensor([0, 1, 3]))  # channel 2 gone: ids 0, 1 | 3 route in two runs
            >>> select.segments, select.sum_path(torch.randn(16, 3, 8))
            (((0, 0, 2), (3, 2, 1)), 'slices')
        """
        if self.identity:
            return "identity"
        if len(self.segments) <= MAX_SLICE_ADDS:
            return "slices"
        if x.dim() <= 2 or x.shape[0] < 8 or 6 * self.present.numel() <= self.in_channels + 2 * self.out_channels:
            return "scatter"
        return "gather"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("in_ids", "out_ids"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.shape != getattr(self, name).shape:
                setattr(self, name, saved.clone().to(getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, segments={len(self.segments)}"


MAX_SLICE_ADDS = 4
"""`ChannelSelect.add_to_` adds slices when the routed channels form at most this many runs, and gathers otherwise."""


def _runs(out_positions: Sequence[int], in_positions: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """Maximal runs ``(out_start, in_start, length)`` of routed pairs that are consecutive on both sides.

    Examples:
        >>> _runs([0, 1, 2, 5, 6], [3, 4, 5, 0, 1])
        ((0, 3, 3), (5, 0, 2))
    """
    runs: list[list[int]] = []
    for out_position, in_position in zip(out_positions, in_positions, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == out_position and runs[-1][1] + runs[-1][2] == in_position:
            runs[-1][2] += 1
        else:
            runs.append([out_position, in_position, 1])
    return tuple((out_start, in_start, length) for out_start, in_start, length in runs)


def _observed(module: nn.Module) -> bool:
    """Whether forward hooks (the module's own or global ones) would see calls of ``module``."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(torch.nn.modules.module, "_global_forward_hooks", None)
        or getattr(torch.nn.modules.module, "_global_forward_pre_hooks", None)
    )


def residual_sum(branch: Tensor, shortcut: nn.Module, x: Tensor) -> Tensor:
    """``branch + shortcut(x)``, fused in place when ``shortcut`` is a `ChannelSelect` that nobody observes.

    The fused form (`ChannelSelect.add_to_`) spares the selection's zero-filled intermediate and the full-width sum,
    which keeps a decoupled compact model close to the speed of a statically pruned one. While hooks are attached to
    the selection (Torch-Pruning's tracing, the dead check's monitors) the plain form runs, so they see the module
    called as usual; so it does when the sum would broadcast ``branch`` or promote its dtype (under autocast, a
    half-precision branch and a float input). Both forms give the same values. A forward hook that keeps the branch
    layer's output would see it overwritten.

    Args:
        branch: The residual branch's output (a fresh tensor: see `ChannelSelect.add_to_`).
        shortcut: The shortcut module (a `ChannelSelect`, a projection, or anything else).
        x: The block input.

    Examples:
        >>> select, x, branch = ChannelSelect(4), torch.randn(2, 4, 3), torch.randn(2, 4, 3)
        >>> expected = branch + x
        >>> torch.equal(residual_sum(branch, select, x), expected)
        True
    """
    if isinstance(shortcut, ChannelSelect) and not _observed(shortcut) and _fits_in_place(branch, shortcut, x):
        return shortcut.add_to_(branch, x)
    return branch + shortcut(x)


def _fits_in_place(branch: Tensor, select: ChannelSelect, x: Tensor) -> bool:
    """Whether ``branch + select(x)`` has ``branch``'s own shape and dtype (no broadcast, no type promotion)."""
    return (
        branch.dim() == x.dim() >= 2
        and branch.shape[0] == x.shape[0]
        and branch.shape[1] == select.out_channels
        and branch.shape[2:] == x.shape[2:]
        and branch.dtype == torch.result_type(branch, x)
    )

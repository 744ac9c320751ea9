"""Operations that mix or regroup a group's units between its producer and its readers, read off autograd nodes.

Torch-Pruning maps unit indices through a reshape or a reduction as if each unit stayed on its own. Two patterns
break that: a reshape that splits the units' dimension into fixed-size pieces (per-head attention's
``view(B, T, heads, head_dim)``, an unflatten, a channel shuffle), and a reduction over the units' dimension (a
mean over channels, as ConvNeXtV2's GRN takes, a hand-written norm, a softmax): removing one unit there breaks
the reshape, or changes every other unit. `lightning_demp.graph` blocks such groups, with the reason.
"""

from __future__ import annotations

import math
import re
from typing import Any


def split_of(before: tuple[int, ...], after: tuple[int, ...]) -> tuple[int, tuple[int, ...]] | None:
    """Where a reshape from ``before`` to ``after`` splits one dimension (not the batch) into several factors of
    which at least two are above 1: ``(dim, factors)``, or None for a merge, a no-op or a rearrangement.

    Examples:
        >>> split_of((2, 8, 32), (2, 8, 4, 8))  # per-head attention: 32 features as 4 heads of 8
        (2, (4, 8))
        >>> split_of((2, 8, 32), (16, 4, 8))  # the same, with batch and tokens merged
        (2, (4, 8))
        >>> split_of((2, 16, 5), (2, 80)) is None  # a flatten merges
        True
    """
    for dim in range(1, len(before)):
        extra = len(after) - len(before) + 1
        if extra < 2 or before[:dim] != after[:dim] or before[dim + 1 :] != after[dim + extra :]:
            continue
        factors = after[dim : dim + extra]
        if math.prod(factors) == before[dim] and sum(f > 1 for f in factors) >= 2:
            return dim, tuple(factors)
    last = before[-1] if before else 1
    for count in range(2, len(after) + 1):  # the last dimension split while the leading ones merge
        factors = after[-count:]
        if math.prod(factors) == last and after[-1] < last and sum(f > 1 for f in factors) >= 2:
            return len(before) - 1, tuple(factors)
    return None


def reshape_split(grad_fn: Any) -> tuple[int, tuple[int, ...]] | None:
    """The `split_of` the reshape whose output has this autograd ``grad_fn`` made, read off the node's recorded
    input and output shapes; None for another op, or a reshape that splits nothing. Per-head attention
    (``q.view(B, T, heads, head_dim)``) is such a split: a unit that goes would leave the features no longer
    divisible into heads.

    Examples:
        >>> import torch
        >>> out = torch.ones(2, 6, requires_grad=True).mul(2).view(2, 3, 2)
        >>> reshape_split(out.grad_fn), reshape_split(out.sum().grad_fn)
        ((1, (3, 2)), None)
    """
    name = grad_fn.name() if grad_fn is not None else ""
    if "View" not in name and "Reshape" not in name:
        return None
    try:
        after = tuple(int(size) for size in grad_fn._input_metadata[0].shape)
        before = getattr(grad_fn, "_saved_self_sym_sizes", None)
        if before is None:  # the shape its input had when its producer returned it
            producer, index = grad_fn.next_functions[0]
            before = producer._input_metadata[index].shape
    except (AttributeError, IndexError, RuntimeError, TypeError):
        return None
    return split_of(tuple(int(size) for size in before), after)


_REDUCTIONS = {
    "Mean", "Sum", "Nansum", "Nanmean", "Norm", "LinalgVectorNorm", "Softmax", "LogSoftmax", "Var", "Std", "VarMean",
    "StdMean", "Amax", "Amin", "Max", "Min", "Logsumexp", "Prod", "Median",
}  # fmt: skip


def _signed(dim: int) -> int:
    """A dimension as autograd saved it: -1 comes back as 2**64 - 1."""
    return dim - 2**64 if dim >= 2**63 else dim


_KEEPS_DIMS = {
    "Relu", "Gelu", "Silu", "Sigmoid", "Tanh", "LeakyRelu", "Hardtanh", "Elu", "Threshold", "Mul", "Div", "Add",
    "Sub", "Neg", "Abs", "Pow", "Sqrt", "Rsqrt", "Exp", "Log", "Clone", "ToCopy", "NativeDropout", "NativeBatchNorm",
}  # fmt: skip


def _op(node: Any) -> str:
    return re.sub(r"Backward\d*$", "", node.name()) if node is not None else ""


def _out_shape(node: Any) -> tuple[int, ...]:
    return tuple(int(size) for size in node._input_metadata[0].shape)


def _units_dim(reduction: Any) -> int | None:
    """Where the units are in the tensor ``reduction`` reduces: walked back to the Linear or convolution that wrote
    them, through elementwise ops, transposes, permutes and views that keep the units' dimension whole, then mapped
    forward from their dimension there (1 after a convolution, the last after a Linear). None when the walk meets
    any other op (the caller then assumes no transpose between)."""
    chain, node = [], reduction.next_functions[0][0] if reduction.next_functions else None
    for _ in range(32):
        if node is None:
            return None
        name = _op(node)
        if name in ("Convolution", "Addmm", "Mm"):
            break
        if name in ("Transpose", "Permute", "View", "Reshape", "UnsafeView"):
            chain.append(node)
        elif name not in _KEEPS_DIMS:
            return None
        node = next((child for child, _ in node.next_functions if child is not None), None)
    else:
        return None
    shape = _out_shape(node)
    dim = 1 if _op(node) == "Convolution" else len(shape) - 1
    for step in reversed(chain):
        after, name = _out_shape(step), _op(step)
        if name == "Transpose":
            a, b = (_signed(step._saved_dim0) % len(shape), _signed(step._saved_dim1) % len(shape))
            dim = b if dim == a else a if dim == b else dim
        elif name == "Permute":
            dim = [_signed(d) % len(shape) for d in step._saved_dims].index(dim)
        elif dim == len(shape) - 1 and shape[-1] == after[-1]:  # a view that keeps the last dimension
            dim = len(after) - 1
        elif shape[: dim + 1] != after[: dim + 1]:
            return None
        shape = after
    return dim


def _resolved_units_dim(grad_fn: Any, ndim: int, channels_last: bool) -> int:
    """`_units_dim`, or where the producer writes them when the walk back does not reach it."""
    try:
        found = _units_dim(grad_fn)
    except (AttributeError, RuntimeError, IndexError, ValueError):
        found = None
    return found if found is not None else ndim - 1 if channels_last else 1


def unit_reduction(grad_fn: Any, num_units: int, channels_last: bool) -> str | None:
    """The op and dimension when the autograd node ``grad_fn`` reduces over the dimension that holds a group's
    ``num_units`` units (a mean over channels, as ConvNeXtV2's GRN takes, or a hand-written norm): removing a unit
    there changes every other unit's value. None for any other node.

    The units lie where their producer writes them: the last dimension after a Linear (``channels_last``), the
    second after a convolution, followed through transposes and permutes on the way; that dimension must be at
    least ``num_units`` long (concatenated units too). A
    reduction over every dimension (``h.mean()``) and a normalization without weights (``F.layer_norm``) count.

    Examples:
        >>> import torch
        >>> x = torch.randn(2, 8, 5, requires_grad=True)  # 8 channels of a convolution, 5 positions
        >>> unit_reduction(x.mean(dim=1).grad_fn, 8, False), unit_reduction(x.mean(dim=2).grad_fn, 8, False)
        ('`mean` over dimension 1', None)
        >>> unit_reduction(x.var(dim=-1).grad_fn, 5, True)  # after a Linear: the units are the last dimension
        '`var` over dimension 2'
    """
    op = re.sub(r"Backward\d*$", "", grad_fn.name() if grad_fn is not None else "")
    if op not in _REDUCTIONS and op not in ("NativeLayerNorm", "NativeGroupNorm"):
        return None
    try:
        shape = getattr(grad_fn, "_saved_self_sym_sizes", None)
        if shape is None:
            saved = next(
                (
                    value
                    for name in ("_saved_self", "_saved_input")
                    if (value := getattr(grad_fn, name, None)) is not None
                ),
                None,
            )
            shape = (saved if saved is not None else grad_fn._saved_result).shape
        ndim = len(shape)
        if op == "NativeLayerNorm":  # over its trailing normalized dimensions
            dims = list(range(ndim - len(grad_fn._saved_normalized_shape), ndim))
        elif op == "NativeGroupNorm":  # over the channels, group by group
            dims = [1]
        else:
            saved_dim = getattr(grad_fn, "_saved_dim", None)
            dims = list(range(ndim)) if saved_dim is None or saved_dim == () else saved_dim
    except (AttributeError, RuntimeError, StopIteration):
        return None
    shape = tuple(int(size) for size in shape)
    unit_dim = _resolved_units_dim(grad_fn, len(shape), channels_last)
    for dim in [dims] if isinstance(dims, int) else list(dims):
        if shape and _signed(int(dim)) % len(shape) == unit_dim and shape[unit_dim] >= num_units:
            return f"`{op.removeprefix('Native').lower()}` over dimension {unit_dim}"
    return None


_BY_POSITION = {"SplitWithSizes", "Split", "Slice", "Unbind", "Select", "Narrow"}


def unit_split(grad_fn: Any, num_units: int, channels_last: bool) -> str | None:
    """The op and dimension when the autograd node ``grad_fn`` picks a group's units by position along their
    dimension (``torch.split(h, [4, 4], dim=1)``, ``h[:, :4]``, ``h.chunk(2, dim=1)``): the model's code fixes
    where each unit sits, so a removal shifts the others across the cut, or breaks it. A full slice
    (``h[:, :]``) picks nothing. None for any other node; the units' dimension as for `unit_reduction`.

    Examples:
        >>> import torch
        >>> x = torch.randn(2, 8, 5, requires_grad=True)  # 8 channels of a convolution, 5 positions
        >>> unit_split(torch.split(x, [4, 4], dim=1)[0].grad_fn, 8, False), unit_split(x[:, :, :2].grad_fn, 8, False)
        ('`splitwithsizes` over dimension 1', None)
        >>> unit_split(x[:, :].grad_fn, 8, False) is None  # a no-op
        True
    """
    op = _op(grad_fn)
    if op not in _BY_POSITION:
        return None
    try:
        dim = _signed(int(grad_fn._saved_dim))
        shape = getattr(grad_fn, "_saved_self_sym_sizes", None)
        if shape is None:  # the shape its input had
            producer, index = grad_fn.next_functions[0]
            shape = producer._input_metadata[index].shape
        shape = tuple(int(size) for size in shape)
        dim %= len(shape)
        if (
            op == "Slice"
            and grad_fn._saved_start == 0
            and grad_fn._saved_end >= shape[dim]
            and grad_fn._saved_step == 1
        ):
            return None
    except (AttributeError, RuntimeError, IndexError, TypeError, ZeroDivisionError):
        return None
    unit_dim = _resolved_units_dim(grad_fn, len(shape), channels_last)
    if dim == unit_dim and shape[unit_dim] >= num_units:
        return f"`{op.lower()}` over dimension {unit_dim}"
    return None

"""Megatron's four autograd mappings between replicated and tensor-parallel activations.

Each is a pair of collectives that are adjoint to each other, so gradients stay correct:
copy (identity / all-reduce), reduce (all-reduce / identity), scatter (split / all-gather) and
gather (all-gather / split). Splits are along the last dimension. In a group of one process every
mapping is the identity and communicates nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    # A copy, because autograd may still need the input; the collective works in place.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split_last(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    chunks = x.chunk(dist.get_world_size(group), dim=-1)
    return chunks[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def _identity(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x.view_as(x)


def _mapping(name: str, forward: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """An autograd function applying `forward(x, group)` and, to the gradient, its adjoint `backward`."""

    def fwd(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return backward(grad, ctx.group), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


_Copy = _mapping("_Copy", _identity, _all_reduce)
_Reduce = _mapping("_Reduce", _all_reduce, _identity)
_Scatter = _mapping("_Scatter", _split_last, _gather_last)
_Gather = _mapping("_Gather", _gather_last, _split_last)


def copy_to_tensor_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (enters a column-parallel layer)."""
    return x if dist.get_world_size(group) == 1 else _Copy.apply(x, group)


def reduce_from_tensor_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-reduce forward; identity backward (sums the partial outputs of a row-parallel layer)."""
    return x if dist.get_world_size(group) == 1 else _Reduce.apply(x, group)


def scatter_to_tensor_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's slice of the last dimension forward; all-gather of the gradient backward."""
    return x if dist.get_world_size(group) == 1 else _Scatter.apply(x, group)


def gather_from_tensor_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather of the last dimension forward; this rank's slice of the gradient backward."""
    return x if dist.get_world_size(group) == 1 else _Gather.apply(x, group)

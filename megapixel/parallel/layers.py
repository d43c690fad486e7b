"""Megatron-style tensor-parallel layers, each cut from a full layer of the same model.

A layer is built from the full (size-1) layer, so each rank's shard is by construction the matching
slice of the weight the same seed gives one process. With a group of one process a layer holds the
whole weight and computes exactly what the plain layer does, with no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megapixel.parallel.mappings import copy_to_tensor_region, gather_from_tensor_region, reduce_from_tensor_region


def _shard(weight: torch.Tensor, dim: int, group: dist.ProcessGroup) -> nn.Parameter:
    """This rank's contiguous slice of `weight` along `dim`, as a new parameter."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    assert weight.shape[dim] % size == 0, f"dimension {dim} of {tuple(weight.shape)} does not split {size} ways"
    part = nn.Parameter(weight.detach().chunk(size, dim=dim)[rank].clone(), requires_grad=weight.requires_grad)
    # Megatron's marks: DeepSpeed counts such a parameter on every tensor rank when it sums the gradient
    # norm (replicated ones once), and checkpoint tools read which dimension to concatenate.
    part.tensor_model_parallel = size > 1
    part.partition_dim = dim
    return part


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across the group: each rank computes its slice of y."""

    def __init__(self, full: nn.Linear, group: dist.ProcessGroup, gather_output: bool = False) -> None:
        super().__init__()
        assert full.bias is None, "iGPT has no biases"
        self.group = group
        self.gather_output = gather_output
        self.in_features, self.out_features = full.in_features, full.out_features
        self.weight = _shard(full.weight, 0, group)

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the output's last dimension, from a replicated input."""
        return F.linear(copy_to_tensor_region(x, self.group), self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_local(x)
        return gather_from_tensor_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        local = self.weight.shape[0]
        return f"in={self.in_features}, out={self.out_features} (local {local}), gather={self.gather_output}"


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split: each rank takes its slice of x, the partial sums are all-reduced."""

    def __init__(self, full: nn.Linear, group: dist.ProcessGroup) -> None:
        super().__init__()
        assert full.bias is None, "iGPT has no biases"
        self.group = group
        self.in_features, self.out_features = full.in_features, full.out_features
        self.weight = _shard(full.weight, 1, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` is already split along its last dimension (a column-parallel layer's output)."""
        return reduce_from_tensor_region(F.linear(x, self.weight), self.group)

    def extra_repr(self) -> str:
        return f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}"


class VocabParallelEmbedding(nn.Module):
    """An embedding table whose rows (vocabulary entries) are split: each rank looks up the tokens it holds."""

    def __init__(self, full: nn.Embedding, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.num_embeddings, self.embedding_dim = full.num_embeddings, full.embedding_dim
        self.weight = _shard(full.weight, 0, group)
        self.vocab_start = dist.get_rank(group) * self.weight.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if dist.get_world_size(group=self.group) == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        # Tokens another rank holds contribute zero here; the all-reduce fills them in.
        h = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_region(h, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} (local {self.weight.shape[0]} from {self.vocab_start}), {self.embedding_dim}"

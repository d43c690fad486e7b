"""Tensor, data and pipeline process groups and the Megatron-style tensor-parallel layers."""

from megapixel.parallel.cross_entropy import vocab_parallel_cross_entropy
from megapixel.parallel.groups import ParallelGroups, layout, make_groups, validate_layout
from megapixel.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megapixel.parallel.mappings import (
    copy_to_tensor_region,
    gather_from_tensor_region,
    reduce_from_tensor_region,
    scatter_to_tensor_region,
)
from megapixel.parallel.parallelize import parallel_loss, tensor_parallelize

__all__ = [
    "ColumnParallelLinear",
    "ParallelGroups",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tensor_region",
    "gather_from_tensor_region",
    "layout",
    "make_groups",
    "parallel_loss",
    "reduce_from_tensor_region",
    "scatter_to_tensor_region",
    "tensor_parallelize",
    "validate_layout",
    "vocab_parallel_cross_entropy",
]

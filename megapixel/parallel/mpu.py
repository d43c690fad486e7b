"""The `mpu` object DeepSpeed asks for its groups, answered from megapixel's ParallelGroups.

DeepSpeed reads the data-parallel group from it for the gradient all-reduce, ZeRO partitioning and the
data-parallel size, and the model-parallel group for gradient-norm sums and checkpoint file names
(`mp_rank_XX_model_states.pt`, one per tensor rank).
"""

from __future__ import annotations

import torch.distributed as dist

from megapixel.parallel.groups import ParallelGroups


class ModelParallelUnit:
    """Megatron's mpu interface over one rank's tensor, data and pipeline groups (pipeline size 1)."""

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        """The tensor group: with one pipeline stage, the model is split across it alone."""
        return self.groups.tensor

    def get_model_parallel_rank(self) -> int:
        """This rank's place in the tensor group (names its checkpoint shard)."""
        return self.groups.tensor_rank

    def get_model_parallel_world_size(self) -> int:
        """The tensor-parallel size."""
        return self.groups.tensor_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        """The ranks holding replicas of the same shard, which average their gradients."""
        return self.groups.data

    def get_data_parallel_rank(self) -> int:
        """This rank's place among the replicas."""
        return self.groups.data_rank

    def get_data_parallel_world_size(self) -> int:
        """The number of replicas."""
        return self.groups.data_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        """The global ranks of this rank's data group."""
        return dist.get_process_group_ranks(self.groups.data)

    def get_pipeline_model_parallel_world_size(self) -> int:
        """The pipeline size."""
        return self.groups.pipeline_size

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        """The ranks holding the stages of this rank's model replica."""
        return self.groups.pipeline

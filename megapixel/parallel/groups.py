"""Process groups for data, tensor and pipeline parallelism, laid out in Megatron's order.

Ranks are ordered tensor first, then data, then pipeline:
`rank = tensor_rank + tensor * (data_rank + data * pipeline_rank)`. Tensor-parallel ranks are
adjacent (on one node, where their per-layer all-reduces are cheapest), data-parallel replicas of a
stage come next, and pipeline stages are the farthest apart (they exchange only activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megapixel.config import Config, ModelConfig, ParallelConfig
from megapixel.errors import ConfigError


def check_world(parallel: ParallelConfig, world_size: int) -> int:
    """The data-parallel size world_size / (tensor * pipeline); ConfigError when it is not whole."""
    per_replica = parallel.tensor * parallel.pipeline
    if world_size % per_replica:
        raise ConfigError(
            f"{world_size} processes cannot be split into parallel.tensor ({parallel.tensor}) x parallel.pipeline "
            f"({parallel.pipeline}) = {per_replica}: launch a multiple of {per_replica} processes or change the sizes"
        )
    return world_size // per_replica


def check_tensor_split(model: ModelConfig, tensor: int) -> None:
    """Raise ConfigError unless `tensor` ranks can split the heads and the vocabulary evenly."""
    # n_embd = n_head * head_dim, so ranks that split the heads also split the MLP width 4 * n_embd.
    for name, count in (("model.n_head", model.n_head), ("model.n_vocab", model.n_vocab)):
        if count % tensor:
            raise ConfigError(f"parallel.tensor ({tensor}) must divide {name} ({count}): choose a divisor of {count}")


def validate_layout(cfg: Config, world_size: int) -> None:
    """Reject, with one line, a layout that cannot hold this model on `world_size` processes."""
    p, m = cfg.parallel, cfg.model
    if p.tensor < 1 or p.pipeline < 1:
        raise ConfigError("parallel.tensor and parallel.pipeline must be at least 1")
    check_tensor_split(m, p.tensor)
    if p.pipeline > m.n_layer:
        raise ConfigError(
            f"parallel.pipeline ({p.pipeline}) cannot exceed model.n_layer ({m.n_layer}): each stage needs a block"
        )
    check_world(p, world_size)


def layout(tensor: int, pipeline: int, world_size: int) -> dict[str, list[list[int]]]:
    """The global ranks of every tensor, data and pipeline group, in Megatron's tensor-data-pipeline order."""
    data = world_size // (tensor * pipeline)

    def rank(t: int, d: int, p: int) -> int:
        return t + tensor * (d + data * p)

    return {
        "tensor": [[rank(t, d, p) for t in range(tensor)] for p in range(pipeline) for d in range(data)],
        "data": [[rank(t, d, p) for d in range(data)] for p in range(pipeline) for t in range(tensor)],
        "pipeline": [[rank(t, d, p) for p in range(pipeline)] for d in range(data) for t in range(tensor)],
    }


@dataclass(frozen=True)
class ParallelGroups:
    """This process's tensor, data and pipeline groups and its coordinates in each."""

    tensor: dist.ProcessGroup
    data: dist.ProcessGroup
    pipeline: dist.ProcessGroup
    tensor_rank: int
    data_rank: int
    pipeline_rank: int
    tensor_size: int
    data_size: int
    pipeline_size: int


def make_groups(parallel: ParallelConfig, world_size: int, rank: int) -> ParallelGroups:
    """Create every group on the initialised default group (all ranks must call this) and return this rank's."""
    assert dist.is_initialized(), "initialise torch.distributed before making parallel groups"
    assert (world_size, rank) == (dist.get_world_size(), dist.get_rank()), "pass the default group's size and rank"
    data = check_world(parallel, world_size)
    ranks = layout(parallel.tensor, parallel.pipeline, world_size)
    # Every rank must create every group, in the same order, even those it is not a member of.
    mine = {kind: dist.new_subgroups_by_enumeration(lists)[0] for kind, lists in ranks.items()}
    tensor_rank = rank % parallel.tensor
    data_rank = (rank // parallel.tensor) % data
    pipeline_rank = rank // (parallel.tensor * data)
    return ParallelGroups(
        tensor=mine["tensor"],
        data=mine["data"],
        pipeline=mine["pipeline"],
        tensor_rank=tensor_rank,
        data_rank=data_rank,
        pipeline_rank=pipeline_rank,
        tensor_size=parallel.tensor,
        data_size=data,
        pipeline_size=parallel.pipeline,
    )

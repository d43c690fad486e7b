"""Layouts: Megatron's rank order, and one-line errors for sizes that cannot hold the model."""

from __future__ import annotations

import random

import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megapixel.config import Config, ModelConfig, ParallelConfig, preset
from megapixel.errors import ConfigError
from megapixel.parallel import layout, validate_layout


def test_tensor_ranks_are_adjacent_then_data_then_pipeline():
    groups = layout(tensor=2, pipeline=2, world_size=8)
    assert groups["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["data"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pipeline"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_every_rank_is_in_exactly_one_group_of_each_kind():
    tensor, pipeline, data = random.choice([1, 2, 4]), random.choice([1, 3]), random.choice([1, 2, 5])
    world = tensor * pipeline * data
    groups = layout(tensor, pipeline, world)
    for kind, size in (("tensor", tensor), ("data", data), ("pipeline", pipeline)):
        assert sorted(r for ranks in groups[kind] for r in ranks) == list(range(world)), kind
        assert all(len(ranks) == size for ranks in groups[kind]), kind


def config(tensor: int = 1, pipeline: int = 1, **model) -> Config:
    """A config built without config.validate, as a caller that skips it would hand one over."""
    base = dict(n_layer=2, n_embd=32, n_head=4, n_vocab=16, n_px=4)
    return Config(model=ModelConfig(**{**base, **model}), parallel=ParallelConfig(tensor=tensor, pipeline=pipeline))


@pytest.mark.parametrize(
    ("cfg", "world", "message"),
    [
        (
            config(tensor=3, n_embd=48, n_head=6),
            3,
            "parallel.tensor (3) must divide model.n_vocab (16): choose a divisor of 16",
        ),
        (config(tensor=8), 8, "parallel.tensor (8) must divide model.n_head (4): choose a divisor of 4"),
        (config(pipeline=3), 3, "parallel.pipeline (3) cannot exceed model.n_layer (2): each stage needs a block"),
        (
            config(tensor=2, pipeline=2),
            6,
            "6 processes cannot be split into parallel.tensor (2) x parallel.pipeline (2) = 4: "
            "launch a multiple of 4 processes or change the sizes",
        ),
        (config(tensor=0), 1, "parallel.tensor and parallel.pipeline must be at least 1"),
    ],
)
def test_impossible_layouts_are_refused_with_one_line(cfg, world, message):
    with pytest.raises(ConfigError) as caught:
        validate_layout(cfg, world)
    assert str(caught.value) == message


def test_the_paper_xl_model_fits_eight_way_tensor_by_four_stage_pipeline():
    cfg = preset("xl")
    cfg.parallel.tensor, cfg.parallel.pipeline = 8, 4
    validate_layout(cfg, world_size=64)


def test_layout_agrees_with_deepspeeds_pipeline_topology():
    tensor, pipeline, data = 2, 3, 2
    topology = PipeModelDataParallelTopology(num_pp=pipeline, num_mp=tensor, num_dp=data)
    groups = layout(tensor, pipeline, tensor * pipeline * data)
    assert sorted(groups["tensor"]) == sorted(topology.get_axis_comm_lists("model"))
    assert sorted(groups["data"]) == sorted(topology.get_axis_comm_lists("data"))
    assert sorted(groups["pipeline"]) == sorted(topology.get_axis_comm_lists("pipe"))

"""Continuing a run: the checks that a checkpoint fits the run before anything is loaded, loading an engine's
state from it, and the guard that makes DeepSpeed read every checkpoint file without running code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megapixel.checkpoint.files import (
    deepspeed_records,
    has_checkpoints,
    load_safely,
    resolve_checkpoint,
)
from megapixel.checkpoint.read import read_client_state
from megapixel.checkpoint.save import layout_of
from megapixel.config import Config, from_dict
from megapixel.errors import CheckpointError
from megapixel.parallel import ParallelGroups


def resume_tag(cfg: Config, manifest: dict[str, Any], resume: bool, groups: ParallelGroups) -> Path | None:
    """The checkpoint to continue from (None for a fresh run), after checking it fits `cfg` and the shards."""
    run_dir = Path(cfg.train.run_dir)
    if not resume:
        if has_checkpoints(run_dir):
            raise CheckpointError(
                f"{run_dir} already has checkpoints: pass --resume to continue, or choose another train.run_dir"
            )
        return None
    if not has_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from: start it without --resume")
    tag = resolve_checkpoint(run_dir)
    state = read_client_state(tag)
    if "config" not in state or "ranks" not in state:
        raise CheckpointError(f"{tag} was not written by megapixel's trainer: it holds no training state to resume")
    saved = dataclasses.asdict(from_dict(state["config"], where=f"{tag} config").model)
    now = dataclasses.asdict(cfg.model)
    for key in saved:
        # The kernel choice changes how, not what, the model computes.
        if key != "kernels" and saved[key] != now[key]:
            raise CheckpointError(
                f"model.{key} is {now[key]!r} but the checkpoint {tag.name} was trained with {saved[key]!r}: "
                f"set model.{key}={saved[key]} to resume it"
            )
    # Checkpoints from before layouts were recorded are one-shard, one-stage.
    saved_layout = state.get("layout", {"tensor": 1, "pipeline": 1, "data": state["dp_world_size"]})
    now_layout = layout_of(groups)
    for axis in ("tensor", "pipeline"):
        if saved_layout[axis] != now_layout[axis]:
            raise CheckpointError(
                f"{tag.name} was written with parallel.{axis}={saved_layout[axis]} but this run has "
                f"parallel.{axis}={now_layout[axis]}: resume with parallel.{axis}={saved_layout[axis]}"
            )
    stage = state.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    if stage != cfg.parallel.zero_stage:
        raise CheckpointError(
            f"{tag.name} was written with ZeRO stage {stage}: resume with parallel.zero_stage={stage}"
        )
    if stage > 0 and state["dp_world_size"] != groups.data_size:
        raise CheckpointError(
            f"{tag.name} was written by {state['dp_world_size']} data-parallel ranks and ZeRO partitions its "
            f"optimizer state by rank: resume on {state['dp_world_size']} data-parallel ranks"
        )
    if state["palette_hash"] != manifest["palette_hash"]:
        raise CheckpointError(
            f"{cfg.data.shards} uses another palette than {tag.name} was trained on: resume with the same shard set"
        )
    return tag


class SafeLoads:
    """DeepSpeed's checkpoint engine with its `load` replaced by `load_safely`, everything else passed through.

    DeepSpeed reads every file of a checkpoint (model, optimizer, ZeRO partitions, pipeline layers) through its
    engine's `checkpoint_engine.load`, which unpickles with weights_only=False: a crafted file could run code.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        """The file's contents, refused (CheckpointError) unless they are tensors, plain values and inert records."""
        return load_safely(path, map_location=map_location, allow=deepspeed_records())


def guard_loads(engine: Any) -> None:
    """Make every checkpoint `engine` loads go through `load_safely`."""
    if not isinstance(engine.checkpoint_engine, SafeLoads):
        engine.checkpoint_engine = SafeLoads(engine.checkpoint_engine)


def restore(engine: Any, tag: Path) -> tuple[int, list[dict[str, Any]]]:
    """Load engine, optimizer and scheduler state from `tag`; return its step and the per-rank states."""
    path, client = engine.load_checkpoint(
        str(tag.parent), tag=tag.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag}: the checkpoint is incomplete")
    scheduler = engine.lr_scheduler
    # The optimizer comes back with the learning rate of the saved schedule; recompute it from this run's
    # schedule (exactly as LambdaLR does), which differs when train.steps changed.
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    return client["step"], client["ranks"]

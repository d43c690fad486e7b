"""Training checkpoints: atomic saves, loads that run no code, and the checks before a run continues from one.

A save has every rank write its files into checkpoints/step_XXXXXXX.partial/; when all have finished, the main
rank renames the folder to step_XXXXXXX and then replaces `latest` (os.replace). A process killed at any moment
leaves `latest` naming a complete tag, the previous one or the new one; a full disk fails the save with one line
and leaves the earlier tags and `latest` as they were. What an interrupted save leaves is removed when the next
run starts (checkpoint.remove_unfinished).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megapixel.checkpoint import (
    PARTIAL,
    STALE,
    deepspeed_records,
    has_checkpoints,
    load_safely,
    prune_checkpoints,
    read_client_state,
    resolve_checkpoint,
    tag_name,
)
from megapixel.config import Config, from_dict
from megapixel.distributed import DistInfo
from megapixel.errors import CheckpointError
from megapixel.parallel import ParallelGroups


def layout_of(groups: ParallelGroups) -> dict[str, int]:
    """The sizes a checkpoint records: its tensor shards, pipeline stages and data-parallel replicas."""
    return {"tensor": groups.tensor_size, "pipeline": groups.pipeline_size, "data": groups.data_size}


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(partial: Path, tag: Path) -> None:
    """Move a complete `partial` folder to its tag name, durably (a crash of the machine keeps it whole too)."""
    for path in partial.rglob("*"):
        _fsync(path)
    _fsync(partial)
    if tag.exists():
        # An earlier life of this run saved this step after the tag `latest` names; this save replaces it.
        stale = tag.with_name(tag.name + STALE)
        os.rename(tag, stale)
        os.rename(partial, tag)
        shutil.rmtree(stale)
    else:
        os.rename(partial, tag)
    _fsync(tag.parent)


def point_latest(checkpoints: Path, name: str) -> None:
    """Make checkpoints/latest name `name` in one step: readers see the old name or the new, never a torn file."""
    tmp = checkpoints / "latest.tmp"
    with tmp.open("w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoints / "latest")
    _fsync(checkpoints)


def save_checkpoint(
    engine: Any, cfg: Config, step: int, palette: str, per_rank: dict[str, Any], info: DistInfo, groups: ParallelGroups
) -> Path:
    """Save the engine and every rank's `per_rank` state as tag step_XXXXXXX, atomically, then keep the newest
    cfg.train.keep_last tags; a failed write (a full disk) raises CheckpointError and changes nothing earlier.
    Every rank calls it."""
    ranks: list[Any] = [None] * info.world_size
    dist.all_gather_object(ranks, per_rank)
    client = {
        "step": step,
        "config": cfg.to_dict(),
        "palette_hash": palette,
        "ranks": ranks,
        "layout": layout_of(groups),
    }
    checkpoints = Path(cfg.train.run_dir) / "checkpoints"
    tag = checkpoints / tag_name(step)
    partial = tag.with_name(tag.name + PARTIAL)
    try:
        # DeepSpeed writes `latest` by truncating and rewriting it; point_latest replaces it atomically instead.
        engine.save_checkpoint(str(checkpoints), tag=partial.name, client_state=client, save_latest=False)
        # Every rank's files must be complete before the folder takes its final name. (DeepSpeed's save ends
        # with a barrier too; this one does not depend on that.)
        dist.barrier()
        if info.is_main:
            _commit(partial, tag)
            point_latest(checkpoints, tag.name)
    except (OSError, RuntimeError) as e:  # torch's file writer reports a failed write as a RuntimeError
        shutil.rmtree(partial, ignore_errors=True)
        (checkpoints / "latest.tmp").unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise CheckpointError(
            f"could not save {tag.name} in {checkpoints}: {reason}; the earlier checkpoints and `latest` are "
            "unchanged (free space, then --resume)"
        ) from e
    if info.is_main:
        prune_checkpoints(checkpoints, cfg.train.keep_last, step)
    # No rank goes on (or exits) before the main rank has committed the tag.
    dist.barrier()
    return tag


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

"""Saving a training checkpoint atomically, from every rank of any layout.

Every rank writes its files into checkpoints/step_XXXXXXX.partial/; when all have finished, the main rank fsyncs
them, renames the folder to step_XXXXXXX and then points `latest` at it. A process killed at any moment leaves
`latest` naming a complete tag, the previous one or the new one; a full disk fails the save with one line and
leaves the earlier tags and `latest` as they were. What an interrupted save leaves is removed when the next run
starts (files.remove_unfinished).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megapixel.atomic import fsync, fsync_tree
from megapixel.checkpoint.files import (
    PARTIAL,
    STALE,
    point_latest,
    prune_checkpoints,
    tag_name,
)
from megapixel.config import Config
from megapixel.errors import CheckpointError
from megapixel.parallel import ParallelGroups
from megapixel.parallel.distributed import DistInfo


def layout_of(groups: ParallelGroups) -> dict[str, int]:
    """The sizes a checkpoint records: its tensor shards, pipeline stages and data-parallel replicas."""
    return {"tensor": groups.tensor_size, "pipeline": groups.pipeline_size, "data": groups.data_size}


def _commit(partial: Path, tag: Path) -> None:
    """Move a complete `partial` folder to its tag name, durably (a crash of the machine keeps it whole too)."""
    fsync_tree(partial)
    if tag.exists():
        # An earlier life of this run saved this step after the tag `latest` names; this save replaces it.
        stale = tag.with_name(tag.name + STALE)
        os.rename(tag, stale)
        os.rename(partial, tag)
        shutil.rmtree(stale)
    else:
        os.rename(partial, tag)
    fsync(tag.parent)


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

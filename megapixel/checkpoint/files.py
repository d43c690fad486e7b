"""Checkpoint folders on disk: tag names, finding the one a path means, pruning, clearing what interrupted saves
left, and reading torch files without running code.

A run keeps DeepSpeed's layout: RUN_DIR/checkpoints/step_0000500/ holds the engine's files, and
RUN_DIR/checkpoints/latest names the newest complete tag. The trainer (megapixel/checkpoint/save.py) writes a tag
as step_0000500.partial/, renames it into place when every rank's files are complete, then replaces `latest`:
a folder named step_* is always complete. Every torch file is read with `torch.load(weights_only=True)` (through
`load_safely`): loading a checkpoint never runs code.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megapixel.atomic import is_temporary, write_atomic
from megapixel.errors import CheckpointError

TAG_PREFIX = "step_"


# The engine's wrapper (megapixel.engine.build.LossModule) holds the IGPT under this attribute name.
MODULE_PREFIX = "model."


# ZeRO 0-2 write the full module into the first file; ZeRO-3 writes one partitioned file per rank.
MODEL_STATES = "mp_rank_00_model_states.pt"


ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


# Suffixes of unfinished folders beside the tags: a save in progress, a tag being replaced or pruned.
PARTIAL, STALE = ".partial", ".stale"


def tag_name(step: int) -> str:
    """The checkpoint folder name for `step`: step_0000500."""
    return f"{TAG_PREFIX}{step:07d}"


def tag_step(tag: Path) -> int | None:
    """The step a tag folder's name encodes, or None for other names."""
    suffix = tag.name.removeprefix(TAG_PREFIX)
    return int(suffix) if tag.name.startswith(TAG_PREFIX) and suffix.isdigit() else None


def list_tags(checkpoints: Path) -> list[Path]:
    """The step_* folders under `checkpoints`, oldest step first (complete or not)."""
    if not checkpoints.is_dir():
        return []
    tags = [p for p in checkpoints.iterdir() if p.is_dir() and tag_step(p) is not None]
    return sorted(tags, key=tag_step)


def has_checkpoints(run_dir: Path) -> bool:
    """Whether RUN_DIR/checkpoints holds any checkpoint (or the start of one)."""
    checkpoints = run_dir / "checkpoints"
    return (checkpoints / "latest").exists() or bool(list_tags(checkpoints))


def is_tag(path: Path) -> bool:
    return (path / MODEL_STATES).is_file() or (path / ZERO3_MODEL_STATES).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The tag folder that `path` means: a run folder or its checkpoints/ folder (-> latest), a tag folder, or a
    file inside one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: no such file or folder")
    if path.is_file() and is_tag(path.parent):
        return path.parent
    if path.is_dir() and is_tag(path):
        return path
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = checkpoints / "latest"
    if not latest.is_file():
        # A save renames its complete folder into place before it moves `latest`, so a run killed between the
        # two on its first save has a complete tag and no `latest` yet.
        tags = [tag for tag in list_tags(checkpoints) if is_tag(tag)]
        if tags:
            return tags[-1]
        raise CheckpointError(
            f"no checkpoint in {path}: expected a run folder, its checkpoints/ folder or a step_* folder "
            "(a run that never finished its first save has none)"
        )
    tag = checkpoints / latest.read_text().strip()
    if not is_tag(tag):
        raise CheckpointError(f"{latest} names {tag.name}, which is missing or incomplete: pass a step_* folder")
    return tag


def model_states_file(tag: Path) -> Path:
    return tag / MODEL_STATES if (tag / MODEL_STATES).is_file() else tag / ZERO3_MODEL_STATES


def deepspeed_records() -> list[type]:
    """The classes DeepSpeed pickles into optimizer files besides tensors and plain values: inert records (an
    enum, a loss-scale holder, a dataclass of two ints) whose rebuilding runs no code of the file's choosing."""
    # Imported here: DeepSpeed takes seconds to import, and evaluation reads checkpoints without it.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def load_safely(path: str | Path, map_location: Any = "cpu", mmap: bool = False, allow: Sequence[type] = ()) -> Any:
    """What a torch file holds, rebuilt from tensors, plain values and the `allow`ed classes only (a file that
    asks for anything else is refused: unpickling it could run code); CheckpointError names a bad file."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found or "Weights only load failed" in str(e):
            what = found.group(1) if found else "object"
            raise CheckpointError(
                f"refusing to read {path}: it holds a pickled {what}, not only tensors and plain values, and "
                "unpickling it could run code"
            ) from None
        raise CheckpointError(f"cannot read {path}: {_first_line(e)}") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read {path}: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def prune_checkpoints(checkpoints: Path, keep_last: int, current_step: int) -> None:
    """Delete all but the newest `keep_last` tags up to `current_step` (tags past it are left alone)."""
    done = [t for t in list_tags(checkpoints) if tag_step(t) <= current_step]
    for tag in done[:-keep_last]:
        # Renamed first: a process killed while deleting leaves no half-deleted step_* folder behind.
        stale = tag.with_name(tag.name + STALE)
        os.rename(tag, stale)
        shutil.rmtree(stale)


def remove_unfinished(checkpoints: Path) -> list[Path]:
    """Delete what interrupted saves left under `checkpoints` (*.partial, *.stale, a temporary `latest`); return it."""
    if not checkpoints.is_dir():
        return []
    left = [p for p in checkpoints.iterdir() if p.name.endswith((PARTIAL, STALE)) or is_temporary(p)]
    for path in left:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return left


def point_latest(checkpoints: Path, name: str) -> None:
    """Make checkpoints/latest name `name` in one step: readers see the old name or the new, never a torn file."""
    write_atomic(checkpoints / "latest", name)

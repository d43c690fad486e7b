"""Checkpoints on disk: finding them, loading a model for evaluation, and megapixel's own training state.

A run keeps DeepSpeed's layout: RUN_DIR/checkpoints/step_0000500/ holds the engine's files, and
RUN_DIR/checkpoints/latest names the newest complete tag. The trainer (megapixel/checkpointing.py) writes a tag
as step_0000500.partial/, renames it into place when every rank's files are complete, then replaces `latest`:
a folder named step_* is always complete. Everything here reads with `torch.load(weights_only=True)` (through
`load_safely`): loading a checkpoint never runs code.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megapixel.config import Config, from_dict, load
from megapixel.errors import CheckpointError, MegapixelError
from megapixel.model import IGPT

TAG_PREFIX = "step_"
# The engine's wrapper (train.LossModule) holds the IGPT under this attribute name.
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


def _is_tag(path: Path) -> bool:
    return (path / MODEL_STATES).is_file() or (path / ZERO3_MODEL_STATES).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The tag folder that `path` means: a run folder or its checkpoints/ folder (-> latest), a tag folder, or a
    file inside one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: no such file or folder")
    if path.is_file() and _is_tag(path.parent):
        return path.parent
    if path.is_dir() and _is_tag(path):
        return path
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = checkpoints / "latest"
    if not latest.is_file():
        # A save renames its complete folder into place before it moves `latest`, so a run killed between the
        # two on its first save has a complete tag and no `latest` yet.
        tags = [tag for tag in list_tags(checkpoints) if _is_tag(tag)]
        if tags:
            return tags[-1]
        raise CheckpointError(
            f"no checkpoint in {path}: expected a run folder, its checkpoints/ folder or a step_* folder "
            "(a run that never finished its first save has none)"
        )
    tag = checkpoints / latest.read_text().strip()
    if not _is_tag(tag):
        raise CheckpointError(f"{latest} names {tag.name}, which is missing or incomplete: pass a step_* folder")
    return tag


def _model_states_file(tag: Path) -> Path:
    return tag / MODEL_STATES if (tag / MODEL_STATES).is_file() else tag / ZERO3_MODEL_STATES


def deepspeed_records() -> list[type]:
    """The classes DeepSpeed pickles into optimizer files besides tensors and plain values: inert records (an
    enum, a loss-scale holder, a dataclass of two ints) whose rebuilding runs no code of the file's choosing."""
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


def read_client_state(tag: Path, path: Path | None = None) -> dict[str, Any]:
    """The saved engine record of a tag folder (or of its file `path`): DeepSpeed's keys plus the client state
    megapixel stored."""
    # mmap: only what is touched is read, so looking up the step or config of a large model is cheap.
    return load_safely(path or _model_states_file(tag), mmap=True)


def _zero3_weights(tag: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights gathered from a ZeRO-3 checkpoint's per-rank partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed's reader unpickles without restriction; first prove that every file holds only tensors,
    # plain values and DeepSpeed's inert records, so that reading cannot run code.
    for path in sorted(tag.glob("*.pt")):
        load_safely(path, mmap=True, allow=deepspeed_records())
    state = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    return {name: t.detach() for name, t in state.items()}


def checkpoint_layout(state: dict[str, Any]) -> dict[str, int]:
    """The tensor, pipeline and data sizes a checkpoint was written with (older ones: one shard, one stage)."""
    return state.get("layout") or {"tensor": 1, "pipeline": 1, "data": state.get("dp_world_size", 1)}


def _module_of(tag: Path, path: Path) -> dict[str, torch.Tensor]:
    module = read_client_state(tag, path).get("module")
    if not module:
        raise CheckpointError(f"{path} holds no module weights")
    return {name.removeprefix(MODULE_PREFIX): t for name, t in module.items()}


def read_model_weights(tag: Path) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    """The IGPT state dict stored in a tag folder, with names as a bare IGPT has them; for a tensor-parallel
    checkpoint, one state dict of shards per tensor rank."""
    if not (tag / MODEL_STATES).is_file():
        return {name.removeprefix(MODULE_PREFIX): t for name, t in _zero3_weights(tag).items()}
    state = read_client_state(tag)
    layout = checkpoint_layout(state)
    if layout["pipeline"] > 1:
        n_layer = config_of(tag, state).model.n_layer
        shards = [_pipeline_layers(tag, r, n_layer) for r in range(layout["tensor"])]
    else:
        shards = [_module_of(tag, tag / f"mp_rank_{r:02d}_model_states.pt") for r in range(layout["tensor"])]
    return shards[0] if len(shards) == 1 else shards


def _pipeline_layers(tag: Path, tensor_rank: int, n_layer: int) -> dict[str, torch.Tensor]:
    """One tensor rank's weights from a pipeline checkpoint's per-layer files, under IGPT's names.

    Layers are megapixel.parallel.pipeline's: 0 the embeddings, 1..n_layer the blocks (`block.` inside),
    n_layer + 1 ln_f and the heads."""
    weights = {}
    for index in range(n_layer + 2):
        layer = load_safely(tag / f"layer_{index:02d}-model_{tensor_rank:02d}-model_states.pt", mmap=True)
        for name, tensor in layer.items():
            block = 1 <= index <= n_layer
            weights[f"blocks.{index - 1}.{name.removeprefix('block.')}" if block else name] = tensor
    return weights


def gather_tensor_shards(
    shards: list[dict[str, torch.Tensor]], full: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Join each tensor rank's shards into the whole weights whose shapes `full` gives (tensors or meta)."""
    joined = {}
    for name, first in shards[0].items():
        want = full.get(name)
        if want is None or first.shape == want.shape:
            joined[name] = first  # replicated on every tensor rank (or unknown: check_weights names it)
            continue
        # A split weight differs from the whole in exactly the dimension it was cut along.
        dim = next(d for d, (a, b) in enumerate(zip(first.shape, want.shape, strict=True)) if a != b)
        joined[name] = torch.cat([shard[name] for shard in shards], dim=dim)
    return joined


def config_of(tag: Path, state: dict[str, Any]) -> Config:
    """The config a tag folder's model was built with: stored in its engine record, else the run's config.yaml."""
    if "config" in state:
        return from_dict(state["config"], where=f"{tag} config")
    run_config = tag.parent.parent / "config.yaml"
    if run_config.is_file():
        return load(run_config)
    raise CheckpointError(f"{tag} stores no config and {run_config} does not exist: the model cannot be rebuilt")


def palette_of(tag: Path, cfg: Config, saved_hash: str | None) -> np.ndarray:
    """The palette a tag folder's model was trained with: the run's palette.npy, else the shard set's (matching
    `saved_hash` when given)."""
    # Imported here: the palette module pulls in scikit-learn, which only this function needs.
    from megapixel.palette import load_palette, palette_hash

    candidates = [tag.parent.parent / "palette.npy"]
    if cfg.data.shards:
        candidates.append(Path(cfg.data.shards) / "palette.npy")
    for path in candidates:
        if not path.is_file():
            continue
        try:
            palette = load_palette(path)
        except MegapixelError:
            continue
        if saved_hash is None or palette_hash(palette) == saved_hash:
            return palette
    raise CheckpointError(
        f"no palette for {tag}: expected the run's palette.npy ({candidates[0]}) matching the one it was trained with"
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[IGPT, Config, np.ndarray]:
    """The model of a checkpoint (run folder, checkpoints/ folder or tag), a consolidated folder or a HF ImageGPT
    folder, in eval mode, with its config and palette."""
    # Imported here: megapixel.convert imports this module.
    from megapixel.convert.consolidate import build_model, check_weights, meta_state
    from megapixel.convert.loading import is_model_folder, load_model_folder

    if is_model_folder(path):
        return load_model_folder(path, device)
    tag = resolve_checkpoint(path)
    state = read_client_state(tag)
    cfg = config_of(tag, state)
    weights = read_model_weights(tag)
    if isinstance(weights, list):
        weights = gather_tensor_shards(weights, meta_state(cfg))
    check_weights(weights, cfg, tag)
    palette = palette_of(tag, cfg, state.get("palette_hash"))
    return build_model(weights, cfg, device), cfg, palette


def prune_checkpoints(checkpoints: Path, keep_last: int, current_step: int) -> None:
    """Delete all but the newest `keep_last` tags up to `current_step` (tags past it are left alone)."""
    done = [t for t in list_tags(checkpoints) if tag_step(t) <= current_step]
    for tag in done[:-keep_last]:
        # Renamed first: a process killed while deleting leaves no half-deleted step_* folder behind.
        stale = tag.with_name(tag.name + STALE)
        os.rename(tag, stale)
        shutil.rmtree(stale)


def remove_unfinished(checkpoints: Path) -> list[Path]:
    """Delete what interrupted saves left under `checkpoints` (*.partial, *.stale, latest.tmp); return it."""
    if not checkpoints.is_dir():
        return []
    left = [p for p in checkpoints.iterdir() if p.name.endswith((PARTIAL, STALE)) or p.name == "latest.tmp"]
    for path in left:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return left


def rng_state() -> dict[str, Any]:
    """This process's random states (torch, numpy, python, cuda) as tensors and plain values."""
    _, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

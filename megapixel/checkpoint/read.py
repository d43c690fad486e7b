"""What a training checkpoint holds: its engine record, its layout, config and palette, and its weights under IGPT's
names, gathered from any tensor x pipeline layout or ZeRO-3 partition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from megapixel.checkpoint.files import (
    MODEL_STATES,
    MODULE_PREFIX,
    deepspeed_records,
    load_safely,
    model_states_file,
    resolve_checkpoint,
)
from megapixel.checkpoint.weights import Weights, check_weights, meta_state
from megapixel.config import Config, from_dict, load
from megapixel.data.palette import load_palette, palette_hash
from megapixel.errors import CheckpointError, MegapixelError


def read_client_state(tag: Path, path: Path | None = None) -> dict[str, Any]:
    """The saved engine record of a tag folder (or of its file `path`): DeepSpeed's keys plus the client state
    megapixel stored."""
    # mmap: only what is touched is read, so looking up the step or config of a large model is cheap.
    return load_safely(path or model_states_file(tag), mmap=True)


def _zero3_weights(tag: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights gathered from a ZeRO-3 checkpoint's per-rank partitions."""
    # Imported here: DeepSpeed takes seconds to import, and only ZeRO-3 checkpoints need its reader.
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


def read_checkpoint(path: str | Path) -> tuple[Weights, Config, np.ndarray, dict[str, str]]:
    """The full weights, config, palette and provenance of a training checkpoint (run, checkpoints/ or tag folder)."""
    tag = resolve_checkpoint(path)
    client = read_client_state(tag)
    cfg = config_of(tag, client)
    state = read_model_weights(tag)
    if isinstance(state, list):  # one state dict of shards per tensor rank
        state = gather_tensor_shards(state, meta_state(cfg))
    check_weights(state, cfg, tag)
    palette = palette_of(tag, cfg, client.get("palette_hash"))
    metadata = {"source": str(tag.resolve())}
    if "step" in client:
        metadata["step"] = str(client["step"])
    return state, cfg, palette, metadata

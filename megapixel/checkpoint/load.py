"""One reader for every form a model takes on disk, so evaluation and training accept any of them.

A consolidated folder, a HF ImageGPT folder or a training checkpoint (run, checkpoints/ or step_* folder),
looked for in that order. checkpoint.load_model dispatches here for the two folder forms, so every command
that loads a model takes all three.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megapixel.checkpoint.consolidate import is_consolidated, load_consolidated, read_consolidated
from megapixel.checkpoint.files import resolve_checkpoint
from megapixel.checkpoint.hf import HF_CONFIG, load_hf, read_hf
from megapixel.checkpoint.read import (
    config_of,
    gather_tensor_shards,
    palette_of,
    read_checkpoint,
    read_client_state,
    read_model_weights,
)
from megapixel.checkpoint.weights import Weights, build_model, check_weights, meta_state
from megapixel.config import Config
from megapixel.data.palette import load_palette, palette_hash
from megapixel.errors import CheckpointError
from megapixel.model import IGPT

# The fields that give the network its shapes and its attention split; the rest (objective, BERT mask rate,
# kernels) may change between the source of initial weights and the run that starts from them.
ARCHITECTURE = ("n_layer", "n_embd", "n_head", "n_vocab", "n_px")
# A head a run may add to weights that lack it (fine-tuning a generative model as a classifier).
NEW_HEADS = ("clf.weight",)


def is_model_folder(path: str | Path) -> bool:
    """Whether `path` is a consolidated or HF ImageGPT folder (not a training checkpoint)."""
    path = Path(path)
    return is_consolidated(path) or (path / HF_CONFIG).is_file()


def load_model_folder(path: str | Path, device: str | torch.device = "cpu") -> tuple[IGPT, Config, np.ndarray]:
    """The model of a consolidated or HF ImageGPT folder in eval mode on `device`, with its config and palette."""
    return load_consolidated(path, device) if is_consolidated(path) else load_hf(path, device)


def read_any(path: str | Path) -> tuple[Weights, Config, np.ndarray, dict[str, str]]:
    """The full weights, config, palette and provenance of a consolidated folder, HF folder or training checkpoint."""
    if is_consolidated(path):
        return read_consolidated(path)
    if (Path(path) / HF_CONFIG).is_file():
        return read_hf(path)
    return read_checkpoint(path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[IGPT, Config, np.ndarray]:
    """The model of a checkpoint (run folder, checkpoints/ folder or tag), a consolidated folder or a HF ImageGPT
    folder, in eval mode, with its config and palette."""

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


def load_initial_weights(model: IGPT, cfg: Config) -> None:
    """Fill `model` (built from cfg.model, not yet laid out over processes) with the weights of
    cfg.train.init_from; CheckpointError naming the field, tensor or file that does not fit."""

    source = cfg.train.init_from
    state, source_cfg, palette, _ = read_any(source)
    for name in ARCHITECTURE:
        ours, theirs = getattr(cfg.model, name), getattr(source_cfg.model, name)
        if ours != theirs:
            raise CheckpointError(
                f"train.init_from {source} has model.{name}={theirs} but this run has model.{name}={ours}: "
                f"set model.{name}={theirs}"
            )
    expected = model.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise CheckpointError(
                f"train.init_from {source} holds {name}, which this model does not have "
                f"(model.n_classes={source_cfg.model.n_classes} there, {cfg.model.n_classes} here)"
            )
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"train.init_from {source}: {name} has shape {tuple(tensor.shape)} but this model wants "
                f"{tuple(expected[name].shape)} (model.n_classes={source_cfg.model.n_classes} there, "
                f"{cfg.model.n_classes} here)"
            )
    missing = [name for name in expected if name not in state and name not in NEW_HEADS]
    if missing:
        raise CheckpointError(f"train.init_from {source} lacks {missing[0]}")
    shard_palette = Path(cfg.data.shards or ".") / "palette.npy"
    # Tokens are palette indices: weights learned on other colours would read these shards' tokens wrongly.
    if (
        cfg.data.shards
        and shard_palette.is_file()
        and palette_hash(load_palette(shard_palette)) != palette_hash(palette)
    ):
        raise CheckpointError(
            f"train.init_from {source} was trained with another palette than {shard_palette}: "
            "make the shards with its palette (megapixel shards --palette)"
        )
    # A head the source lacks keeps this model's own initialisation (the same seed on every rank).
    model.load_state_dict(state, strict=False)

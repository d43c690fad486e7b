"""One consolidated file per model: a folder of model.safetensors, config.yaml and palette.npy.

A DeepSpeed training checkpoint of any layout (tensor x pipeline x data, ZeRO 0-3; ZeRO-3 with one stage)
becomes a folder that evaluation, export and sharing read without DeepSpeed, and that loads back as an
IGPT. Reading never unpickles code: safetensors for the weights, YAML for the config, .npy without pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megapixel.atomic import new_folder
from megapixel.checkpoint.read import read_checkpoint
from megapixel.checkpoint.weights import Weights, build_model, check_weights
from megapixel.config import Config, load, to_yaml
from megapixel.data.palette import check_palette, load_palette, palette_hash, save_palette
from megapixel.errors import CheckpointError, MegapixelError
from megapixel.model import IGPT

WEIGHTS = "model.safetensors"


CONFIG = "config.yaml"


PALETTE = "palette.npy"


# safetensors metadata is str -> str; this key marks files megapixel wrote.
FORMAT_KEY = "megapixel_format"


FORMAT = "consolidated-1"


def save_safetensors(state: Weights, path: Path, metadata: dict[str, str]) -> None:
    """Write `state` as a safetensors file readable as the umask allows (safetensors itself creates it 0600)."""
    save_file({name: t.detach().contiguous() for name, t in state.items()}, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def write_consolidated(
    state: Weights, cfg: Config, palette: np.ndarray, out: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write `state` (IGPT names) with its config and palette as a consolidated folder `out`, atomically."""

    check_weights(state, cfg, "the weights")
    palette = check_palette(palette, "the palette", cfg.model.n_vocab)
    meta = {**(metadata or {}), FORMAT_KEY: FORMAT, "palette_hash": palette_hash(palette)}
    with new_folder(out) as tmp:
        save_safetensors(state, tmp / WEIGHTS, meta)
        (tmp / CONFIG).write_text(to_yaml(cfg))
        save_palette(tmp / PALETTE, palette)
    return Path(out)


def is_consolidated(path: str | Path) -> bool:
    """Whether `path` is a consolidated folder (model.safetensors and config.yaml in it)."""
    path = Path(path)
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def read_consolidated(path: str | Path) -> tuple[Weights, Config, np.ndarray, dict[str, str]]:
    """The weights, config, palette and file metadata of a consolidated folder, checked against each other."""

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no consolidated model at {path}: expected a folder with {WEIGHTS}, {CONFIG}, {PALETTE}")
    for name in (WEIGHTS, CONFIG, PALETTE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} lacks {name}: a consolidated folder holds {WEIGHTS}, {CONFIG} and {PALETTE}")
    cfg = load(path / CONFIG)
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error type and OSError for foreign or truncated files
        raise CheckpointError(f"cannot read {path / WEIGHTS}: {str(e).splitlines()[0]}") from None
    check_weights(state, cfg, path / WEIGHTS)
    try:
        palette = load_palette(path / PALETTE, k=cfg.model.n_vocab)
    except MegapixelError as e:
        raise CheckpointError(str(e)) from None
    saved = metadata.get("palette_hash")
    if saved is not None and saved != palette_hash(palette):
        raise CheckpointError(f"{path / PALETTE} is not the palette {path / WEIGHTS} was saved with: restore it")
    return state, cfg, palette, metadata


def load_consolidated(path: str | Path, device: str | torch.device = "cpu") -> tuple[IGPT, Config, np.ndarray]:
    """The model of a consolidated folder, in fp32 and eval mode on `device`, with its config and palette
    (what checkpoint.load_model returns for a training checkpoint)."""
    state, cfg, palette, _ = read_consolidated(path)
    return build_model(state, cfg, device), cfg, palette


def consolidate(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a training checkpoint (any tensor x pipeline x data layout, ZeRO 0-3) as a consolidated folder `out`."""
    state, cfg, palette, metadata = read_checkpoint(checkpoint)
    return write_consolidated(state, cfg, palette, out, metadata)

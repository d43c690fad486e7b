"""One loader for every form a model takes on disk, so evaluation commands accept any of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megapixel.checkpoint import load_model
from megapixel.config import Config
from megapixel.convert.consolidate import is_consolidated, load_consolidated
from megapixel.convert.hf import HF_CONFIG, load_hf
from megapixel.model import IGPT


def load_any(path: str | Path, device: str | torch.device = "cpu") -> tuple[IGPT, Config, np.ndarray]:
    """The model at `path` in eval mode, with its config and palette: a consolidated folder, a HF ImageGPT folder,
    or a training checkpoint (run, checkpoints/ or step_* folder), in that order of looking."""
    path = Path(path)
    if is_consolidated(path):
        return load_consolidated(path, device)
    if (path / HF_CONFIG).is_file():
        return load_hf(path, device)
    return load_model(path, device)

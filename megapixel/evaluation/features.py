"""Linear-probe features of a model over a shard split, in memory or written to disk in chunks, and the raw-pixel
baseline they are compared with.

Features of layer l are block l's normed attention input, mean-pooled over positions (the paper's n^l);
several layers concatenate in the order asked. A BERT model's features average over several random masks
(the paper's evaluation ensemble); an AR model needs no mask. On disk a feature set is a folder:
`features.npy` (float32 (N, len(layers) * n_embd), written row-block by row-block through a memory map, so a
set larger than memory never has to be held), `labels.npy` (int64, -1 for unlabelled) and `meta.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from megapixel.atomic import new_folder
from megapixel.data.shards.format import read_manifest
from megapixel.data.stream import make_loader
from megapixel.errors import ConfigError, DataError
from megapixel.model.igpt import IGPT

FEATURES = "features.npy"


LABELS = "labels.npy"


META = "meta.json"


def check_layers(layers: list[int] | tuple[int, ...], n_layer: int) -> list[int]:
    """The layers as a list, or a ConfigError naming the first one the model does not have."""
    if not layers:
        raise ConfigError("feature extraction needs at least one layer, e.g. --layers 2")
    for layer in layers:
        if not 0 <= layer < n_layer:
            raise ConfigError(f"layer {layer} is out of range: the model has blocks 0..{n_layer - 1}")
    return list(layers)


@torch.no_grad()
def masked_features(model: IGPT, tokens: torch.Tensor, layers: list[int], mask: torch.Tensor) -> torch.Tensor:
    """Features of `layers` (order kept) with the BERT `mask` (True = masked) applied to the input embeddings."""
    wanted: dict[int, torch.Tensor] = {}
    h = model.embed(tokens, mask)
    for i, block in enumerate(model.blocks[: max(layers) + 1]):
        if i in layers:
            wanted[i] = block.norm1(h).float().mean(dim=1)
        h = block(h)
    return torch.cat([wanted[layer] for layer in layers], dim=-1)


@torch.no_grad()
def batch_features(
    model: IGPT, tokens: torch.Tensor, layers: list[int], n_masks: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(b, len(layers) * n_embd) float32 features; a BERT model's are averaged over `n_masks` random masks."""
    if model.cfg.objective != "bert":
        return model.features(tokens, layers).float()
    if n_masks < 1:
        raise ConfigError(f"a BERT model's features need at least one mask, got n_masks={n_masks}")
    total = None
    for _ in range(n_masks):
        feats = masked_features(model, tokens, layers, model.bert_mask(tokens.shape, tokens.device, generator))
        total = feats if total is None else total + feats
    return total / n_masks


def iter_features(
    model: IGPT,
    loader: Iterable[dict[str, torch.Tensor]],
    layers: list[int],
    device: str | torch.device,
    *,
    n_masks: int = 1,
    seed: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Per batch: (features float32, labels int64, the batch's tokens on the CPU), the model in eval mode."""
    layers = check_layers(layers, model.cfg.n_layer)
    # One mask stream for the whole pass: the same seed gives the same features.
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                tokens = batch["tokens"].to(device)
                feats = batch_features(model, tokens, layers, n_masks, generator)
                yield feats.cpu().numpy(), batch["labels"].cpu().numpy().astype(np.int64), batch["tokens"]
    finally:
        model.train(was_training)


def split_features(
    model: IGPT,
    shard_dir: str | Path,
    split: str,
    layers: list[int],
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 256,
    n_masks: int = 1,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, tokens) of every image of a shard split, in memory, in the split's fixed order."""
    loader = make_loader(str(shard_dir), split, batch_size, infinite=False, n_px=model.cfg.n_px)
    total = read_manifest(shard_dir)["splits"][split]["count"]
    feats, labels, tokens = [], [], []
    with tqdm(total=total, desc=f"features {split}", unit="img", disable=not progress) as bar:
        for f, y, t in iter_features(model, loader, layers, device, n_masks=n_masks):
            feats.append(f)
            labels.append(y)
            tokens.append(t.numpy())
            bar.update(len(y))
    if not feats:
        raise DataError(f"{shard_dir} has no {split} images")
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(tokens)


def extract_to_disk(
    model: IGPT,
    shard_dir: str | Path,
    split: str,
    layers: list[int],
    out: str | Path,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 256,
    n_masks: int = 1,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the features of a shard split to the folder `out` (features.npy, labels.npy, meta.json), block by
    block through a memory map; the folder appears only when complete, and an existing one is refused."""
    out = Path(out)
    if out.exists():
        raise DataError(f"{out} already exists: choose a new folder for the features")
    layers = check_layers(layers, model.cfg.n_layer)
    total = read_manifest(shard_dir)["splits"][split]["count"]
    if total == 0:
        raise DataError(f"{shard_dir} has no {split} images")
    loader = make_loader(str(shard_dir), split, batch_size, infinite=False, n_px=model.cfg.n_px)
    with new_folder(out) as partial:
        width = len(layers) * model.cfg.n_embd
        feats = np.lib.format.open_memmap(partial / FEATURES, mode="w+", dtype=np.float32, shape=(total, width))
        labels = np.lib.format.open_memmap(partial / LABELS, mode="w+", dtype=np.int64, shape=(total,))
        row = 0
        with tqdm(total=total, desc=f"features {split}", unit="img", disable=not progress) as bar:
            for f, y, _ in iter_features(model, loader, layers, device, n_masks=n_masks):
                if row + len(y) > total:
                    raise DataError(f"{shard_dir}'s {split} split holds more images than its manifest says")
                feats[row : row + len(y)] = f
                labels[row : row + len(y)] = y
                row += len(y)
                bar.update(len(y))
        if row != total:
            raise DataError(f"{shard_dir}'s {split} split holds {row} images but its manifest says {total}")
        feats.flush()
        labels.flush()
        del feats, labels
        masks = n_masks if model.cfg.objective == "bert" else 0  # an AR model's features use no mask
        info = {"layers": layers, "n_embd": model.cfg.n_embd, "count": total, "split": split, "n_masks": masks}
        (partial / META).write_text(json.dumps({**info, **(meta or {})}, indent=2) + "\n")
    return out


def load_features(folder: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features, labels, meta) of a folder `extract_to_disk` wrote; the arrays are memory-mapped, not read."""
    folder = Path(folder)
    if not (folder / META).is_file():
        raise DataError(f"{folder} is not a feature set: it has no {META}")
    meta = json.loads((folder / META).read_text())
    return np.load(folder / FEATURES, mmap_mode="r"), np.load(folder / LABELS, mmap_mode="r"), meta


def extract_features(
    model: IGPT, loader: Iterable[dict[str, torch.Tensor]], layers: list[int], device: str | torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, len(layers) * n_embd), labels (N,)) over one pass of a loader."""
    features, labels, _ = features_and_pixels(model, loader, layers, device, palette=None)
    return features, labels


def raw_pixel_features(tokens: np.ndarray | torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """The raw-pixel baseline: each token's palette colour, flattened to (N, n_ctx * 3) floats in [-1, 1]."""
    tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    return np.asarray(palette, dtype=np.float32)[tokens].reshape(len(tokens), -1)


def features_and_pixels(
    model: IGPT,
    loader: Iterable[dict[str, torch.Tensor]],
    layers: list[int],
    device: str | torch.device,
    palette: np.ndarray | None,
    n_masks: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Features, labels and (when a palette is given) raw pixels of every sample, in one pass."""
    feats, labels, pixels = [], [], []
    for f, y, tokens in iter_features(model, loader, layers, device, n_masks=n_masks):
        feats.append(f)
        labels.append(y)
        if palette is not None:
            pixels.append(raw_pixel_features(tokens, palette))
    if not feats:
        raise DataError("the probe got no images: the split is empty")
    raw = np.concatenate(pixels) if palette is not None else None
    return np.concatenate(feats).astype(np.float32, copy=False), np.concatenate(labels), raw

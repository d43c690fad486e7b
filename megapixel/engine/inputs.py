"""The data contract of a run: the shard set must fit the model, and each data-parallel replica streams its own
share of it (every tensor and pipeline rank of a replica reads the same images).
"""

from __future__ import annotations

from typing import Any

from megapixel.config import Config
from megapixel.data.shards.format import read_manifest
from megapixel.data.stream import make_loader
from megapixel.errors import ConfigError
from megapixel.parallel import ParallelGroups


def check_shards(cfg: Config) -> dict[str, Any]:
    """The manifest of cfg.data.shards, after checking that the model fits the shards."""

    if not cfg.data.shards:
        raise ConfigError(
            "data.shards is not set: point it at a shard set (a folder of manifest.json, palette.npy and *.tar, or "
            "its URL)"
        )
    manifest = read_manifest(cfg.data.shards)
    m = cfg.model
    if manifest["n_vocab"] != m.n_vocab:
        raise ConfigError(
            f"model.n_vocab={m.n_vocab} but the shards use a {manifest['n_vocab']}-colour palette: "
            f"set model.n_vocab={manifest['n_vocab']}"
        )
    px = manifest["n_px"]
    fits = m.n_px < px and px % m.n_px == 0  # the stream can average px/n_px blocks through the palette
    if m.n_px != px and not (cfg.data.downsample and fits):
        also = " or data.downsample=true" if fits else ""
        raise ConfigError(f"model.n_px={m.n_px} but the shards hold {px}x{px} images: set model.n_px={px}{also}")
    n_labels = len(manifest.get("label_names") or [])
    if m.n_classes and m.n_classes != n_labels:
        fix = f"set model.n_classes={n_labels}" if n_labels else "set model.n_classes=0 (these shards have no labels)"
        raise ConfigError(f"model.n_classes={m.n_classes} but the shards have {n_labels} classes: {fix}")
    if manifest["splits"]["train"]["count"] == 0:
        raise ConfigError(f"{cfg.data.shards} has no training images: make the shard set with a val_fraction below 1")
    return manifest


def replica_loader(cfg: Config, split: str, batch: int, groups: ParallelGroups, infinite: bool) -> Any:
    """The stream of this data-parallel replica: every tensor rank of a replica reads the same images."""

    return make_loader(
        cfg.data.shards,
        split,
        batch,
        rank=groups.data_rank,
        world_size=groups.data_size,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.train.seed,
        flip=cfg.data.flip and split == "train",
        infinite=infinite,
        n_px=cfg.model.n_px,
        downsample=cfg.data.downsample,
    )

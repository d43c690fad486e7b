"""Shard sets on disk: images -> palette tokens in webdataset .tar shards, with a palette and a manifest.

A shard set is a folder holding `palette.npy`, `manifest.json`, `train-000000.tar ...` and
`val-000000.tar ...`. A sample is `KEY.tok` (n_px * n_px little-endian uint16 palette indices in
raster order) and, when the source is labelled, `KEY.cls` (the class index in ASCII decimal).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from megapixel.data.sources import Source, resize_image
from megapixel.errors import DataError
from megapixel.palette import check_palette, encode_pixels, fit_palette, load_palette, palette_hash, save_palette

FORMAT = "megapixel-shards"
VERSION = 1
SPLITS = ("train", "val")
# Pixels the palette is fitted on: enough for 512 stable centres, few enough to fit in seconds.
PALETTE_PIXELS = 200_000
# Images encoded together: big enough to amortise numpy overhead, small enough to bound memory.
_ENCODE_BLOCK = 256


def write_shards(
    source: Source,
    out_dir: str | Path,
    n_px: int,
    palette: np.ndarray | None = None,
    k: int = 512,
    val_fraction: float = 0.1,
    samples_per_shard: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Resize, palette-encode and split `source` into a new shard set at `out_dir`; returns its manifest."""
    out_dir = Path(out_dir)
    if n_px < 1:
        raise DataError(f"resolution {n_px}: must be a positive number of pixels")
    if samples_per_shard < 1:
        raise DataError(f"samples per shard {samples_per_shard}: must be at least 1")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction {val_fraction}: must be in [0, 1)")
    if palette is not None:
        palette = check_palette(palette, "the given palette")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} is not empty: choose a new folder for the shard set")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written beside the final folder and renamed into place at the end, so an
    # interrupted run never leaves a half shard set under the name a trainer would read.
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        manifest = _write(source, partial, n_px, palette, k, val_fraction, samples_per_shard, seed, progress)
        try:
            os.rename(partial, out_dir)
        except OSError as err:
            raise DataError(f"cannot move the new shard set into {out_dir} ({err}): choose a new folder") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _write(
    source: Source,
    folder: Path,
    n_px: int,
    palette: np.ndarray | None,
    k: int,
    val_fraction: float,
    samples_per_shard: int,
    seed: int,
    progress: bool,
) -> dict:
    images, labels = _read_resized(source, folder / "images.tmp.npy", n_px, progress)
    count = len(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    n_val = 0
    if val_fraction > 0 and count >= 2:
        n_val = min(max(1, round(count * val_fraction)), count - 1)
    # Training samples keep the seeded permutation so every shard mixes classes; validation
    # samples keep the source's order, as evaluation never shuffles.
    split_indices = {"train": order[n_val:], "val": np.sort(order[:n_val])}
    if palette is None:
        palette = fit_palette(_sample_pixels(images, split_indices["train"], rng), k, seed=seed)
    save_palette(folder / "palette.npy", palette)

    splits: dict[str, Any] = {}
    with tqdm(total=count, desc="encoding", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            indices = split_indices[split]
            shards = []
            for number, start in enumerate(range(0, len(indices), samples_per_shard)):
                name = f"{split}-{number:06d}.tar"
                chunk = indices[start : start + samples_per_shard]
                _write_shard(folder / name, images, labels, chunk, palette)
                shards.append({"name": name, "count": len(chunk), "sha256": _file_sha256(folder / name)})
                bar.update(len(chunk))
            splits[split] = {"shards": shards, "count": int(len(indices))}
    del images
    (folder / "images.tmp.npy").unlink()

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "n_px": n_px,
        "n_vocab": len(palette),
        "palette_hash": palette_hash(palette),
        "label_names": list(source.label_names),
        "splits": splits,
        "source": source.name,
        "seed": seed,
        "skipped": [[path, reason] for path, reason in source.skipped],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read_resized(source: Source, scratch: Path, n_px: int, progress: bool) -> tuple[np.ndarray, list[int | None]]:
    """Every readable image resized to n_px, in a scratch memory-mapped array (the set may exceed RAM)."""
    images = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(max(len(source), 1), n_px, n_px, 3))
    labels: list[int | None] = []
    for sample in tqdm(source.samples(), total=len(source), desc="resizing", unit="img", disable=not progress):
        images[len(labels)] = resize_image(sample.image, n_px)
        labels.append(sample.label)
    if not labels:
        raise DataError(f"{source.name} gave no readable images ({len(source.skipped)} skipped): check the source")
    return images[: len(labels)], labels


def _sample_pixels(images: np.ndarray, indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to PALETTE_PIXELS pixels drawn at random from the images at `indices`, as (N, 3)."""
    per_image = images.shape[1] * images.shape[2]
    flat = images.reshape(len(images), per_image, 3)
    total = len(indices) * per_image
    if total <= PALETTE_PIXELS:
        return flat[np.sort(indices)].reshape(-1, 3)
    picks = np.sort(rng.choice(total, PALETTE_PIXELS, replace=False))
    return flat[indices[picks // per_image], picks % per_image]


def _write_shard(
    path: Path, images: np.ndarray, labels: list[int | None], indices: np.ndarray, palette: np.ndarray
) -> None:
    # A fixed mtime makes the same samples give byte-identical shards, so their hashes are stable.
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for start in range(0, len(indices), _ENCODE_BLOCK):
            block = indices[start : start + _ENCODE_BLOCK]
            tokens = encode_pixels(images[np.sort(block)], palette)
            # Encoded in sorted order (memory-map friendly), written back in the shard's order.
            rows = np.argsort(np.argsort(block))
            for index, row in zip(block, rows, strict=True):
                sample = {"__key__": f"{index:08d}", "tok": tokens[row].astype("<u2").tobytes()}
                if labels[index] is not None:
                    sample["cls"] = str(labels[index]).encode("ascii")
                writer.write(sample)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(shard_dir: str | Path) -> dict:
    """Read and check a shard set's manifest, palette and shard files; DataError says what is wrong."""
    shard_dir = Path(shard_dir)
    remake = "make one with `megapixel shards SRC NEW_FOLDER`"
    if not shard_dir.is_dir():
        raise DataError(f"no shard set at {shard_dir}: {remake}")
    path = shard_dir / "manifest.json"
    if not path.is_file():
        raise DataError(f"{shard_dir} has no manifest.json, so it is not a shard set: {remake}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not readable JSON ({err}): remake the shard set") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a megapixel shard manifest (format is not {FORMAT!r}): {remake}")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path} has version {manifest.get('version')}: this megapixel reads version {VERSION}")
    _check_fields(manifest, path)
    palette = load_palette(shard_dir / "palette.npy", k=manifest["n_vocab"])
    if palette_hash(palette) != manifest["palette_hash"]:
        raise DataError(
            f"{shard_dir / 'palette.npy'} does not match the palette_hash in {path}: the palette was changed "
            "after the shards were written; restore it or remake the shard set"
        )
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            if not (shard_dir / shard["name"]).is_file():
                raise DataError(f"{shard_dir} lacks {shard['name']}, listed in manifest.json: copy the whole set again")
    return manifest


def _check_fields(manifest: dict, path: Path) -> None:
    """DataError unless the manifest has every field, with the right types, that readers rely on."""
    problems = []
    for field, kind in (("n_px", int), ("n_vocab", int), ("palette_hash", str), ("label_names", list)):
        if not isinstance(manifest.get(field), kind):
            problems.append(field)
    splits = manifest.get("splits")
    for split in SPLITS:
        entry = splits.get(split) if isinstance(splits, dict) else None
        shards = entry.get("shards") if isinstance(entry, dict) else None
        valid = isinstance(shards, list) and isinstance(entry.get("count"), int)
        valid = valid and all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("count"), int) for s in shards
        )
        if not valid:
            problems.append(f"splits.{split}")
    if problems:
        raise DataError(f"{path} lacks or garbles {', '.join(problems)}: remake the shard set")

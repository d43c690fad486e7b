"""Checking a whole shard set against its manifest (checksums, counts, token and label ranges) and writing a few of
its images as PNGs to look at (tools/inspect_shards.py).
"""

from __future__ import annotations

from pathlib import Path

from megapixel.data.images import save_png, scale_for, upscale
from megapixel.data.palette import decode_tokens, load_palette
from megapixel.data.shards.format import SPLITS, crops_of, file_sha256, open_shard, read_manifest
from megapixel.errors import DataError


def verify_shards(shard_dir: str | Path) -> list[str]:
    """Every problem found in a shard set: checksums, per-shard counts, labels in range; [] when sound."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    problems = []
    for split in SPLITS:
        total = 0
        crops = crops_of(manifest, split)
        for shard in manifest["splits"][split]["shards"]:
            path = shard_dir / shard["name"]
            if "sha256" in shard and file_sha256(path) != shard["sha256"]:
                problems.append(f"{shard['name']}: checksum differs from the manifest (changed or truncated)")
            try:
                tokens, labels = open_shard(path, manifest["n_px"], manifest["version"], crops)
            except DataError as err:
                problems.append(str(err))
                continue
            total += len(tokens) // crops
            if len(tokens) != shard["count"] * crops:
                problems.append(
                    f"{shard['name']}: holds {len(tokens) // crops} images, the manifest says {shard['count']}"
                )
            if len(tokens) and int(tokens.max()) >= manifest["n_vocab"]:
                problems.append(
                    f"{shard['name']}: token {int(tokens.max())} is outside the {manifest['n_vocab']} colours"
                )
            n_labels = len(manifest["label_names"])
            if labels is not None and len(labels) and (labels.max() >= n_labels or labels.min() < -1):
                problems.append(f"{shard['name']}: labels outside 0..{n_labels - 1}")
        if total != manifest["splits"][split]["count"] and not problems:
            problems.append(
                f"{split}: {total} images in its shards, the manifest says {manifest['splits'][split]['count']}"
            )
    return problems


def write_previews(shard_dir: str | Path, out_dir: str | Path, count: int = 8, split: str = "train") -> list[Path]:
    """Decode the first `count` images of a split through the palette and write them as PNGs (upscaled to view)."""

    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    manifest = read_manifest(shard_dir)
    palette = load_palette(shard_dir / "palette.npy")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    n_px = manifest["n_px"]
    for shard in manifest["splits"][split]["shards"]:
        crops = crops_of(manifest, split)
        tokens, labels = open_shard(shard_dir / shard["name"], n_px, manifest["version"], crops)
        for row in range(min(len(tokens) // crops, count - len(written))):
            label = "" if labels is None or labels[row] < 0 else f"-{manifest['label_names'][labels[row]]}"
            image = upscale(decode_tokens(tokens[row * crops].reshape(n_px, n_px), palette), scale_for(n_px))
            written.append(save_png(image, out_dir / f"{split}-{len(written):03d}{label}.png"))
        if len(written) >= count:
            break
    return written

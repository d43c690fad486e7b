"""Validate a shard set (counts, checksums, palette hash, token and label ranges) and write a few images as PNG.

    python tools/inspect_shards.py SHARD_DIR [--png OUT --count 8 --split train]

Exits 0 when the set is sound, 1 when a problem was found (each printed on its own line), 2 on a user mistake.
"""

from __future__ import annotations

import argparse
import sys

from megapixel.data.shards.format import read_manifest
from megapixel.data.shards.verify import verify_shards, write_previews
from megapixel.errors import MegapixelError


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, verify the set and write previews."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", help="a shard set folder (manifest.json, palette.npy, *.tar)")
    parser.add_argument("--png", help="folder to write decoded images into (default: none)")
    parser.add_argument("--count", type=int, default=8, help="images to write (default 8)")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.shards)
        problems = verify_shards(args.shards)
        # Previews read the shards: only from a sound set, so a damaged shard is reported once, as a problem.
        written = write_previews(args.shards, args.png, args.count, args.split) if args.png and not problems else []
    except MegapixelError as e:
        print(f"inspect_shards: error: {e}", file=sys.stderr)
        return 2
    splits = ", ".join(
        f"{name} {info['count']:,} in {len(info['shards'])} shards" for name, info in manifest["splits"].items()
    )
    print(
        f"{args.shards}: version {manifest['version']}, {manifest['n_px']}x{manifest['n_px']}, {splits}, "
        f"{manifest['n_vocab']} colours (palette {manifest['palette_hash']}), {len(manifest['label_names'])} classes, "
        f"{len(manifest.get('skipped', []))} source images skipped"
    )
    for path in written:
        print(f"png: {path}")
    for problem in problems:
        print(f"problem: {problem}")
    print("ok: counts, checksums and palette hash match the manifest" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

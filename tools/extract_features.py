"""Write a checkpoint's linear-probe features of chosen layers to disk, one folder per split.

    python tools/extract_features.py RUN_DIR OUT --layers 10,12,14 --splits train,val

Each OUT/SPLIT holds features.npy (float32, rows in the split's fixed order, layers concatenated in the order
given), labels.npy and meta.json; `megapixel.evaluation.features.load_features` memory-maps them back.
"""

from __future__ import annotations

import argparse
import sys

from megapixel.cli import _device, _layers
from megapixel.errors import MegapixelError
from megapixel.evaluation.commands import extract_command


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and extract; a user mistake prints one line and exits 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run folder, its checkpoints folder, or one checkpoint")
    parser.add_argument("out", help="folder to create, with one sub-folder per split")
    parser.add_argument(
        "--layers", type=_layers, default=None, help="blocks to concatenate, e.g. 1,2 (default: middle)"
    )
    parser.add_argument("--shards", help="shard set (default: the run's)")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits (default train,val)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--masks", type=int, default=5, help="random masks averaged for BERT models (default 5)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    args = parser.parse_args(argv)
    try:
        written = extract_command(
            args.checkpoint,
            args.out,
            args.layers,
            args.shards,
            [s.strip() for s in args.splits.split(",") if s.strip()],
            _device(args.device),
            batch_size=args.batch_size,
            n_masks=args.masks,
        )
    except MegapixelError as e:
        print(f"extract_features: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"features: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

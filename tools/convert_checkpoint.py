"""Convert megapixel checkpoints: consolidate a training checkpoint, and export to or import from HF transformers.

    python tools/convert_checkpoint.py consolidate RUN_DIR OUT        # DeepSpeed checkpoint -> OUT/model.safetensors
    python tools/convert_checkpoint.py to-hf RUN_DIR_OR_OUT HF_DIR    # -> ImageGPTForCausalImageModeling folder
    python tools/convert_checkpoint.py from-hf HF_DIR OUT             # HF ImageGPT folder -> consolidated folder

A consolidated folder holds model.safetensors, config.yaml and palette.npy; megapixel.convert.load_consolidated
loads it as an IGPT. Output folders must not exist yet; each appears complete or not at all.
"""

from __future__ import annotations

import argparse
import sys

from megapixel.convert.consolidate import describe, read_checkpoint, read_model, write_consolidated
from megapixel.convert.hf import export_hf, read_hf
from megapixel.errors import MegapixelError


def consolidate(args: argparse.Namespace) -> None:
    state, cfg, palette, metadata = read_checkpoint(args.checkpoint)
    write_consolidated(state, cfg, palette, args.out, metadata)
    step = f"step {metadata['step']} of " if "step" in metadata else ""
    print(f"consolidated {step}{metadata['source']}\n  {describe(state, cfg)}\n  -> {args.out}")


def to_hf(args: argparse.Namespace) -> None:
    state, cfg, palette, metadata = read_model(args.source)
    export_hf(state, cfg, palette, args.out, source=metadata.get("source", str(args.source)))
    kind = "ImageGPTForImageClassification" if cfg.model.n_classes else "ImageGPTForCausalImageModeling"
    print(f"exported {args.source} as {kind}\n  {describe(state, cfg)}\n  -> {args.out}")


def from_hf(args: argparse.Namespace) -> None:
    state, cfg, palette, metadata = read_hf(args.source)
    write_consolidated(state, cfg, palette, args.out, metadata)
    note = f"\n  note: {metadata['note']}" if "note" in metadata else ""
    print(f"imported {args.source}\n  {describe(state, cfg)}{note}\n  -> {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and convert; a user mistake prints one line and exits 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("consolidate", help="a training checkpoint -> one safetensors file with config and palette")
    p.add_argument("checkpoint", help="a run folder, its checkpoints folder, or one step_* folder")
    p.add_argument("out", help="new folder for model.safetensors, config.yaml and palette.npy")
    p.set_defaults(func=consolidate)
    p = sub.add_parser("to-hf", help="a consolidated folder or training checkpoint -> a HF ImageGPT folder")
    p.add_argument("source", help="a consolidated folder, or a run / checkpoints / step_* folder")
    p.add_argument("out", help="new folder that transformers' from_pretrained loads")
    p.set_defaults(func=to_hf)
    p = sub.add_parser("from-hf", help="a HF ImageGPT folder -> a consolidated folder")
    p.add_argument("source", help="a folder holding config.json, model.safetensors and preprocessor_config.json")
    p.add_argument("out", help="new folder for model.safetensors, config.yaml and palette.npy")
    p.set_defaults(func=from_hf)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except MegapixelError as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

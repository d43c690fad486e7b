"""Convert megapixel checkpoints: consolidate, reshard to another layout, export to or import from HF transformers.

    python tools/convert_checkpoint.py consolidate RUN_DIR OUT        # DeepSpeed checkpoint -> OUT/model.safetensors
    python tools/convert_checkpoint.py reshard SOURCE OUT --tensor 2 --pipeline 2  # -> a run that resumes in 2 x 2
    python tools/convert_checkpoint.py to-hf RUN_DIR_OR_OUT HF_DIR    # -> ImageGPTForCausalImageModeling folder
    python tools/convert_checkpoint.py from-hf HF_DIR OUT             # HF ImageGPT folder -> consolidated folder

A consolidated folder holds model.safetensors, config.yaml and palette.npy;
megapixel.checkpoint.consolidate.load_consolidated loads it as an IGPT. Output folders must not exist yet;
each appears complete or not at all.
"""

from __future__ import annotations

import argparse
import sys

from megapixel.checkpoint.consolidate import write_consolidated
from megapixel.checkpoint.hf import export_hf, read_hf
from megapixel.checkpoint.load import read_any
from megapixel.checkpoint.read import read_checkpoint
from megapixel.checkpoint.weights import describe
from megapixel.engine.reshard import reshard as reshard_model
from megapixel.errors import MegapixelError


def consolidate(args: argparse.Namespace) -> None:
    state, cfg, palette, metadata = read_checkpoint(args.checkpoint)
    write_consolidated(state, cfg, palette, args.out, metadata)
    step = f"step {metadata['step']} of " if "step" in metadata else ""
    print(f"consolidated {step}{metadata['source']}\n  {describe(state, cfg)}\n  -> {args.out}")


def reshard(args: argparse.Namespace) -> None:
    source, cfg = reshard_model(
        args.source, args.out, args.tensor, args.pipeline, args.data, args.zero_stage, args.shards
    )
    p, old = cfg.parallel, source.layout
    count = p.tensor * p.pipeline * args.data
    processes = f"{count} process" + ("es" if count > 1 else "")
    before = f"tensor {old['tensor']} x pipeline {old['pipeline']} x data {old['data']}, ZeRO {source.zero_stage}"
    after = f"tensor {p.tensor} x pipeline {p.pipeline} x data {args.data}, ZeRO {p.zero_stage}"
    print(f"resharded {source.path}\n  from {before}\n  to   {after} ({processes})")
    if source.position is not None:
        consumed = source.position.get("consumed", 0)
        print(
            f"  carried: the weights, step {source.step}, the learning-rate schedule, the data position ({consumed:,} "
            "samples consumed)"
        )
    else:
        print(
            "  carried: the weights; training starts at step 0 at the start of the data (the source is no training run)"
        )
    print(
        "  the optimizer starts fresh: Adam's moments are not carried across layouts (they restart at zero)\n"
        f"  -> {args.out}; continue on {processes}: megapixel train {args.out}/config.yaml --resume"
    )


def to_hf(args: argparse.Namespace) -> None:
    state, cfg, palette, metadata = read_any(args.source)
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
    p = sub.add_parser("reshard", help="any model -> a run in a tensor x pipeline x data layout that training resumes")
    p.add_argument("source", help="a run / checkpoints / step_* folder, a consolidated folder or a HF folder")
    p.add_argument("out", help="new run folder (config.yaml, palette.npy, checkpoints/)")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pipeline", type=int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--data", type=int, default=1, help="data-parallel replicas (default 1)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default: the source's)")
    p.add_argument("--shards", help="shard set to train on (default: the source config's data.shards)")
    p.set_defaults(func=reshard)
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

"""The `megapixel` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megapixel.atomic import write_atomic
from megapixel.config import load
from megapixel.errors import MegapixelError

# Each command imports the library modules it needs inside its function ("Imported here, as in every command"),
# so that `megapixel --help` and the cheap commands never wait for torch or DeepSpeed to import.


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated block numbers, got {text!r}") from None


def _per_class(text: str) -> list[int | None]:
    out: list[int | None] = []
    for item in text.split(","):
        item = item.strip()
        if item in ("all", "full"):
            out.append(None)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"--per-class takes 'all' or positive counts like all,10, got {text!r}")
    return out


def _device(name: str) -> str:
    if name != "auto":
        return name
    # Imported here, as in every command.
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_info(args: argparse.Namespace) -> None:
    # Imported here, as in every command.
    from megapixel.planning.counts import describe

    print(describe(load(args.config, args.overrides), args.config))


def cmd_plan(args: argparse.Namespace) -> None:
    # Imported here, as in every command.
    from megapixel.planning.estimate import Cluster
    from megapixel.planning.search import plan_report

    cluster = Cluster(
        gpus_per_node=args.gpus_per_node,
        gpu_memory_gb=args.gpu_memory,
        peak_tflops=args.peak_tflops,
        mfu=args.mfu,
        intra_node_gbps=args.intra_node_gbps,
        inter_node_gbps=args.inter_node_gbps,
        host_gbps=args.host_gbps,
        host_memory_gb=args.host_memory,
    )
    cfg = load(args.config, args.overrides)
    text, data = plan_report(
        cfg, args.config, args.gpus, cluster, args.batch, args.explain, args.own_layout, not args.no_flash
    )
    print(text)
    if args.json:
        write_atomic(args.json, json.dumps(data, indent=2) + "\n")
        print(f"plan: {args.json}")


# Unreadable source files printed by `shards` (the manifest lists them all).
SHOWN_SKIPS = 10


def cmd_shards(args: argparse.Namespace) -> None:
    # Imported here, as in every command.
    from megapixel.data.palette import load_palette
    from megapixel.data.sources import open_source
    from megapixel.data.writer import write_shards

    palette = load_palette(args.palette) if args.palette else None
    source = open_source(args.source)
    val_source = open_source(args.val_source) if args.val_source else None
    # A separate val source replaces the held-out share unless a fraction is asked for too (an error).
    val_fraction = args.val_fraction if args.val_fraction is not None else (0.0 if val_source else 0.1)
    manifest = write_shards(
        source,
        args.out,
        n_px=args.n_px,
        palette=palette,
        k=args.palette_size,
        val_fraction=val_fraction,
        samples_per_shard=args.shard_size,
        seed=args.seed,
        workers=args.workers,
        train_crops=args.train_crops,
        val_source=val_source,
    )
    splits = ", ".join(f"{name} {info['count']:,}" for name, info in manifest["splits"].items())
    print(f"wrote {args.out}: {splits} images at {args.n_px}x{args.n_px}, {manifest['n_vocab']}-colour palette")
    skipped = manifest["skipped"]
    if skipped:
        print(f"skipped {len(skipped)} unreadable files (all listed in {Path(args.out) / 'manifest.json'}):")
        for path, reason in skipped[:SHOWN_SKIPS]:
            print(f"  {path}: {reason}")
        if len(skipped) > SHOWN_SKIPS:
            print(f"  ... and {len(skipped) - SHOWN_SKIPS} more")


def cmd_train(args: argparse.Namespace) -> None:
    # Imported here, as in every command.
    from megapixel.engine.loop import train

    summary = train(load(args.config, args.overrides), resume=args.resume)
    if summary.get("rank", 0) == 0:
        print(f"trained {summary['steps']} steps: run in {summary['run_dir']}")


def cmd_sample(args: argparse.Namespace) -> None:
    # Imported here, as in every command.
    from megapixel.evaluation.commands import sample_command

    path = sample_command(
        args.checkpoint,
        out=args.out,
        n=args.n,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        shards=args.shards,
        n_completions=args.completions,
        device=_device(args.device),
    )
    print(f"samples: {path}")


def cmd_probe(args: argparse.Namespace) -> None:
    # Imported here, as in every command.
    from megapixel.evaluation.commands import probe_command

    report = probe_command(
        args.checkpoint,
        layers=args.layers,
        shards=args.shards,
        out=args.out,
        per_class=args.per_class,
        device=_device(args.device),
        solver=args.solver,
        sweep=args.sweep,
        n_masks=args.masks,
    )
    print(report.to_markdown())
    if args.out:
        print(f"report: {Path(args.out) / 'probe.md'}")


def cmd_finetune(args: argparse.Namespace) -> None:
    # Imported here, as in every command.
    from megapixel.evaluation.commands import finetune_command
    from megapixel.evaluation.finetune import settings_from

    settings = settings_from(
        {
            "clf_weight": args.clf_weight,
            "lr": args.lr,
            "head_lr_scale": args.head_lr_scale,
            "steps": args.steps,
            "batch_size": args.batch_size,
        }
    )
    result = finetune_command(args.checkpoint, args.out, args.shards, args.per_class, settings, _device(args.device))
    held = "" if result.val_accuracy is None else f", held-out {100 * result.val_accuracy:.1f}%"
    print(
        f"fine-tuned on {result.n_train:,} labelled images, kept step {result.best_step} of {result.steps_run}{held}: "
        f"test accuracy {100 * result.accuracy:.1f}%"
    )
    if args.out:
        print(f"fine-tuned run: {args.out}")


def cmd_report(args: argparse.Namespace) -> None:
    # Imported here, as in every command.
    from megapixel.evaluation.commands import report_command
    from megapixel.evaluation.finetune import settings_from

    settings = settings_from(
        {"steps": args.finetune_steps, "lr": args.finetune_lr, "head_lr_scale": args.finetune_head_lr_scale}
    )
    report = report_command(
        args.checkpoint,
        args.out,
        args.shards,
        per_class=args.per_class,
        seeds=tuple(range(args.seeds)),
        finetune_settings=settings,
        device=_device(args.device),
    )
    print(report.to_markdown())
    print(f"report: {Path(args.out) / 'report.md'} (plot: {Path(args.out) / 'sweep.png'})")


def cmd_demo(args: argparse.Namespace) -> None:
    # Imported here, as in every command.
    from megapixel.demo import run_demo

    run_demo(Path(args.out), steps=args.steps)


CHECKPOINT_HELP = "a run folder, its checkpoints folder, one checkpoint, or a consolidated or HF ImageGPT folder"


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per job."""
    parser = argparse.ArgumentParser(prog="megapixel", description="Train Image GPT from a laptop to a cluster.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="fit a palette, shard, train, sample and probe on the built-in digits")
    p.add_argument("--out", default="demo", help="folder for everything the demo writes (default: ./demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's, ~5 min on 2 cores)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="print a preset's or config's architecture and parameter count")
    p.add_argument("config", help="a preset (tiny, s, m, l, xl; optionally -32/-48/-64) or a YAML config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plan", help="memory and time a GPU of a layout; the fastest layouts that fit (docs/scaling.md)")
    p.add_argument("config", help="a preset (e.g. xl-64) or a YAML config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256], help="GPU counts (default 8 64 256)")
    p.add_argument("--batch", type=int, default=None, help="global batch in images (default: train.batch_size)")
    p.add_argument("--own-layout", action="store_true", help="estimate the config's own layout instead of searching")
    p.add_argument("--explain", action="store_true", help="show the runners-up and why other layouts were rejected")
    p.add_argument("--no-flash", action="store_true", help="attention keeps its (seq x seq) scores (math kernels)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB a GPU (default 80)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (default 989: H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.45, help="model FLOPs utilisation assumed (default 0.45)")
    p.add_argument("--intra-node-gbps", type=float, default=450.0, help="GB/s one way in a node (default 450)")
    p.add_argument("--inter-node-gbps", type=float, default=50.0, help="GB/s a GPU between nodes (default 50)")
    p.add_argument("--host-gbps", type=float, default=25.0, help="GB/s between host and GPU (default 25)")
    p.add_argument("--host-memory", type=float, default=2048.0, help="GB of host memory a node (default 2048)")
    p.add_argument("--json", help="also write the plan as JSON here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("shards", help="palette-encode images into webdataset shards")
    p.add_argument("source", help="'digits', an image folder, ImageNet val, CIFAR python, .npy, or .tar (docs/data.md)")
    p.add_argument("out", help="new folder for the shard set")
    p.add_argument("--n-px", type=int, default=32, help="resolution of the stored images (default 32)")
    p.add_argument("--palette", help="an existing palette .npy (k x 3 in [-1, 1]); default: fit one")
    p.add_argument("--palette-size", type=int, default=512, help="colours when fitting a palette (default 512)")
    p.add_argument("--val-fraction", type=float, help="share of images held out (default 0.1; 0 with --val-source)")
    p.add_argument(
        "--val-source",
        help="validation images (e.g. ImageNet's val folder), centre-cropped, instead of a held-out share",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: in this process)")
    p.add_argument(
        "--train-crops", type=int, default=0, help="store K of the paper's random crops per train image (0: centre)"
    )
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("train", help="train from a preset or YAML config")
    p.add_argument("config", help="a YAML config (recipes/*.yaml) or a preset name")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-3")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample images and completions from a checkpoint")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--out", default="samples.png", help="PNG to write (default samples.png)")
    p.add_argument("--n", type=int, default=16, help="unconditional samples (default 16)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", help="shard set whose val images are completed (default: the run's)")
    p.add_argument("--completions", type=int, default=8, help="held-out images to complete (default 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("probe", help="linear probe of a checkpoint's features vs raw pixels")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--layers", type=_layers, default=None, help="blocks to concatenate, e.g. 1,2 (default: middle)")
    p.add_argument("--shards", help="labelled shard set (default: the run's)")
    p.add_argument("--per-class", type=_per_class, default=[None, 10], help="labellings, e.g. all,10 (default)")
    p.add_argument("--out", help="folder for probe.md and probe.json (and sweep.png)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--solver", choices=("sklearn", "torch"), default="sklearn", help="torch: L-BFGS on --device")
    p.add_argument("--sweep", action="store_true", help="also probe each layer alone (default layers: all)")
    p.add_argument("--masks", type=int, default=5, help="random masks averaged for BERT models (default 5)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint with a classification head (L_gen + lambda L_clf)")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--shards", help="labelled shard set (default: the run's)")
    p.add_argument("--out", help="new folder for the fine-tuned run and finetune.json")
    p.add_argument("--per-class", type=int, default=None, help="labels per class (default: all)")
    p.add_argument("--clf-weight", type=float, default=None, help="lambda in L_gen + lambda L_clf (default 1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-4)")
    p.add_argument("--head-lr-scale", type=float, default=None, help="the new head's rate is lr x this (default 10)")
    p.add_argument("--steps", type=int, default=None, help="most steps (default 300)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("report", help="raw pixels vs best layer vs concatenated layers vs fine-tuning, as markdown")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--out", default="report", help="folder for report.md, report.json, sweep.png (default ./report)")
    p.add_argument("--shards", help="labelled shard set (default: the run's)")
    p.add_argument("--per-class", type=_per_class, default=[None, 1, 5, 10], help="labellings (default all,1,5,10)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per few-label row (default 3)")
    p.add_argument("--finetune-steps", type=int, default=None, help="most fine-tuning steps (default 300)")
    p.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning learning rate (default 3e-4)")
    p.add_argument(
        "--finetune-head-lr-scale", type=float, default=None, help="the new head's rate is lr x this (default 10)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; user mistakes print one line and exit 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse does not go back to a positional list after an option, so the overrides of
    # `train CONFIG --resume train.lr=1e-4` (as launchers that append --resume write it) are left over.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides, extra = args.overrides + extra, []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except MegapixelError as e:
        print(f"megapixel: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megapixel: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The embedded-default demo: the real path end to end on scikit-learn's handwritten digits.

Palette, shards, training, sampling and the linear probe are the same library calls a cluster
run makes; only the data set and the model are small enough for two CPU cores and a few minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

from megapixel.atomic import write_atomic
from megapixel.config import Config, from_dict
from megapixel.data.shards.format import read_manifest
from megapixel.data.sources import open_source
from megapixel.data.writer import write_shards
from megapixel.engine.loop import train
from megapixel.errors import DataError
from megapixel.evaluation.commands import probe_command, sample_command

# The digits are 8x8 with 17 grey levels; upsampled to 16x16 they gain smooth edges (more levels),
# and 256 tokens per image keep a training step cheap on a CPU.
DEMO_PX = 16
DEMO_COLOURS = 16
DEMO_STEPS = 800


def demo_config(out: Path, steps: int = DEMO_STEPS) -> Config:
    """The demo's run: the tiny preset on the digits shards, sized for about five minutes on 2 cores."""
    return from_dict(
        {
            "preset": "tiny",
            "model": {"n_px": DEMO_PX, "n_vocab": DEMO_COLOURS},
            "data": {"shards": str(out / "shards"), "shuffle_buffer": 500, "flip": False},
            "train": {
                "run_dir": str(out / "run"),
                "steps": steps,
                "batch_size": 32,
                "lr": 3e-3,
                "warmup_steps": min(100, steps // 10),
                "eval_every": max(1, steps // 6),
                "eval_batches": 12,
                "save_every": max(1, steps // 3),
                "log_every": 10,
                "keep_last": 2,
            },
        },
        where="demo config",
    )


def ensure_demo_shards(shards: Path) -> dict:
    """The digits as a shard set: reused when a complete one is already there."""

    if (shards / "manifest.json").exists():
        return read_manifest(shards)
    if shards.exists() and any(shards.iterdir()):
        raise DataError(f"{shards} holds files but no shard set: remove it or choose another --out")
    print(f"[1/4] palette and shards: scikit-learn digits -> {DEMO_PX}x{DEMO_PX}, {DEMO_COLOURS} colours")
    return write_shards(
        open_source("digits"), shards, n_px=DEMO_PX, k=DEMO_COLOURS, val_fraction=0.2, samples_per_shard=400
    )


def run_demo(out: Path, steps: int | None = None) -> dict:
    """Shard the digits, train a tiny iGPT, write samples.png and a probe report under `out`."""

    out.mkdir(parents=True, exist_ok=True)
    manifest = ensure_demo_shards(out / "shards")
    cfg = demo_config(out, steps or DEMO_STEPS)
    run_dir = Path(cfg.train.run_dir)
    resume = (run_dir / "checkpoints" / "latest").exists()
    print(f"[2/4] training {cfg.train.steps} steps on {manifest['splits']['train']['count']} images -> {run_dir}")
    summary = train(cfg, resume=resume)

    print("[3/4] sampling: unconditional samples and completions of held-out digits")
    samples = sample_command(
        str(run_dir),
        out=str(out / "samples.png"),
        n=18,
        temperature=1.0,
        top_k=None,
        seed=0,
        shards=None,
        n_completions=6,
        device="cpu",
    )
    print("[4/4] linear probe: features vs raw pixels, all labels and 10 per class")
    report = probe_command(str(run_dir), layers=None, shards=None, out=str(out), per_class=[None, 10], device="cpu")

    result = {
        "run_dir": str(run_dir),
        "val_loss": summary.get("val_loss"),
        "samples": str(samples),
        "probe": str(out / "probe.md"),
        "metrics": str(run_dir / "metrics.jsonl"),
    }
    write_atomic(out / "demo.json", json.dumps(result, indent=2) + "\n")
    print()
    print(report.to_markdown())
    print()
    print(f"validation loss {summary.get('val_loss'):.3f} nats/token (uniform guess: log {DEMO_COLOURS} = 2.773)")
    for name in ("samples", "probe", "metrics", "run_dir"):
        print(f"  {name:<8} {result[name]}")
    return result

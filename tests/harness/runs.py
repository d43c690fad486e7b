"""Small real runs the tests train and read back: configs of a two-block model, engine checkpoints, and what a run
wrote."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from megapixel.checkpoint.files import tag_name
from megapixel.config import Config, from_dict
from megapixel.data.palette import palette_hash, save_palette
from megapixel.engine.build import build_engine, deepspeed_config
from megapixel.engine.metrics import read_metrics
from megapixel.parallel.distributed import init_distributed


def tiny(shards: Path | str, run_dir: Path, objective: str = "ar", **train: object) -> Config:
    """A two-block model small enough for a few steps a second on two cores."""
    settings = {
        "steps": 12,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup_steps": 2,
        "log_every": 1,
        "eval_every": 4,
        "eval_batches": 2,
        "save_every": 4,
        "keep_last": 2,
        "progress": False,
        "run_dir": str(run_dir),
    }
    return from_dict(
        {
            "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_px": 8, "n_vocab": 16, "objective": objective},
            "data": {"shards": str(shards) if shards else "", "shuffle_buffer": 100},
            "train": {**settings, **train},
        }
    )


def losses(run_dir: Path) -> list[tuple[int, str, float]]:
    """(step, "loss" or "val_loss", value) of every loss a run logged, in order."""
    return [(r["step"], key, r[key]) for r in read_metrics(run_dir) for key in ("loss", "val_loss") if key in r]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes: what a refused command must leave unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_config(run_dir: Path, zero_stage: int = 0, objective: str = "ar") -> Config:
    """A two-block engine config without shards (for checkpoints made by stepping the engine directly)."""
    return from_dict(
        {
            "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_px": 4, "n_vocab": 8, "objective": objective},
            "train": {"run_dir": str(run_dir), "batch_size": 4, "progress": False, "seed": random.randrange(2**31)},
            "parallel": {"zero_stage": zero_stage},
        }
    )


def save_engine_checkpoint(run_dir: Path, steps: int = 2, zero_stage: int = 0, with_config: bool = True):
    """A real DeepSpeed checkpoint of a tiny engine after `steps` updates, with the run's palette beside it."""
    cfg = tiny_config(run_dir, zero_stage)
    info = init_distributed()
    engine = build_engine(cfg, deepspeed_config(cfg, info.world_size, info.device), info)
    for _ in range(steps):
        loss = engine(torch.randint(0, cfg.model.n_vocab, (4, cfg.model.n_ctx)))
        engine.backward(loss)
        engine.step()
    palette = np.random.uniform(-1, 1, (cfg.model.n_vocab, 3)).astype(np.float32)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_palette(run_dir / "palette.npy", palette)
    client = {"step": steps, "palette_hash": palette_hash(palette)}
    if with_config:
        client["config"] = cfg.to_dict()
    engine.save_checkpoint(str(run_dir / "checkpoints"), tag=tag_name(steps), client_state=client)
    return engine, cfg, palette

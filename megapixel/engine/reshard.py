"""Reshard: a model in any form -> a training checkpoint in any tensor x pipeline x data layout.

The new layout's processes (launched with torchrun, gloo on CPU) each build the trainer's own engine from the
source (train.init_from: the whole model is filled, then split) and save it as the trainer does, so the result
is exactly what `megapixel train --resume` reads in that layout. From a training checkpoint the step, the
learning-rate schedule's position and the data position (samples consumed, exact on any layout) are carried;
Adam's moments are not (the optimizer starts fresh); from a consolidated or HF folder training starts at step 0.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megapixel.atomic import refuse_existing, write_atomic
from megapixel.checkpoint.files import resolve_checkpoint
from megapixel.checkpoint.load import is_model_folder, read_any
from megapixel.checkpoint.read import checkpoint_layout, config_of, palette_of, read_client_state
from megapixel.checkpoint.save import save_checkpoint
from megapixel.config import Config, from_dict, to_yaml
from megapixel.data.palette import palette_hash, save_palette
from megapixel.data.stream import make_loader
from megapixel.engine.build import build_engine, deepspeed_config
from megapixel.engine.rank_state import RankState
from megapixel.errors import CheckpointError, ConfigError, DataError, MegapixelError
from megapixel.parallel import make_groups
from megapixel.parallel.distributed import init_distributed
from megapixel.parallel.groups import validate_layout

# The line naming the exception a process died of (torch prefixes each rank's lines with "[rankN]: ").
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]: )?[\w.]+(Error|Exception): ")
# Variables a launcher sets for its children: this process's own must not leak into the ones torchrun starts.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEGAPIXEL_INVENTED_RANK_VARS")


@dataclass
class Source:
    """What resharding takes from a source: its config and palette, and the training position it reached."""

    path: Path  # the tag folder of a training checkpoint, or the model folder
    cfg: Config
    palette: np.ndarray
    step: int
    position: dict[str, Any] | None  # the data stream's position (samples consumed); None: not a training run
    layout: dict[str, int]
    zero_stage: int


def read_source(path: str | Path) -> Source:
    """The config, palette and training position of a consolidated folder, HF folder or training checkpoint
    (a training checkpoint's weights are not read here)."""
    if is_model_folder(path):
        _, cfg, palette, _ = read_any(path)
        one_piece = {"tensor": 1, "pipeline": 1, "data": 1}
        return Source(Path(path), cfg, palette, 0, None, one_piece, cfg.parallel.zero_stage)
    tag = resolve_checkpoint(path)
    client = read_client_state(tag)
    cfg = config_of(tag, client)
    palette = palette_of(tag, cfg, client.get("palette_hash"))
    stage = client.get("ds_config", {}).get("zero_optimization", {}).get("stage", cfg.parallel.zero_stage)
    # Only the trainer's checkpoints record where the data stream stood; others are weights to start from.
    position = client["ranks"][0]["loader"] if "ranks" in client else None
    step = client.get("step", 0) if position is not None else 0
    return Source(tag, cfg, palette, step, position, checkpoint_layout(client), stage)


def target_config(source: Source, out: Path, tensor: int, pipeline: int, data: int, zero_stage: int | None) -> Config:
    """The source's config laid out as tensor x pipeline x data (ZeRO stage kept unless given), run in `out`;
    ConfigError when the model or batch does not split that way."""

    cfg = copy.deepcopy(source.cfg)
    cfg.parallel.tensor, cfg.parallel.pipeline = tensor, pipeline
    cfg.parallel.zero_stage = source.zero_stage if zero_stage is None else zero_stage
    cfg.train.run_dir = str(out.resolve())
    cfg.train.init_from = ""  # the checkpoint holds the weights: resuming needs nothing else
    validate_layout(cfg, tensor * pipeline * data)
    if pipeline > 1 and cfg.parallel.zero_stage > 1:
        raise ConfigError(
            f"ZeRO stage {cfg.parallel.zero_stage} cannot partition gradients across pipeline stages: "
            "pass --zero-stage 1 (or 0) with --pipeline above 1"
        )
    deepspeed_config(cfg, data, torch.device("cpu"))  # refuses a batch the data ranks cannot share
    return cfg


def start_position(cfg: Config) -> dict[str, Any]:
    """The data position at the start of cfg.data.shards' training split (for a source that reached none)."""

    try:
        loader = make_loader(
            cfg.data.shards, "train", 1, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer, infinite=True
        )
    except (DataError, OSError) as e:
        raise CheckpointError(
            f"this source has no data position, so its checkpoint starts at the beginning of the shards to train "
            f"on, which are needed ({e}): pass --shards with that shard set"
        ) from None
    return loader.state_dict()


class _Position:
    """Stands for the trainer's loader in RankState: the data position to record (the same on every rank)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


def set_schedule_position(engine: Any, step: int) -> None:
    """Put the engine's learning-rate schedule (and step counters) at `step` completed updates."""
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = step
    # As LambdaLR sets them at that point: the next update runs at the schedule's lr for step + 1.
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(step)
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()


def save_rank(job: dict[str, Any]) -> None:
    """This process's part of a reshard `job` (made by `reshard`): build the trainer's engine from the source in
    the new layout and save it as the trainer saves a checkpoint. Every rank of the layout calls it."""

    cfg = from_dict(job["config"], where="reshard config")
    info = init_distributed()
    groups = make_groups(cfg.parallel, info.world_size, info.rank)
    source = copy.deepcopy(cfg)
    source.train.init_from = job["source"]
    engine = build_engine(source, deepspeed_config(cfg, groups.data_size, info.device), info, groups)
    set_schedule_position(engine, job["step"])
    # Every rank's random streams seeded as a new run seeds them, at the carried data position.
    state = RankState(cfg, info, _Position(job["position"]), groups.data_rank)
    save_checkpoint(engine, cfg, job["step"], job["palette_hash"], state.state_dict(), info, groups)


def _launch(job: dict[str, Any], processes: int) -> None:
    """Run `save_rank(job)` in `processes` processes under torchrun; CheckpointError with their error line."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += ["-m", "megapixel.engine.reshard", json.dumps(job)]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode == 0:
        return
    lines = done.stderr.splitlines()
    errors = [line for line in lines if line.startswith("reshard: error: ")]
    if errors:
        raise CheckpointError(errors[0].removeprefix("reshard: error: "))
    # Otherwise the first exception a process died of.
    crashes = [line for line in lines if EXCEPTION_LINE.match(line)]
    reason = crashes[0] if crashes else "\n".join(lines[-20:])
    raise CheckpointError(f"the {processes} resharding processes failed (exit {done.returncode}): {reason}")


def reshard(
    source: str | Path,
    out: str | Path,
    tensor: int = 1,
    pipeline: int = 1,
    data: int = 1,
    zero_stage: int | None = None,
    shards: str | None = None,
) -> tuple[Source, Config]:
    """Write the model at `source` as a run folder `out` (config.yaml, palette.npy, checkpoints/) laid out as
    tensor x pipeline x data, which `megapixel train out/config.yaml --resume` continues. Returns the source
    read and the new run's config."""

    src = read_source(source)
    out = Path(out)
    refuse_existing(out)
    cfg = target_config(src, out, tensor, pipeline, data, zero_stage)
    if shards:
        cfg.data.shards = str(Path(shards).resolve())
    position = src.position or start_position(cfg)
    job = {
        "source": str(src.path.resolve()),
        "config": cfg.to_dict(),
        "step": src.step,
        "position": position,
        "palette_hash": palette_hash(src.palette),
    }
    # The processes write straight into `out` (the trainer's save names it in the checkpoint's config, and
    # commits the tag atomically); a failure leaves nothing behind.
    out.mkdir(parents=True, exist_ok=True)
    try:
        if tensor * pipeline * data == 1:
            save_rank(job)
        else:
            _launch(job, tensor * pipeline * data)
        write_atomic(out / "config.yaml", to_yaml(cfg))
        save_palette(out / "palette.npy", src.palette)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return src, cfg


def main() -> int:
    """The entry of each process torchrun starts: save this rank's part of the job given as JSON."""
    try:
        save_rank(json.loads(sys.argv[1]))
    except MegapixelError as e:
        print(f"reshard: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training: a DeepSpeed engine over IGPT, the warmup-cosine schedule, metrics, evaluation, checkpoints and resume.

One code path serves a CPU process and a GPU cluster. A run folder holds everything a run makes:
config.yaml, palette.npy (so sampling needs no shards), metrics.jsonl, tb/ and checkpoints/.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from megapixel.checkpoint import (
    has_checkpoints,
    prune_checkpoints,
    read_client_state,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
    tag_name,
)
from megapixel.config import Config, from_dict, to_yaml
from megapixel.distributed import DistInfo, init_distributed
from megapixel.errors import CheckpointError, ConfigError, DataError
from megapixel.metrics import MetricsLog
from megapixel.model import IGPT
from megapixel.schedule import make_scheduler

# Never let DeepSpeed print its own step lines: the progress bar and metrics.jsonl report progress.
QUIET_STEPS = 2**62


class LossModule(nn.Module):
    """The engine's module: IGPT's training loss, so every call goes through the engine (and ZeRO-3's hooks)."""

    def __init__(self, model: IGPT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.model.loss(tokens, labels, generator)[0]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deepspeed_config(cfg: Config, dp_world: int, device: torch.device) -> dict[str, Any]:
    """DeepSpeed's config derived from `cfg`, with cfg.deepspeed merged over it (the user's keys win)."""
    t = cfg.train
    if t.micro_batch == 0 and t.batch_size % dp_world:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a multiple of the {dp_world} data-parallel ranks: "
            "change train.batch_size"
        )
    micro = t.micro_batch or t.batch_size // dp_world
    if t.batch_size % (micro * dp_world):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch ({micro}) x {dp_world} "
            f"data-parallel ranks = {micro * dp_world}: change train.batch_size or train.micro_batch"
        )
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    derived = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.batch_size // (micro * dp_world),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": QUIET_STEPS,
    }
    return _deep_merge(derived, cfg.deepspeed)


def _check_layout(cfg: Config) -> None:
    p = cfg.parallel
    if p.tensor > 1 or p.pipeline > 1:
        raise ConfigError(
            "tensor and pipeline parallelism are not available yet; set parallel.tensor=1 parallel.pipeline=1"
        )
    if p.activation_checkpointing:
        raise ConfigError("activation checkpointing is not available yet; set parallel.activation_checkpointing=false")


def check_shards(cfg: Config) -> dict[str, Any]:
    """The manifest of cfg.data.shards, after checking that the model fits the shards."""
    from megapixel.data.shards import read_manifest

    if not cfg.data.shards:
        raise ConfigError("data.shards is not set: point it at a shard set folder (manifest.json, palette.npy, *.tar)")
    if not Path(cfg.data.shards).is_dir():
        raise DataError(f"data.shards: no shard set at {cfg.data.shards} (no such folder)")
    manifest = read_manifest(cfg.data.shards)
    m = cfg.model
    if manifest["n_vocab"] != m.n_vocab:
        raise ConfigError(
            f"model.n_vocab={m.n_vocab} but the shards use a {manifest['n_vocab']}-colour palette: "
            f"set model.n_vocab={manifest['n_vocab']}"
        )
    if manifest["n_px"] != m.n_px:
        px = manifest["n_px"]
        raise ConfigError(f"model.n_px={m.n_px} but the shards hold {px}x{px} images: set model.n_px={px}")
    n_labels = len(manifest.get("label_names") or [])
    if m.n_classes and m.n_classes != n_labels:
        fix = f"set model.n_classes={n_labels}" if n_labels else "set model.n_classes=0 (these shards have no labels)"
        raise ConfigError(f"model.n_classes={m.n_classes} but the shards have {n_labels} classes: {fix}")
    if manifest["splits"]["train"]["count"] == 0:
        raise ConfigError(f"{cfg.data.shards} has no training images: make the shard set with a val_fraction below 1")
    return manifest


def _resume_tag(cfg: Config, manifest: dict[str, Any], resume: bool, world_size: int) -> Path | None:
    """The checkpoint to continue from (None for a fresh run), after checking it fits `cfg` and the shards."""
    run_dir = Path(cfg.train.run_dir)
    if not resume:
        if has_checkpoints(run_dir):
            raise CheckpointError(
                f"{run_dir} already has checkpoints: pass --resume to continue, or choose another train.run_dir"
            )
        return None
    if not has_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from: start it without --resume")
    tag = resolve_checkpoint(run_dir)
    state = read_client_state(tag)
    if "config" not in state or "ranks" not in state:
        raise CheckpointError(f"{tag} was not written by megapixel's trainer: it holds no training state to resume")
    saved = dataclasses.asdict(from_dict(state["config"], where=f"{tag} config").model)
    now = dataclasses.asdict(cfg.model)
    for key in saved:
        # The kernel choice changes how, not what, the model computes.
        if key != "kernels" and saved[key] != now[key]:
            raise CheckpointError(
                f"model.{key} is {now[key]!r} but the checkpoint {tag.name} was trained with {saved[key]!r}: "
                f"set model.{key}={saved[key]} to resume it"
            )
    stage = state.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    if stage != cfg.parallel.zero_stage:
        raise CheckpointError(
            f"{tag.name} was written with ZeRO stage {stage}: resume with parallel.zero_stage={stage}"
        )
    if stage > 0 and state["dp_world_size"] != world_size:
        raise CheckpointError(
            f"{tag.name} was written by {state['dp_world_size']} data-parallel ranks and ZeRO partitions its "
            f"optimizer state by rank: resume on {state['dp_world_size']} ranks"
        )
    if state["palette_hash"] != manifest["palette_hash"]:
        raise CheckpointError(
            f"{cfg.data.shards} uses another palette than {tag.name} was trained on: resume with the same shard set"
        )
    return tag


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_engine(cfg: Config, ds_config: dict[str, Any], info: DistInfo) -> Any:
    """A DeepSpeed engine over LossModule(IGPT(cfg.model)) with AdamW and the warmup-cosine schedule."""
    import deepspeed

    # Every rank builds the same initial weights (DeepSpeed would broadcast rank 0's anyway), directly on
    # its device: no host copy of the whole model per rank.
    _seed(cfg.train.seed)
    with torch.device(info.device):
        model = IGPT(cfg.model)
    module = LossModule(model)
    if cfg.parallel.zero_stage == 3:
        # IGPT.embed reads these without calling their owners' forward, so ZeRO-3 would not gather them
        # (nor again for backward); the wrapper's hooks keep them gathered across forward and backward.
        for param in (model.sos, model.wpe.weight):
            deepspeed.zero.register_external_parameter(module, param)
    t = cfg.train
    optimizer = torch.optim.AdamW(
        module.parameters(),
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=1e-8,
        weight_decay=t.weight_decay,
        fused=info.device.type == "cuda",
    )
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer, t), config=ds_config
    )
    return engine


def _make_loader(cfg: Config, split: str, batch: int, info: DistInfo, infinite: bool) -> Any:
    from megapixel.data.stream import make_loader

    return make_loader(
        cfg.data.shards,
        split,
        batch,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.train.seed,
        flip=cfg.data.flip and split == "train",
        infinite=infinite,
        n_px=cfg.model.n_px,
    )


def evaluate(engine: Any, cfg: Config, info: DistInfo, max_batches: int) -> float | None:
    """Mean loss over min(max_batches, the whole val split) batches of each rank; None without any."""
    if max_batches == 0:
        return None
    loader = _make_loader(cfg, "val", engine.train_micro_batch_size_per_gpu(), info, infinite=False)
    # A fixed mask stream (BERT) makes every evaluation score the same masked positions.
    generator = torch.Generator(device=info.device).manual_seed(cfg.train.seed)
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)  # sum of loss x images, images
    batches = iter(loader)
    engine.eval()
    with torch.no_grad():
        for _ in range(max_batches):
            batch = next(batches, None)
            # Ranks stop together: with ZeRO-3 every forward is a collective.
            more = torch.tensor([batch is not None], dtype=torch.int32, device=info.device)
            dist.all_reduce(more, op=dist.ReduceOp.MIN)
            if not more.item():
                break
            tokens = batch["tokens"].to(info.device, non_blocking=True)
            labels = batch["labels"].to(info.device, non_blocking=True) if cfg.model.n_classes else None
            loss = engine(tokens, labels, generator=generator)
            totals += torch.stack([loss.double() * len(tokens), totals.new_tensor(len(tokens))])
    engine.train()
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else None


def _write_run_files(cfg: Config) -> None:
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    shutil.copyfile(Path(cfg.data.shards) / "palette.npy", run_dir / "palette.npy")


def _save(engine: Any, cfg: Config, step: int, palette: str, per_rank: dict[str, Any], info: DistInfo) -> None:
    ranks: list[Any] = [None] * info.world_size
    dist.all_gather_object(ranks, per_rank)
    client = {"step": step, "config": cfg.to_dict(), "palette_hash": palette, "ranks": ranks}
    checkpoints = Path(cfg.train.run_dir) / "checkpoints"
    engine.save_checkpoint(str(checkpoints), tag=tag_name(step), client_state=client)
    if info.is_main:
        # DeepSpeed moved `latest` to the new tag when save_checkpoint returned; older ones can go.
        prune_checkpoints(checkpoints, cfg.train.keep_last, step)


def _restore(engine: Any, tag: Path) -> tuple[int, list[dict[str, Any]]]:
    """Load engine, optimizer and scheduler state from `tag`; return its step and the per-rank states."""
    path, client = engine.load_checkpoint(
        str(tag.parent), tag=tag.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag}: the checkpoint is incomplete")
    scheduler = engine.lr_scheduler
    # The optimizer comes back with the learning rate of the saved schedule; recompute it from this run's
    # schedule (exactly as LambdaLR does), which differs when train.steps changed.
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    return client["step"], client["ranks"]


class RankState:
    """What one rank carries from step to step besides the engine: its data position, random streams, and
    the loss of the steps since the last log line (summed on the device: no host sync until it is logged).

    Making one seeds this rank's random generators (torch, numpy, python, BERT masks) from (train.seed, rank).
    """

    def __init__(self, cfg: Config, info: DistInfo, loader: Any) -> None:
        self.loader = loader
        self.loss_sum = torch.zeros((), device=info.device)
        self.loss_count = 0
        # BERT's training masks come from their own stream, so nothing else that draws random numbers
        # (data-loader workers, evaluation) can change them.
        seed = int(np.random.SeedSequence([cfg.train.seed, info.rank]).generate_state(1)[0])
        self.masks = torch.Generator(device=info.device).manual_seed(seed)
        _seed(seed)

    def add(self, loss: torch.Tensor) -> None:
        """Count one micro-batch's loss."""
        self.loss_sum += loss.detach()
        self.loss_count += 1

    def take_mean_loss(self) -> float:
        """The mean loss over all ranks since the last call (a host sync)."""
        total = torch.stack([self.loss_sum, self.loss_sum.new_tensor(self.loss_count)])
        dist.all_reduce(total)
        self.loss_sum.zero_()
        self.loss_count = 0
        return (total[0] / total[1]).item()

    def state_dict(self) -> dict[str, Any]:
        """Plain types and tensors only, so a checkpoint reads with weights_only=True."""
        return {
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "masks": self.masks.get_state(),
            "loss_sum": self.loss_sum.item(),
            "loss_count": self.loss_count,
        }

    def load_state_dict(self, ranks: list[dict[str, Any]], rank: int) -> None:
        """Continue exactly where rank `rank` stopped; with another number of ranks, continue the data at the
        same point of its epoch (the loader warns) with this rank's fresh random streams."""
        if len(ranks) != dist.get_world_size():
            self.loader.load_state_dict(ranks[0]["loader"])
            return
        state = ranks[rank]
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.masks.set_state(state["masks"])
        self.loss_sum.fill_(state["loss_sum"])
        self.loss_count = state["loss_count"]


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train cfg's model on cfg.data.shards into cfg.train.run_dir (resume: from its latest checkpoint);
    returns a summary: steps, train_loss, val_loss, run_dir, tokens_per_s, rank."""
    from tqdm import tqdm

    _check_layout(cfg)
    info = init_distributed()
    manifest = check_shards(cfg)
    ds_config = deepspeed_config(cfg, info.world_size, info.device)
    tag = _resume_tag(cfg, manifest, resume, info.world_size)
    eval_batches = cfg.train.eval_batches if manifest["splits"]["val"]["count"] else 0

    engine = build_engine(cfg, ds_config, info)
    accum = engine.gradient_accumulation_steps()
    loader = _make_loader(cfg, "train", engine.train_micro_batch_size_per_gpu(), info, infinite=True)
    state = RankState(cfg, info, loader)
    step = 0
    if tag is not None:
        step, ranks = _restore(engine, tag)
        state.load_state_dict(ranks, info.rank)
    if info.is_main:
        _write_run_files(cfg)
    metrics = MetricsLog(cfg.train.run_dir, start_step=step, enabled=info.is_main)

    steps, use_labels = cfg.train.steps, cfg.model.n_classes > 0
    tokens_per_step = engine.train_batch_size() * cfg.model.n_ctx
    train_loss = val_loss = None
    trained_steps, train_time = 0, 0.0
    bar = tqdm(total=steps, initial=step, disable=not (info.is_main and cfg.train.progress), unit="step")
    batches = iter(loader)
    window_start, window_steps = time.perf_counter(), 0
    while step < steps:
        lr = engine.get_lr()[0]
        for _ in range(accum):
            batch = next(batches)
            tokens = batch["tokens"].to(info.device, non_blocking=True)
            labels = batch["labels"].to(info.device, non_blocking=True) if use_labels else None
            loss = engine(tokens, labels, generator=state.masks)
            engine.backward(loss)
            engine.step()
            state.add(loss)
        step += 1
        window_steps += 1
        bar.update()
        last = step == steps
        if step % cfg.train.log_every == 0 or last:
            train_loss = state.take_mean_loss()
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * tokens_per_step / elapsed
            trained_steps, train_time = trained_steps + window_steps, train_time + elapsed
            metrics.write(step, loss=train_loss, lr=lr, tokens_per_s=tokens_per_s)
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            window_start, window_steps = time.perf_counter(), 0
        pause_start = time.perf_counter()
        if step % cfg.train.eval_every == 0 or last:
            val_loss = evaluate(engine, cfg, info, eval_batches)
            if val_loss is not None:
                metrics.write(step, val_loss=val_loss)
        if step % cfg.train.save_every == 0 or last:
            _save(engine, cfg, step, manifest["palette_hash"], state.state_dict(), info)
        # Time spent evaluating and saving is not training throughput.
        window_start += time.perf_counter() - pause_start
    bar.close()
    metrics.close()
    if trained_steps == 0:
        # Resumed at or past train.steps: nothing to train, but the summary still reports the model.
        val_loss = evaluate(engine, cfg, info, eval_batches)
    return {
        "steps": step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "run_dir": cfg.train.run_dir,
        "tokens_per_s": trained_steps * tokens_per_step / train_time if train_time else None,
        "rank": info.rank,
    }

"""Training: a DeepSpeed engine over IGPT, the warmup-cosine schedule, metrics, evaluation, checkpoints and resume.

One code path serves a CPU process and a GPU cluster. A run folder holds everything a run makes:
config.yaml, palette.npy (so sampling needs no shards), metrics.jsonl, tb/ and checkpoints/.
"""

from __future__ import annotations

import copy
import functools
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from megapixel.checkpoint import remove_unfinished
from megapixel.checkpointing import guard_loads, restore, resume_tag, save_checkpoint
from megapixel.config import Config, TrainConfig, to_yaml
from megapixel.distributed import DistInfo, init_distributed
from megapixel.errors import ConfigError, DataError
from megapixel.metrics import MetricsLog
from megapixel.model import IGPT
from megapixel.model.igpt import Block
from megapixel.model.init import materialize
from megapixel.nonfinite import SkipCounter, guard_optimizer
from megapixel.parallel import ParallelGroups, make_groups, parallel_loss, tensor_parallelize, validate_layout
from megapixel.parallel.mpu import ModelParallelUnit
from megapixel.parallel.pipeline import pipeline_micro_batches, pipeline_module
from megapixel.rank_state import RankState, seed_all
from megapixel.schedule import make_scheduler
from megapixel.signals import STOP_FILE, StopRequest, write_stop_file

# Never let DeepSpeed print its own step lines: the progress bar and metrics.jsonl report progress.
QUIET_STEPS = 2**62


class LossModule(nn.Module):
    """The engine's module: IGPT's training loss, so every call goes through the engine (and ZeRO-3's hooks).

    With a tensor group of more than one rank the model must be tensor-parallelized over it, and the loss is
    taken on vocabulary shards (the full logits are never gathered).
    """

    def __init__(self, model: IGPT, tensor_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.model = model
        self.tensor_group = tensor_group

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.tensor_group is not None:
            return parallel_loss(self.model, tokens, self.tensor_group, labels, generator)[0]
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


def _check_layout(cfg: Config, world_size: int) -> None:
    """Refuse, with one line, a layout that cannot run on `world_size` processes, before any work."""
    p = cfg.parallel
    if p.pipeline > 1 and p.zero_stage > 1:
        raise ConfigError(
            f"ZeRO stage {p.zero_stage} cannot partition gradients across pipeline stages: "
            "set parallel.zero_stage=1 (or 0) with parallel.pipeline > 1"
        )
    validate_layout(cfg, world_size)


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
    px = manifest["n_px"]
    fits = m.n_px < px and px % m.n_px == 0  # the stream can average px/n_px blocks through the palette
    if m.n_px != px and not (cfg.data.downsample and fits):
        also = " or data.downsample=true" if fits else ""
        raise ConfigError(f"model.n_px={m.n_px} but the shards hold {px}x{px} images: set model.n_px={px}{also}")
    n_labels = len(manifest.get("label_names") or [])
    if m.n_classes and m.n_classes != n_labels:
        fix = f"set model.n_classes={n_labels}" if n_labels else "set model.n_classes=0 (these shards have no labels)"
        raise ConfigError(f"model.n_classes={m.n_classes} but the shards have {n_labels} classes: {fix}")
    if manifest["splits"]["train"]["count"] == 0:
        raise ConfigError(f"{cfg.data.shards} has no training images: make the shard set with a val_fraction below 1")
    return manifest


def checkpoint_blocks(model: IGPT) -> None:
    """Recompute each block's activations in backward instead of keeping them: memory of one block's
    activations plus the blocks' inputs, for a third more compute. State-dict names stay unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    # Non-reentrant checkpointing: works with inputs that need no gradient and with the tensor-parallel
    # collectives (recomputed in the same order on every tensor rank).
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, Block))


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed's config moves the optimizer state and step off the GPU (ZeRO-Offload, to CPU or NVMe)."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def make_optimizer(
    params: Any, t: TrainConfig, ds_config: dict[str, Any], device: torch.device
) -> torch.optim.Optimizer:
    """AdamW with the run's rate, betas and weight decay: DeepSpeed's CPU Adam where ZeRO-Offload steps on the
    host (unless the config sets zero_force_ds_cpu_optimizer false), torch's otherwise (fused on CUDA)."""
    settings = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, weight_decay=t.weight_decay)
    if offloads_optimizer(ds_config) and ds_config.get("zero_force_ds_cpu_optimizer", True):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder

        try:
            # Its C++ op is compiled on first use (a minute or more) and cached in ~/.cache/torch_extensions.
            CPUAdamBuilder().load()
        except Exception as error:  # a failed build comes as one of several types; all mean the same to the user
            last = str(error).strip().splitlines()[-1] if str(error).strip() else "no message"
            raise ConfigError(
                f"ZeRO-Offload steps with DeepSpeed's CPU Adam, whose C++ op did not build ({type(error).__name__}: "
                f"{last}): install a C++ compiler and ninja, or set deepspeed.zero_force_ds_cpu_optimizer=false to "
                "step with torch's AdamW on the host"
            ) from error
        return DeepSpeedCPUAdam(params, adamw_mode=True, **settings)
    return torch.optim.AdamW(params, fused=device.type == "cuda", **settings)


def build_engine(cfg: Config, ds_config: dict[str, Any], info: DistInfo, groups: ParallelGroups | None = None) -> Any:
    """A DeepSpeed engine over LossModule(IGPT(cfg.model)) with AdamW and the warmup-cosine schedule, laid out
    over `groups` (made from cfg.parallel when not given): weights split over the tensor group, gradients
    averaged and ZeRO partitions taken over the data group."""
    import deepspeed

    if groups is None:
        groups = make_groups(cfg.parallel, info.world_size, info.rank)
    # Built on the meta device (no memory), laid out there, then each rank gives only the weights it holds their
    # values: the slices of its tensor rank, in its pipeline stage (megapixel.model.init). Every layout starts
    # from the weights one process would make from the same seed.
    seed_all(cfg.train.seed)
    with torch.device("meta"):
        model = IGPT(cfg.model)
    if cfg.train.init_from:
        # Imported here: megapixel.convert imports the checkpoint module, and most runs never need it.
        from megapixel.convert.loading import load_initial_weights

        # The whole model is filled before it is split, so every layout starts from the same weights.
        materialize(model, info.device)
        load_initial_weights(model, cfg)
    tensor_group = None
    if groups.tensor_size > 1:
        tensor_group = groups.tensor
        tensor_parallelize(model, tensor_group)
    own = functools.partial(materialize, model, info.device, groups.tensor_rank, groups.tensor_size)
    if groups.pipeline_size > 1:
        module = pipeline_module(model, groups, cfg.parallel.activation_checkpointing, own)
        mpu = None  # the PipelineModule brings its own grid, in the same rank order as `groups`
    else:
        own()
        if cfg.parallel.activation_checkpointing:
            checkpoint_blocks(model)
        module = LossModule(model, tensor_group)
        mpu = ModelParallelUnit(groups)
    if cfg.parallel.zero_stage == 3:
        # IGPT.embed reads these without calling their owners' forward, so ZeRO-3 would not gather them
        # (nor again for backward); the wrapper's hooks keep them gathered across forward and backward.
        for param in (model.sos, model.wpe.weight):
            deepspeed.zero.register_external_parameter(module, param)
    t = cfg.train
    optimizer = make_optimizer(module.parameters(), t, ds_config, info.device)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=make_scheduler(optimizer, t),
        config=ds_config,
        mpu=mpu,
    )
    guard_optimizer(engine, optimizer)
    guard_loads(engine)
    return engine


def _make_loader(cfg: Config, split: str, batch: int, groups: ParallelGroups, infinite: bool) -> Any:
    """The stream of this data-parallel replica: every tensor rank of a replica reads the same images."""
    from megapixel.data.stream import make_loader

    return make_loader(
        cfg.data.shards,
        split,
        batch,
        rank=groups.data_rank,
        world_size=groups.data_size,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.train.seed,
        flip=cfg.data.flip and split == "train",
        infinite=infinite,
        n_px=cfg.model.n_px,
        downsample=cfg.data.downsample,
    )


def evaluate(engine: Any, cfg: Config, info: DistInfo, groups: ParallelGroups, max_batches: int) -> float | None:
    """Mean loss over min(max_batches, the whole val split) batches of each rank; None without any."""
    if max_batches == 0:
        return None
    loader = _make_loader(cfg, "val", engine.train_micro_batch_size_per_gpu(), groups, infinite=False)
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
            if groups.pipeline_size > 1:
                micro = pipeline_micro_batches([batch], cfg.model, info.device, generator)
                # The last stage gets a 0-d loss, the others a broadcast copy of shape (1,).
                loss = engine.eval_batch(micro, num_micro_batches=1).reshape(())
            else:
                labels = batch["labels"].to(info.device, non_blocking=True) if cfg.model.n_classes else None
                loss = engine(tokens, labels, generator=generator)
            totals += torch.stack([loss.double() * len(tokens), totals.new_tensor(len(tokens))])
    engine.train()
    # Tensor ranks of a replica count its images once each: the mean is the same.
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else None


def _write_run_files(cfg: Config) -> None:
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    shutil.copyfile(Path(cfg.data.shards) / "palette.npy", run_dir / "palette.npy")


def _train_step(engine: Any, batches: Any, state: RankState, info: DistInfo, use_labels: bool, pipelined: bool) -> bool:
    """One optimizer step over the engine's accumulation of micro-batches; whether the engine applied it (it
    skips a step whose gradients are not finite: megapixel.nonfinite)."""
    if pipelined:
        # The engine runs the accumulation steps itself (1F1B) and steps the optimizer.
        state.add(engine.train_batch(data_iter=batches))
    else:
        for _ in range(engine.gradient_accumulation_steps()):
            batch = next(batches)
            tokens = batch["tokens"].to(info.device, non_blocking=True)
            labels = batch["labels"].to(info.device, non_blocking=True) if use_labels else None
            loss = engine(tokens, labels, generator=state.masks)
            engine.backward(loss)
            engine.step()
            state.add(loss)
    applied = engine.was_step_applied()
    state.end_step(applied)
    return applied


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train cfg's model on cfg.data.shards into cfg.train.run_dir (resume: from its latest checkpoint);
    returns a summary: steps, train_loss, val_loss, run_dir, tokens_per_s, rank, and stopped_by (the name of
    the signal that stopped it early after saving, else None)."""
    info = init_distributed()
    _check_layout(cfg, info.world_size)
    if cfg.train.max_skipped_steps < 0:
        raise ConfigError(f"train.max_skipped_steps must be >= 0 (0: never stop), got {cfg.train.max_skipped_steps}")
    manifest = check_shards(cfg)
    groups = make_groups(cfg.parallel, info.world_size, info.rank)
    ds_config = deepspeed_config(cfg, groups.data_size, info.device)
    tag = resume_tag(cfg, manifest, resume, groups)
    run_dir = Path(cfg.train.run_dir)
    if info.is_main:
        # What an interrupted save or the last stop on a signal left behind.
        remove_unfinished(run_dir / "checkpoints")
        (run_dir / STOP_FILE).unlink(missing_ok=True)
    # From here on SIGTERM / SIGUSR1 stop the run at the next step boundary, after a save.
    with StopRequest() as stop:
        return _train(cfg, tag, manifest, ds_config, info, groups, stop)


def _train(
    cfg: Config,
    tag: Path | None,
    manifest: dict[str, Any],
    ds_config: dict[str, Any],
    info: DistInfo,
    groups: ParallelGroups,
    stop: StopRequest,
) -> dict[str, Any]:
    from tqdm import tqdm

    eval_batches = cfg.train.eval_batches if manifest["splits"]["val"]["count"] else 0
    engine = build_engine(cfg, ds_config, info, groups)
    loader = _make_loader(cfg, "train", engine.train_micro_batch_size_per_gpu(), groups, infinite=True)
    state = RankState(cfg, info, loader, groups.data_rank)
    step = 0
    if tag is not None:
        step, ranks = restore(engine, tag)
        state.load_state_dict(ranks, info.rank)
    if info.is_main:
        _write_run_files(cfg)
    metrics = MetricsLog(cfg.train.run_dir, start_step=step, enabled=info.is_main)

    def save() -> str:
        return save_checkpoint(engine, cfg, step, manifest["palette_hash"], state.state_dict(), info, groups).name

    steps, use_labels = cfg.train.steps, cfg.model.n_classes > 0
    tokens_per_step = engine.train_batch_size() * cfg.model.n_ctx
    train_loss = val_loss = stopped_by = None
    trained_steps, train_time = 0, 0.0
    skips = SkipCounter(cfg.train.max_skipped_steps, engine.skipped_steps)
    bar = tqdm(total=steps, initial=step, disable=not (info.is_main and cfg.train.progress), unit="step")
    batches = iter(loader)
    pipelined = groups.pipeline_size > 1
    if pipelined:
        batches = pipeline_micro_batches(batches, cfg.model, info.device, state.masks)
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < steps:
            lr = engine.get_lr()[0]
            applied = _train_step(engine, batches, state, info, use_labels, pipelined)
            step += 1
            window_steps += 1
            bar.update()
            last = step == steps
            skips.record(applied)
            if not applied:
                metrics.write(step, skipped_steps=skips.total)
                if skips.exhausted:
                    # Skipped steps changed no weight: this checkpoint holds the last good state.
                    raise skips.error(step, save())
            if step % cfg.train.log_every == 0 or last:
                train_loss = state.take_mean_loss()
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * tokens_per_step / elapsed
                trained_steps, train_time = trained_steps + window_steps, train_time + elapsed
                if train_loss is not None:
                    metrics.write(step, loss=train_loss, lr=lr, tokens_per_s=tokens_per_s)
                    bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                window_start, window_steps = time.perf_counter(), 0
            pause_start = time.perf_counter()
            if step % cfg.train.eval_every == 0 or last:
                val_loss = evaluate(engine, cfg, info, groups, eval_batches)
                if val_loss is not None:
                    metrics.write(step, val_loss=val_loss)
            stopped_by = None if last else stop.agreed(info.device)
            if step % cfg.train.save_every == 0 or last or stopped_by:
                saved = save()
            # Time spent evaluating and saving is not training throughput.
            window_start += time.perf_counter() - pause_start
            if stopped_by:
                if info.is_main:
                    write_stop_file(cfg.train.run_dir, step, stopped_by, saved)
                    print(f"{stopped_by} at step {step}: saved {saved} and stopped; continue with --resume", flush=True)
                break
    finally:
        bar.close()
        metrics.close()
    if trained_steps == 0:
        # Resumed at or past train.steps: nothing to train, but the summary still reports the model.
        val_loss = evaluate(engine, cfg, info, groups, eval_batches)
    return {
        "steps": step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "run_dir": cfg.train.run_dir,
        "tokens_per_s": trained_steps * tokens_per_step / train_time if train_time else None,
        "rank": info.rank,
        "stopped_by": stopped_by,
    }

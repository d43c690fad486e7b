"""The training loop: train(cfg) runs steps on the engine, logs metrics, validates, saves checkpoints and stops on a
signal after saving.

One code path serves a CPU process and a GPU cluster. A run folder holds everything a run makes:
config.yaml, palette.npy (so sampling needs no shards), metrics.jsonl, tb/ and checkpoints/.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megapixel.atomic import write_atomic
from megapixel.checkpoint.files import remove_unfinished
from megapixel.checkpoint.resume import restore, resume_tag
from megapixel.checkpoint.save import save_checkpoint
from megapixel.config import Config, to_yaml
from megapixel.data.palette import save_palette
from megapixel.data.shards.format import open_shard_set
from megapixel.engine.build import build_engine, check_layout, deepspeed_config
from megapixel.engine.inputs import check_shards, replica_loader
from megapixel.engine.metrics import MetricsLog
from megapixel.engine.nonfinite import SkipCounter
from megapixel.engine.rank_state import RankState
from megapixel.engine.signals import STOP_FILE, StopRequest, write_stop_file
from megapixel.engine.validation import validation_loss
from megapixel.errors import ConfigError
from megapixel.parallel import ParallelGroups, make_groups
from megapixel.parallel.distributed import DistInfo, init_distributed
from megapixel.parallel.pipeline import pipeline_micro_batches


def _write_run_files(cfg: Config) -> None:
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    save_palette(run_dir / "palette.npy", open_shard_set(cfg.data.shards).palette)


def _train_step(engine: Any, batches: Any, state: RankState, info: DistInfo, use_labels: bool, pipelined: bool) -> bool:
    """One optimizer step over the engine's accumulation of micro-batches; whether the engine applied it (it
    skips a step whose gradients are not finite: megapixel.engine.nonfinite)."""
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
    check_layout(cfg, info.world_size)
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
    eval_batches = cfg.train.eval_batches if manifest["splits"]["val"]["count"] else 0
    engine = build_engine(cfg, ds_config, info, groups)
    loader = replica_loader(cfg, "train", engine.train_micro_batch_size_per_gpu(), groups, infinite=True)
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
                val_loss = validation_loss(engine, cfg, info, groups, eval_batches)
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
        val_loss = validation_loss(engine, cfg, info, groups, eval_batches)
    return {
        "steps": step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "run_dir": cfg.train.run_dir,
        "tokens_per_s": trained_steps * tokens_per_step / train_time if train_time else None,
        "rank": info.rank,
        "stopped_by": stopped_by,
    }

"""The evaluation commands (`megapixel sample`, `probe`, `finetune`, `report`, tools/extract_features.py): load a
model in any form, find the shard set to evaluate on (the one given, else the one it was trained on), check that
they share a palette, run the evaluation and write its files, each appearing whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megapixel.atomic import write_atomic
from megapixel.checkpoint.load import load_model
from megapixel.config import Config
from megapixel.data.shards.format import check_shards_palette, read_manifest
from megapixel.data.stream import make_loader
from megapixel.errors import ConfigError, DataError
from megapixel.evaluation.features import check_layers, extract_to_disk
from megapixel.evaluation.finetune import (
    FinetuneResult,
    FinetuneSettings,
    finetune,
    read_split,
    save_finetuned,
    with_classifier,
)
from megapixel.evaluation.labels import held_out_split, low_label_subset
from megapixel.evaluation.probe import ProbeReport, default_probe_layers, plot_sweep, probe
from megapixel.evaluation.report import Report, evaluate_model
from megapixel.evaluation.sample import write_sample_grid
from megapixel.model.igpt import IGPT


def open_for_evaluation(
    ckpt: str, shards: str | None, device: str, who: str, classes: bool = True
) -> tuple[IGPT, Config, np.ndarray, str]:
    """The model at `ckpt` on `device` with its config and palette, and the shard set to evaluate it on: `shards`,
    else the run's. DataError, starting with `who` ("the probe", ...), when there is none, when it uses another
    palette, or (with `classes`) when it has fewer than two classes."""
    model, cfg, palette = load_model(ckpt, device=device)
    shard_dir = shards or cfg.data.shards
    if not shard_dir:
        raise DataError(f"{who} needs {'labelled shards' if classes else 'a shard set'}: pass --shards")
    check_shards_palette(shard_dir, palette)
    if classes:
        names = read_manifest(shard_dir)["label_names"]
        if len(names) < 2:
            raise DataError(f"{who} needs shards with at least two classes: {shard_dir} has {len(names)}")
    return model, cfg, palette, shard_dir


def sample_command(
    ckpt: str,
    out: str,
    n: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    shards: str | None,
    n_completions: int,
    device: str,
    per_image: int = 4,
) -> Path:
    """Load a checkpoint and write a PNG of `n` samples and `per_image` completions of each of the first
    `n_completions` val images of `shards` (else of the run's shard set; none when it no longer exists)."""
    model, cfg, palette = load_model(ckpt, device=device)
    shard_dir = shards or (cfg.data.shards if cfg.data.shards and Path(cfg.data.shards).is_dir() else None)
    held_out = None
    if shard_dir and n_completions > 0:
        check_shards_palette(shard_dir, palette)
        held_out = _val_tokens(shard_dir, n_completions, model.cfg.n_px)
    return write_sample_grid(
        model,
        palette,
        out,
        n_uncond=n,
        completions_from=held_out,
        per_image=per_image,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )


def _val_tokens(shard_dir: str, count: int, n_px: int) -> torch.Tensor:
    """The first `count` images of a shard set's val split, in its fixed evaluation order."""
    taken: list[torch.Tensor] = []
    for batch in make_loader(shard_dir, "val", min(count, 64), infinite=False, n_px=n_px):
        taken.append(batch["tokens"])
        if sum(len(t) for t in taken) >= count:
            break
    return torch.cat(taken)[:count]


def probe_command(
    ckpt: str,
    layers: list[int] | None,
    shards: str | None,
    out: str | None,
    per_class: Sequence[int | None],
    device: str,
    *,
    solver: str = "sklearn",
    sweep: bool = False,
    n_masks: int = 5,
) -> ProbeReport:
    """Load a checkpoint and probe it on `shards` (else the run's shard set); write probe.md and probe.json (and
    with `sweep`, sweep.png: accuracy against depth) into `out` when given. A sweep defaults to every layer."""
    model, _, _, shard_dir = open_for_evaluation(ckpt, shards, device, "the probe")
    if layers is not None:
        layers = check_layers(layers, model.cfg.n_layer)
    else:
        layers = list(range(model.cfg.n_layer)) if sweep else default_probe_layers(model.cfg.n_layer)
    report = probe(
        model, shard_dir, layers, per_class=per_class, device=device, solver=solver, sweep=sweep, n_masks=n_masks
    )
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "probe.md", report.to_markdown())
        write_atomic(folder / "probe.json", json.dumps(report.to_dict(), indent=2) + "\n")
        if report.sweep is not None:
            plot_sweep(report.layers, report.sweep, folder / "sweep.png", f"linear probe by depth: {Path(ckpt).name}")
    return report


def finetune_command(
    ckpt: str,
    out: str | None,
    shards: str | None,
    per_class: int | None,
    settings: FinetuneSettings,
    device: str,
) -> FinetuneResult:
    """Fine-tune a checkpoint on `shards` (else the run's): train split labels (all, or `per_class` of each class),
    early stopping on a stratified 20% of them when there are enough, accuracy on the val split; with `out`, write
    the fine-tuned run folder and finetune.json there."""
    settings.check()
    if out and Path(out, "checkpoints").exists():
        raise ConfigError(f"{out} already holds checkpoints: choose a new --out folder")
    model, cfg, palette, shard_dir = open_for_evaluation(ckpt, shards, device, "fine-tuning")
    train_tokens, train_labels = read_split(shard_dir, "train", model.cfg.n_px)
    test_tokens, test_labels = read_split(shard_dir, "val", model.cfg.n_px)
    test = (test_tokens[test_labels >= 0], test_labels[test_labels >= 0])
    chosen = np.flatnonzero(train_labels >= 0)
    if per_class is not None:
        chosen = low_label_subset(train_labels, per_class, settings.seed)
    split = held_out_split(train_labels[chosen], 0.2, settings.seed) if per_class is None else None
    val = None
    if split is not None:
        val = (train_tokens[chosen[split[1]]], train_labels[chosen[split[1]]])
        chosen = chosen[split[0]]
    model = with_classifier(model, len(read_manifest(shard_dir)["label_names"]))
    model, result = finetune(model, (train_tokens[chosen], train_labels[chosen]), test, settings, val, progress=True)
    if out:
        save_finetuned(model, cfg, palette, out, result.best_step)
        record = {"settings": dataclasses.asdict(settings), "per_class": per_class, **dataclasses.asdict(result)}
        write_atomic(Path(out) / "finetune.json", json.dumps(record, indent=2) + "\n")
    return result


def report_command(
    ckpt: str,
    out: str,
    shards: str | None,
    *,
    finetune_settings: FinetuneSettings | None = None,
    device: str = "cpu",
    **kwargs: Any,
) -> Report:
    """Evaluate a checkpoint (megapixel.evaluation.report) and write report.md, report.json and sweep.png into
    `out`. The fine-tuning settings are checked before anything is loaded."""
    settings = finetune_settings or FinetuneSettings()
    settings.check()
    model, _, palette, shard_dir = open_for_evaluation(ckpt, shards, device, "the report")
    report = evaluate_model(model, palette, shard_dir, str(ckpt), finetune_settings=settings, device=device, **kwargs)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    plot_sweep(report.layers, report.sweep, folder / "sweep.png", f"linear probe by depth: {Path(ckpt).name}")
    write_atomic(folder / "report.md", report.to_markdown())
    write_atomic(folder / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def extract_command(
    ckpt: str,
    out: str,
    layers: list[int] | None,
    shards: str | None,
    splits: list[str],
    device: str,
    batch_size: int = 256,
    n_masks: int = 1,
) -> list[Path]:
    """Load a checkpoint and write the features of each split of `shards` (else the run's) to OUT/SPLIT."""
    for split in splits:
        if (Path(out) / split).exists():
            raise DataError(f"{Path(out) / split} already exists: choose a new folder for the features")
    model, _, _, shard_dir = open_for_evaluation(ckpt, shards, device, "feature extraction", classes=False)
    layers = check_layers(layers, model.cfg.n_layer) if layers is not None else [model.cfg.n_layer // 2]
    meta = {"checkpoint": str(ckpt), "shards": str(shard_dir)}
    kwargs = dict(batch_size=batch_size, n_masks=n_masks, meta=meta)
    return [extract_to_disk(model, shard_dir, s, layers, Path(out) / s, device, **kwargs) for s in splits]

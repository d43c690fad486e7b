"""The paper's evaluation of one checkpoint in one report: layer sweep, raw pixels vs best single layer vs
concatenated layers vs fine-tuning, with all labels and with a few labels per class.

Every choice is made without the test set: C on a held-out slice of the training labels, the best layer by its
held-out accuracy in the all-labels sweep, the concatenated layers as the paper's window of five around it.
The test set is the shard set's val split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megapixel.data.shards.format import read_manifest
from megapixel.errors import ConfigError, DataError
from megapixel.evaluation.features import raw_pixel_features, split_features
from megapixel.evaluation.finetune import FinetuneResult, FinetuneSettings, finetune, with_classifier
from megapixel.evaluation.labels import held_out_split, low_label_subset
from megapixel.evaluation.linear import ProbeResult, fit_probe
from megapixel.evaluation.probe import concat_window, layer_slice, layer_sweep, sweep_markdown
from megapixel.model.igpt import IGPT


@torch.no_grad()
def bert_val_loss(model: IGPT, tokens: np.ndarray, n_masks: int, seed: int = 0, batch_size: int = 256) -> float:
    """A BERT model's loss on masked tokens, averaged over `n_masks` random masks per image."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(n_masks):
        for start in range(0, len(tokens), batch_size):
            batch = torch.as_tensor(tokens[start : start + batch_size], device=device).long()
            total += model.loss(batch, generator=generator)[0].item() * len(batch)
            count += len(batch)
    return total / count


def _mean_std(values: Sequence[float]) -> str:
    acc = 100 * np.asarray(values)
    return f"{acc.mean():.1f}%" if len(acc) == 1 else f"{acc.mean():.1f} ± {acc.std():.1f}%"


@dataclass
class ReportRow:
    """One labelling: accuracies of each method, one entry per seed."""

    per_class: int | None
    n_train: int
    raw_pixels: list[ProbeResult] = field(default_factory=list)
    best_layer: list[ProbeResult] = field(default_factory=list)
    concatenated: list[ProbeResult] = field(default_factory=list)
    finetuned: list[FinetuneResult] = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.per_class is None:
            return f"all labels ({self.n_train:,})"
        return f"{self.per_class} per class ({self.n_train:,}, {len(self.raw_pixels)} seeds)"

    def cells(self) -> list[str]:
        out = [_mean_std([r.accuracy for r in results]) for results in (self.raw_pixels, self.best_layer)]
        out.append(_mean_std([r.accuracy for r in self.concatenated]))
        out.append(_mean_std([r.accuracy for r in self.finetuned]) if self.finetuned else "-")
        return out


@dataclass
class Report:
    """The evaluation of one checkpoint: sweep, choices and one row per labelling."""

    checkpoint: str
    n_test: int
    layers: list[int]
    sweep: list[ProbeResult]
    best_layer: int
    concat_layers: list[int]
    rows: list[ReportRow]
    finetune_settings: dict[str, Any]
    bert_val_loss: float | None = None

    def to_markdown(self) -> str:
        """The report as markdown: the comparison table, the sweep table, and how each choice was made."""
        concat = ", ".join(map(str, self.concat_layers))
        lines = [
            f"Evaluation of {self.checkpoint} on {self.n_test:,} test images (mean ± std over seeds)",
            "",
            f"| labelling | raw pixels | best layer ({self.best_layer}) | layers {concat} | fine-tuned |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {row.name} | " + " | ".join(row.cells()) + " |" for row in self.rows]
        s = self.finetune_settings
        lines += [
            "",
            "Layer sweep, all labels (the best layer is chosen by held-out accuracy):",
            "",
            sweep_markdown(self.layers, self.sweep).rstrip(),
            "",
            "Probes: features standardised with every training image, L-BFGS logistic regression, C from "
            "1e-3..1e2 on a stratified 20% of the training labels (C=1 where a class has too few to hold out). "
            f"Fine-tuning: L_gen + {s['clf_weight']:g} L_clf, Adam lr {s['lr']:g} (the new head "
            f"{s['lr'] * s['head_lr_scale']:g}), batch {s['batch_size']}; with all labels at most {s['steps']} steps, "
            f"early stopping on a held-out 20% of them; with few labels a fixed {s['few_label_steps']} steps (there "
            "are none to hold out); one seed per row.",
        ]
        if self.bert_val_loss is not None:
            lines += ["", f"BERT val loss (masked tokens, averaged over masks): {self.bert_val_loss:.4f}"]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data."""
        return dataclasses.asdict(self)


def _labelled(feats: np.ndarray, labels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, ...]:
    keep = labels >= 0
    return feats[keep], labels[keep], tokens[keep]


def evaluate_model(
    model: IGPT,
    palette: np.ndarray,
    shard_dir: str | Path,
    name: str,
    *,
    per_class: Sequence[int | None] = (None, 1, 5, 10),
    seeds: Sequence[int] = (0, 1, 2),
    finetune_settings: FinetuneSettings | None = None,
    few_label_finetune_steps: int = 100,
    n_masks: int = 5,
    device: str = "cpu",
    progress: bool = True,
) -> Report:
    """Evaluate `model` (called `name` in the report) on a labelled shard set of its palette: see the module
    docstring."""
    if not seeds:
        raise ConfigError("the report needs at least one seed")
    settings = finetune_settings or FinetuneSettings()
    # Few labels leave none to hold out for early stopping: a fixed budget, never above the all-labels row's.
    few_label_steps = min(few_label_finetune_steps, settings.steps)
    n_classes = len(read_manifest(shard_dir)["label_names"])
    layers = list(range(model.cfg.n_layer))
    n_masks = n_masks if model.cfg.objective == "bert" else 1
    d = model.cfg.n_embd
    every = split_features(model, shard_dir, "train", layers, device, n_masks=n_masks, progress=progress)
    train_f, train_y, train_t = _labelled(*every)
    test_f, test_y, test_t = _labelled(
        *split_features(model, shard_dir, "val", layers, device, n_masks=n_masks, progress=progress)
    )
    if len(test_y) == 0 or len(np.unique(train_y)) < 2:
        raise DataError(f"the report needs labelled train and val images of at least two classes in {shard_dir}")
    train_raw, test_raw = raw_pixel_features(train_t, palette), raw_pixel_features(test_t, palette)
    # Few-label probes standardise with every training image, labelled or not (SCALING in evaluation/linear.py).
    pool_f, pool_raw = every[0], raw_pixel_features(every[2], palette)

    sweep = layer_sweep((train_f, train_y), (test_f, test_y), layers, d)
    best = layers[int(np.argmax([r.val_accuracy or 0.0 for r in sweep]))]
    window = concat_window(best, model.cfg.n_layer)
    columns = np.concatenate([np.arange(layer * d, (layer + 1) * d) for layer in window])
    train_c, test_c, pool_c = train_f[:, columns], test_f[:, columns], pool_f[:, columns]

    rows = []
    for n in per_class:
        row = ReportRow(per_class=n, n_train=len(train_y) if n is None else n * len(np.unique(train_y)))
        for seed in seeds if n is not None else seeds[:1]:
            idx = np.arange(len(train_y)) if n is None else low_label_subset(train_y, n, seed)
            y = train_y[idx]
            row.raw_pixels.append(fit_probe(train_raw[idx], y, test_raw, test_y, seed=seed, scale_with=pool_raw))
            if n is None:
                row.best_layer.append(sweep[layers.index(best)])
            else:
                train_b, test_b, pool_b = (layer_slice(f, best, d) for f in (train_f[idx], test_f, pool_f))
                row.best_layer.append(fit_probe(train_b, y, test_b, test_y, seed=seed, scale_with=pool_b))
            row.concatenated.append(fit_probe(train_c[idx], y, test_c, test_y, seed=seed, scale_with=pool_c))
        row.finetuned.append(
            _finetune_row(model, n_classes, train_t, train_y, (test_t, test_y), n, settings, few_label_steps, seeds[0])
        )
        rows.append(row)
    loss = bert_val_loss(model, test_t, n_masks) if model.cfg.objective == "bert" else None
    finetuning = {**dataclasses.asdict(settings), "few_label_steps": few_label_steps}
    return Report(name, len(test_y), layers, sweep, best, window, rows, finetuning, loss)


def _finetune_row(
    model: IGPT,
    n_classes: int,
    tokens: np.ndarray,
    labels: np.ndarray,
    test: tuple[np.ndarray, np.ndarray],
    per_class: int | None,
    settings: FinetuneSettings,
    few_label_steps: int,
    seed: int,
) -> FinetuneResult:
    """Fine-tune a fresh copy of `model` with all labels (early stopping on 20% of them) or, for `few_label_steps`,
    `per_class` per class."""
    run = dataclasses.replace(settings, seed=seed)
    if per_class is None:
        fit, val = held_out_split(labels, 0.2, seed)
        train, held = (tokens[fit], labels[fit]), (tokens[val], labels[val])
    else:
        idx = low_label_subset(labels, per_class, seed)
        train, held = (tokens[idx], labels[idx]), None
        run = dataclasses.replace(run, steps=few_label_steps)
    _, result = finetune(with_classifier(model, n_classes), train, test, run, held)
    return result

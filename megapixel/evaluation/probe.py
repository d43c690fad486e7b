"""The linear probe: logistic regression on a model's mid-network features, against the same on raw pixels, with all
labels and a few per class, and the layer sweep that finds the best depth.

Features of layer l are block l's normed attention input, mean-pooled over positions (the paper's n^l);
several layers concatenate. Each probe is megapixel.evaluation.linear's fit, with its L2 strength chosen on
a held-out slice of the training set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megapixel.atomic import replacing
from megapixel.data.palette import load_palette
from megapixel.data.shards.format import read_manifest
from megapixel.data.stream import make_loader
from megapixel.errors import ConfigError, DataError
from megapixel.evaluation.features import check_layers, features_and_pixels
from megapixel.evaluation.labels import low_label_subset
from megapixel.evaluation.linear import ProbeResult, fit_probe
from megapixel.model.igpt import IGPT


def default_probe_layers(n_layer: int) -> list[int]:
    """The middle block alone: where the paper finds the best single-layer probe (the last costs points)."""
    return [n_layer // 2]


@dataclass
class ProbeRow:
    """One labelling of the training set: probe results on features and on raw pixels, one per seed."""

    per_class: int | None
    features: list[ProbeResult]
    raw_pixels: list[ProbeResult]

    @property
    def name(self) -> str:
        if self.per_class is None:
            return f"all labels ({self.features[0].n_train:,})"
        return f"{self.per_class} per class ({self.features[0].n_train:,}, {len(self.features)} seeds)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "labelling": self.name,
            "per_class": self.per_class,
            "features": _summary(self.features),
            "raw_pixels": _summary(self.raw_pixels),
        }


def _summary(results: list[ProbeResult]) -> dict[str, Any]:
    acc = np.array([r.accuracy for r in results])
    return {"mean": float(acc.mean()), "std": float(acc.std()), "runs": [asdict(r) for r in results]}


def _cell(results: list[ProbeResult]) -> str:
    acc = 100 * np.array([r.accuracy for r in results])
    return f"{acc.mean():.1f}%" if len(acc) == 1 else f"{acc.mean():.1f} ± {acc.std():.1f}%"


@dataclass
class ProbeReport:
    """Probe accuracies on the val split for each labelling, features against raw pixels."""

    layers: list[int]
    n_test: int
    rows: list[ProbeRow] = field(default_factory=list)
    # With a sweep: one all-labels probe per layer of `layers`, on that layer alone.
    sweep: list[ProbeResult] | None = None

    def to_markdown(self) -> str:
        """A markdown table: one row per labelling, columns raw pixels and features."""
        layers = ", ".join(str(layer) for layer in self.layers)
        lines = [
            f"Linear probe accuracy on {self.n_test:,} val images (mean ± std over seeds where subsampled)",
            "",
            f"| labelling | raw pixels | features (layers {layers}) |",
            "|---|---|---|",
        ]
        lines += [f"| {row.name} | {_cell(row.raw_pixels)} | {_cell(row.features)} |" for row in self.rows]
        if self.sweep is not None:
            lines += ["", "Layer sweep, all labels, one layer at a time:", "", sweep_markdown(self.layers, self.sweep)]
        return "\n".join(lines).rstrip("\n") + "\n"

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data."""
        data = {"layers": self.layers, "n_test": self.n_test, "rows": [row.to_dict() for row in self.rows]}
        if self.sweep is not None:
            data["sweep"] = [asdict(r) for r in self.sweep]
        return data


def probe(
    model: IGPT,
    shard_dir: str | Path,
    layers: list[int],
    *,
    per_class: Sequence[int | None] = (None, 10),
    seeds: Sequence[int] = (0, 1, 2),
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    solver: str = "sklearn",
    sweep: bool = False,
    n_masks: int = 5,
) -> ProbeReport:
    """Probe features of `layers` (concatenated) against raw pixels on a shard set: train on its train split (all
    labels, or N per class averaged over `seeds`), score on its val split. With `sweep`, also probe each layer
    alone with all labels. A BERT model's features average over `n_masks` random masks."""
    layers = check_layers(layers, model.cfg.n_layer)
    if not seeds:
        raise ConfigError("the probe needs at least one seed")
    manifest = read_manifest(shard_dir)
    if not manifest.get("label_names"):
        raise DataError(f"the probe needs labelled shards: {shard_dir} has no labels")
    palette = load_palette(Path(shard_dir) / "palette.npy")
    splits, pools = {}, None
    for split in ("train", "val"):
        loader = make_loader(shard_dir, split, batch_size, infinite=False, n_px=model.cfg.n_px)
        feats, labels, raw = features_and_pixels(model, loader, layers, device, palette, n_masks)
        keep = labels >= 0
        if not keep.any():
            raise DataError(f"the probe needs labelled shards: {shard_dir}'s {split} split has no labelled images")
        splits[split] = (feats[keep], raw[keep], labels[keep])
        if split == "train":
            pools = feats, raw
    (train_f, train_raw, train_y), (test_f, test_raw, test_y) = splits["train"], splits["val"]

    report = ProbeReport(layers=layers, n_test=len(test_y))
    fit = partial(fit_probe, solver=solver, device=device)
    for n in per_class:
        row = ProbeRow(per_class=n, features=[], raw_pixels=[])
        for seed in seeds if n is not None else seeds[:1]:
            idx = np.arange(len(train_y)) if n is None else low_label_subset(train_y, n, seed)
            # Standardised with every training image, labelled or not: see SCALING in megapixel/evaluation/linear.py.
            row.features.append(fit(train_f[idx], train_y[idx], test_f, test_y, seed=seed, scale_with=pools[0]))
            row.raw_pixels.append(fit(train_raw[idx], train_y[idx], test_raw, test_y, seed=seed, scale_with=pools[1]))
        report.rows.append(row)
    if sweep:
        report.sweep = layer_sweep(
            (train_f, train_y), (test_f, test_y), layers, model.cfg.n_embd, solver=solver, device=device
        )
    return report


# The paper's multi-layer probe concatenated 5 layers around the best one.
CONCAT_WINDOW = 5


def layer_slice(features: np.ndarray, position: int, n_embd: int) -> np.ndarray:
    """The columns of the `position`-th concatenated layer of a feature matrix."""
    return features[:, position * n_embd : (position + 1) * n_embd]


def layer_sweep(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    layers: Sequence[int],
    n_embd: int,
    *,
    solver: str = "sklearn",
    device: str = "cpu",
) -> list[ProbeResult]:
    """One probe per layer of features that hold `layers` concatenated in that order."""
    (train_x, train_y), (test_x, test_y) = train, test
    return [
        fit_probe(
            layer_slice(train_x, i, n_embd),
            train_y,
            layer_slice(test_x, i, n_embd),
            test_y,
            solver=solver,
            device=device,
        )
        for i in range(len(layers))
    ]


def concat_window(best: int, n_layer: int, width: int = CONCAT_WINDOW) -> list[int]:
    """`width` consecutive layers centred on `best` as far as the model allows."""
    width = min(width, n_layer)
    start = min(max(0, best - width // 2), n_layer - width)
    return list(range(start, start + width))


def plot_sweep(layers: Sequence[int], results: Sequence[ProbeResult], path: str | Path, title: str) -> Path:
    """A PNG of probe accuracy (test and held-out) against depth."""
    # Imported here: matplotlib takes a second to import, and only a sweep plots.
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported: no display is needed or wanted
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(layers, [100 * r.accuracy for r in results], "o-", label="test")
    held = [r.val_accuracy for r in results]
    if all(v is not None for v in held):
        ax.plot(layers, [100 * v for v in held], "s--", alpha=0.7, label="held-out (chooses the layer)")
    ax.set_xlabel("layer (block whose normed input is probed)")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.set_xticks(list(layers))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def sweep_markdown(layers: Sequence[int], results: Sequence[ProbeResult]) -> str:
    """A markdown table of the sweep: layer, test accuracy, held-out accuracy, chosen C."""
    lines = ["| layer | test accuracy | held-out accuracy | C |", "|---|---|---|---|"]
    for layer, r in zip(layers, results, strict=True):
        held = "-" if r.val_accuracy is None else f"{100 * r.val_accuracy:.1f}%"
        lines.append(f"| {layer} | {100 * r.accuracy:.1f}% | {held} | {r.C:g} |")
    return "\n".join(lines) + "\n"

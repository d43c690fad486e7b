"""The linear probe: logistic regression on a model's mid-network features, against the same on raw pixels.

Features of layer l are block l's normed attention input, mean-pooled over positions (the paper's n^l);
several layers concatenate. The probe is scikit-learn's L-BFGS logistic regression after standardising,
as the paper used for CIFAR and STL, with its L2 strength chosen on a held-out slice of the training set.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from megapixel.checkpoint import load_model
from megapixel.data.shards import read_manifest
from megapixel.data.stream import make_loader
from megapixel.errors import ConfigError, DataError
from megapixel.features import check_layers, iter_features
from megapixel.model.igpt import IGPT
from megapixel.palette import load_palette
from megapixel.sample import check_shards_palette

# Inverse L2 strengths tried when none is given: 1e-3 .. 1e2, one per decade.
C_GRID = tuple(float(c) for c in np.logspace(-3, 2, 6))
DEFAULT_C = 1.0
VALIDATION_FRACTION = 0.2
# SCALING: a few-label probe standardises with the mean and spread of every training image (labelled or not:
# they need no labels), not of its N labelled ones. Statistics of 10 images are mostly noise, and dividing by
# them magnified it: on the digits at 1 label per class, raw pixels went 39% -> 58% (measured 2026-12-02).
MAX_ITER = 1000


@dataclass
class ProbeResult:
    """One fitted probe: accuracy on the test set, the C it used, and how that C was chosen."""

    accuracy: float
    C: float
    n_train: int
    # "given", "validation" (best of C_GRID on a stratified 20% slice), or "default" (too few samples per
    # class to hold any out, so C = 1.0).
    c_choice: str = "validation"
    # False when L-BFGS stopped at MAX_ITER iterations (a usable probe, slightly short of the optimum).
    converged: bool = True
    # Accuracy of the chosen C on the held-out slice (None when C was not chosen there): what layers are
    # compared on, so that the test set picks nothing.
    val_accuracy: float | None = None


def default_probe_layers(n_layer: int) -> list[int]:
    """The middle block alone: where the paper finds the best single-layer probe (the last costs points)."""
    return [n_layer // 2]


def extract_features(
    model: IGPT, loader: Iterable[dict[str, torch.Tensor]], layers: list[int], device: str | torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, len(layers) * n_embd), labels (N,)) over one pass of a loader."""
    features, labels, _ = _pass(model, loader, layers, device, palette=None)
    return features, labels


def raw_pixel_features(tokens: np.ndarray | torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """The raw-pixel baseline: each token's palette colour, flattened to (N, n_ctx * 3) floats in [-1, 1]."""
    tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    return np.asarray(palette, dtype=np.float32)[tokens].reshape(len(tokens), -1)


def _pass(
    model: IGPT,
    loader: Iterable[dict[str, torch.Tensor]],
    layers: list[int],
    device: str | torch.device,
    palette: np.ndarray | None,
    n_masks: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Features, labels and (when a palette is given) raw pixels of every sample, in one pass."""
    feats, labels, pixels = [], [], []
    for f, y, tokens in iter_features(model, loader, layers, device, n_masks=n_masks):
        feats.append(f)
        labels.append(y)
        if palette is not None:
            pixels.append(raw_pixel_features(tokens, palette))
    if not feats:
        raise DataError("the probe got no images: the split is empty")
    raw = np.concatenate(pixels) if palette is not None else None
    return np.concatenate(feats).astype(np.float32, copy=False), np.concatenate(labels), raw


SOLVERS = ("sklearn", "torch")


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    C: float | None = None,
    seed: int = 0,
    solver: str = "sklearn",
    device: str | torch.device = "cpu",
    scale_with: np.ndarray | None = None,
) -> ProbeResult:
    """Standardise, fit L2-regularised logistic regression (C given, or chosen from C_GRID on a stratified 20%
    slice of the training set and refitted on all of it), and score it on the test set. `solver` "sklearn" is
    scikit-learn's L-BFGS; "torch" minimises the same objective with torch's full-batch L-BFGS on `device`.
    The standardisation's mean and spread come from `scale_with` (e.g. every training image, labelled or not)
    when given, else from train_x."""
    if solver not in SOLVERS:
        raise ConfigError(f"unknown probe solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if len(np.unique(train_y)) < 2:
        raise DataError("the probe needs training images of at least two classes")
    if len(test_y) == 0:
        raise DataError("the probe needs labelled test images")
    fit = _fit_sklearn if solver == "sklearn" else _torch_fitter(device)
    mean, std = standardiser(train_x if scale_with is None else scale_with)
    train_x, test_x = (np.asarray(train_x, np.float32) - mean) / std, (np.asarray(test_x, np.float32) - mean) / std
    c_choice, val_accuracy = "given", None
    # L-BFGS makes thousands of skinny (N x d) @ (d x classes) products; BLAS and OpenMP threads spend more on
    # waking each other than they save. On the 2-core CI machine one thread fitted 1438x128 features 50x
    # faster and 10000x1536 7x faster than two.
    with threadpool_limits(limits=1):
        if C is None:
            try:
                fit_x, val_x, fit_y, val_y = train_test_split(
                    train_x, train_y, test_size=VALIDATION_FRACTION, stratify=train_y, random_state=seed
                )
            except ValueError:
                # A class with a single sample, or fewer held-out slots than classes: no fair validation split.
                C, c_choice = DEFAULT_C, "default"
            else:
                scores = [fit(fit_x, fit_y, c, seed).score(val_x, val_y) for c in C_GRID]
                # Ties go to the smaller C (the stronger regulariser), which generalises at least as well.
                C, c_choice, val_accuracy = C_GRID[int(np.argmax(scores))], "validation", float(max(scores))
        final = fit(train_x, train_y, C, seed)
        accuracy = float(final.score(test_x, test_y))
    return ProbeResult(accuracy, float(C), len(train_y), c_choice, final.converged, val_accuracy)


def standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, spread) of each column; a constant column's spread is 1, so it stays at 0 and carries nothing."""
    x = np.asarray(x, dtype=np.float32)
    mean, std = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


class _Fitted:
    """A fitted probe, whichever solver made it: its accuracy on a set, and whether it converged."""

    def __init__(self, predict: Any, converged: bool) -> None:
        self.predict = predict
        self.converged = converged

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(x) == np.asarray(y)))


def _fit_sklearn(x: np.ndarray, y: np.ndarray, C: float, seed: int) -> _Fitted:
    model = LogisticRegression(C=C, max_iter=MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        # Weakly regularised fits on separable features can run to MAX_ITER; the result records it instead.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return _Fitted(model.predict, bool(model.n_iter_.max() < MAX_ITER))


def _torch_fitter(device: str | torch.device) -> Any:
    def fit(x: np.ndarray, y: np.ndarray, C: float, seed: int) -> _Fitted:
        return _fit_torch(x, y, C, seed, torch.device(device))

    return fit


def _fit_torch(x: np.ndarray, y: np.ndarray, C: float, seed: int, device: torch.device) -> _Fitted:
    """scikit-learn's objective, 0.5 |W|^2 + C * sum of cross-entropies (bias unpenalised), divided by C * N so
    its scale does not grow with N, minimised by full-batch L-BFGS on `device` (x arrives standardised)."""
    classes = np.unique(y)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    yt = torch.as_tensor(np.searchsorted(classes, y), device=device)
    torch.manual_seed(seed)
    linear = torch.nn.Linear(xt.shape[1], len(classes), device=device)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(
        linear.parameters(), max_iter=MAX_ITER, tolerance_grad=1e-6, history_size=20, line_search_fn="strong_wolfe"
    )
    penalty = 1.0 / (2.0 * C * len(yt))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xt), yt) + penalty * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    converged = optimizer.state[optimizer._params[0]]["n_iter"] < MAX_ITER

    @torch.no_grad()
    def predict(data: np.ndarray) -> np.ndarray:
        return classes[
            linear(torch.as_tensor(np.asarray(data, dtype=np.float32), device=device)).argmax(1).cpu().numpy()
        ]

    return _Fitted(predict, bool(converged))


def low_label_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` labelled samples of every class present, drawn without replacement."""
    labels = np.asarray(labels)
    if per_class < 1:
        raise ConfigError(f"labels per class must be at least 1, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise DataError(
                f"class {cls} has only {len(members)} labelled training images: ask for at most that many per class"
            )
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


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
            from megapixel.evaluate import sweep_markdown

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
        feats, labels, raw = _pass(model, loader, layers, device, palette, n_masks)
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
            # Standardised with every training image, labelled or not: see SCALING.
            row.features.append(fit(train_f[idx], train_y[idx], test_f, test_y, seed=seed, scale_with=pools[0]))
            row.raw_pixels.append(fit(train_raw[idx], train_y[idx], test_raw, test_y, seed=seed, scale_with=pools[1]))
        report.rows.append(row)
    if sweep:
        from megapixel.evaluate import layer_sweep

        report.sweep = layer_sweep(
            (train_f, train_y), (test_f, test_y), layers, model.cfg.n_embd, solver=solver, device=device
        )
    return report


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
    model, cfg, palette = load_model(ckpt, device=device)
    shard_dir = shards or cfg.data.shards
    if not shard_dir:
        raise DataError("the probe needs labelled shards: pass --shards")
    check_shards_palette(shard_dir, palette)
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
        _write_atomic(folder / "probe.md", report.to_markdown())
        _write_atomic(folder / "probe.json", json.dumps(report.to_dict(), indent=2) + "\n")
        if report.sweep is not None:
            from megapixel.evaluate import plot_sweep

            plot_sweep(report.layers, report.sweep, folder / "sweep.png", f"linear probe by depth: {Path(ckpt).name}")
    return report


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

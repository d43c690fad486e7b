"""Which labelled images an evaluation uses: N per class for the low-label protocol, and a stratified held-out
slice for early stopping.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from megapixel.errors import ConfigError, DataError


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


def held_out_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(train indices, validation indices) of the labelled images, stratified; None when a class is too small."""

    labelled = np.flatnonzero(labels >= 0)
    try:
        fit, val = train_test_split(labelled, test_size=fraction, stratify=labels[labelled], random_state=seed)
    except ValueError:
        return None
    return np.sort(fit), np.sort(val)

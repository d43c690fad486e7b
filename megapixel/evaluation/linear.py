"""Fitting a linear classifier on features: standardised L2-regularised logistic regression, its strength chosen
on a held-out slice, by scikit-learn's L-BFGS (as the paper used for CIFAR and STL) or torch's on a device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from megapixel.errors import ConfigError, DataError

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

"""Fine-tuning: the whole network plus a classification head, trained on L_gen + lambda * L_clf, early-stopped.

The head reads the mean-pooled final normed states (IGPT.clf). As in the paper: the same Adam settings as
pre-training, a constant learning rate (no cosine), early stopping on validation accuracy. The loop is a plain
single-device torch loop over token arrays held in memory (a 1.28M-image 32x32 set is 2.6 GB of uint16 tokens).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from megapixel.atomic import replacing, write_atomic
from megapixel.checkpoint.files import MODEL_STATES, MODULE_PREFIX, point_latest, tag_name
from megapixel.config import Config, to_yaml
from megapixel.data.palette import palette_hash, save_palette
from megapixel.data.stream import make_loader
from megapixel.errors import ConfigError, DataError
from megapixel.model.igpt import IGPT


@dataclass
class FinetuneSettings:
    """How to fine-tune: loss weight, optimiser, budget and early stopping."""

    # lambda in L_gen + lambda * L_clf (the paper found the sum better than L_clf alone).
    clf_weight: float = 1.0
    # The paper's best fine-tuning rates were often ~10x below pre-training's.
    lr: float = 3e-4
    # The head starts from zero and has to be learned from scratch while the pre-trained body only needs
    # nudging: its rate is lr * head_lr_scale.
    head_lr_scale: float = 10.0
    steps: int = 300
    batch_size: int = 32
    # Validation accuracy is measured every eval_every steps; training stops after `patience` evaluations
    # without a new best, and the best weights are kept.
    eval_every: int = 25
    patience: int = 4
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """ConfigError for a setting that cannot work."""
        if not self.clf_weight >= 0:
            raise ConfigError(f"the classification loss weight must be >= 0, got {self.clf_weight}")
        if not self.lr > 0:
            raise ConfigError(f"the fine-tuning learning rate must be positive, got {self.lr}")
        if not self.head_lr_scale > 0:
            raise ConfigError(f"the head's learning-rate scale must be positive, got {self.head_lr_scale}")
        for name in ("steps", "batch_size", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"fine-tuning {name} must be at least 1, got {getattr(self, name)}")


@dataclass
class FinetuneResult:
    """Test accuracy of the kept weights, and how training went."""

    accuracy: float
    n_train: int
    best_step: int
    steps_run: int
    val_accuracy: float | None
    history: list[dict[str, float]] = field(default_factory=list)


def with_classifier(model: IGPT, n_classes: int) -> IGPT:
    """A copy of `model` with a fresh zero-initialised `n_classes`-way head; every other weight is kept (a head the
    model already had is dropped, as its classes need not be these)."""
    if n_classes < 2:
        raise ConfigError(f"a classifier needs at least two classes, got {n_classes}")
    param = next(model.parameters())
    new = IGPT(dataclasses.replace(model.cfg, n_classes=n_classes)).to(device=param.device, dtype=param.dtype)
    kept = {name: t for name, t in model.state_dict().items() if not name.startswith("clf.")}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    # Only the new head starts fresh; anything else missing would mean the two models differ.
    assert set(missing) == {"clf.weight"} and not unexpected, (missing, unexpected)
    return new


def finetune_loss(
    model: IGPT, tokens: torch.Tensor, labels: torch.Tensor, clf_weight: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_gen + clf_weight * L_clf on one batch, and the parts; labels of -1 (unlabelled) add no L_clf."""
    assert model.clf is not None, "fine-tuning needs a model with a classification head (with_classifier)"
    mask = model.bert_mask(tokens.shape, tokens.device, generator) if model.cfg.objective == "bert" else None
    h = model.hidden(tokens, mask)
    per_token = model.token_nll(h, tokens)
    gen = per_token.mean() if mask is None else (per_token * mask).sum() / mask.sum().clamp(min=1)
    logits = model.clf(h.mean(dim=1)).float()
    labelled = labels >= 0
    # A sum over the labelled rows divided by their count: a batch without labels adds zero, not NaN.
    clf = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")[labelled].sum() / labelled.sum().clamp(min=1)
    return gen + clf_weight * clf, {"gen": gen, "clf": clf}


@torch.no_grad()
def classify(model: IGPT, tokens: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Predicted class of each image (no mask for BERT models), in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(tokens), batch_size):
            batch = torch.as_tensor(np.asarray(tokens[start : start + batch_size]), device=device).long()
            out.append(model(batch).clf_logits.argmax(dim=-1).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def accuracy(model: IGPT, tokens: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose predicted class is their label."""
    return float(np.mean(classify(model, tokens) == labels))


def finetune(
    model: IGPT,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    settings: FinetuneSettings,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    progress: bool = False,
) -> tuple[IGPT, FinetuneResult]:
    """Fine-tune `model` (which has a head: see with_classifier) on (tokens, labels) `train`; with `val`, stop early
    on its accuracy and keep the best weights, else train all settings.steps; score on `test`."""
    settings.check()
    tokens, labels = np.asarray(train[0]), np.asarray(train[1])
    if len(labels) == 0 or not (labels >= 0).any():
        raise DataError("fine-tuning needs labelled training images")
    device = next(model.parameters()).device
    rng = np.random.default_rng(settings.seed)
    masks = torch.Generator(device=device).manual_seed(settings.seed)
    # The head is `clf.*`, as in with_classifier.
    head = [p for name, p in model.named_parameters() if name.startswith("clf.")]
    body = [p for name, p in model.named_parameters() if not name.startswith("clf.")]
    groups = [{"params": body, "lr": settings.lr}, {"params": head, "lr": settings.lr * settings.head_lr_scale}]
    optimizer = torch.optim.AdamW(groups, betas=(settings.beta1, settings.beta2), weight_decay=0.0)
    history: list[dict[str, float]] = []
    best_acc, best_step, best_state, stale = None, 0, None, 0
    model.train()
    order, cursor, step = rng.permutation(len(labels)), 0, 0
    bar = tqdm(total=settings.steps, desc="fine-tuning", unit="step", disable=not progress)
    while step < settings.steps:
        if cursor + settings.batch_size > len(order):
            # A new epoch; a set smaller than a batch is used whole each step.
            order, cursor = rng.permutation(len(labels)), 0
        idx = order[cursor : cursor + settings.batch_size]
        cursor += len(idx)
        batch = torch.as_tensor(tokens[idx], device=device).long()
        loss, parts = finetune_loss(
            model, batch, torch.as_tensor(labels[idx], device=device), settings.clf_weight, masks
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        step += 1
        bar.update()
        if val is not None and (step % settings.eval_every == 0 or step == settings.steps):
            acc = accuracy(model, *val)
            history.append({"step": step, "gen": parts["gen"].item(), "clf": parts["clf"].item(), "val_accuracy": acc})
            bar.set_postfix(val_acc=f"{acc:.3f}")
            if best_acc is None or acc > best_acc:
                best_acc, best_step, stale = acc, step, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= settings.patience:
                    break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_step = step
    model.eval()
    result = FinetuneResult(accuracy(model, *test), int((labels >= 0).sum()), best_step, step, best_acc, history)
    return model, result


def read_split(shard_dir: str | Path, split: str, n_px: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint16 (N, n_ctx), labels int64 (N,)) of a shard split, in its fixed order."""

    tokens, labels = [], []
    for batch in make_loader(str(shard_dir), split, 256, infinite=False, n_px=n_px):
        tokens.append(batch["tokens"].numpy().astype(np.uint16))
        labels.append(batch["labels"].numpy().astype(np.int64))
    if not tokens:
        raise DataError(f"{shard_dir} has no {split} images")
    return np.concatenate(tokens), np.concatenate(labels)


def save_finetuned(model: IGPT, cfg: Config, palette: np.ndarray, run_dir: str | Path, step: int) -> Path:
    """Write the model as a run folder that load_model, `megapixel probe` and `megapixel sample` read."""
    run_dir = Path(run_dir)
    tag = run_dir / "checkpoints" / tag_name(step)
    tag.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg.model = dataclasses.replace(model.cfg)
    cfg.train.run_dir = str(run_dir)
    module = {MODULE_PREFIX + name: t.detach().cpu() for name, t in model.state_dict().items()}
    state = {"module": module, "config": cfg.to_dict(), "palette_hash": palette_hash(palette), "step": step}
    with replacing(tag / MODEL_STATES) as tmp:
        torch.save(state, tmp)
    save_palette(run_dir / "palette.npy", palette)
    write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    # `latest` moves last, as the trainer's does: a reader never finds it naming an incomplete tag.
    point_latest(run_dir / "checkpoints", tag.name)
    return run_dir


def settings_from(values: dict[str, Any]) -> FinetuneSettings:
    """FinetuneSettings from the given (non-None) values over the defaults."""
    return FinetuneSettings(**{k: v for k, v in values.items() if v is not None})

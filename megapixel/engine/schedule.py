"""The learning-rate schedule: linear warmup from 0, then cosine decay to min_lr (the paper decays to 0)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from megapixel.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer update `step` (1-based): cfg.lr at warmup_steps, min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """A LambdaLR whose factor times the optimizer's base lr (cfg.lr) follows `lr_at`."""

    # LambdaLR counts completed updates from 0; the update about to run is number completed + 1, so
    # the first update already moves the weights instead of spending a step at lr 0.
    def factor(completed: int) -> float:
        return lr_at(completed + 1, cfg) / cfg.lr

    return LambdaLR(optimizer, factor)

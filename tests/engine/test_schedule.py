"""The learning-rate schedule: linear warmup from 0 to lr, then cosine decay to min_lr at the last step."""

import math
import random

import pytest
import torch

from megapixel.config import TrainConfig
from megapixel.engine.schedule import lr_at, make_scheduler


def random_schedule() -> TrainConfig:
    lr = 10 ** random.uniform(-4, -2)
    warmup = random.randint(1, 50)
    steps = warmup + random.randint(2, 500)
    return TrainConfig(lr=lr, min_lr=lr * random.uniform(0, 0.5), warmup_steps=warmup, steps=steps)


def test_warmup_rises_linearly_from_zero_to_lr_at_warmup_steps():
    cfg = random_schedule()
    assert lr_at(0, cfg) == 0.0
    assert lr_at(cfg.warmup_steps, cfg) == pytest.approx(cfg.lr, rel=1e-12)
    rises = [lr_at(s, cfg) for s in range(cfg.warmup_steps + 1)]
    steps = [b - a for a, b in zip(rises, rises[1:], strict=False)]
    assert steps == pytest.approx([cfg.lr / cfg.warmup_steps] * cfg.warmup_steps, rel=1e-9)


def test_cosine_decays_monotonically_to_min_lr_at_the_last_step():
    cfg = random_schedule()
    decay = [lr_at(s, cfg) for s in range(cfg.warmup_steps, cfg.steps + 1)]
    assert all(b <= a for a, b in zip(decay, decay[1:], strict=False))
    assert decay[-1] == pytest.approx(cfg.min_lr, rel=1e-12, abs=1e-15)
    middle = (cfg.warmup_steps + cfg.steps) / 2
    if middle.is_integer():
        assert lr_at(int(middle), cfg) == pytest.approx((cfg.lr + cfg.min_lr) / 2, rel=1e-12)
    # Past the end the rate stays at the floor instead of rising again along the cosine.
    assert lr_at(cfg.steps + 7, cfg) == pytest.approx(cfg.min_lr, abs=1e-15)


def test_no_warmup_starts_at_full_rate():
    cfg = TrainConfig(lr=3e-3, warmup_steps=0, steps=100)
    assert lr_at(0, cfg) == cfg.lr
    assert lr_at(100, cfg) == 0.0


def test_scheduler_gives_each_update_the_rate_of_lr_at():
    cfg = random_schedule()
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg)
    used = []
    for _ in range(cfg.steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [lr_at(s, cfg) for s in range(1, cfg.steps + 1)]
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert used[0] > 0, "the first update must move the weights"
    assert math.isclose(max(used), cfg.lr, rel_tol=1e-12)

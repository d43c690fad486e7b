"""Fixtures shared by the test modules: a thread budget, the digits as shards, and a tiny-model factory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from megapixel.config import ModelConfig
from megapixel.data.sources import open_source
from megapixel.data.writer import write_shards
from megapixel.model import IGPT

# The tiny model's fields; a test overrides any of them.
TINY_MODEL = dict(n_layer=2, n_embd=32, n_head=4, n_vocab=16, n_px=4, kernels="torch")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy two-core runner threads fight."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """scikit-learn's digits as 8x8 tokens over a 16-colour palette (they have 17 grey levels), 10% held out, in
    shards of 500 images: the real data the trainer's tests run on. Shared by the whole session: tests that damage
    shards copy them first."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    write_shards(open_source("digits"), out, n_px=8, k=16, val_fraction=0.1, samples_per_shard=500, progress=False)
    return out


def make_tiny_model(**fields: object) -> IGPT:
    """A small IGPT in eval mode (TINY_MODEL's fields, overridden by `fields`) whose zero-initialised heads have
    random weights and whose norm gains are moved off one, so that every term a test checks depends on the weights
    it should (a forgotten gain or head would otherwise hide)."""
    model = IGPT(ModelConfig(**{**TINY_MODEL, **fields})).eval()
    with torch.no_grad():
        # Normed hidden states have unit RMS, so std 0.3 gives logits of std ~1.7 over 32 dims: peaked, not one-hot.
        model.head.weight.normal_(std=0.3)
        if model.clf is not None:
            model.clf.weight.normal_(std=0.3)
        for block in model.blocks:
            block.norm1.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., IGPT]:
    """The factory make_tiny_model: tiny_model(objective="bert", n_classes=3, ...)."""
    return make_tiny_model

"""Fine-tuning: the loss is L_gen + lambda * L_clf, a pretrained model gains a fresh head and keeps the rest,
training learns a class the tokens show, and the command leaves a run that the other commands read."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megapixel.checkpoint.load import load_model
from megapixel.cli import main
from megapixel.config import from_dict
from megapixel.data.sources.files import ArraySource
from megapixel.data.writer import write_shards
from megapixel.engine.loop import train
from megapixel.errors import ConfigError, DataError
from megapixel.evaluation.commands import finetune_command
from megapixel.evaluation.finetune import FinetuneSettings, finetune, finetune_loss, with_classifier

N_PX = 4
N_VOCAB = 16
MODEL = dict(n_classes=3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("clf_weight", [0.0, 0.3, 2.0])
def test_the_loss_is_the_generative_loss_plus_lambda_times_the_classification_loss(tiny_model, clf_weight):
    model = tiny_model(**MODEL)
    tokens = torch.randint(0, N_VOCAB, (6, N_PX * N_PX))
    labels = torch.randint(0, 3, (6,))
    total, parts = finetune_loss(model, tokens, labels, clf_weight)
    out = model(tokens)
    # Written out independently: mean next-token cross-entropy over every position, class cross-entropy of the
    # head on the mean-pooled final states (what forward's clf_logits are).
    gen = F.cross_entropy(out.logits.reshape(-1, N_VOCAB), tokens.reshape(-1))
    clf = F.cross_entropy(out.clf_logits, labels)
    # fp32 means over ~100 terms of order one: differences are rounding.
    torch.testing.assert_close(parts["gen"], gen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["clf"], clf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, gen + clf_weight * clf, rtol=1e-5, atol=1e-6)


def test_unlabelled_images_add_no_classification_loss(tiny_model):
    model = tiny_model(**MODEL)
    tokens = torch.randint(0, N_VOCAB, (6, N_PX * N_PX))
    labels = torch.tensor([2, -1, 0, -1, -1, 1])
    _, parts = finetune_loss(model, tokens, labels, 1.0)
    known = labels >= 0
    torch.testing.assert_close(parts["clf"], F.cross_entropy(model(tokens[known]).clf_logits, labels[known]))
    _, none = finetune_loss(model, tokens, torch.full((6,), -1), 1.0)
    assert none["clf"].item() == 0.0


def test_a_bert_model_scores_only_masked_positions(tiny_model):
    model = tiny_model(**MODEL, objective="bert")
    tokens = torch.randint(0, N_VOCAB, (4, N_PX * N_PX))
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    _, parts = finetune_loss(model, tokens, torch.randint(0, 3, (4,)), 1.0, torch.Generator().manual_seed(seed))
    mask = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(seed)) < model.cfg.bert_mask_prob
    logits = model(tokens, mask=mask).logits
    torch.testing.assert_close(parts["gen"], F.cross_entropy(logits[mask], tokens[mask]), rtol=1e-5, atol=1e-6)


def test_with_classifier_keeps_every_pretrained_weight_and_adds_a_zero_head(tiny_model):
    pretrained = tiny_model(n_classes=0)
    model = with_classifier(pretrained, 5)
    assert model.clf.weight.shape == (5, 32) and not model.clf.weight.any()
    before = pretrained.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("clf."):
            assert torch.equal(tensor, before[name]), name
    # A head of other classes is replaced, not reused; the source model is untouched.
    again = with_classifier(tiny_model(n_classes=3), 2)
    assert again.clf.weight.shape == (2, 32) and not again.clf.weight.any()
    assert pretrained.clf is None


def class_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens whose class (0 or 1) is which half of the palette the image uses: a model can learn it quickly."""
    labels = np.random.randint(0, 2, n)
    tokens = np.random.randint(0, N_VOCAB // 2, (n, N_PX * N_PX)) + labels[:, None] * (N_VOCAB // 2)
    return tokens, labels


@pytest.mark.slow
def test_fine_tuning_learns_a_class_the_tokens_show_and_keeps_the_best_weights(tiny_model):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = with_classifier(tiny_model(n_classes=0), 2)
    train_set, val_set, test_set = class_images(64), class_images(32), class_images(64)
    settings = FinetuneSettings(lr=3e-3, steps=60, batch_size=16, eval_every=10, patience=3)
    model, result = finetune(model, train_set, test_set, settings, val_set)
    # Chance is 0.5; the classes are told apart by every single token, so a fitted head is near perfect.
    assert result.accuracy > 0.9
    assert result.val_accuracy == max(h["val_accuracy"] for h in result.history)
    assert result.best_step in [h["step"] for h in result.history] and result.n_train == 64


def test_the_fresh_head_learns_head_lr_scale_times_faster_than_the_pretrained_body(tiny_model):
    model = with_classifier(tiny_model(n_classes=0), 2)
    before = {name: t.detach().clone() for name, t in model.named_parameters()}
    settings = FinetuneSettings(lr=1e-3, head_lr_scale=7.0, steps=1, batch_size=8, grad_clip=0.0)
    finetune(model, class_images(8), class_images(8), settings)
    moved = {name: (t.detach() - before[name]).abs().max().item() for name, t in model.named_parameters()}
    # Adam's first step moves every weight with a gradient by its group's rate exactly (m / sqrt(v) = +-1).
    assert moved.pop("clf.weight") == pytest.approx(7e-3, rel=1e-3)
    assert max(moved.values()) == pytest.approx(1e-3, rel=1e-3)


def test_bad_settings_and_no_labels_say_what_to_fix(tiny_model):
    model = with_classifier(tiny_model(n_classes=0), 2)
    data = class_images(8)
    with pytest.raises(ConfigError, match="learning rate"):
        finetune(model, data, data, FinetuneSettings(lr=0.0))
    with pytest.raises(ConfigError, match="head's learning-rate scale"):
        finetune(model, data, data, FinetuneSettings(head_lr_scale=0.0))
    with pytest.raises(ConfigError, match="steps"):
        finetune(model, data, data, FinetuneSettings(steps=0))
    with pytest.raises(DataError, match="labelled"):
        finetune(model, (data[0], np.full(8, -1)), data, FinetuneSettings(steps=1))
    with pytest.raises(ConfigError, match="two classes"):
        with_classifier(model, 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A real run without a head: 4x4 images whose class is the bright half, trained two steps; (run, shards)."""
    root = tmp_path_factory.mktemp("finetune_run")
    labels = np.random.randint(0, 2, 60)
    images = np.random.randint(0, 80, (60, N_PX, N_PX, 3), dtype=np.uint8)
    images[labels == 0, : N_PX // 2] += 150
    images[labels == 1, N_PX // 2 :] += 150
    np.save(root / "images.npy", images)
    np.save(root / "images_labels.npy", labels)
    shards = root / "shards"
    write_shards(ArraySource(root / "images.npy"), shards, n_px=N_PX, k=N_VOCAB, val_fraction=0.25, progress=False)
    cfg = from_dict(
        {
            "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_px": N_PX, "n_vocab": N_VOCAB},
            "data": {"shards": str(shards)},
            "train": {"run_dir": str(root / "run"), "steps": 2, "batch_size": 4, "eval_batches": 1, "progress": False},
        }
    )
    train(cfg)
    return root / "run", shards


@pytest.mark.slow
def test_finetune_command_writes_a_run_that_loads_with_its_head(run, tmp_path):
    run_dir, _ = run
    settings = FinetuneSettings(steps=6, batch_size=8, eval_every=2, lr=1e-3)
    result = finetune_command(str(run_dir), str(tmp_path / "ft"), None, None, settings, "cpu")
    assert 0.0 <= result.accuracy <= 1.0 and result.val_accuracy is not None
    model, cfg, _ = load_model(tmp_path / "ft")
    assert cfg.model.n_classes == 2 and model.clf is not None
    record = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert math.isclose(record["accuracy"], result.accuracy) and record["settings"]["steps"] == 6
    # A second fine-tune into the same folder is refused before anything is read or written.
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        finetune_command(str(run_dir), str(tmp_path / "ft"), None, None, settings, "cpu")


@pytest.mark.slow
def test_few_label_fine_tuning_trains_the_fixed_budget_on_n_per_class(run):
    run_dir, _ = run
    result = finetune_command(str(run_dir), None, None, 3, FinetuneSettings(steps=4, batch_size=8), "cpu")
    assert result.n_train == 6 and result.steps_run == 4 and result.val_accuracy is None


@pytest.mark.slow
def test_the_finetune_command_line_reports_accuracy_and_refuses_a_used_folder(run, tmp_path, capsys):
    run_dir, _ = run
    args = ["finetune", str(run_dir), "--out", str(tmp_path / "ft"), "--steps", "2", "--device", "cpu"]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1

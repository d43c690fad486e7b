"""The linear probe: features are the paper's n^l, the probe separates what is separable, reports read right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from megapixel.config import from_dict
from megapixel.data.shards.format import read_manifest
from megapixel.data.sources.files import ArraySource
from megapixel.data.writer import write_shards
from megapixel.engine.loop import train
from megapixel.errors import ConfigError, DataError
from megapixel.evaluation.commands import probe_command, report_command
from megapixel.evaluation.features import extract_features, raw_pixel_features
from megapixel.evaluation.finetune import FinetuneSettings
from megapixel.evaluation.labels import low_label_subset
from megapixel.evaluation.linear import C_GRID, ProbeResult, fit_probe
from megapixel.evaluation.probe import ProbeReport, ProbeRow, concat_window, default_probe_layers, probe

N_PX = 4
N_VOCAB = 16
MODEL = dict(n_layer=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(n_batches: int = 3, batch: int = 5) -> list[dict[str, torch.Tensor]]:
    """What make_loader yields: token batches (the last one short) and labels, some unlabelled (-1)."""
    out = []
    for i in range(n_batches):
        b = batch - (i == n_batches - 1)
        out.append({"tokens": torch.randint(0, N_VOCAB, (b, N_PX * N_PX)), "labels": torch.randint(-1, 3, (b,))})
    return out


def test_features_concatenate_the_chosen_layers_in_order(tiny_model):
    model = tiny_model(**MODEL)
    loader = batches()
    feats, labels = extract_features(model, loader, [2, 0], "cpu")
    n = sum(len(b["labels"]) for b in loader)
    assert feats.shape == (n, 2 * 32) and feats.dtype == np.float32
    assert np.array_equal(labels, torch.cat([b["labels"] for b in loader]).numpy())
    two, _ = extract_features(model, loader, [2], "cpu")
    zero, _ = extract_features(model, loader, [0], "cpu")
    assert np.array_equal(feats, np.concatenate([two, zero], axis=1))


def test_features_are_the_mean_pooled_normed_attention_input_of_each_block(tiny_model):
    model = tiny_model(**MODEL)
    loader = batches(n_batches=1, batch=4)
    tokens = loader[0]["tokens"]
    feats, _ = extract_features(model, loader, [1], "cpu")
    with torch.no_grad():
        # The AR input: SOS then the tokens shifted right, plus positions; then blocks 0 and 1.
        h = torch.cat([model.sos.expand(len(tokens), 1, -1), model.wte(tokens[:, :-1])], dim=1) + model.wpe.weight
        h = model.blocks[0](h)
        x = model.blocks[1].norm1.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        expected = x.mean(dim=1).numpy()
    # fp32 through one block: differences are rounding, a few ulps of values of order one.
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)


def test_a_layer_the_model_does_not_have_is_a_config_error(tiny_model):
    with pytest.raises(ConfigError, match=r"layer 3 is out of range: the model has blocks 0\.\.2"):
        extract_features(tiny_model(**MODEL), batches(), [0, 3], "cpu")


def test_default_probe_layers_is_the_middle_block():
    assert default_probe_layers(24) == [12]
    assert default_probe_layers(4) == [2]
    assert default_probe_layers(1) == [0]


def test_raw_pixel_features_are_the_palette_colours_flattened():
    palette = np.random.uniform(-1, 1, (N_VOCAB, 3)).astype(np.float32)
    tokens = torch.randint(0, N_VOCAB, (6, N_PX * N_PX))
    raw = raw_pixel_features(tokens, palette)
    assert raw.shape == (6, N_PX * N_PX * 3)
    assert np.array_equal(raw[2, 3 * 5 : 3 * 6], palette[tokens[2, 5]])
    assert raw.min() >= -1 and raw.max() <= 1


def separable(n_per_class: int, n_classes: int = 3, dim: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters with centres 10 standard deviations apart: linearly separable in practice."""
    rng = np.random.default_rng()
    centres = rng.normal(size=(n_classes, dim)) * 10
    y = np.repeat(np.arange(n_classes), n_per_class)
    return centres[y] + rng.normal(size=(len(y), dim)), y


def test_the_probe_separates_separable_features():
    x, y = separable(60)
    order = np.random.permutation(len(y))
    train, test = order[:120], order[120:]
    result = fit_probe(x[train], y[train], x[test], y[test])
    assert result.accuracy == 1.0
    assert result.n_train == 120
    assert result.C in C_GRID and result.c_choice == "validation"


def test_the_probe_is_at_chance_on_random_labels():
    rng = np.random.default_rng()
    x, tx = rng.normal(size=(400, 10)), rng.normal(size=(400, 10))
    y, ty = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    result = fit_probe(x, y, tx, ty)
    # Chance is 0.5; the accuracy over 400 test points has std 0.025, so 0.35..0.65 is six sigma.
    assert 0.35 < result.accuracy < 0.65


def test_a_given_C_is_used_and_too_few_samples_fall_back_to_the_default():
    x, y = separable(5)
    given = fit_probe(x, y, x, y, C=0.5)
    assert (given.C, given.c_choice) == (0.5, "given")
    one_each_x, one_each_y = x[::5], y[::5]
    fallback = fit_probe(one_each_x, one_each_y, x, y)
    assert (fallback.C, fallback.c_choice) == (1.0, "default")


def test_the_probe_standardises_with_the_statistics_of_scale_with_when_given_else_of_its_training_set():
    # Written out with scikit-learn: standardise, then logistic regression at the given C. Overlapping clusters
    # on offset, unevenly scaled axes, so the choice of statistics moves the boundary.
    rng = np.random.default_rng(0)
    y_all = rng.integers(0, 3, 600)
    x_all = (rng.normal(size=(3, 8))[y_all] + rng.normal(size=(600, 8))) * rng.uniform(0.1, 10, 8) + 3
    few = low_label_subset(y_all[:400], 2, seed=0)
    x, y, tx, ty = x_all[few], y_all[few], x_all[400:], y_all[400:]

    def by_hand(stats: np.ndarray) -> float:
        mean, std = stats.mean(0), stats.std(0)
        fitted = LogisticRegression(C=1.0, max_iter=1000).fit((x - mean) / std, y)
        return float(fitted.score((tx - mean) / std, ty))

    pool = x_all[:400]
    assert fit_probe(x, y, tx, ty, C=1.0, scale_with=pool).accuracy == pytest.approx(by_hand(pool), abs=1 / 200)
    assert fit_probe(x, y, tx, ty, C=1.0).accuracy == pytest.approx(by_hand(x), abs=1 / 200)


def test_the_probe_needs_two_classes():
    x, y = separable(5)
    with pytest.raises(DataError, match="two classes"):
        fit_probe(x[y == 0], y[y == 0], x, y)


def test_low_label_subset_takes_exactly_n_labelled_samples_per_class():
    labels = np.random.randint(-1, 4, 500)
    idx = low_label_subset(labels, 7, seed=3)
    assert len(idx) == 4 * 7 and len(np.unique(idx)) == len(idx)
    assert np.bincount(labels[idx], minlength=4).tolist() == [7, 7, 7, 7]
    assert np.array_equal(idx, low_label_subset(labels, 7, seed=3))
    assert not np.array_equal(idx, low_label_subset(labels, 7, seed=4))


def test_low_label_subset_says_when_a_class_is_too_small():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(DataError, match="class 1 has only 3"):
        low_label_subset(labels, 5, seed=0)


def test_report_markdown_shows_both_accuracies():
    row_all = ProbeRow(None, features=[ProbeResult(0.875, 1.0, 1000)], raw_pixels=[ProbeResult(0.412, 0.1, 1000)])
    row_few = ProbeRow(
        10,
        features=[ProbeResult(a, 1.0, 30) for a in (0.6, 0.7, 0.8)],
        raw_pixels=[ProbeResult(a, 1.0, 30) for a in (0.3, 0.3, 0.3)],
    )
    report = ProbeReport(layers=[1, 2], n_test=200, rows=[row_all, row_few])
    text = report.to_markdown()
    assert "| raw pixels | features (layers 1, 2) |" in text
    assert "| all labels (1,000) | 41.2% | 87.5% |" in text
    assert "| 10 per class (30, 3 seeds) | 30.0 ± 0.0% | 70.0 ± 8.2% |" in text
    data = report.to_dict()
    assert data["rows"][1]["features"]["mean"] == pytest.approx(0.7)
    assert data["rows"][0]["raw_pixels"]["runs"][0]["accuracy"] == 0.412


def write_image_shards(root: Path, n: int = 80, labelled: bool = True) -> Path:
    """A shard set of 4x4 images whose class (0 or 1) is which half is bright: raw pixels separate them."""
    labels = np.random.randint(0, 2, n)
    images = np.random.randint(0, 80, (n, N_PX, N_PX, 3), dtype=np.uint8)
    images[labels == 0, : N_PX // 2] += 150
    images[labels == 1, N_PX // 2 :] += 150
    np.save(root / "images.npy", images)
    if labelled:
        np.save(root / "images_labels.npy", labels)
    shards = root / "shards"
    write_shards(ArraySource(root / "images.npy"), shards, n_px=N_PX, k=N_VOCAB, val_fraction=0.25, progress=False)
    return shards


def test_probe_scores_features_and_raw_pixels_on_the_val_split(tiny_model, tmp_path):
    shards = write_image_shards(tmp_path)
    report = probe(tiny_model(**MODEL), shards, [1, 2], per_class=[None, 5], seeds=(0, 1), batch_size=16)
    assert report.n_test == read_manifest(shards)["splits"]["val"]["count"]
    full, few = report.rows
    assert full.per_class is None and len(full.features) == 1 and full.features[0].n_train == 60
    assert few.per_class == 5 and [r.n_train for r in few.features] == [10, 10]
    # Bright top against bright bottom is linearly separable in pixels: all labels classify the val images.
    assert full.raw_pixels[0].accuracy == 1.0
    assert "features (layers 1, 2)" in report.to_markdown()


def test_probe_refuses_shards_without_labels(tiny_model, tmp_path):
    shards = write_image_shards(tmp_path, labelled=False)
    with pytest.raises(DataError, match="the probe needs labelled shards"):
        probe(tiny_model(**MODEL), shards, [0])


def test_probe_command_writes_probe_md_and_json_and_nothing_for_a_bad_layer(tmp_path):
    shards = write_image_shards(tmp_path)
    cfg = from_dict(
        {
            "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_px": N_PX, "n_vocab": N_VOCAB},
            "data": {"shards": str(shards)},
            "train": {"run_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 4, "progress": False},
        }
    )
    train(cfg)
    with pytest.raises(ConfigError, match=r"layer 2 is out of range: the model has blocks 0\.\.1"):
        probe_command(str(tmp_path / "run"), [2], None, str(tmp_path / "report"), [None], "cpu")
    assert not (tmp_path / "report").exists()
    report = probe_command(str(tmp_path / "run"), None, None, str(tmp_path / "report"), [None, 5], "cpu")
    assert report.layers == [1]
    assert (tmp_path / "report" / "probe.md").read_text() == report.to_markdown()
    assert json.loads((tmp_path / "report" / "probe.json").read_text()) == report.to_dict()
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["probe.json", "probe.md"]


def test_the_torch_solver_separates_separable_features_and_agrees_with_scikit_learn():
    x, y = separable(60)
    order = np.random.permutation(len(y))
    train, test = order[:120], order[120:]
    result = fit_probe(x[train], y[train], x[test], y[test], solver="torch")
    assert result.accuracy == 1.0 and result.C in C_GRID and result.val_accuracy == 1.0
    # Overlapping clusters: both solvers minimise the same convex objective at the same C, so they classify the
    # same points; a few test points sitting on the boundary may fall either way.
    rng = np.random.default_rng()
    centres = rng.normal(size=(3, 10))
    labels = rng.integers(0, 3, 600)
    points = centres[labels] + rng.normal(size=(600, 10))
    kwargs = dict(C=0.1)
    a = fit_probe(points[:400], labels[:400], points[400:], labels[400:], solver="torch", **kwargs)
    b = fit_probe(points[:400], labels[:400], points[400:], labels[400:], solver="sklearn", **kwargs)
    assert abs(a.accuracy - b.accuracy) <= 0.02


def test_an_unknown_solver_is_a_config_error():
    x, y = separable(5)
    with pytest.raises(ConfigError, match="unknown probe solver"):
        fit_probe(x, y, x, y, solver="sgd")


def test_concat_window_is_five_layers_around_the_best_within_the_model():
    assert concat_window(12, 24) == [10, 11, 12, 13, 14]
    assert concat_window(0, 24) == [0, 1, 2, 3, 4]
    assert concat_window(23, 24) == [19, 20, 21, 22, 23]
    assert concat_window(2, 4) == [0, 1, 2, 3]


def test_probe_command_sweep_writes_one_result_per_layer_and_a_plot(tmp_path):
    shards = write_image_shards(tmp_path)
    cfg = from_dict(
        {
            "model": {"n_layer": 3, "n_embd": 32, "n_head": 2, "n_px": N_PX, "n_vocab": N_VOCAB},
            "data": {"shards": str(shards)},
            "train": {"run_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 4, "progress": False},
        }
    )
    train(cfg)
    report = probe_command(str(tmp_path / "run"), None, None, str(tmp_path / "out"), [None], "cpu", sweep=True)
    assert report.layers == [0, 1, 2] and len(report.sweep) == 3
    assert "| layer | test accuracy | held-out accuracy | C |" in report.to_markdown()
    assert len(json.loads((tmp_path / "out" / "probe.json").read_text())["sweep"]) == 3
    with Image.open(tmp_path / "out" / "sweep.png") as image:
        assert image.format == "PNG" and image.size[0] > 100


@pytest.mark.slow
def test_the_report_compares_raw_pixels_layers_and_fine_tuning_for_each_labelling(tmp_path):
    shards = write_image_shards(tmp_path, n=100)
    cfg = from_dict(
        {
            "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_px": N_PX, "n_vocab": N_VOCAB},
            "data": {"shards": str(shards)},
            "train": {"run_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 4, "progress": False},
        }
    )
    train(cfg)
    settings = FinetuneSettings(steps=4, batch_size=8, eval_every=2)
    report = report_command(
        str(tmp_path / "run"),
        str(tmp_path / "report"),
        None,
        per_class=[None, 2],
        seeds=(0, 1),
        finetune_settings=settings,
        few_label_finetune_steps=3,
        progress=False,
    )
    full, few = report.rows
    assert [len(full.raw_pixels), len(full.best_layer), len(full.concatenated), len(full.finetuned)] == [1, 1, 1, 1]
    assert [len(few.raw_pixels), len(few.best_layer), len(few.concatenated), len(few.finetuned)] == [2, 2, 2, 1]
    assert few.finetuned[0].steps_run == 3 and few.finetuned[0].n_train == 4
    # The best layer is the one the held-out slice prefers, never the test set.
    assert report.best_layer == int(np.argmax([r.val_accuracy for r in report.sweep]))
    assert report.concat_layers == [0, 1]
    text = (tmp_path / "report" / "report.md").read_text()
    assert text == report.to_markdown()
    assert f"| labelling | raw pixels | best layer ({report.best_layer}) | layers 0, 1 | fine-tuned |" in text
    assert "| 2 per class (4, 2 seeds) |" in text
    # The footnote says the budgets each row ran, and the new head's own rate.
    assert "with all labels at most 4 steps" in text and "with few labels a fixed 3 steps" in text
    assert f"(the new head {settings.lr * settings.head_lr_scale:g})" in text
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.json", "report.md", "sweep.png"]

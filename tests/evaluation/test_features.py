"""Feature extraction: the chosen layers in the order asked, the same in memory and on disk, BERT masks averaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megapixel.data.shards.format import read_manifest
from megapixel.data.sources.files import ArraySource
from megapixel.data.writer import write_shards
from megapixel.errors import ConfigError, DataError
from megapixel.evaluation.features import (
    batch_features,
    extract_to_disk,
    load_features,
    masked_features,
    split_features,
)

N_PX = 4
N_VOCAB = 8
MODEL = dict(n_layer=3, n_embd=16, n_head=2, n_vocab=N_VOCAB)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """37 labelled random 4x4 images over an 8-colour palette, about a quarter held out."""
    root = tmp_path_factory.mktemp("features")
    np.save(root / "images.npy", np.random.randint(0, 256, (37, N_PX, N_PX, 3), dtype=np.uint8))
    np.save(root / "images_labels.npy", np.random.randint(0, 3, 37))
    write_shards(
        ArraySource(root / "images.npy"), root / "shards", n_px=N_PX, k=N_VOCAB, val_fraction=0.25, progress=False
    )
    return root / "shards"


def test_split_features_have_one_row_per_image_and_the_layers_in_the_order_asked(tiny_model, shards):
    model = tiny_model(**MODEL)
    feats, labels, tokens = split_features(model, shards, "train", [2, 0], batch_size=8)
    count = read_manifest(shards)["splits"]["train"]["count"]
    assert feats.shape == (count, 2 * 16) and feats.dtype == np.float32
    assert labels.shape == (count,) and tokens.shape == (count, N_PX * N_PX)
    two, _, _ = split_features(model, shards, "train", [2], batch_size=5)
    zero, _, _ = split_features(model, shards, "train", [0], batch_size=5)
    # The same images in the same order whatever the batch size; block 2's columns first, then block 0's.
    np.testing.assert_array_equal(feats, np.concatenate([two, zero], axis=1))
    np.testing.assert_array_equal(feats, model.features(torch.as_tensor(tokens).long(), [2, 0]).numpy())


def test_features_on_disk_equal_those_in_memory(tiny_model, shards, tmp_path):
    model = tiny_model(**MODEL)
    out = extract_to_disk(model, shards, "val", [1, 2], tmp_path / "val", batch_size=4, progress=False)
    feats, labels, meta = load_features(out)
    expected, expected_labels, _ = split_features(model, shards, "val", [1, 2])
    assert isinstance(feats, np.memmap)
    np.testing.assert_array_equal(feats, expected)
    np.testing.assert_array_equal(labels, expected_labels)
    assert meta["layers"] == [1, 2] and meta["count"] == len(expected) and meta["split"] == "val"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]


def test_extraction_refuses_an_existing_folder_and_a_missing_layer_without_writing(tiny_model, shards, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists"):
        extract_to_disk(tiny_model(**MODEL), shards, "val", [0], tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match=r"layer 3 is out of range: the model has blocks 0\.\.2"):
        extract_to_disk(tiny_model(**MODEL), shards, "val", [0, 3], tmp_path / "new", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_bert_model_without_masked_positions_gives_the_unmasked_features(tiny_model):
    model = tiny_model(**MODEL, objective="bert")
    tokens = torch.randint(0, N_VOCAB, (5, N_PX * N_PX))
    nothing = torch.zeros(tokens.shape, dtype=torch.bool)
    np.testing.assert_array_equal(masked_features(model, tokens, [1, 0], nothing), model.features(tokens, [1, 0]))


def test_bert_features_average_over_the_random_masks(tiny_model):
    model = tiny_model(**MODEL, objective="bert")
    tokens = torch.randint(0, N_VOCAB, (6, N_PX * N_PX))
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    got = batch_features(model, tokens, [2, 1], n_masks=3, generator=torch.Generator().manual_seed(seed))
    # The same draws by hand: three masks in turn from one generator, each position masked with p = 0.15.
    generator = torch.Generator().manual_seed(seed)
    masks = [torch.rand(tokens.shape, generator=generator) < model.cfg.bert_mask_prob for _ in range(3)]
    expected = torch.stack([masked_features(model, tokens, [2, 1], m) for m in masks]).mean(0)
    # fp32 sums of three values of order one: rounding differences of a few ulps.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # 96 positions with p = 0.15: an empty mask has probability 1.7e-7, so a mask changes the features.
    assert not torch.allclose(got, model.features(tokens, [2, 1]))


def test_an_ar_model_needs_no_mask(tiny_model):
    model = tiny_model(**MODEL)
    tokens = torch.randint(0, N_VOCAB, (3, N_PX * N_PX))
    assert torch.equal(batch_features(model, tokens, [0, 2], n_masks=4), model.features(tokens, [0, 2]))

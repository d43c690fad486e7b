"""Streaming shards: coverage across ranks and workers, shuffling, flips, evaluation passes, resume."""

import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from megapixel.data.shards import write_shards
from megapixel.data.sources import open_source
from megapixel.data.stream import make_loader
from megapixel.errors import DataError

N_PX = 4
N_SAMPLES = 40  # 36 train (6 shards of 6) + 4 val


def make_shard_set(folder, samples_per_shard: int) -> None:
    """Images in the palette's own colours whose first token is the sample's index, so batches name their samples."""
    rng = np.random.default_rng()
    codes = rng.choice(256**3, 64, replace=False)
    colours = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1).astype(np.uint8)
    tokens = rng.integers(0, 64, (N_SAMPLES, N_PX, N_PX))
    tokens[:, 0, 0] = np.arange(N_SAMPLES)
    folder.mkdir()
    np.save(folder / "images.npy", colours[tokens])
    np.save(folder / "images_labels.npy", np.arange(N_SAMPLES) % 3)
    palette = (colours / 127.5 - 1).astype(np.float32)
    source = open_source(str(folder / "images.npy"))
    write_shards(source, folder / "shards", N_PX, palette=palette, samples_per_shard=samples_per_shard, progress=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("stream") / "six"
    make_shard_set(folder, samples_per_shard=6)
    return str(folder / "shards")


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("stream") / "one"
    make_shard_set(folder, samples_per_shard=100)
    return str(folder / "shards")


def split_ids(shard_dir: str, split: str) -> list[int]:
    ids = []
    for path in sorted(Path(shard_dir).glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            ids += [int(name.split(".")[0]) for name in tar.getnames() if name.endswith(".tok")]
    return sorted(ids)


def ids(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch["tokens"][:, 0]]


def epochs(loader, count: int) -> list[list[int]]:
    """The sample ids of the first `count` epochs of an infinite loader, told apart by its position."""
    out: list[list[int]] = [[] for _ in range(count)]
    for batch in loader:
        epoch = loader.state_dict()["epoch"]  # the position includes the batch just handed out
        if epoch == count:
            return out
        out[epoch] += ids([batch])
    raise AssertionError("an infinite loader ended")


def test_batches_are_long_tokens_and_labels_of_the_requested_size(shards):
    batch = next(iter(make_loader(shards, "train", 5, n_px=N_PX)))
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (5, N_PX * N_PX)
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (5,)
    assert torch.equal(batch["labels"], batch["tokens"][:, 0] % 3)  # the labels belong to their images


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shard_set", ["shards", "one_shard"])
def test_an_evaluation_pass_over_two_ranks_covers_every_sample_once(request, shard_set, num_workers):
    shard_dir = request.getfixturevalue(shard_set)
    seen = []
    for rank in range(2):
        loader = make_loader(shard_dir, "train", 4, rank=rank, world_size=2, num_workers=num_workers, infinite=False)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen += ids(batches)
    assert sorted(seen) == split_ids(shard_dir, "train")


@pytest.mark.parametrize("shard_set", ["shards", "one_shard"])
def test_a_training_epoch_over_two_ranks_covers_every_sample_once(request, shard_set):
    shard_dir = request.getfixturevalue(shard_set)
    # Batches of one: no partial batch is dropped, so the epoch is the whole split.
    seen = []
    for rank in range(2):
        seen += epochs(make_loader(shard_dir, "train", 1, rank=rank, world_size=2, shuffle_buffer=8), 1)[0]
    assert sorted(seen) == split_ids(shard_dir, "train")


def test_training_reshuffles_every_epoch_and_the_seed_fixes_the_order(shards):
    epoch0, epoch1 = epochs(make_loader(shards, "train", 1, shuffle_buffer=8), 2)
    again = epochs(make_loader(shards, "train", 1, shuffle_buffer=8), 1)[0]
    other_seed = epochs(make_loader(shards, "train", 1, shuffle_buffer=8, seed=1), 1)[0]
    assert sorted(epoch0) == sorted(epoch1) == split_ids(shards, "train")
    assert again == epoch0
    assert epoch1 != epoch0 and other_seed != epoch0


def test_training_batches_are_always_full(shards):
    loader = make_loader(shards, "train", 5, num_workers=2)
    assert all(len(batch["labels"]) == 5 for batch in islice(loader, 30))


def test_an_evaluation_pass_keeps_the_last_partial_batch_and_repeats_identically(shards):
    loader = make_loader(shards, "val", 3, infinite=False)
    first, again = list(loader), list(loader)
    assert [len(b["labels"]) for b in first] == [3, 1] and len(loader) == 2
    assert ids(first) == ids(again) == split_ids(shards, "val")


def test_flip_reverses_the_rows_of_about_half_the_images(shards):
    plain = torch.cat([b["tokens"] for b in make_loader(shards, "train", 6, infinite=False)])
    flipped = torch.cat([b["tokens"] for b in make_loader(shards, "train", 6, infinite=False, flip=True)])
    grid, flipped_grid = plain.view(-1, N_PX, N_PX), flipped.view(-1, N_PX, N_PX)
    is_flipped = (flipped_grid == grid.flip(-1)).all(dim=(1, 2))
    assert ((flipped_grid == grid).all(dim=(1, 2)) | is_flipped).all()
    # 36 fair coins: fewer than 6 or more than 30 heads has probability ~1e-5.
    assert 6 <= int(is_flipped.sum()) <= 30


# With 4 workers the 6 shards split 2, 2, 1, 1: two workers finish early, and a resume must skip them too.
@pytest.mark.parametrize("num_workers", [0, 2, 4])
@pytest.mark.parametrize("stop_after", [3, 6, 10])  # in the first epoch (8 or 9 batches of 4), and in the second
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")  # more than this CI's 2 cores
def test_a_restored_loader_continues_with_the_same_batches(shards, num_workers, stop_after):
    def loader():
        return make_loader(shards, "train", 4, num_workers=num_workers, shuffle_buffer=8, flip=True, seed=5)

    uninterrupted = list(islice(loader(), stop_after + 12))
    stopped = loader()
    it = iter(stopped)
    for _ in range(stop_after):
        next(it)
    state = stopped.state_dict()
    restored = loader()
    restored.load_state_dict(state)
    following = list(islice(restored, 12))
    for want, got in zip(uninterrupted[stop_after:], following, strict=True):
        assert torch.equal(want["tokens"], got["tokens"]) and torch.equal(want["labels"], got["labels"])


def test_a_restored_loader_on_another_layout_resumes_the_same_epoch(shards):
    loader = make_loader(shards, "train", 4)
    list(islice(loader, 12))
    state = loader.state_dict()
    other = make_loader(shards, "train", 2, rank=1, world_size=2)
    with pytest.warns(UserWarning, match="another layout"):
        other.load_state_dict(state)
    assert other.state_dict()["epoch"] == state["epoch"] and other.state_dict()["batches"] == state["batches"]


def test_a_batch_larger_than_a_ranks_epoch_is_refused(shards):
    with pytest.raises(DataError, match="no full batch of 64"):
        next(iter(make_loader(shards, "train", 64)))


def test_loader_arguments_are_checked_against_the_shard_set(shards, tmp_path):
    with pytest.raises(DataError, match="holds 4x4 images but the model expects 32x32"):
        make_loader(shards, "train", 4, n_px=32)
    with pytest.raises(DataError, match="unknown split 'test'"):
        make_loader(shards, "test", 4)
    with pytest.raises(DataError, match="rank 2 of 2"):
        make_loader(shards, "train", 4, rank=2, world_size=2)
    with pytest.raises(DataError, match="no shard set"):
        make_loader(str(tmp_path / "missing"), "train", 4)


def test_an_empty_split_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng().integers(0, 256, (4, 2, 2, 3), dtype=np.uint8))
    write_shards(open_source(str(tmp_path / "x.npy")), tmp_path / "s", 2, k=4, val_fraction=0, progress=False)
    with pytest.raises(DataError, match="no val samples"):
        make_loader(str(tmp_path / "s"), "val", 2, infinite=False)

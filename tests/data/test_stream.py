"""Streaming shards: coverage across ranks and workers, shuffling, flips, downsampling, evaluation passes, resume."""

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from megapixel.data.palette import decode_tokens, encode_pixels, load_palette
from megapixel.data.shards.format import open_shard
from megapixel.data.sources import open_source
from megapixel.data.stream import PREPARED_AHEAD, _Reader, make_loader
from megapixel.data.writer import write_shards
from megapixel.errors import CheckpointError, DataError

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
        ids += open_shard(path, N_PX)[0][:, 0].tolist()
    return sorted(ids)


def ids(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch["tokens"][:, 0]]


def epochs(loader, count: int) -> list[list[int]]:
    """The sample ids of the first `count` epochs of an infinite loader, told apart by its position."""
    out: list[list[int]] = [[] for _ in range(count)]
    before = loader.state_dict()
    for batch in loader:
        # Batches of one never straddle epochs: the position before the batch tells its epoch.
        epoch = before["consumed"] // before["samples"]
        if epoch == count:
            return out
        out[epoch] += ids([batch])
        before = loader.state_dict()
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


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_after", [3, 10])  # in the first epoch (9 batches of 4), and in the second
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


def test_two_ranks_of_two_workers_yield_every_sample_exactly_once_per_epoch(shards):
    # 36 training samples, 2 ranks x batch 3: six steps make one epoch, twelve make two.
    seen: list[list[int]] = [[], []]
    for rank in range(2):
        loader = make_loader(shards, "train", 3, rank=rank, world_size=2, num_workers=2, shuffle_buffer=8)
        batches = list(islice(loader, 12))
        seen[0] += ids(batches[:6])
        seen[1] += ids(batches[6:])
        assert loader.state_dict()["consumed"] == 72
    assert sorted(seen[0]) == sorted(seen[1]) == split_ids(shards, "train")
    assert seen[0] != seen[1]


@pytest.mark.parametrize("ranks, batch, workers", [(1, 4, 0), (4, 2, 2), (2, 2, 1)])
def test_a_stream_stopped_mid_epoch_resumes_with_exactly_the_rest_on_any_layout(shards, ranks, batch, workers):
    # Two ranks of batch 2 with two workers each stop after 5 steps: 20 of the epoch's 36 samples consumed.
    first = [make_loader(shards, "train", 2, rank=r, world_size=2, num_workers=2, seed=7) for r in range(2)]
    consumed = [i for loader in first for i in ids(islice(loader, 5))]
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["consumed"] == 20

    rest = []
    for rank in range(ranks):
        loader = make_loader(shards, "train", batch, rank=rank, world_size=ranks, num_workers=workers, seed=7)
        loader.load_state_dict(state)
        rest += ids(islice(loader, 16 // (ranks * batch)))  # every layout here divides the 16 left
    assert sorted(consumed + rest) == split_ids(shards, "train")


def test_a_batch_larger_than_the_split_straddles_epochs_without_losing_samples(shards):
    loader = make_loader(shards, "train", 64, shuffle_buffer=8)
    first, second = islice(loader, 2)
    order = ids([first, second])
    assert sorted(order[:36]) == sorted(order[36:72]) == split_ids(shards, "train")


def test_downsampling_through_the_palette_averages_each_block_and_re_encodes(shards):
    full = next(iter(make_loader(shards, "val", 4, infinite=False)))["tokens"].numpy()
    half = next(iter(make_loader(shards, "val", 4, infinite=False, n_px=N_PX // 2, downsample=True)))
    half = half["tokens"].numpy()
    palette = load_palette(Path(shards) / "palette.npy")
    rgb = decode_tokens(full, palette).reshape(-1, 2, 2, 2, 2, 3).astype(np.float64)
    expected = encode_pixels(np.rint(rgb.mean(axis=(2, 4))).astype(np.uint8), palette).reshape(-1, 4)
    np.testing.assert_array_equal(half, expected)


def test_a_position_from_another_shard_set_is_refused_and_an_old_one_warns(shards):
    loader = make_loader(shards, "train", 4)
    with pytest.raises(CheckpointError, match="split of 99 samples"):
        loader.load_state_dict({**loader.state_dict(), "samples": 99})
    old = {"epoch": 2, "batches": 3, "worker_batches": [3], "next_worker": 0, "batch_size": 4, "world_size": 1}
    with pytest.warns(UserWarning, match="earlier megapixel"):
        loader.load_state_dict(old)
    assert loader.state_dict()["consumed"] == 2 * 36 + 12


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_truncated_shard_is_named_in_one_line_when_streamed(tmp_path, num_workers):
    make_shard_set(tmp_path / "set", samples_per_shard=6)
    path = tmp_path / "set" / "shards" / "train-000002.tar"
    path.write_bytes(path.read_bytes()[:600])
    loader = make_loader(str(tmp_path / "set" / "shards"), "train", 6, infinite=False, num_workers=num_workers)
    with pytest.raises(DataError, match="train-000002.tar is truncated") as error:
        list(loader)
    assert "\n" not in str(error.value)  # not wrapped in a data-loader worker's traceback


def test_a_lower_model_resolution_is_refused_unless_downsampling_is_asked_for(shards):
    with pytest.raises(DataError, match="holds 4x4 images but the model expects 2x2: set data.downsample=true"):
        make_loader(shards, "train", 4, n_px=2)
    assert next(iter(make_loader(shards, "train", 4, n_px=2, downsample=True)))["tokens"].shape == (4, 4)
    with pytest.raises(DataError, match="cannot be downsampled to the model's 3x3"):
        make_loader(shards, "train", 4, n_px=3, downsample=True)


def test_a_shard_with_a_token_outside_the_palette_is_named_when_streamed(tmp_path):
    make_shard_set(tmp_path / "set", samples_per_shard=6)
    path = tmp_path / "set" / "shards" / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[512 + 2 * 5 : 512 + 2 * 6] = b"\xff\xff"  # token 5 of the first image (the data follows a 512-byte header)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-000001.tar holds token 65535, outside the 64-colour palette"):
        list(make_loader(str(tmp_path / "set" / "shards"), "train", 6, infinite=False))


def test_loader_arguments_are_checked_against_the_shard_set(shards, tmp_path):
    with pytest.raises(DataError, match="holds 4x4 images but the model expects 32x32: set model.n_px=4"):
        make_loader(shards, "train", 4, n_px=32)
    with pytest.raises(DataError, match="holds 4x4 images but the model expects 3x3: set model.n_px=4"):
        make_loader(shards, "train", 4, n_px=3)
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


def test_a_reader_holds_only_the_shards_around_its_position(shards):
    # Six shards of six and a shuffle window of six: a batch of four needs at most two shards.
    plan = make_loader(shards, "train", 4, shuffle_buffer=6).plan
    reader = _Reader(plan)
    held, opened = [], set()
    for start in range(0, 3 * plan.samples, 4):  # three epochs
        reader.batch(start, start + 4)
        opened |= set(reader.shards)
        reader.prepare(start + 4, start + 8)
        held.append(len(reader.shards))
    reader.close()
    assert opened == set(range(6)) and max(held) <= 2 + PREPARED_AHEAD < 6

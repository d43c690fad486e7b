"""Writing shard sets (tokens, labels, palette, manifest) and checking them when read."""

import hashlib
import json
import tarfile

import numpy as np
import pytest

from megapixel.data.shards import read_manifest, write_shards
from megapixel.data.sources import open_source, resize_image
from megapixel.errors import DataError
from megapixel.palette import encode_pixels, load_palette, palette_hash, save_palette


def make_npy_source(folder, n: int, size: int = 6, labelled: bool = True, grey_levels: int = 0):
    """An .npy source of n random images (grey with only `grey_levels` levels when given), labels 0-2."""
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    if grey_levels:
        images[:] = (rng.integers(0, grey_levels, (n, size, size, 1)) * 50).astype(np.uint8)
    np.save(folder / "images.npy", images)
    if labelled:
        np.save(folder / "images_labels.npy", rng.integers(0, 3, n))
    return open_source(str(folder / "images.npy")), images


def read_tar(path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} in the order the shard holds them."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_shards_hold_the_encoded_images_and_labels_and_the_manifest_describes_them(tmp_path):
    source, images = make_npy_source(tmp_path, 23)
    labels = np.load(tmp_path / "images_labels.npy")
    out = tmp_path / "shards"
    manifest = write_shards(source, out, n_px=4, k=8, val_fraction=0.1, samples_per_shard=5, seed=1, progress=False)

    assert manifest["format"] == "megapixel-shards" and manifest["version"] == 1
    assert (manifest["n_px"], manifest["n_vocab"], manifest["seed"]) == (4, 8, 1)
    assert manifest["label_names"] == ["0", "1", "2"] and manifest["skipped"] == []
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["count"], val["count"]) == (21, 2)  # round(23 * 0.1) = 2 held out
    assert [s["count"] for s in train["shards"]] == [5, 5, 5, 5, 1]
    assert [s["name"] for s in val["shards"]] == ["val-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "palette.npy"] + [s["name"] for s in train["shards"] + val["shards"]]
    )
    assert json.loads((out / "manifest.json").read_text()) == manifest

    palette = load_palette(out / "palette.npy", k=8)
    assert palette_hash(palette) == manifest["palette_hash"]
    seen = []
    for split in (train, val):
        for shard in split["shards"]:
            assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
            samples = read_tar(out / shard["name"])
            assert len(samples) == shard["count"]
            for key, sample in samples.items():
                index = int(key)
                tokens = np.frombuffer(sample["tok"], dtype="<u2").reshape(4, 4)
                np.testing.assert_array_equal(tokens, encode_pixels(resize_image(images[index], 4), palette))
                assert int(sample["cls"].decode("ascii")) == labels[index]
                seen.append(index)
    assert sorted(seen) == list(range(23))
    train_keys = [int(k) for s in train["shards"] for k in read_tar(out / s["name"])]
    assert train_keys != sorted(train_keys)  # training shards are mixed


def test_a_given_palette_is_used_as_is_and_unlabelled_sources_write_no_labels(tmp_path):
    source, images = make_npy_source(tmp_path, 6, size=3, labelled=False)
    palette = np.random.default_rng().uniform(-1, 1, (40, 3)).astype(np.float32)
    manifest = write_shards(source, tmp_path / "s", n_px=3, palette=palette, val_fraction=0.0, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "palette.npy"), palette)
    assert manifest["n_vocab"] == 40 and manifest["label_names"] == []
    assert manifest["splits"]["val"] == {"shards": [], "count": 0}
    samples = read_tar(tmp_path / "s" / "train-000000.tar")
    assert all(set(sample) == {"tok"} for sample in samples.values())


def test_the_same_source_and_seed_give_byte_identical_shards(tmp_path):
    source, _ = make_npy_source(tmp_path, 12)
    first = write_shards(source, tmp_path / "a", n_px=6, k=8, samples_per_shard=4, progress=False)
    second = write_shards(source, tmp_path / "b", n_px=6, k=8, samples_per_shard=4, progress=False)
    assert first["splits"] == second["splits"] and first["palette_hash"] == second["palette_hash"]


def test_a_folder_source_records_skipped_files_in_the_manifest(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng().integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png"
        )
    (tmp_path / "imgs" / "bad.png").write_bytes(b"garbage")
    manifest = write_shards(open_source(str(tmp_path / "imgs")), tmp_path / "s", n_px=2, k=4, progress=False)
    assert [path for path, _ in manifest["skipped"]] == [str(tmp_path / "imgs" / "bad.png")]
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 3


def test_writing_into_a_non_empty_folder_is_refused_and_leaves_it_untouched(tmp_path):
    source, _ = make_npy_source(tmp_path, 5)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not empty: choose a new folder"):
        write_shards(source, out, n_px=6, k=4, progress=False)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_an_existing_empty_folder_receives_the_shard_set(tmp_path):
    source, _ = make_npy_source(tmp_path, 5)
    (tmp_path / "empty").mkdir()
    write_shards(source, tmp_path / "empty", n_px=6, k=4, progress=False)
    assert read_manifest(tmp_path / "empty")["splits"]["train"]["count"] == 4


def test_a_failed_write_leaves_no_shard_set_and_no_partial_folder(tmp_path):
    source, _ = make_npy_source(tmp_path, 5, grey_levels=3)  # too few colours for 8 centres
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match="at most 3"):
        write_shards(source, tmp_path / "s", n_px=6, k=8, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("kwargs, message", [({"n_px": 0}, "resolution"), ({"val_fraction": 1.0}, "in \\[0, 1\\)")])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    source, _ = make_npy_source(tmp_path, 5)
    with pytest.raises(DataError, match=message):
        write_shards(source, tmp_path / "s", **{"n_px": 4, **kwargs}, progress=False)
    assert not (tmp_path / "s").exists()


@pytest.fixture()
def shard_set(tmp_path):
    source, _ = make_npy_source(tmp_path, 10)
    write_shards(source, tmp_path / "s", n_px=6, k=8, samples_per_shard=4, progress=False)
    return tmp_path / "s"


def test_read_manifest_returns_the_written_manifest(shard_set):
    assert read_manifest(shard_set) == json.loads((shard_set / "manifest.json").read_text())


def test_read_manifest_refuses_a_missing_folder_with_how_to_make_one(tmp_path):
    with pytest.raises(DataError, match="no shard set at .*nothing: make one with `megapixel shards"):
        read_manifest(tmp_path / "nothing")


def test_read_manifest_refuses_a_changed_palette(shard_set):
    palette = load_palette(shard_set / "palette.npy")
    palette[0] = -palette[0] if palette[0].any() else 0.5
    save_palette(shard_set / "palette.npy", palette)
    with pytest.raises(DataError, match="does not match the palette_hash"):
        read_manifest(shard_set)


def test_read_manifest_refuses_a_missing_shard(shard_set):
    (shard_set / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="lacks train-000001.tar"):
        read_manifest(shard_set)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not readable JSON"),
        ('{"format": "something-else"}', "not a megapixel shard manifest"),
        ('{"format": "megapixel-shards", "version": 2}', "version 2"),
        ('{"format": "megapixel-shards", "version": 1, "n_px": "6"}', "n_px"),
    ],
)
def test_read_manifest_refuses_a_broken_manifest(shard_set, text, message):
    (shard_set / "manifest.json").write_text(text)
    with pytest.raises(DataError, match=message):
        read_manifest(shard_set)

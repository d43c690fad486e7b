"""Writing shard sets (tokens, labels, palette, manifest) and checking them when read."""

import hashlib
import io
import json
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from megapixel.data.palette import encode_pixels, load_palette, palette_hash, save_palette
from megapixel.data.shards.format import open_shard, read_manifest
from megapixel.data.shards.verify import verify_shards
from megapixel.data.sources import open_source
from megapixel.data.sources.base import resize_image
from megapixel.data.writer import write_shards
from megapixel.errors import DataError


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


def read_tar(path) -> dict[str, bytes]:
    """{member name: bytes} of a shard."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_hold_the_encoded_images_and_labels_and_the_manifest_describes_them(tmp_path):
    source, images = make_npy_source(tmp_path, 23)
    labels = np.load(tmp_path / "images_labels.npy")
    out = tmp_path / "shards"
    manifest = write_shards(source, out, n_px=4, k=8, val_fraction=0.1, samples_per_shard=5, seed=1, progress=False)

    assert manifest["format"] == "megapixel-shards" and manifest["version"] == 2
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
            members = read_tar(out / shard["name"])
            assert sorted(members) == ["samples.cls", "samples.keys", "samples.tok"]
            keys = [int(k) for k in json.loads(members["samples.keys"])]
            tokens = np.frombuffer(members["samples.tok"], dtype="<u2").reshape(-1, 4, 4)
            assert len(keys) == len(tokens) == shard["count"]
            np.testing.assert_array_equal(
                tokens, encode_pixels(np.stack([resize_image(images[i], 4) for i in keys]), palette)
            )
            np.testing.assert_array_equal(np.frombuffer(members["samples.cls"], dtype="<i4"), labels[keys])
            seen += keys
    assert sorted(seen) == list(range(23))
    train_keys = [int(k) for s in train["shards"] for k in json.loads(read_tar(out / s["name"])["samples.keys"])]
    assert train_keys != sorted(train_keys)  # training shards are mixed


def test_a_given_palette_is_used_as_is_and_unlabelled_sources_write_no_labels(tmp_path):
    source, images = make_npy_source(tmp_path, 6, size=3, labelled=False)
    palette = np.random.default_rng().uniform(-1, 1, (40, 3)).astype(np.float32)
    manifest = write_shards(source, tmp_path / "s", n_px=3, palette=palette, val_fraction=0.0, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "palette.npy"), palette)
    assert manifest["n_vocab"] == 40 and manifest["label_names"] == []
    assert manifest["splits"]["val"] == {"shards": [], "count": 0}
    assert sorted(read_tar(tmp_path / "s" / "train-000000.tar")) == ["samples.keys", "samples.tok"]


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
        ('{"format": "megapixel-shards", "version": 3}', "version 3"),
        ('{"format": "megapixel-shards", "version": 2, "n_px": "6"}', "n_px"),
    ],
)
def test_read_manifest_refuses_a_broken_manifest(shard_set, text, message):
    (shard_set / "manifest.json").write_text(text)
    with pytest.raises(DataError, match=message):
        read_manifest(shard_set)


def test_an_interrupted_write_is_finished_by_running_it_again_making_only_the_missing_shards(tmp_path):
    source, _ = make_npy_source(tmp_path, 30)
    args = dict(n_px=6, k=8, samples_per_shard=4, seed=3, progress=False)
    whole = write_shards(source, tmp_path / "whole", **args)

    class Interrupt(Exception):
        pass

    loads = 0

    def load_then_stop(index, min_side=0):
        nonlocal loads
        loads += 1
        if loads > 27 + 10:  # the palette sample (27 images) and two shards are done when the run "dies"
            raise Interrupt
        return type(source).load(source, index, min_side)

    source.load = load_then_stop
    with pytest.raises(Interrupt):
        write_shards(source, tmp_path / "cut", **args)
    del source.load
    finished = sorted(p.name for p in (tmp_path / "cut").glob("*.tar"))
    assert finished and not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(DataError, match="interrupted .* run it again"):
        read_manifest(tmp_path / "cut")
    before = {name: (tmp_path / "cut" / name).stat().st_mtime_ns for name in finished}

    resumed = write_shards(source, tmp_path / "cut", **args)
    assert resumed["splits"] == whole["splits"] and resumed["palette_hash"] == whole["palette_hash"]
    assert {name: (tmp_path / "cut" / name).stat().st_mtime_ns for name in finished} == before  # not rewritten
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole").iterdir()
    )


def test_an_unfinished_set_made_another_way_is_refused_and_left_alone(tmp_path):
    source, _ = make_npy_source(tmp_path, 12)
    out = tmp_path / "s"
    out.mkdir()
    (out / "recipe.json").write_text("{}")
    with pytest.raises(DataError, match="unfinished shard set made another way"):
        write_shards(source, out, n_px=6, k=8, progress=False)
    assert [p.name for p in out.iterdir()] == ["recipe.json"]
    write_shards(source, tmp_path / "done", n_px=6, k=8, progress=False)
    with pytest.raises(DataError, match="is not empty"):
        write_shards(source, tmp_path / "done", n_px=6, k=8, progress=False)


@pytest.mark.slow
def test_worker_processes_write_the_same_bytes_as_one_process(tmp_path):
    source, _ = make_npy_source(tmp_path, 40)
    args = dict(n_px=6, k=8, samples_per_shard=7, seed=2, progress=False)
    one = write_shards(source, tmp_path / "one", **args)
    two = write_shards(source, tmp_path / "two", workers=2, **args)
    assert one["splits"] == two["splits"] and one["palette_hash"] == two["palette_hash"]


def test_verify_finds_a_sound_set_sound_and_names_a_truncated_or_changed_shard(shard_set):
    assert verify_shards(shard_set) == []
    path = shard_set / "train-000000.tar"
    path.write_bytes(path.read_bytes()[:700])
    problems = verify_shards(shard_set)
    assert any("train-000000.tar" in p and "checksum" in p for p in problems)
    assert any("train-000000.tar" in p and "truncated" in p for p in problems)
    with pytest.raises(DataError, match="train-000000.tar is truncated"):
        open_shard(path, 6)


def test_version_1_shard_sets_of_one_member_per_sample_are_still_read(tmp_path):
    rng = np.random.default_rng()
    tokens = rng.integers(0, 8, (5, 16)).astype("<u2")
    with tarfile.open(tmp_path / "old.tar", "w") as tar:
        for i, row in enumerate(tokens):
            for ext, data in (("tok", row.tobytes()), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    got, labels = open_shard(tmp_path / "old.tar", 4, version=1)
    np.testing.assert_array_equal(got, tokens)
    assert labels.tolist() == [0, 1, 0, 1, 0]


def test_the_inspect_tool_reports_a_sound_set_writes_pngs_and_flags_a_damaged_shard(shard_set, tmp_path, capsys):
    from PIL import Image

    from tools.inspect_shards import main

    assert main([str(shard_set), "--png", str(tmp_path / "png"), "--count", "3"]) == 0
    out = capsys.readouterr().out
    assert "ok: counts, checksums and palette hash match" in out and out.count("png: ") == 3
    pngs = sorted((tmp_path / "png").iterdir())
    assert len(pngs) == 3 and Image.open(pngs[0]).mode == "RGB"
    (shard_set / "val-000000.tar").write_bytes(b"\0" * 10)
    assert main([str(shard_set)]) == 1
    assert "problem: val-000000.tar: checksum differs" in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere")]) == 2


def test_the_inspect_tool_names_a_truncated_shard_in_one_line_and_writes_no_previews_from_a_damaged_set(
    shard_set, tmp_path, capsys
):
    from tools.inspect_shards import main

    path = shard_set / "train-000000.tar"
    path.write_bytes(path.read_bytes()[:700])
    assert main([str(shard_set), "--png", str(tmp_path / "png")]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 2
    assert problems[0] == "problem: train-000000.tar: checksum differs from the manifest (changed or truncated)"
    assert problems[1].startswith(f"problem: {path} is truncated or damaged (")
    assert not (tmp_path / "png").exists()


def test_a_multi_crop_set_stores_k_random_crops_per_training_image_and_the_stream_reads_one_per_epoch(tmp_path):
    from megapixel.data.stream import make_loader

    source, _ = make_npy_source(tmp_path, 12, size=24)
    manifest = write_shards(source, tmp_path / "s", n_px=6, k=8, samples_per_shard=4, train_crops=3, progress=False)
    assert manifest["train_crops"] == 3 and verify_shards(tmp_path / "s") == []
    shard = manifest["splits"]["train"]["shards"][0]
    tokens, labels = open_shard(tmp_path / "s" / shard["name"], 6, crops=3)
    assert tokens.shape == (3 * shard["count"], 36) and labels.shape == (shard["count"],)
    assert not (tokens[0::3] == tokens[1::3]).all()  # the crops differ
    val = manifest["splits"]["val"]["shards"][0]
    assert open_shard(tmp_path / "s" / val["name"], 6)[0].shape == (val["count"], 36)  # val: one centre crop each

    # Every stored row of an image, keyed to find which image and crop a streamed row is.
    rows = {}
    for s in manifest["splits"]["train"]["shards"]:
        t, _ = open_shard(tmp_path / "s" / s["name"], 6, crops=3)
        for i, row in enumerate(t):
            rows.setdefault(row.tobytes(), set()).add((s["name"], i // 3, i % 3))
    images = {(s["name"], i) for s in manifest["splits"]["train"]["shards"] for i in range(s["count"])}
    loader = make_loader(str(tmp_path / "s"), "train", 11, shuffle_buffer=4)  # 11 training images: an epoch a batch
    crops_seen = set()
    for batch in islice(loader, 6):
        found = [rows[row.astype(np.uint16).tobytes()] for row in batch["tokens"].numpy()]
        assert {(name, image) for hits in found for name, image, _ in hits} == images  # each image once
        crops_seen |= {crop for hits in found for _, _, crop in hits}
    assert crops_seen == {0, 1, 2}  # 66 draws of one crop in 3: all three occur (miss one: < 1e-11)


def make_imagenet_like(root, rng: np.random.Generator) -> tuple[dict, dict]:
    """A train tree of classes a, b, c (2 PNGs each) and a val folder of 3 wide PNGs of classes b and c
    labelled by a LOC_val_solution.csv; returns {key: image} of each."""
    from PIL import Image

    train, val = {}, {}
    for name in ("a", "b", "c"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(2):
            train[f"{name}/{i}.png"] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(train[f"{name}/{i}.png"]).save(root / "train" / name / f"{i}.png")
    (root / "val").mkdir()
    rows = []
    for i, wnid in enumerate(["c", "b", "c"]):
        val[f"v{i}.png"] = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
        Image.fromarray(val[f"v{i}.png"]).save(root / "val" / f"v{i}.png")
        rows.append(f"v{i},{wnid} 0 0 1 1")
    (root / "val" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return train, val


def test_a_separate_val_source_is_the_val_split_centre_cropped_and_labelled_with_the_train_classes(tmp_path):
    train, val = make_imagenet_like(tmp_path, np.random.default_rng())
    source, val_source = open_source(str(tmp_path / "train")), open_source(str(tmp_path / "val"))
    assert val_source.label_names == ["b", "c"]  # its own numbering: b is 0 there, 1 in the train tree
    manifest = write_shards(
        source, tmp_path / "s", n_px=4, k=8, val_fraction=0, val_source=val_source, train_crops=2, progress=False
    )
    assert manifest["label_names"] == ["a", "b", "c"] and manifest["val_source"] == val_source.name
    assert (manifest["splits"]["train"]["count"], manifest["splits"]["val"]["count"]) == (6, 3)
    palette = load_palette(tmp_path / "s" / "palette.npy")
    members = read_tar(tmp_path / "s" / "val-000000.tar")
    assert json.loads(members["samples.keys"]) == ["v0.png", "v1.png", "v2.png"]  # in the source's order
    assert np.frombuffer(members["samples.cls"], dtype="<i4").tolist() == [2, 1, 2]
    expected = encode_pixels(np.stack([resize_image(val[f"v{i}.png"], 4) for i in range(3)]), palette)
    np.testing.assert_array_equal(np.frombuffer(members["samples.tok"], dtype="<u2").reshape(3, 4, 4), expected)
    train_keys = [
        k
        for s in manifest["splits"]["train"]["shards"]
        for k in json.loads(read_tar(tmp_path / "s" / s["name"])["samples.keys"])
    ]
    assert sorted(train_keys) == sorted(train)  # every training image, none held out
    assert verify_shards(tmp_path / "s") == []


def test_a_val_source_is_refused_with_a_val_fraction_or_with_classes_the_train_source_lacks(tmp_path):
    make_imagenet_like(tmp_path, np.random.default_rng())
    source, val_source = open_source(str(tmp_path / "train")), open_source(str(tmp_path / "val"))
    with pytest.raises(DataError, match="a validation source and a validation fraction"):
        write_shards(source, tmp_path / "s", n_px=4, k=8, val_fraction=0.1, val_source=val_source, progress=False)
    (tmp_path / "val" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nv0,c 0\nv1,z 0\nv2,b 0\n")
    with pytest.raises(DataError, match="has 1 classes that .* lacks \\(first: z\\)"):
        write_shards(
            source,
            tmp_path / "s",
            n_px=4,
            k=8,
            val_fraction=0,
            val_source=open_source(str(tmp_path / "val")),
            progress=False,
        )
    assert not (tmp_path / "s").exists()


def test_the_shards_command_skips_truncated_and_unreadable_images_and_prints_their_paths(tmp_path, capsys):
    from PIL import Image

    from megapixel.cli import main

    rng = np.random.default_rng()
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / f"{i}.jpg")
    truncated, garbage = tmp_path / "imgs" / "a" / "1.jpg", tmp_path / "imgs" / "a" / "x.png"
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage.write_bytes(b"not a png")
    assert main(["shards", str(tmp_path / "imgs"), str(tmp_path / "s"), "--n-px", "4", "--palette-size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"skipped 2 unreadable files (all listed in {tmp_path / 's' / 'manifest.json'}):" in out
    assert f"  {truncated}: " in out and f"  {garbage}: " in out
    manifest = read_manifest(tmp_path / "s")
    assert sorted(path for path, _ in manifest["skipped"]) == sorted([str(truncated), str(garbage)])
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 3


def documented_webdataset_reader() -> str:
    """The Python block of docs/data.md's section on reading shards with plain webdataset."""
    section = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text().split(WEBDATASET_SECTION)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


WEBDATASET_SECTION = "## A shard as a webdataset sample"


def test_the_documented_plain_webdataset_reader_gives_each_shards_tokens_labels_and_keys(digits_shards):
    namespace: dict = {}
    exec(documented_webdataset_reader(), namespace)
    read = list(namespace["read_shards"](f"{digits_shards}/train-{{000000..000003}}.tar", 8))
    shards = read_manifest(digits_shards)["splits"]["train"]["shards"]
    assert len(read) == len(shards) == 4
    for (tokens, labels, keys), shard in zip(read, shards, strict=True):
        expected_tokens, expected_labels = open_shard(digits_shards / shard["name"], 8)
        assert tokens.dtype == np.uint16 and tokens.shape == (shard["count"], 64)
        assert np.array_equal(tokens, expected_tokens) and np.array_equal(labels, expected_labels)
        assert keys == json.loads(read_tar(digits_shards / shard["name"])["samples.keys"])

"""Image sources (digits, folders, .npy) and the resize to the model's resolution."""

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from megapixel.data.sources import open_source
from megapixel.data.sources.base import random_resized_crop, resize_image
from megapixel.errors import DataError


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(path, image: np.ndarray, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).convert(mode).save(path)


def test_digits_are_1797_labelled_grey_8x8_rgb_images():
    source = open_source("digits")
    samples = list(source.samples())
    assert len(source) == len(samples) == 1797
    assert source.label_names == [str(d) for d in range(10)]
    images = np.stack([s.image for s in samples])
    assert images.shape == (1797, 8, 8, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    assert images.max() == 255  # 16 * 255 / 16
    assert sorted({s.label for s in samples}) == list(range(10))
    assert len({s.key for s in samples}) == 1797


def test_a_folder_of_class_subfolders_is_labelled_and_skips_unreadable_files(tmp_path):
    rng = np.random.default_rng()
    cat, dog, deep = random_image(rng, 5, 7), random_image(rng, 4, 4), random_image(rng, 6, 3)
    save(tmp_path / "cats" / "a.png", cat)
    save(tmp_path / "dogs" / "b.PNG", dog)
    save(tmp_path / "dogs" / "sub" / "c.bmp", deep)
    save(tmp_path / "dogs" / "grey.png", dog, mode="L")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image, and not an image extension")

    source = open_source(str(tmp_path))
    samples = list(source.samples())
    assert source.label_names == ["cats", "dogs"]
    assert len(source) == 5  # the broken file counts until it is read
    assert [s.key for s in samples] == ["cats/a.png", "dogs/b.PNG", "dogs/grey.png", "dogs/sub/c.bmp"]
    assert [s.label for s in samples] == [0, 1, 1, 1]
    np.testing.assert_array_equal(samples[0].image, cat)
    np.testing.assert_array_equal(samples[1].image, dog)
    np.testing.assert_array_equal(samples[3].image, deep)
    assert samples[2].image.shape == (4, 4, 3)  # grey files come out as RGB
    assert [path for path, _ in source.skipped] == [str(tmp_path / "dogs" / "broken.png")]
    assert source.skipped[0][1]  # with the reason


def test_a_folder_with_images_at_its_top_level_is_unlabelled(tmp_path):
    rng = np.random.default_rng()
    save(tmp_path / "top.jpg", random_image(rng, 8, 8))
    save(tmp_path / "cats" / "a.png", random_image(rng, 8, 8))
    source = open_source(str(tmp_path))
    assert source.label_names == []
    assert [s.label for s in source.samples()] == [None, None]


def test_an_npy_file_gives_its_images_with_labels_from_the_sibling_file(tmp_path):
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)
    labels = np.array([0, 2, 1, 2, 0, 1])
    np.save(tmp_path / "set.npy", images)
    np.save(tmp_path / "set_labels.npy", labels)
    source = open_source(str(tmp_path / "set.npy"))
    samples = list(source.samples())
    assert len(source) == 6 and source.label_names == ["0", "1", "2"]
    np.testing.assert_array_equal(np.stack([s.image for s in samples]), images)
    assert [s.label for s in samples] == labels.tolist()


def test_a_grey_npy_file_without_labels_gives_unlabelled_rgb(tmp_path):
    grey = np.random.default_rng().integers(0, 256, (3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "grey.npy", grey)
    samples = list(open_source(str(tmp_path / "grey.npy")).samples())
    np.testing.assert_array_equal(samples[1].image, np.repeat(grey[1][..., None], 3, axis=-1))
    assert all(s.label is None for s in samples)


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((2, 4, 4, 3), np.float32), None, "dtype float32: expected uint8"),
        (np.zeros((2, 4, 4, 4), np.uint8), None, r"shape \(2, 4, 4, 4\): expected uint8 images \(N, H, W, 3\)"),
        (np.zeros((2, 4), np.uint8), None, r"shape \(2, 4\)"),
        (np.zeros((2, 4, 4), np.uint8), np.zeros(3, np.int64), r"labels.npy has .*shape \(3,\): expected integer"),
        (np.zeros((2, 4, 4), np.uint8), np.array([0.5, 1.0]), "float64"),
    ],
)
def test_a_malformed_npy_source_is_refused_naming_the_file(tmp_path, images, labels, message):
    np.save(tmp_path / "bad.npy", images)
    if labels is not None:
        np.save(tmp_path / "bad_labels.npy", labels)
    with pytest.raises(DataError, match=message) as err:
        open_source(str(tmp_path / "bad.npy"))
    assert "bad" in str(err.value)


def test_missing_paths_empty_folders_and_other_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="no such file or folder: .*nowhere"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(DataError, match="is not a folder of images, a .npy file, a .tar"):
        open_source(str(tmp_path / "data.csv"))


def test_resize_centre_crops_a_wide_image_to_a_square():
    image = random_image(np.random.default_rng(), 6, 10)
    np.testing.assert_array_equal(resize_image(image, 6), image[:, 2:8])


def test_shrinking_averages_blocks_of_pixels():
    image = random_image(np.random.default_rng(), 8, 8)
    expected = image.reshape(4, 2, 4, 2, 3).astype(np.float64).mean(axis=(1, 3))
    # PIL's box filter works in fixed point: results are within one level of the exact mean.
    assert np.abs(resize_image(image, 4).astype(np.float64) - expected).max() <= 1.0


def test_enlarging_keeps_a_flat_image_flat_and_returns_uint8():
    image = np.full((4, 4, 3), (10, 200, 255), dtype=np.uint8)
    big = resize_image(image, 9)
    assert big.shape == (9, 9, 3) and big.dtype == np.uint8
    assert (big == image[0, 0]).all()


def write_cifar_batch(path, images: np.ndarray, labels: list[int], field: str = "labels") -> None:
    """A batch as the cifar-*-python archives hold it: a protocol-2 pickle of bytes keys, rows of R, G, B planes."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", field.encode(): labels, b"data": data}, f, protocol=2)


def test_a_cifar10_python_folder_gives_its_training_batches_with_class_names(tmp_path):
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(tmp_path / "data_batch_1", images[:3], [0, 1, 2])
    write_cifar_batch(tmp_path / "data_batch_2", images[3:], [2, 0])
    write_cifar_batch(tmp_path / "test_batch", images[:1], [9])
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird"]}, f, protocol=2)
    source = open_source(str(tmp_path))
    samples = list(source.samples())
    assert source.label_names == ["airplane", "automobile", "bird"]
    np.testing.assert_array_equal(np.stack([s.image for s in samples]), images)
    assert [s.label for s in samples] == [0, 1, 2, 2, 0]
    test = open_source(str(tmp_path / "test_batch"))  # one batch file: the test set
    assert len(test) == 1 and test.load(0).label == 9


def test_a_cifar100_folder_uses_the_fine_labels_and_code_in_a_pickle_is_refused(tmp_path):
    images = np.random.default_rng().integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(tmp_path / "train", images, [7, 99], field="fine_labels")
    with open(tmp_path / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f, protocol=2)
    source = open_source(str(tmp_path))
    assert len(source.label_names) == 100 and [s.label for s in source.samples()] == [7, 99]
    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({b"data": print}, f, protocol=2)
    with pytest.raises(DataError, match="not a CIFAR python batch"):
        open_source(str(tmp_path / "evil"))


def test_an_imagenet_val_folder_is_labelled_by_loc_val_solution_with_sorted_synsets(tmp_path):
    rng = np.random.default_rng()
    names = ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002", "ILSVRC2012_val_00000003"]
    for name in names:
        save(tmp_path / f"{name}.JPEG", random_image(rng, 9, 12))
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        f"{names[0]},n09999999 1 2 3 4 n09999999 5 6 7 8\n{names[1]},n01440764 0 0 5 5\n{names[2]},n01443537 1 1 2 2\n"
    )
    source = open_source(str(tmp_path))
    assert source.label_names == ["n01440764", "n01443537", "n09999999"]
    assert [(s.key, s.label) for s in source.samples()] == [
        (f"{n}.JPEG", i) for n, i in zip(names, [2, 0, 1], strict=True)
    ]
    (tmp_path / "extra.JPEG").write_bytes((tmp_path / f"{names[0]}.JPEG").read_bytes())
    with pytest.raises(DataError, match="1 images in .* have no label"):
        open_source(str(tmp_path))


def test_webdataset_tars_of_jpeg_and_png_give_their_images_and_skip_a_truncated_one(tmp_path):
    rng = np.random.default_rng()
    pngs = [random_image(rng, 6, 5) for _ in range(3)]

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    encoded = []
    for image in pngs:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    jpeg = io.BytesIO()
    Image.fromarray(pngs[0]).save(jpeg, format="JPEG")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for i, data in enumerate(encoded[:2]):
            add(tar, f"s{i}.png", data)
            add(tar, f"s{i}.cls", str(i).encode())
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        add(tar, "s2.png", encoded[2])
        add(tar, "s2.cls", b"1")
        add(tar, "s3.jpg", jpeg.getvalue())
        add(tar, "s3.cls", b"0")
        add(tar, "s4.png", encoded[2][:40])  # truncated inside the image data
        add(tar, "s4.cls", b"0")
    source = open_source(str(tmp_path))
    samples = list(source.samples())
    assert [s.key for s in samples] == ["a/s0", "a/s1", "b/s2", "b/s3"] and [s.label for s in samples] == [0, 1, 1, 0]
    for got, want in zip(samples[:3], pngs, strict=True):
        np.testing.assert_array_equal(got.image, want)
    assert samples[3].image.shape == (6, 5, 3)  # JPEG: lossy, so only its shape is exact
    assert [path for path, _ in source.skipped] == [f"{tmp_path / 'b.tar'}:s4"]
    assert len(open_source(str(tmp_path / "a.tar"))) == 2


def test_the_paper_random_crop_spans_224_of_a_short_side_resized_to_256_to_384():
    # A horizontal ramp: a crop's first and last columns tell where it starts and ends.
    ramp = np.broadcast_to(np.arange(1024, dtype=np.float64)[None, :, None] / 4, (768, 1024, 3)).astype(np.uint8)
    rng = np.random.default_rng()
    spans = []
    for _ in range(200):
        crop = random_resized_crop(ramp, 16, rng).astype(float)
        # Each output column averages 1/16 of the crop: its end columns sit half a column inside the crop.
        spans.append((crop[0, -1, 0] - crop[0, 0, 0]) * 4 * 16 / 15 / 768)
    spans = np.array(spans)
    # 224/384 .. 224/256 of the short side, +-1 pixel of rounding in the 0..255 ramp (4 source pixels = 0.5%).
    assert spans.min() > 224 / 384 - 0.01 and spans.max() < 224 / 256 + 0.01
    assert spans.max() - spans.min() > 0.2  # the whole range is used

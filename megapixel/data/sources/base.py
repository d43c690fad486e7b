"""Image sources: the built-in digits, a folder of image files, or a .npy array, as (key, RGB, label).

`open_source(spec)` picks the kind from the spec (archive formats live in `megapixel/data/archives.py`).
Every source is a fixed, indexable list: `load(i)` reads image i, so worker processes can each read
their own share, and a shard set made twice from the same source and seed is the same. Sources open
their files lazily, so pickling one to a worker process sends paths, not pixels.
"""

from __future__ import annotations

import abc
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from megapixel.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Sample:
    """One image: a key unique within its source, RGB uint8 (H, W, 3), and a class index or None."""

    key: str
    image: np.ndarray
    label: int | None


class UnreadableImage(Exception):
    """Raised by `Source.load` for an image that cannot be decoded; the message says where and why."""


class Source(abc.ABC):
    """A finite, ordered set of images; `skipped` lists (path, reason) of unreadable files once iterated."""

    def __init__(self, name: str, label_names: list[str]) -> None:
        self.name = name
        self.label_names = label_names
        self.skipped: list[tuple[str, str]] = []

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many samples the source offers (files later skipped as unreadable included)."""

    @abc.abstractmethod
    def load(self, index: int, min_side: int = 0) -> Sample:
        """Sample `index`; UnreadableImage(path, reason) when it cannot be decoded.

        `min_side` > 0 allows a JPEG to be decoded at a reduced scale whose shorter side is still at least that."""

    def samples(self) -> Iterator[Sample]:
        """The readable samples, always in the same order; unreadable ones go to `skipped`."""
        self.skipped = []
        for index in range(len(self)):
            try:
                yield self.load(index)
            except UnreadableImage as err:
                self.skipped.append(err.args)


def decode_image(data: bytes | Path, where: str, min_side: int = 0) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file or its bytes; UnreadableImage(where, reason) if it cannot be decoded.

    With `min_side`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (its DCT scaling, itself an area
    average) as long as both sides stay at least `min_side`: 3-4x faster for ImageNet-sized photos."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            if min_side and img.format == "JPEG":
                img.draft("RGB", (min_side, min_side))
            return np.asarray(img.convert("RGB"))
    except Exception as err:  # noqa: BLE001
        # PIL's decoders raise many types on malformed files (OSError, SyntaxError, zlib and
        # struct errors...); one bad file must not stop a run over a million images, so it is
        # recorded and left out.
        raise UnreadableImage(where, f"{type(err).__name__}: {err}") from None


class DigitsSource(Source):
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped with it), as grey RGB, labels 0-9."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits  # slow to import: only when the digits are wanted

        digits = load_digits()
        grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
        self._images = np.repeat(grey[..., None], 3, axis=-1)
        self._labels = digits.target.astype(int)
        super().__init__("digits", [str(d) for d in range(10)])

    def __len__(self) -> int:
        return len(self._images)

    def load(self, index: int, min_side: int = 0) -> Sample:
        return Sample(f"{index:04d}", self._images[index], int(self._labels[index]))


class FolderSource(Source):
    """Image files under a folder (recursive); first-level subfolders are the classes when every image is in one."""

    def __init__(self, root: Path) -> None:
        self._root = root
        files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        self._files = sorted(files, key=lambda p: p.relative_to(root).as_posix())
        if not self._files:
            raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}): point to a folder of images")
        parts = [p.relative_to(root).parts for p in self._files]
        labelled = all(len(part) >= 2 for part in parts)
        label_names = sorted({part[0] for part in parts}) if labelled else []
        self._class_of = {name: i for i, name in enumerate(label_names)}
        super().__init__(str(root.resolve()), label_names)

    def __len__(self) -> int:
        return len(self._files)

    def load(self, index: int, min_side: int = 0) -> Sample:
        path = self._files[index]
        relative = path.relative_to(self._root).as_posix()
        image = decode_image(path, str(path), min_side)
        label = self._class_of[relative.split("/", 1)[0]] if self.label_names else None
        return Sample(relative, image, label)


class ArraySource(Source):
    """Images in a .npy file, uint8 (N, H, W, 3) or grey (N, H, W), with labels from `<stem>_labels.npy`.

    Float arrays are refused rather than guessed at: whether they hold [0, 1] or [0, 255] is not
    knowable from the file, so the message asks for uint8.
    """

    def __init__(self, path: Path) -> None:
        expected = "expected uint8 images (N, H, W, 3) or grey (N, H, W)"
        images = _load_npy(path, expected)
        if images.dtype != np.uint8:
            raise DataError(f"{path} has dtype {images.dtype}: {expected} (scale floats to 0..255 and cast to uint8)")
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3) or 0 in images.shape[1:]:
            raise DataError(f"{path} has shape {images.shape}: {expected}")
        self._path = path
        self._images: np.ndarray | None = images
        self._count = len(images)
        self._labels = None
        label_names: list[str] = []
        labels_path = path.with_name(f"{path.stem}_labels.npy")
        if labels_path.exists():
            labels = _load_npy(labels_path, f"expected integer labels ({len(images)},)")
            if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
                raise DataError(
                    f"{labels_path} has dtype {labels.dtype} and shape {labels.shape}: "
                    f"expected integer labels ({len(images)},), one per image in {path.name}"
                )
            if len(labels) and labels.min() < 0:
                raise DataError(f"{labels_path} has negative labels: expected class indices 0, 1, 2, ...")
            self._labels = np.asarray(labels, dtype=np.int64)
            label_names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
        super().__init__(str(path.resolve()), label_names)

    def __len__(self) -> int:
        return self._count

    def __getstate__(self) -> dict:
        # A worker process re-opens the memory map instead of receiving a copy of the array.
        return {**self.__dict__, "_images": None}

    def load(self, index: int, min_side: int = 0) -> Sample:
        if self._images is None:
            self._images = np.load(self._path, mmap_mode="r", allow_pickle=False)
        image = np.asarray(self._images[index])
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        label = None if self._labels is None else int(self._labels[index])
        return Sample(f"{index:0{len(str(max(self._count - 1, 0)))}d}", image, label)


def _load_npy(path: Path, expected: str) -> np.ndarray:
    try:
        # Memory-mapped, so a large array is read image by image.
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npy file ({err}): {expected}") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise DataError(f"{path} is an .npz archive: {expected} in a .npy file")
    return array


def open_source(spec: str) -> Source:
    """Open `digits` (built in), a folder (class-per-folder images, ImageNet val, CIFAR python, webdataset tars),
    a .npy array, a .tar of images or one CIFAR batch file; docs/data.md lists the layouts."""
    from megapixel.data import archives

    if spec == "digits":
        return DigitsSource()
    path = Path(spec)
    if not path.exists():
        raise DataError(f"no such file or folder: {spec}")
    batches = archives.cifar_batches(path)
    if batches:
        return archives.CifarSource(batches)
    if path.is_dir():
        labels = archives.imagenet_val_labels(path)
        if labels is not None:
            return archives.ImageNetValSource(path, labels)
        tars = sorted(path.glob("*.tar"))
        if tars and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            return archives.TarSource(tars)
        return FolderSource(path)
    if path.suffix.lower() == ".npy":
        return ArraySource(path)
    if path.suffix.lower() == ".tar":
        return archives.TarSource([path])
    raise DataError(
        f"{spec} is not a folder of images, a .npy file, a .tar of images or a CIFAR batch: "
        "give one of those, or `digits`"
    )


def resize_image(image: np.ndarray, n_px: int) -> np.ndarray:
    """Centre-crop an RGB uint8 image to a square and resize it to (n_px, n_px, 3): box filter down, bicubic up."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = np.ascontiguousarray(image[top : top + side, left : left + side])
    if side == n_px:
        return square
    # BOX averages every source pixel into the output (area resampling), the right filter for
    # shrinking; BICUBIC on an 8-bit image is clipped to 0..255 by PIL itself.
    resample = Image.Resampling.BOX if side > n_px else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(square, "RGB").resize((n_px, n_px), resample))


# The paper's training augmentation: the shorter side resized to a random size in [256, 384], then a
# random 224 x 224 crop (which is then downsampled to the model's resolution).
CROP_SHORT_SIDE = (256, 384)
CROP_SIZE = 224


def random_resized_crop(image: np.ndarray, n_px: int, rng: np.random.Generator) -> np.ndarray:
    """The paper's random crop of an RGB uint8 image, area-downsampled to (n_px, n_px, 3).

    Resizing the short side to S and cropping 224 is cropping a square of 224/S of the short side at
    full resolution, which loses nothing to a first resize."""
    height, width = image.shape[:2]
    short_side = rng.uniform(*CROP_SHORT_SIDE)
    side = int(min(min(height, width), max(1, round(min(height, width) * CROP_SIZE / short_side))))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    return resize_image(image[top : top + side, left : left + side], n_px)

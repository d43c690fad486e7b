"""What every image source is: a fixed, indexable list of (key, RGB uint8 image, label) samples, and the image
operations they share (decoding, centre-crop resizing, the paper's random crop).

`load(i)` reads image i, so worker processes can each read their own share, and a shard set made twice from the
same source and seed is the same. Sources open their files lazily, so pickling one to a worker process sends
paths, not pixels.
"""

from __future__ import annotations

import abc
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

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

"""Image sources: the built-in digits, image folders, ImageNet's layouts, CIFAR batches, tars of images and .npy
arrays, each read as (key, RGB uint8 image, label). `open_source(spec)` picks the kind from the spec; docs/data.md
lists the layouts.
"""

from __future__ import annotations

from pathlib import Path

from megapixel.data.sources.archives import (
    CifarSource,
    ImageNetValSource,
    TarSource,
    cifar_batches,
    imagenet_val_labels,
)
from megapixel.data.sources.base import IMAGE_SUFFIXES, Source
from megapixel.data.sources.files import ArraySource, DigitsSource, FolderSource
from megapixel.errors import DataError


def open_source(spec: str) -> Source:
    """Open `digits` (built in), a folder (class-per-folder images, ImageNet val, CIFAR python, webdataset tars),
    a .npy array, a .tar of images or one CIFAR batch file; docs/data.md lists the layouts."""
    if spec == "digits":
        return DigitsSource()
    path = Path(spec)
    if not path.exists():
        raise DataError(f"no such file or folder: {spec}")
    batches = cifar_batches(path)
    if batches:
        return CifarSource(batches)
    if path.is_dir():
        labels = imagenet_val_labels(path)
        if labels is not None:
            return ImageNetValSource(path, labels)
        tars = sorted(path.glob("*.tar"))
        if tars and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            return TarSource(tars)
        return FolderSource(path)
    if path.suffix.lower() == ".npy":
        return ArraySource(path)
    if path.suffix.lower() == ".tar":
        return TarSource([path])
    raise DataError(
        f"{spec} is not a folder of images, a .npy file, a .tar of images or a CIFAR batch: "
        "give one of those, or `digits`"
    )

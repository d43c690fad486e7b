"""Sources of loose files: the built-in digits (scikit-learn's), a folder of image files (first-level subfolders
as classes), and a .npy array of images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megapixel.data.sources.base import IMAGE_SUFFIXES, Sample, Source, decode_image
from megapixel.errors import DataError


class DigitsSource(Source):
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped with it), as grey RGB, labels 0-9."""

    def __init__(self) -> None:
        # Imported here: scikit-learn takes ~0.5 s to import, which shard writing from files need not pay.
        from sklearn.datasets import load_digits

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

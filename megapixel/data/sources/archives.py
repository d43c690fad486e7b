"""Sources in published archive layouts: CIFAR-10/100 python pickles, ImageNet's val folder, webdataset tars.

ImageNet's train layout (one folder per synset) is a plain class-per-folder tree (`FolderSource`);
its val layout is a flat folder of JPEGs whose labels come from a file beside them.
"""

from __future__ import annotations

import csv
import pickle
import tarfile
from pathlib import Path

import numpy as np

from megapixel.data.sources.base import IMAGE_SUFFIXES, Sample, Source, UnreadableImage, decode_image
from megapixel.errors import DataError

# Label files accepted in an ImageNet val folder (see docs/data.md).
IMAGENET_VAL_LABELS = ("LOC_val_solution.csv", "val_labels.txt")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: numpy arrays, lists, dicts and strings; never arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"): data, not code.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(
            f"{path} is not a CIFAR python batch ({err}): give the extracted cifar-*-python files"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR python batch (no dict inside): give the extracted cifar-*-python files")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


class CifarSource(Source):
    """CIFAR-10 or CIFAR-100 python batches (32x32 RGB); CIFAR-100 uses the 100 fine labels."""

    def __init__(self, batches: list[Path]) -> None:
        self._batches = batches
        self._data: tuple[np.ndarray, np.ndarray] | None = None
        meta_names = {"batches.meta": "label_names", "meta": "fine_label_names"}
        label_names: list[str] = []
        for meta, field in meta_names.items():
            if (batches[0].parent / meta).is_file():
                label_names = [_text(n) for n in _unpickle(batches[0].parent / meta).get(field, [])]
                break
        images, labels = self._read()
        self._count = len(images)
        if not label_names:
            label_names = [str(i) for i in range(int(labels.max()) + 1)]
        super().__init__(str(batches[0].parent.resolve()), label_names)

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        if self._data is None:
            images, labels = [], []
            for path in self._batches:
                batch = _unpickle(path)
                data, label = batch.get("data"), batch.get("labels", batch.get("fine_labels"))
                if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or label is None:
                    raise DataError(f"{path} lacks 'data' (N, 3072) or labels: give the extracted cifar-*-python files")
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8))
                labels.append(np.asarray(label, dtype=np.int64))
            self._data = (np.concatenate(images), np.concatenate(labels))
        return self._data

    def __len__(self) -> int:
        return self._count

    def __getstate__(self) -> dict:
        # Workers re-read the batches (150 MB for CIFAR-10) rather than receive them through a pipe.
        return {**self.__dict__, "_data": None}

    def load(self, index: int, min_side: int = 0) -> Sample:
        images, labels = self._read()
        return Sample(f"{index:05d}", images[index], int(labels[index]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cifar_batches(path: Path) -> list[Path] | None:
    """The batch files a CIFAR path stands for (a python folder's training batches, or one batch), else None."""
    if path.is_dir():
        ten = sorted(path.glob("data_batch_[0-9]*"))
        if ten:
            return ten
        if (path / "train").is_file() and (path / "meta").is_file():
            return [path / "train"]
        return None
    if path.suffix == "" and path.is_file():
        with open(path, "rb") as f:
            # A pickle (protocol 2+) starts with PROTO 0x80; CIFAR's batches are protocol 2 or 1 ('(' or '}').
            head = f.read(1)
        return [path] if head in (b"\x80", b"(", b"}") else None
    return None


class ImageNetValSource(Source):
    """A flat folder of JPEGs labelled by LOC_val_solution.csv or val_labels.txt ("FILE WNID" lines) in it.

    Label indices are the sorted synset ids, as a class-per-folder train tree gives them, so a val set
    with every class numbers them as the train set does.
    """

    def __init__(self, folder: Path, labels_file: Path) -> None:
        wnid_of = _read_val_labels(labels_file)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        unlabelled = [p.name for p in files if p.stem not in wnid_of and p.name not in wnid_of]
        if unlabelled:
            raise DataError(
                f"{len(unlabelled)} images in {folder} have no label in {labels_file.name} (first: {unlabelled[0]}): "
                "use the labels file of this image set"
            )
        if not files:
            raise DataError(f"{folder} holds no images beside {labels_file.name}: point to ImageNet's val folder")
        self._files = files
        self._wnids = [wnid_of.get(p.stem, wnid_of.get(p.name)) for p in files]
        names = sorted(set(wnid_of.values()))
        self._class_of = {name: i for i, name in enumerate(names)}
        super().__init__(str(folder.resolve()), names)

    def __len__(self) -> int:
        return len(self._files)

    def load(self, index: int, min_side: int = 0) -> Sample:
        path = self._files[index]
        return Sample(path.name, decode_image(path, str(path), min_side), self._class_of[self._wnids[index]])


def _read_val_labels(path: Path) -> dict[str, str]:
    """{image id or file name: synset id} from LOC_val_solution.csv or "FILE WNID" / "FILE,WNID" lines."""
    labels: dict[str, str] = {}
    with open(path, newline="") as f:
        if path.suffix == ".csv":
            for row in csv.DictReader(f):
                if "ImageId" not in row or "PredictionString" not in row:
                    raise DataError(f"{path} lacks the ImageId and PredictionString columns of LOC_val_solution.csv")
                # PredictionString is "WNID x0 y0 x1 y1 [WNID ...]": every box of a val image has its class.
                labels[row["ImageId"]] = row["PredictionString"].split()[0]
        else:
            for number, line in enumerate(f, 1):
                parts = line.replace(",", " ").split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise DataError(f"{path}:{number} is not 'FILE WNID': each line names one image and its synset")
                labels[parts[0]] = parts[1]
    if not labels:
        raise DataError(f"{path} holds no labels: expected LOC_val_solution.csv or 'FILE WNID' lines")
    return labels


def imagenet_val_labels(folder: Path) -> Path | None:
    """The ImageNet val labels file in `folder` when it holds images flat beside one, else None."""
    for name in IMAGENET_VAL_LABELS:
        if (folder / name).is_file():
            return folder / name
    return None


class TarSource(Source):
    """Webdataset tars of images: each KEY.(jpg|png|...) member, labelled by a KEY.cls member when every image has one.

    The tars are indexed once (member offsets), so `load(i)` reads one image without scanning.
    """

    def __init__(self, tars: list[Path]) -> None:
        self._entries: list[tuple[int, str, int, int]] = []  # (tar, key, offset, size)
        labels: dict[tuple[int, str], int] = {}
        for number, path in enumerate(tars):
            try:
                with tarfile.open(path) as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, _, ext = member.name.partition(".")
                        if "." + ext.lower() in IMAGE_SUFFIXES:
                            self._entries.append((number, key, member.offset_data, member.size))
                        elif ext == "cls":
                            labels[number, key] = int(tar.extractfile(member).read())
            except (tarfile.TarError, OSError, ValueError) as err:
                raise DataError(f"{path} is not a readable tar of images ({err}): give webdataset .tar files") from None
        if not self._entries:
            raise DataError(f"{tars[0].parent} holds no images in its tars ({', '.join(IMAGE_SUFFIXES)})")
        self._tars = [str(p) for p in tars]
        labelled = all((t, key) in labels for t, key, _, _ in self._entries)
        self._labels = [labels[t, key] for t, key, _, _ in self._entries] if labelled else None
        names = [str(i) for i in range(max(self._labels) + 1)] if self._labels else []
        super().__init__(str(tars[0].parent.resolve()) if len(tars) > 1 else str(tars[0].resolve()), names)

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, index: int, min_side: int = 0) -> Sample:
        number, key, offset, size = self._entries[index]
        where = f"{self._tars[number]}:{key}"
        with open(self._tars[number], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise UnreadableImage(where, "the tar ends inside this image (truncated)")
        label = None if self._labels is None else self._labels[index]
        return Sample(f"{Path(self._tars[number]).stem}/{key}", decode_image(data, where, min_side), label)

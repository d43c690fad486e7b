"""The shard-set format: writing one shard, reading one (a file memory-mapped, or a fetched shard's bytes), and
reading and checking a set's manifest wherever the set is (a folder, or a URL / pipe: location: remote.py).

A shard set is a folder holding `palette.npy`, `manifest.json`, `train-000000.tar ...` and
`val-000000.tar ...`. Version 2 (written now) groups a whole shard into three tar members:
`samples.tok` (n x n_px*n_px little-endian uint16 palette indices in raster order), `samples.cls`
(n little-endian int32 class indices, -1 for none; present when the source is labelled) and
`samples.keys` (the source keys, JSON). Readers view the token array in place, so streaming
costs no per-sample tar parsing. A set made with `train_crops` K > 1 (manifest field) holds K
token rows per training image, image by image: the image's K stored random crops. Version 1 sets
(one `KEY.tok` / `KEY.cls` member per sample) are still read. `megapixel/data/writer.py` writes shard sets.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megapixel.atomic import replacing
from megapixel.data.palette import check_palette, load_palette, palette_hash
from megapixel.data.shards.remote import Location, check_remote, parse_location, read_remote
from megapixel.errors import DataError

FORMAT = "megapixel-shards"


VERSION = 2


READABLE_VERSIONS = (1, 2)


SPLITS = ("train", "val")


MEMBER = "samples"


REMAKE = "make one with `megapixel shards SRC NEW_FOLDER`"


def write_shard(path: Path, tokens: np.ndarray, labels: np.ndarray | None, keys: list[str]) -> None:
    """Write one version-2 shard; the file appears complete under `path` or not at all."""
    members = [("tok", np.ascontiguousarray(tokens, dtype="<u2").tobytes())]
    if labels is not None:
        members.append(("cls", np.asarray(labels, dtype="<i4").tobytes()))
    members.append(("keys", json.dumps(keys).encode()))
    with replacing(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for ext, data in members:
            # A fixed mtime and owner make the same samples give byte-identical shards (stable hashes).
            info = tarfile.TarInfo(f"{MEMBER}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, _BytesReader(data))


class _BytesReader:
    """A minimal file object over bytes (tarfile.addfile reads its data through `read`)."""

    def __init__(self, data: bytes) -> None:
        self._view, self._at = memoryview(data), 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._at + size
        chunk = self._view[self._at : end].tobytes()
        self._at += len(chunk)
        return chunk


def open_shard(
    path: str | Path, n_px: int, version: int = VERSION, crops: int = 1
) -> tuple[np.ndarray, np.ndarray | None]:
    """A shard file's tokens (n * crops, n_px*n_px) uint16 (memory-mapped for version 2) and labels (n,) int64 or
    None."""
    path = Path(path)
    return _read_shard(
        lambda: tarfile.open(path), lambda: np.memmap(path, dtype=np.uint8, mode="r"), str(path), n_px, version, crops
    )


def read_shard(
    data: bytes, where: str, n_px: int, version: int = VERSION, crops: int = 1
) -> tuple[np.ndarray, np.ndarray | None]:
    """`open_shard` of a shard's bytes read into memory (a remote shard; `where` names it in errors)."""
    return _read_shard(
        lambda: tarfile.open(fileobj=io.BytesIO(data)), lambda: np.frombuffer(data, dtype=np.uint8), where, n_px,
        version, crops,
    )  # fmt: skip


def _read_shard(
    open_tar: Callable[[], tarfile.TarFile],
    whole: Callable[[], np.ndarray],
    where: str,
    n_px: int,
    version: int,
    crops: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A shard's arrays: its tar headers read through `open_tar`, a version-2 shard's arrays viewed in place in
    `whole` (the file's bytes, uint8)."""
    length = n_px * n_px
    damaged = f"{where} is truncated or damaged"
    try:
        with open_tar() as tar:
            members = {m.name: m for m in tar.getmembers()}
            if version == 1:
                return _read_v1(tar, members, length, where)
        tok, cls = members.get(f"{MEMBER}.tok"), members.get(f"{MEMBER}.cls")
        if tok is None or tok.size % (2 * length * crops):
            raise DataError(f"{damaged} (no {n_px}x{n_px} token array inside): remake the shard set")
        count = tok.size // (2 * length)
        data = whole()
        if tok.offset_data + tok.size > len(data) or (cls is not None and cls.offset_data + cls.size > len(data)):
            raise DataError(f"{damaged} (it ends inside its data): copy it again or remake the shard set")
        # Tar members start on 512-byte boundaries, so the views are aligned.
        tokens = data[tok.offset_data : tok.offset_data + tok.size].view("<u2").reshape(count, length)
        labels = None
        if cls is not None:
            if cls.size * crops != 4 * count:
                raise DataError(f"{damaged} ({count // crops} images but {cls.size // 4} labels): remake the shard set")
            labels = data[cls.offset_data : cls.offset_data + cls.size].view("<i4").astype(np.int64)
        return tokens, labels
    except (tarfile.TarError, OSError, ValueError, EOFError) as err:
        # tarfile's messages can span lines (a header dump); the first says what is wrong.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{damaged} ({reason}): copy it again or remake the shard set") from None


def _read_v1(tar: tarfile.TarFile, members: dict, length: int, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A version-1 shard (one member per sample) read whole into memory."""
    rows, labels = [], []
    for name, member in members.items():
        key, _, ext = name.partition(".")
        if ext == "tok":
            raw = tar.extractfile(member).read()
            if len(raw) != 2 * length:
                raise DataError(f"{where}: sample {key} is not {length} tokens: the shard is damaged; remake the set")
            rows.append(np.frombuffer(raw, dtype="<u2"))
            cls = members.get(f"{key}.cls")
            labels.append(int(tar.extractfile(cls).read()) if cls is not None else -1)
    tokens = np.stack(rows) if rows else np.zeros((0, length), dtype=np.uint16)
    has_labels = any(label >= 0 for label in labels)
    return tokens, (np.asarray(labels, dtype=np.int64) if has_labels else None)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class ShardSet:
    """A checked shard set: its manifest, its palette and where its files are."""

    location: Location
    manifest: dict
    palette: np.ndarray

    def shard_files(self, split: str) -> list[str]:
        """Where each shard of `split` is (a path, URL or pipe: command), in the manifest's order."""
        return [self.location.file(shard["name"]) for shard in self.manifest["splits"][split]["shards"]]


def read_manifest(where: str | Path) -> dict:
    """Read and check a shard set's manifest, palette and shard files; DataError says what is wrong."""
    return open_shard_set(where).manifest


def open_shard_set(where: str | Path) -> ShardSet:
    """The shard set at `where` (a folder, URL, brace pattern or pipe: command: megapixel.data.shards.remote), its
    manifest, palette and the presence of every shard checked; DataError says what is wrong."""
    location = parse_location(str(where))
    return _open_remote(location.text) if location.remote else _open_local(location)


def _open_local(location: Location) -> ShardSet:
    shard_dir = Path(location.prefix)
    if not shard_dir.is_dir():
        raise DataError(f"no shard set at {location.text}: {REMAKE}")
    path = shard_dir / "manifest.json"
    if not path.is_file():
        hint = (
            " (an interrupted `megapixel shards`: run it again to finish)"
            if (shard_dir / "recipe.json").is_file()
            else ""
        )
        raise DataError(f"{shard_dir} has no manifest.json, so it is not a shard set{hint}: {REMAKE}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path} is not readable ({err}): remake the shard set") from None
    manifest = _parse_manifest(data, str(path))
    palette = load_palette(shard_dir / "palette.npy", k=manifest["n_vocab"])
    _check_set(location, manifest, palette)
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            if not (shard_dir / shard["name"]).is_file():
                raise DataError(f"{shard_dir} lacks {shard['name']}, listed in manifest.json: copy the whole set again")
    return ShardSet(location, manifest, palette)


@functools.cache
def _open_remote(text: str) -> ShardSet:
    """A remote set, read and checked once per process (its shards' heads too: a missing one fails here, at start)."""
    location = parse_location(text)
    where = location.file("manifest.json")
    manifest = _parse_manifest(read_remote(where), where)
    where = location.file("palette.npy")
    try:
        palette = np.load(io.BytesIO(read_remote(where)), allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{where} is not a readable .npy palette ({err}): expected (k, 3) colours in [-1, 1]") from None
    palette = check_palette(palette, where, manifest["n_vocab"])
    _check_set(location, manifest, palette)
    check_remote([file for split in SPLITS for file in ShardSet(location, manifest, palette).shard_files(split)])
    return ShardSet(location, manifest, palette)


def _parse_manifest(data: bytes, where: str) -> dict:
    """A manifest's JSON, checked for the format, version and fields readers rely on."""
    try:
        manifest = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{where} is not readable JSON ({err}): remake the shard set") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where} is not a megapixel shard manifest (format is not {FORMAT!r}): {REMAKE}")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise DataError(f"{where} has version {manifest.get('version')}: this megapixel reads versions 1 and 2")
    _check_fields(manifest, where)
    return manifest


def _check_set(location: Location, manifest: dict, palette: np.ndarray) -> None:
    """DataError unless the palette is the manifest's and a brace pattern names whole splits of its shards."""
    if palette_hash(palette) != manifest["palette_hash"]:
        raise DataError(
            f"{location.file('palette.npy')} does not match the palette_hash in {location.file('manifest.json')}: "
            "the palette was changed after the shards were written; restore it or remake the shard set"
        )
    location.check_names({split: [s["name"] for s in manifest["splits"][split]["shards"]] for split in SPLITS})


def _check_fields(manifest: dict, where: str) -> None:
    """DataError unless the manifest has every field, with the right types, that readers rely on."""
    problems = []
    for field, kind in (("n_px", int), ("n_vocab", int), ("palette_hash", str), ("label_names", list)):
        if not isinstance(manifest.get(field), kind):
            problems.append(field)
    splits = manifest.get("splits")
    for split in SPLITS:
        entry = splits.get(split) if isinstance(splits, dict) else None
        shards = entry.get("shards") if isinstance(entry, dict) else None
        valid = isinstance(shards, list) and isinstance(entry.get("count"), int)
        valid = valid and all(
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and isinstance(s.get("count"), int)
            and isinstance(s.get("sha256", ""), str)
            for s in shards
        )
        if not valid:
            problems.append(f"splits.{split}")
    if problems:
        raise DataError(f"{where} lacks or garbles {', '.join(problems)}: remake the shard set")


def crops_of(manifest: dict, split: str) -> int:
    """Token rows stored per image in `split`: the training crops of a multi-crop set, else 1."""
    return max(1, int(manifest.get("train_crops", 0))) if split == "train" else 1


def check_shards_palette(shard_dir: str | Path, palette: np.ndarray) -> None:
    """DataError unless the shard set's tokens index the same palette the model was trained on."""
    if read_manifest(shard_dir)["palette_hash"] != palette_hash(palette):
        raise DataError(f"{shard_dir} uses another palette than the checkpoint: give the shard set it was trained on")

"""Files and folders that appear whole or not at all.

Everything megapixel writes under a final name goes through here: the bytes go to a hidden temporary sibling (in
the same folder, so the rename stays on one filesystem), are flushed to disk, and the sibling is renamed over the
target in one step (os.replace). A reader sees the old file or the new one, never a torn one; a failed write (a
full disk, a kill) leaves at most a temporary, which `is_temporary` recognises, and the old file as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megapixel.errors import CheckpointError

# Temporaries are ".NAME.PID.tmp" (plus NAME's suffix, which some writers read to choose a format).
TEMPORARY_MARK = ".tmp"


def temporary_sibling(path: str | Path) -> Path:
    """The hidden temporary `path` is written as before it takes its name (unique to this process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_MARK}{path.suffix}")


def is_temporary(path: str | Path) -> bool:
    """Whether `path` is a temporary that an interrupted write left behind."""
    name = Path(path).name
    return name.startswith(".") and TEMPORARY_MARK in name


def fsync(path: str | Path) -> None:
    """Flush a file's or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file and folder under `folder`, and `folder` itself, to disk."""
    for path in Path(folder).rglob("*"):
        fsync(path)
    fsync(folder)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; when the block ends without error it is flushed and renamed over
    `path` (which may exist), else removed."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path`, replacing what was there in one step."""
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def refuse_existing(out: str | Path) -> None:
    """CheckpointError unless `out` is absent or an empty folder: nothing already on disk is overwritten."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise CheckpointError(f"{out} already exists: choose a new output folder (nothing was written)")


@contextmanager
def new_folder(out: str | Path) -> Iterator[Path]:
    """A temporary sibling folder of `out` to fill; flushed and renamed to `out` when the block ends without error,
    else removed. An existing `out` is refused (refuse_existing), so nothing already on disk is overwritten."""
    out = Path(out)
    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            out.rmdir()  # the empty folder checked above
        os.replace(tmp, out)
        fsync(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

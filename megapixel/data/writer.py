"""Write a shard set: split, fit the palette, then decode, resize and encode shards in worker processes.

The folder is written in place: `recipe.json` first (what is being made), then `palette.npy`, then
each shard (atomically, with a record under `progress/`), and `manifest.json` last; `recipe.json`
and `progress/` are then removed. A run that stops leaves finished shards behind; running the same
command again (same source, resolution, palette, split and seed) makes the missing shards only.
Every shard's content depends only on the recipe, so the set is byte-identical for any worker count.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from megapixel.atomic import write_atomic
from megapixel.data.palette import check_palette, encode_pixels, fit_palette, load_palette, palette_hash, save_palette
from megapixel.data.shards.format import FORMAT, SPLITS, VERSION, file_sha256, write_shard
from megapixel.data.sources.base import (
    CROP_SHORT_SIDE,
    CROP_SIZE,
    Source,
    UnreadableImage,
    random_resized_crop,
    resize_image,
)
from megapixel.errors import DataError

# Pixels the palette is fitted on: enough for 512 stable centres, few enough to fit in seconds.
PALETTE_PIXELS = 200_000


def write_shards(
    source: Source,
    out_dir: str | Path,
    n_px: int,
    palette: np.ndarray | None = None,
    k: int = 512,
    val_fraction: float = 0.1,
    samples_per_shard: int = 1000,
    seed: int = 0,
    progress: bool = True,
    workers: int = 0,
    train_crops: int = 0,
    val_source: Source | None = None,
) -> dict:
    """Resize, palette-encode and split `source` into a shard set at `out_dir` (resuming an interrupted one);
    `workers` > 0 decodes in that many processes; `train_crops` > 0 stores that many of the paper's random
    crops of each training image instead of its centre crop (the stream picks one per epoch); `val_source`
    (with val_fraction 0) is the validation split instead of a held-out share. Returns the manifest."""
    out_dir = Path(out_dir)
    if n_px < 1:
        raise DataError(f"resolution {n_px}: must be a positive number of pixels")
    if samples_per_shard < 1:
        raise DataError(f"samples per shard {samples_per_shard}: must be at least 1")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction {val_fraction}: must be in [0, 1)")
    if workers < 0:
        raise DataError(f"{workers} workers: must be 0 (in this process) or more")
    if train_crops < 0:
        raise DataError(f"{train_crops} training crops: must be 0 (centre crop) or more")
    if val_source is not None and val_fraction > 0:
        raise DataError(f"a validation source and a validation fraction ({val_fraction}) were both given: choose one")
    if palette is not None:
        palette = check_palette(palette, "the given palette")
    val_labels = _val_label_map(source, val_source) if val_source is not None else None
    recipe = {
        "format": FORMAT,
        "version": VERSION,
        "source": source.name,
        "images": len(source),
        "n_px": n_px,
        "k": len(palette) if palette is not None else k,
        "given_palette": palette_hash(palette) if palette is not None else None,
        "val_fraction": val_fraction,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
        "train_crops": train_crops,
    }
    if val_source is not None:
        recipe.update(val_source=val_source.name, val_images=len(val_source))
    fresh = _claim(out_dir, recipe)
    sources = Sources(source, val_source or source, val_labels)
    try:
        return _write(sources, out_dir, recipe, palette, progress, workers)
    except DataError:
        if fresh:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _claim(out_dir: Path, recipe: dict) -> bool:
    """Make `out_dir` ours: True for a new set, False to resume the same recipe; DataError for anything else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} is a file: choose a new folder for the shard set")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    if not entries:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "recipe.json", json.dumps(recipe, indent=2) + "\n")
        return True
    recipe_path = out_dir / "recipe.json"
    if "manifest.json" in entries or not recipe_path.is_file():
        raise DataError(f"{out_dir} is not empty: choose a new folder for the shard set")
    try:
        previous = json.loads(recipe_path.read_text())
    except (OSError, json.JSONDecodeError):
        previous = None
    if previous != recipe:
        raise DataError(
            f"{out_dir} is not empty: it holds an unfinished shard set made another way "
            "(source, resolution, palette, split or seed differ); rerun that command or choose a new folder"
        )
    return False


def _write(sources: Sources, out: Path, recipe: dict, palette: np.ndarray | None, progress: bool, workers: int) -> dict:
    n_px, seed = recipe["n_px"], recipe["seed"]
    plan = _plan(len(sources.train), recipe)
    if (out / "palette.npy").is_file():
        palette = load_palette(out / "palette.npy")
    else:
        if palette is None:
            palette = _fit(sources, plan["train"], n_px, recipe["k"], seed, workers, progress)
        save_palette(out / "palette.npy", palette)
    (out / "progress").mkdir(exist_ok=True)
    tasks = [
        (f"{split}-{number:06d}.tar", indices)
        for split in SPLITS
        for number, indices in enumerate(_chunks(plan[split], recipe["samples_per_shard"]))
    ]
    todo = [(name, indices) for name, indices in tasks if not (out / "progress" / f"{name}.json").is_file()]
    done_images = sum(len(indices) for name, indices in tasks) - sum(len(indices) for _, indices in todo)
    total = sum(len(indices) for _, indices in tasks)
    with tqdm(total=total, initial=done_images, desc="shards", unit="img", disable=not progress) as bar:
        for name, record in _run(todo, sources, palette, n_px, out, workers, recipe):
            write_atomic(out / "progress" / f"{name}.json", json.dumps(record))
            bar.update(record["planned"])
    records = {name: json.loads((out / "progress" / f"{name}.json").read_text()) for name, _ in tasks}
    manifest = _manifest(sources, recipe, palette, tasks, records)
    if manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 0:
        skipped = len(manifest["skipped"])
        raise DataError(f"{sources.train.name} gave no readable images ({skipped} skipped): check the source")
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out / "progress")
    (out / "recipe.json").unlink()
    return manifest


def _plan(count: int, recipe: dict) -> dict[str, np.ndarray]:
    """Source indices of each split: training in a seeded order (shards mix classes), validation in source order."""
    order = np.random.default_rng(recipe["seed"]).permutation(count)
    if "val_source" in recipe:
        return {"train": order, "val": np.arange(recipe["val_images"])}
    n_val = 0
    if recipe["val_fraction"] > 0 and count >= 2:
        n_val = min(max(1, round(count * recipe["val_fraction"])), count - 1)
    return {"train": order[n_val:], "val": np.sort(order[:n_val])}


def _chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def _fit(sources: Sources, train: np.ndarray, n_px: int, k: int, seed: int, workers: int, progress: bool) -> np.ndarray:
    """A palette fitted on PALETTE_PIXELS pixels of training images drawn at random (seeded)."""
    rng = np.random.default_rng([seed, 1])
    # Twice the images strictly needed, so the pixels are drawn from many images, not a few.
    wanted = min(len(train), max(1, 2 * -(-PALETTE_PIXELS // (n_px * n_px))))
    picks = np.sort(rng.choice(train, wanted, replace=False)) if len(train) else train
    images = []
    with tqdm(total=len(picks), desc="palette sample", unit="img", disable=not progress) as bar:
        for _, batch in _run([("palette", picks)], sources, None, n_px, None, workers, None):
            images += batch
            bar.update(len(batch))
    if not images:
        raise DataError(f"{sources.train.name} gave no readable training images to fit a palette on: check the source")
    pixels = np.concatenate([image.reshape(-1, 3) for image in images])
    return fit_palette(pixels, k, seed=seed, max_pixels=PALETTE_PIXELS)


class Sources(NamedTuple):
    """Where each split's images come from; `val_labels` maps the val source's class numbers to the train source's."""

    train: Source
    val: Source
    val_labels: np.ndarray | None


def _val_label_map(train: Source, val: Source) -> np.ndarray | None:
    """The train class number of each of `val`'s classes, matched by name; None when `train` is unlabelled."""
    if not train.label_names:
        return None
    if not val.label_names:
        raise DataError(
            f"{val.name} has no labels but {train.name} has {len(train.label_names)} classes: "
            "give a labelled validation source (ImageNet val: its LOC_val_solution.csv beside the images)"
        )
    number = {name: i for i, name in enumerate(train.label_names)}
    unknown = [name for name in val.label_names if name not in number]
    if unknown:
        raise DataError(
            f"{val.name} has {len(unknown)} classes that {train.name} lacks (first: {unknown[0]}): "
            "give the validation images of the same classes"
        )
    return np.asarray([number[name] for name in val.label_names], dtype=np.int64)


# What each worker process holds: the sources, palette and resolution, sent once at start-up.
_WORKER: dict[str, Any] = {}


def _init_worker(
    sources: Sources, palette: np.ndarray | None, n_px: int, out: Path | None, recipe: dict | None
) -> None:
    _WORKER.update(sources=sources, palette=palette, n_px=n_px, out=out, recipe=recipe)


def _run(
    tasks: list,
    sources: Sources,
    palette: np.ndarray | None,
    n_px: int,
    out: Path | None,
    workers: int,
    recipe: dict | None,
):
    """(name, result) of each task as it finishes: a shard record, or (palette=None) the resized images."""
    if not tasks:
        return
    initargs = (sources, palette, n_px, out, recipe)
    if workers == 0:
        _init_worker(*initargs)
        yield from (_task(task) for task in tasks)
        return
    if palette is None and len(tasks) == 1:
        # The palette sample is one task: split it so every worker decodes a share.
        name, indices = tasks[0]
        tasks = [(name, part) for part in np.array_split(indices, workers * 4) if len(part)]
    # spawn, not fork: the parent may hold threads (torch, tqdm) that a fork would copy mid-lock.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, context, initializer=_init_pool_worker, initargs=initargs)
    try:
        futures = [pool.submit(_task, task) for task in tasks]
        for future in futures:
            yield future.result()
    finally:
        # On Ctrl-C or an error: drop the queued shards, let the running ones finish (each is complete
        # on disk or absent), so the next run resumes cleanly.
        pool.shutdown(wait=True, cancel_futures=True)


def _init_pool_worker(*initargs: Any) -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(*initargs)


def _task(task: tuple[str, np.ndarray]) -> tuple[str, Any]:
    name, indices = task
    sources, palette, n_px, out = _WORKER["sources"], _WORKER["palette"], _WORKER["n_px"], _WORKER["out"]
    # The palette sample ("palette" tasks) is drawn from training images.
    source = sources.val if name.startswith("val-") else sources.train
    relabel = sources.val_labels if name.startswith("val-") else None  # None without a separate val source
    crops = _WORKER["recipe"]["train_crops"] if palette is not None and name.startswith("train-") else 0
    # Decoded at no less than twice the stored size (of the smallest crop, which spans 224/384 of the
    # short side), so the box filter still averages at least 2x2 pixels.
    min_side = 2 * n_px if not crops else -(-2 * n_px * CROP_SHORT_SIDE[1] // CROP_SIZE)
    images, labels, keys, skipped = [], [], [], []
    for index in indices:
        try:
            sample = source.load(int(index), min_side=min_side)
        except UnreadableImage as err:
            skipped.append(list(err.args))
            continue
        if crops:
            # Seeded by the image, so a shard's crops do not depend on which process made them.
            rng = np.random.default_rng([_WORKER["recipe"]["seed"], 2, int(index)])
            images += [random_resized_crop(sample.image, n_px, rng) for _ in range(crops)]
        else:
            images.append(resize_image(sample.image, n_px))
        label = -1 if sample.label is None else sample.label
        labels.append(label if relabel is None or label < 0 else int(relabel[label]))
        keys.append(sample.key)
    if palette is None:
        return name, images
    pixels = np.stack(images) if images else np.zeros((0, n_px, n_px, 3), dtype=np.uint8)
    tokens = encode_pixels(pixels, palette).reshape(len(images), n_px * n_px)
    write_shard(out / name, tokens, np.asarray(labels) if sources.train.label_names else None, keys)
    record = {"count": len(keys), "planned": len(indices), "sha256": file_sha256(out / name), "skipped": skipped}
    return name, record


def _manifest(sources: Sources, recipe: dict, palette: np.ndarray, tasks: list, records: dict) -> dict:
    splits = {}
    for split in SPLITS:
        shards = [
            {"name": name, "count": records[name]["count"], "sha256": records[name]["sha256"]}
            for name, _ in tasks
            if name.startswith(split + "-")
        ]
        splits[split] = {"shards": shards, "count": sum(s["count"] for s in shards)}
    return {
        "format": FORMAT,
        "version": VERSION,
        "n_px": recipe["n_px"],
        "n_vocab": len(palette),
        "palette_hash": palette_hash(palette),
        "label_names": list(sources.train.label_names),
        "splits": splits,
        "source": sources.train.name,
        **({"val_source": recipe["val_source"]} if "val_source" in recipe else {}),
        "seed": recipe["seed"],
        "val_fraction": recipe["val_fraction"],
        "train_crops": recipe["train_crops"],
        "augmentation": (
            f"train: {recipe['train_crops']} random crops per image (short side to [256, 384], 224 crop), "
            "val: centre crop"
            if recipe["train_crops"]
            else "centre crop to a square"
        )
        + "; area (box) downsampling; flips at load time",
        "skipped": [skip for name, _ in tasks for skip in records[name]["skipped"]],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

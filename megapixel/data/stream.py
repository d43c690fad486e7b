"""Stream a shard set as batches of tokens: one global order per epoch, split over ranks and workers, resumable.

The samples of a split are numbered by their place in the manifest's shards. Training reads an
endless sequence of epochs; epoch e's order is drawn from (seed, e): the shards are permuted, then
the samples inside each window of `shuffle_buffer` consecutive samples (so reads stay local to a
few shards). Global positions count through that sequence (position p is sample order_e[p - e*N]).
Batch j of rank r (of R, batch B) holds positions C0 + (j*R + r)*B ... + B, where C0 is where the
stream started; data-loader worker w builds the batches j with j % workers == w, and the loader
hands them out in order. So after any number of steps the ranks together have consumed exactly
the positions [0, C): the position is the one number C (plus the seed), and a restart with any
rank count, worker count or batch size continues at C with nothing lost or repeated. Batches may
straddle two epochs; every epoch still yields each sample exactly once.

Augmentation: a multi-crop set stores several of the paper's random crops per training image and
an epoch reads one of them (drawn from seed, epoch and image; evaluation passes read the first). In
token space: a horizontal flip (each raster row reversed), decided per global
position; and, when asked for (`downsample`) and the model's resolution divides the stored one, area
downsampling through the palette (decode, average f x f blocks, re-encode to the nearest colour).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megapixel.data.palette import PaletteDownsampler
from megapixel.data.shards.format import SPLITS, crops_of, file_sha256, open_shard, open_shard_set, read_shard
from megapixel.data.shards.remote import read_remote
from megapixel.errors import CheckpointError, DataError

# Shards a reader prepares beyond those its next batch needs (in the order the epoch first uses them).
PREPARED_AHEAD = 2


@dataclass(frozen=True)
class StreamPlan:
    """Everything a worker needs to produce one rank's batches of a split (picklable for workers)."""

    shard_files: tuple[str, ...]  # paths, or URLs / pipe: commands (remote)
    shard_counts: tuple[int, ...]
    shard_sha256: tuple[str | None, ...]  # the manifest's checksums (None: a set written without them)
    remote: bool  # shards fetched whole through webdataset.gopen (else memory-mapped files)
    version: int
    n_px: int  # stored resolution
    n_vocab: int
    crops: int  # token rows stored per image (the training crops of a multi-crop set), one used per epoch
    out_px: int  # resolution handed out (n_px, or a divisor of it: downsampled)
    palette: np.ndarray = field(compare=False)
    batch_size: int
    rank: int
    world_size: int
    seed: int
    shuffle_buffer: int
    flip: bool
    # Training: shuffled, reshuffled each epoch, endless. Evaluation: one pass in a fixed order.
    shuffle: bool

    @property
    def samples(self) -> int:
        """Samples in one epoch of the split."""
        return sum(self.shard_counts)


def epoch_order(plan: StreamPlan, epoch: int) -> np.ndarray:
    """Sample numbers (int64) of one epoch in the order they are consumed."""
    counts = np.asarray(plan.shard_counts, dtype=np.int64)
    if not plan.shuffle:
        return np.arange(counts.sum())
    rng = np.random.default_rng([plan.seed, epoch])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shards = rng.permutation(len(counts))
    order = np.concatenate([np.arange(starts[s], starts[s] + counts[s]) for s in shards])
    window = max(1, plan.shuffle_buffer)
    full = len(order) // window * window
    # Each window's samples permuted independently, in one vectorised call.
    order[:full] = rng.permuted(order[:full].reshape(-1, window), axis=1).reshape(-1)
    order[full:] = rng.permutation(order[full:])
    return order


@dataclass(frozen=True)
class _Epoch:
    """One epoch's order, and where in it each shard is first and last used (`samples` and -1: never)."""

    order: np.ndarray
    first: np.ndarray
    last: np.ndarray


class _Reader:
    """Reads samples by number across a split's shards in one process.

    It holds only the shards around its position: a shard is opened (local: memory-mapped; remote: fetched whole
    into memory) when a batch first needs it, or just before, by a background thread that prepares the next shards
    of the epoch while batches are built (remote downloads and checksums overlap the stream), and let go once the
    stream is past its last sample of the epoch. A shard is checked against the manifest before the reader uses it:
    its image count and token range always, its sha256 at every fetch of a remote shard and, for a local file, once
    in a run by the one reader whose share it is (`share`: (index, count) among all ranks' data-loader workers;
    shard s is reader s % count's), so the run reads each file once more in all, not once more per reader.
    """

    def __init__(self, plan: StreamPlan, end: int | None = None, share: tuple[int, int] = (0, 1)) -> None:
        self.plan = plan
        self.end = end  # the position the stream stops at (None: endless), so nothing past it is prepared
        self.share = share
        self.ends = np.cumsum(plan.shard_counts)
        self.epochs: dict[int, _Epoch] = {}
        self.shards: dict[int, Future] = {}
        self.checked: set[int] = set()  # local shards already checked (touched by the preparing thread only)
        self.preparer = ThreadPoolExecutor(1, thread_name_prefix="megapixel-shards")
        self.downsampler: PaletteDownsampler | None = None
        n = plan.n_px
        self.flip_index = np.arange(n * n).reshape(n, n)[:, ::-1].reshape(-1)

    def close(self) -> None:
        """Stop preparing shards (one being read finishes in the background) and let go of every shard."""
        self.preparer.shutdown(wait=False, cancel_futures=True)
        self.shards.clear()

    def _shard(self, number: int) -> tuple[np.ndarray, np.ndarray | None]:
        if number not in self.shards:
            self.shards[number] = self.preparer.submit(self._open, number)
        return self.shards[number].result()

    def _open(self, number: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A shard's tokens and labels, checked against the manifest."""
        plan = self.plan
        where = plan.shard_files[number]
        source = read_remote(where) if plan.remote else Path(where)
        if isinstance(source, bytes):
            tokens, labels = read_shard(source, where, plan.n_px, plan.version, plan.crops)
        else:
            tokens, labels = open_shard(source, plan.n_px, plan.version, plan.crops)
        if len(tokens) != plan.shard_counts[number] * plan.crops:
            raise DataError(
                f"{where} holds {len(tokens) // plan.crops} images, the manifest says {plan.shard_counts[number]}: "
                "the shard is damaged; copy it again or remake the set"
            )
        if number in self.checked:
            return tokens, labels
        # A corrupt token would otherwise surface as an index error deep inside the model's embedding.
        if len(tokens) and int(tokens.max()) >= plan.n_vocab:
            raise DataError(
                f"{where} holds token {int(tokens.max())}, outside the {plan.n_vocab}-colour palette: the shard is "
                "corrupt; copy it again or remake the set"
            )
        # Damage that keeps every token valid (a flipped bit) shows only in the checksum.
        expected = plan.shard_sha256[number]
        index, count = self.share
        if expected is not None and (plan.remote or number % count == index):
            digest = hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else file_sha256(source)
            if digest != expected:
                raise DataError(
                    f"{where} differs from its manifest (sha256 {digest[:16]}..., listed as {expected[:16]}...): it "
                    "was changed or damaged after it was written; copy it again or remake the set"
                )
        if not plan.remote:
            self.checked.add(number)
        return tokens, labels

    def _epoch(self, epoch: int) -> _Epoch:
        if epoch not in self.epochs:
            order = epoch_order(self.plan, epoch)
            shard_of = np.searchsorted(self.ends, order, side="right")
            first = np.full(len(self.ends), len(order))
            last = np.full(len(self.ends), -1)
            used, at = np.unique(shard_of, return_index=True)
            first[used] = at
            used, at = np.unique(shard_of[::-1], return_index=True)
            last[used] = len(order) - 1 - at
            # Positions only move forward: earlier epochs are not asked for again.
            self.epochs = {epoch: _Epoch(order, first, last), **{e: v for e, v in self.epochs.items() if e > epoch}}
        return self.epochs[epoch]

    def prepare(self, start: int, stop: int) -> None:
        """Let go of the shards that positions [start, stop) (the next batch) and later ones no longer need and
        start preparing those that batch needs, then the next ones of the epoch."""
        samples = self.plan.samples
        stop = stop if self.end is None else min(stop, self.end)
        wanted: list[int] = []
        for epoch in range(start // samples, (stop - 1) // samples + 1) if stop > start else ():
            spans = self._epoch(epoch)
            low, high = max(start - epoch * samples, 0), min(stop - epoch * samples, samples)
            wanted += np.flatnonzero((spans.first < high) & (spans.last >= low)).tolist()
        if stop > start and (self.end is None or stop < self.end):
            epoch = stop // samples
            spans = self._epoch(epoch)
            later = np.flatnonzero(spans.first >= stop - epoch * samples)
            wanted += later[np.argsort(spans.first[later], kind="stable")][:PREPARED_AHEAD].tolist()
        for number in [n for n in self.shards if n not in wanted]:
            self.shards.pop(number).cancel()
        for number in wanted:
            if number not in self.shards:
                self.shards[number] = self.preparer.submit(self._open, number)

    def batch(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The samples at global positions [start, stop)."""
        plan = self.plan
        positions = np.arange(start, stop)
        epochs = positions // plan.samples
        numbers = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            numbers[at] = self._epoch(int(epoch)).order[positions[at] - epoch * plan.samples]
        shard_of = np.searchsorted(self.ends, numbers, side="right")
        rows = numbers - (self.ends[shard_of] - np.asarray(plan.shard_counts)[shard_of])
        crop_rows = rows * plan.crops
        if plan.crops > 1 and plan.shuffle:
            # Each epoch sees one of an image's stored crops, drawn from (seed, epoch, image).
            crop_rows += (_mix(plan.seed + 1, epochs * plan.samples + numbers) % np.uint64(plan.crops)).astype(np.int64)
        tokens = np.empty((len(numbers), plan.n_px * plan.n_px), dtype=np.uint16)
        labels = np.full(len(numbers), -1, dtype=np.int64)
        for shard in np.unique(shard_of):
            at = np.flatnonzero(shard_of == shard)
            shard_tokens, shard_labels = self._shard(int(shard))
            tokens[at] = shard_tokens[crop_rows[at]]
            if shard_labels is not None:
                labels[at] = shard_labels[rows[at]]
        if plan.flip:
            flipped = (_mix(plan.seed, positions) & np.uint64(1)).astype(bool)
            tokens[flipped] = tokens[flipped][:, self.flip_index]
        if plan.out_px != plan.n_px:
            tokens = self._downsample(tokens)
        return {"tokens": torch.from_numpy(tokens.astype(np.int64)), "labels": torch.from_numpy(labels)}

    def _downsample(self, tokens: np.ndarray) -> np.ndarray:
        if self.downsampler is None:
            # Made once per worker: it remembers the nearest colour of every average it has seen.
            self.downsampler = PaletteDownsampler(self.plan.palette, self.plan.n_px // self.plan.out_px)
        return self.downsampler(tokens)


def _mix(seed: int, values: np.ndarray) -> np.ndarray:
    """uint64 hashes of (seed, value) (splitmix64-style): per-position random choices that no layout changes."""
    with np.errstate(over="ignore"):
        x = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed & (2**63 - 1))
        x ^= x >> np.uint64(31)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(29)
    return x


class TokenStream(IterableDataset):
    """One rank's batches from global position `start` on; each data-loader worker builds every workers-th one.

    Yields `(j, batch)`: j is the batch's number since `start`, so the loader can put workers' batches in order;
    a damaged shard ends the stream with `(j, {"error": message})`.
    """

    def __init__(self, plan: StreamPlan, start: int, end: int | None) -> None:
        super().__init__()
        self.plan, self.start, self.end = plan, start, end

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan
        reader = _Reader(plan, self.end, share=(plan.rank * workers + worker, plan.world_size * workers))

        def bounds(j: int) -> tuple[int, int]:
            first = self.start + (j * plan.world_size + plan.rank) * plan.batch_size
            return first, first + plan.batch_size if self.end is None else min(first + plan.batch_size, self.end)

        try:
            j = worker
            while True:
                first, stop = bounds(j)
                if stop <= first:
                    return
                try:
                    batch = reader.batch(first, stop)
                    reader.prepare(*bounds(j + workers))
                except DataError as err:
                    # Handed to the loader as data: raised in a data-loader worker, torch would re-raise it
                    # wrapped in the worker's traceback, not as the one-line message it is.
                    yield j, {"error": str(err)}
                    return
                yield j, batch
                j += workers
        finally:
            reader.close()


class Loader:
    """Batches `{"tokens": (B, n_px * n_px), "labels": (B,)}` of one rank; `state_dict` is its exact position.

    Infinite (training): epochs follow one another forever, each reshuffled; `iter()` continues
    from the current position. Finite (evaluation): each `iter()` is one pass in a fixed order from
    the start (or from the position last given to `load_state_dict`), the last batch possibly short.
    """

    def __init__(self, plan: StreamPlan, num_workers: int, infinite: bool) -> None:
        self.plan = plan
        self.num_workers = num_workers
        self.infinite = infinite
        self._consumed = 0  # global positions consumed by all ranks together
        self._restored = False

    def __len__(self) -> int:
        """Batches this rank gets in one pass (finite loaders only)."""
        if self.infinite:
            raise TypeError("an infinite loader has no length")
        step = self.plan.world_size * self.plan.batch_size
        first = self.plan.rank * self.plan.batch_size
        return len(range(first, self.plan.samples, step))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.infinite and not self._restored:
            self._consumed = 0
        self._restored = False
        return self._batches()

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        plan = self.plan
        stream = TokenStream(plan, self._consumed, None if self.infinite else plan.samples)
        if self.num_workers == 0:
            items: Any = iter(stream)
        else:
            items = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers))
        waiting: dict[int, dict[str, torch.Tensor]] = {}
        start, j = self._consumed, 0
        for number, batch in items:
            if "error" in batch:
                raise DataError(batch["error"])
            waiting[number] = batch
            while j in waiting:
                self._consumed = start + (j + 1) * plan.world_size * plan.batch_size
                yield waiting.pop(j)
                j += 1
        if not self.infinite:
            self._consumed = 0

    def state_dict(self) -> dict[str, Any]:
        """The position: global samples consumed, with the epoch it falls in and what must match on resume."""
        return {
            "version": 2,
            "consumed": self._consumed,
            "epoch": self._consumed // self.plan.samples,
            "samples": self.plan.samples,
            "seed": self.plan.seed,
            "shuffle_buffer": self.plan.shuffle_buffer,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`, exactly, on any number of ranks and workers and with any batch size."""
        try:
            if state.get("version") != 2:
                self._load_v1(state)
            else:
                consumed, samples = int(state["consumed"]), int(state["samples"])
                if samples != self.plan.samples:
                    raise CheckpointError(
                        f"the checkpoint's data position is for a split of {samples} samples, these shards have "
                        f"{self.plan.samples}: resume with the shard set it was trained on"
                    )
                if state.get("seed") != self.plan.seed or state.get("shuffle_buffer") != self.plan.shuffle_buffer:
                    warnings.warn(
                        "the data stream was saved with another seed or shuffle buffer: the order from here on "
                        "differs, so until the next epoch some samples repeat and others are missed",
                        stacklevel=2,
                    )
                self._consumed = consumed
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"the data position in the checkpoint is malformed ({err!r}): {state!r}") from None
        self._restored = True

    def _load_v1(self, state: dict[str, Any]) -> None:
        """A position saved by the per-worker stream of earlier versions: the same share of the same epoch."""
        warnings.warn(
            "the checkpoint's data position is from an earlier megapixel: resuming its epoch at the same share "
            "of samples, not at the exact sample",
            stacklevel=3,
        )
        done = int(state["batches"]) * int(state["batch_size"]) * int(state["world_size"])
        self._consumed = int(state["epoch"]) * self.plan.samples + min(done, self.plan.samples)


def check_resolution(shard_dir: str | Path, stored: int, n_px: int, downsample: bool) -> None:
    """DataError unless an n_px x n_px model reads shards stored at `stored`: equal, or with `downsample` a divisor."""
    if n_px == stored or (downsample and n_px < stored and stored % n_px == 0):
        return
    if downsample:
        raise DataError(
            f"{shard_dir} holds {stored}x{stored} images, which cannot be downsampled to the model's "
            f"{n_px}x{n_px} (data.downsample needs a model.n_px that divides {stored}): set model.n_px={stored} "
            f"or make shards at {n_px}x{n_px}"
        )
    divides = n_px < stored and stored % n_px == 0
    raise DataError(
        f"{shard_dir} holds {stored}x{stored} images but the model expects {n_px}x{n_px}: "
        + ("set data.downsample=true to downsample them while streaming, " if divides else "")
        + f"set model.n_px={stored}, or make shards at {n_px}x{n_px}"
    )


def make_loader(
    shard_dir: str,
    split: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    flip: bool = False,
    infinite: bool = True,
    n_px: int | None = None,
    downsample: bool = False,
) -> Loader:
    """A loader of `split` from the shard set at `shard_dir` for one rank: shuffled forever, or one fixed pass.

    `n_px` is the model's resolution (default: the stored one); with `downsample`, one that divides the
    stored resolution is made on the fly, through the palette."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise DataError(f"batch size {batch_size}: must be at least 1")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} of {world_size} ranks: need 0 <= rank < world size")
    if num_workers < 0:
        raise DataError(f"{num_workers} data-loader workers: must be 0 or more")
    shard_set = open_shard_set(shard_dir)
    manifest = shard_set.manifest
    stored = manifest["n_px"]
    if n_px is not None:
        check_resolution(shard_dir, stored, n_px, downsample)
    shards = manifest["splits"][split]["shards"]
    if not shards or manifest["splits"][split]["count"] == 0:
        raise DataError(f"{shard_dir} has no {split} samples: remake the shard set with some (val_fraction > 0)")
    plan = StreamPlan(
        shard_files=tuple(shard_set.shard_files(split)),
        shard_counts=tuple(s["count"] for s in shards),
        shard_sha256=tuple(s.get("sha256") for s in shards),
        remote=shard_set.location.remote,
        version=manifest["version"],
        n_px=stored,
        n_vocab=manifest["n_vocab"],
        crops=crops_of(manifest, split),
        out_px=n_px or stored,
        palette=shard_set.palette,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        flip=flip,
        shuffle=infinite,
    )
    return Loader(plan, num_workers, infinite)

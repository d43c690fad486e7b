"""Stream a shard set as batches of tokens: split over ranks and workers, shuffled, resumable.

Each rank's data-loader workers are "slots" (rank * workers + worker). In an epoch, the split's
shards are put in an order drawn from (seed, epoch) and dealt to the slots round-robin; when there
are fewer shards than slots, every slot reads every shard and keeps the samples whose index in the
epoch's order falls to it (index modulo slots), so a one-shard split still feeds every slot. Each
slot shuffles through a buffer seeded from (seed, epoch, rank, worker), optionally flips, and
batches. The rank's loader takes the workers' batches round-robin, skipping workers that are done.

Position: the loader counts the batches it has handed out per worker. Restoring that count makes
each worker re-read its share of the epoch and drop the batches already consumed (the cost: reading,
not training on, that part of the epoch), then continue exactly where the stopped run would have.
"""

from __future__ import annotations

import random
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megapixel.data.shards import SPLITS, read_manifest
from megapixel.errors import CheckpointError, DataError


@dataclass(frozen=True)
class StreamPlan:
    """Everything a worker needs to produce one rank's batches of a split (picklable for workers)."""

    shard_paths: tuple[str, ...]
    shard_counts: tuple[int, ...]
    n_px: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    shuffle_buffer: int
    flip: bool
    # Training: shuffled, reshuffled each epoch, full batches only. Evaluation: a fixed order and
    # the last partial batch kept.
    shuffle: bool


def _seed_of(*parts: int) -> int:
    """One integer seed mixed from several (seed, epoch, rank, worker, purpose) parts."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class TokenStream(IterableDataset):
    """One epoch of one rank's batches, dealt to the data-loader workers; workers skip consumed batches.

    Each worker yields dicts `{"worker", "tokens", "labels"}` and a final `{"worker", "end": True}`,
    so the loader knows when a worker is done and can interleave them in a fixed order.
    """

    def __init__(self, plan: StreamPlan, epoch: int, skip: tuple[int, ...]) -> None:
        super().__init__()
        self.plan = plan
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan
        samples = self._samples(worker, workers)
        # Batches are consecutive samples, so skipping b batches is skipping b * batch_size samples.
        samples = islice(samples, self.skip[worker] * plan.batch_size, None)
        batch: list[tuple[np.ndarray, int]] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == plan.batch_size:
                yield _collate(worker, batch)
                batch = []
        if batch and not plan.shuffle:
            yield _collate(worker, batch)
        yield {"worker": worker, "end": True}

    def _samples(self, worker: int, workers: int) -> Iterator[tuple[np.ndarray, int]]:
        plan = self.plan
        slots = plan.world_size * workers
        slot = plan.rank * workers + worker
        order = list(range(len(plan.shard_paths)))
        if plan.shuffle:
            random.Random(_seed_of(plan.seed, self.epoch)).shuffle(order)
        urls = [plan.shard_paths[i] for i in order]
        stages: list[Any] = []
        if len(urls) >= slots:
            urls = urls[slot::slots]
        else:
            stages.append(wds.select(_EveryNth(slot, slots)))
        if plan.shuffle and plan.shuffle_buffer > 1:
            rng = random.Random(_seed_of(plan.seed, self.epoch, plan.rank, worker, 0))
            stages.append(wds.shuffle(plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=rng))
        flips = np.random.default_rng(_seed_of(plan.seed, self.epoch, plan.rank, worker, 1))
        stages.append(wds.map(_Decoder(plan.n_px, flips if plan.flip else None)))
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), *stages)
        return iter(pipeline)


class _EveryNth:
    """Keeps every n-th sample starting at `first` (picklable, for worker processes)."""

    def __init__(self, first: int, n: int) -> None:
        self.first, self.n, self.seen = first, n, -1

    def __call__(self, sample: dict) -> bool:
        self.seen += 1
        return self.seen % self.n == self.first


class _Decoder:
    """A webdataset sample (`tok` bytes, optional `cls`) -> (tokens int64 (n_px * n_px,), label or -1)."""

    def __init__(self, n_px: int, flips: np.random.Generator | None) -> None:
        self.n_px, self.flips = n_px, flips

    def __call__(self, sample: dict) -> tuple[np.ndarray, int]:
        raw = sample.get("tok")
        if raw is None or len(raw) != 2 * self.n_px * self.n_px:
            raise DataError(
                f"sample {sample.get('__key__')} in {sample.get('__url__')} has no {self.n_px}x{self.n_px} "
                "tokens: the shard is damaged or from another resolution; remake the shard set"
            )
        tokens = np.frombuffer(raw, dtype="<u2").astype(np.int64)
        if self.flips is not None and self.flips.random() < 0.5:
            # A horizontal flip of the image is each raster row read backwards.
            tokens = tokens.reshape(self.n_px, self.n_px)[:, ::-1].reshape(-1)
        label = int(sample["cls"]) if "cls" in sample else -1
        return tokens, label


def _collate(worker: int, batch: list[tuple[np.ndarray, int]]) -> dict[str, Any]:
    tokens = torch.from_numpy(np.stack([tokens for tokens, _ in batch]))
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    return {"worker": worker, "tokens": tokens, "labels": labels}


class Loader:
    """Batches `{"tokens": (B, n_px * n_px), "labels": (B,)}` of one rank; `state_dict` is its exact position.

    Infinite (training): epochs follow one another forever, each reshuffled; `iter()` continues
    from the current position. Finite (evaluation): each `iter()` is one pass in a fixed order from
    the start, or from the position last given to `load_state_dict`.
    """

    def __init__(self, plan: StreamPlan, num_workers: int, infinite: bool) -> None:
        self.plan = plan
        self.num_workers = num_workers
        self.infinite = infinite
        self._workers = max(1, num_workers)
        self._position = self._start(0)
        self._restored = False

    def _start(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "batches": 0, "worker_batches": [0] * self._workers, "next_worker": 0}

    def __len__(self) -> int:
        """Batches in one pass (finite loaders only; a training epoch's length varies with its shuffle)."""
        if self.infinite:
            raise TypeError("an infinite loader has no length")
        plan = self.plan
        total = 0
        for worker in range(self._workers):
            slots = plan.world_size * self._workers
            slot = plan.rank * self._workers + worker
            if len(plan.shard_counts) >= slots:
                samples = sum(plan.shard_counts[slot::slots])
            else:
                samples = len(range(slot, sum(plan.shard_counts), slots))
            total += -(-samples // plan.batch_size)
        return total

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.infinite and not self._restored:
            self._position = self._start(0)
        self._restored = False
        return self._batches()

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        position = self._position
        while True:
            yield from self._epoch(position)
            if not self.infinite:
                self._position = self._start(0)
                return
            if position["batches"] == 0:
                raise DataError(
                    f"rank {self.plan.rank} got no full batch of {self.plan.batch_size} in an epoch: the split has "
                    f"{sum(self.plan.shard_counts)} samples for {self.plan.world_size} ranks x {self._workers} "
                    "workers; use a smaller batch, fewer workers or more data"
                )
            position.update(self._start(position["epoch"] + 1))

    def _epoch(self, position: dict[str, Any]) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the epoch at `position`, updating it as each batch is handed out."""
        stream = TokenStream(self.plan, position["epoch"], tuple(position["worker_batches"]))
        if self.num_workers == 0:
            items = iter(stream)
        else:
            items = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers))
        queues: list[deque] = [deque() for _ in range(self._workers)]
        done = [False] * self._workers
        worker = position["next_worker"]
        while not all(done):
            if done[worker]:
                worker = (worker + 1) % self._workers
                continue
            while not queues[worker]:
                item = next(items)
                queues[item["worker"]].append(item)
            item = queues[worker].popleft()
            if item.get("end"):
                done[worker] = True
                continue
            position["worker_batches"][worker] += 1
            position["batches"] += 1
            worker = (worker + 1) % self._workers
            position["next_worker"] = worker
            yield {"tokens": item["tokens"], "labels": item["labels"]}

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch, batches handed out in it, and what an exact resume needs."""
        plan = self.plan
        return {
            "epoch": self._position["epoch"],
            "batches": self._position["batches"],
            "worker_batches": list(self._position["worker_batches"]),
            "next_worker": self._position["next_worker"],
            "rank": plan.rank,
            "world_size": plan.world_size,
            "workers": self._workers,
            "batch_size": plan.batch_size,
            "seed": plan.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`: exactly when the layout matches, else at the same point of the epoch.

        With another rank, world size, worker count, batch size or seed the exact batches cannot be
        recreated; the epoch resumes after the same share of its samples, so until the next epoch some
        samples repeat and others are missed.
        """
        try:
            epoch, batches = int(state["epoch"]), int(state["batches"])
            same = all(state.get(key) == value for key, value in self.state_dict().items() if key not in _POSITION)
            worker_batches = [int(b) for b in state["worker_batches"]] if same else []
            next_worker = int(state["next_worker"]) if same else 0
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"the data position in the checkpoint is malformed ({err!r}): {state!r}") from None
        if same:
            self._position = {
                "epoch": epoch,
                "batches": batches,
                "worker_batches": worker_batches,
                "next_worker": next_worker,
            }
        else:
            warnings.warn(
                "the data stream was saved with another layout (rank, ranks, workers, batch size or seed); "
                "resuming its epoch at the same share of samples, not at the exact batch",
                stacklevel=2,
            )
            batch = int(state.get("batch_size", self.plan.batch_size))
            ranks = int(state.get("world_size", self.plan.world_size))
            skip = batches * batch * ranks // (self.plan.batch_size * self.plan.world_size)
            self._position = {
                "epoch": epoch,
                "batches": skip,
                "worker_batches": [skip // self._workers + (w < skip % self._workers) for w in range(self._workers)],
                "next_worker": skip % self._workers,
            }
        self._restored = True


_POSITION = ("epoch", "batches", "worker_batches", "next_worker")


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
) -> Loader:
    """A loader of `split` from the shard set at `shard_dir` for one rank: shuffled forever, or one fixed pass."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise DataError(f"batch size {batch_size}: must be at least 1")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} of {world_size} ranks: need 0 <= rank < world size")
    if num_workers < 0:
        raise DataError(f"{num_workers} data-loader workers: must be 0 or more")
    manifest = read_manifest(shard_dir)
    if n_px is not None and n_px != manifest["n_px"]:
        raise DataError(
            f"{shard_dir} holds {manifest['n_px']}x{manifest['n_px']} images but the model expects {n_px}x{n_px}: "
            "set model.n_px to match or make shards at that resolution"
        )
    shards = manifest["splits"][split]["shards"]
    if not shards or manifest["splits"][split]["count"] == 0:
        raise DataError(f"{shard_dir} has no {split} samples: remake the shard set with some (val_fraction > 0)")
    plan = StreamPlan(
        shard_paths=tuple(str(Path(shard_dir) / s["name"]) for s in shards),
        shard_counts=tuple(s["count"] for s in shards),
        n_px=manifest["n_px"],
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        flip=flip,
        shuffle=infinite,
    )
    return Loader(plan, num_workers, infinite)

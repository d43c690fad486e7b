"""Data pipeline throughput on this machine: sharding JPEGs, and streaming 32x32 / 64x64 shards per worker.

    python -m benchmarks.data --out data.json [--images 400 --samples 50000]

Sharding: images/s of `write_shards` from a folder of 500x375 JPEGs to 32x32 tokens (palette given, so the
time is decode + resize + encode + write), in this process and with 1 and 2 worker processes (their start-up
included), and per core used. Streaming: samples/s of one loader process (what one data-loader worker gives)
over grouped (version-2) shards, batches of 128, with flips; the baseline is webdataset's plain per-sample
pipeline (one tar member per sample, shuffle, decode, batch) over the same tokens, measured in the same run.
The cost of checking each shard's sha256 when a stream first opens it: the first epoch (and three) of a fresh
stream with and without the checksums. Remote sets: the same stream from a web server on 127.0.0.1 against the
local files, as rank 0 of 1 and of 8 ranks. On-the-fly 64 -> 32 downsampling through the palette is measured on
random tokens (every block a new colour: the worst case), cold and after its colour table has filled for a while,
and on the JPEGs' own tokens.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from megapixel.data.palette import palette_hash, save_palette
from megapixel.data.shards.format import FORMAT, VERSION, file_sha256, write_shard
from megapixel.data.sources import open_source
from megapixel.data.writer import write_shards

BATCH = 128


def make_jpegs(folder: Path, count: int, rng: np.random.Generator) -> None:
    """Photo-like 500x375 JPEGs (smooth gradients plus noise: ImageNet's typical size and file size)."""
    y, x = np.mgrid[0:375, 0:500]
    for i in range(count):
        base = np.stack([(x * rng.uniform(0.2, 0.5) + y * rng.uniform(0.1, 0.4) + rng.uniform(0, 255)) % 256] * 3, -1)
        image = np.clip(base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        (folder / f"c{i % 10}").mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"c{i % 10}" / f"{i:05d}.jpg", quality=90)


def bench_sharding(root: Path, count: int, palette: np.ndarray) -> list[dict]:
    source = open_source(str(root / "jpegs"))
    rows = []
    # workers=0 decodes in this process (one core; the palette look-up alone may use a second thread).
    for workers, label in ((0, "in this process"), (1, "1 worker process"), (2, "2 worker processes")):
        start = time.perf_counter()
        out = root / f"jpeg-shards-{workers}"
        write_shards(source, out, 32, palette=palette, samples_per_shard=50, progress=False, workers=workers)
        rate = count / (time.perf_counter() - start)
        what = f"shard JPEG 500x375 -> 32x32, {label}"
        rows.append({"what": what, "images_per_s": rate, "images_per_s_per_core": rate / max(1, workers)})
    return rows


def make_token_set(folder: Path, n_px: int, samples: int, palette: np.ndarray, rng: np.random.Generator) -> None:
    """A version-2 shard set of random tokens (streaming cost does not depend on the token values)."""
    folder.mkdir()
    save_palette(folder / "palette.npy", palette)
    shards = []
    for number, start in enumerate(range(0, samples, 10_000)):
        count = min(10_000, samples - start)
        name = f"train-{number:06d}.tar"
        write_shard(folder / name, rng.integers(0, 512, (count, n_px * n_px)), rng.integers(0, 1000, count), [])
        shards.append({"name": name, "count": count, "sha256": file_sha256(folder / name)})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "n_px": n_px,
        "n_vocab": 512,
        "palette_hash": palette_hash(palette),
        "label_names": [str(i) for i in range(1000)],
        "splits": {"train": {"shards": shards, "count": samples}, "val": {"shards": [], "count": 0}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def samples_per_s(batches, samples: int) -> float:
    taken = 0
    start = time.perf_counter()
    for batch in batches:
        taken += len(batch["labels"]) if isinstance(batch, dict) else len(batch[1])
        if taken >= samples:
            break
    return taken / (time.perf_counter() - start)


def bench_streaming(root: Path, samples: int, palette: np.ndarray, rng: np.random.Generator) -> list[dict]:
    # torch and webdataset are imported here, not at the top: spawned sharding workers re-import this
    # module, and would each pay for them.
    import webdataset as wds

    from megapixel.data.stream import make_loader

    rows = []
    for n_px in (32, 64):
        folder = root / f"tokens-{n_px}"
        make_token_set(folder, n_px, samples, palette, rng)
        loader = make_loader(str(folder), "train", BATCH, flip=True, shuffle_buffer=1000)
        list(islice(loader, 2))  # open the shards once (page cache), as a running stream has
        rate = samples_per_s(loader, samples)
        rows.append({"what": f"megapixel stream {n_px}x{n_px}, 1 worker", "samples_per_s": rate})
    rows += bench_checksums(root / "tokens-32", samples)
    rows += bench_remote(root / "tokens-32", samples)
    rows += bench_downsampling(root, samples)
    # Baseline: the same 32x32 tokens, one tar member per sample, webdataset's plain pipeline.
    tokens = rng.integers(0, 512, (samples, 1024)).astype("<u2")
    path = root / "per-sample.tar"
    with wds.TarWriter(str(path), encoder=False) as writer:
        for i, row in enumerate(tokens):
            writer.write({"__key__": f"{i:08d}", "tok": row.tobytes(), "cls": str(i % 1000).encode()})

    def decode(sample):
        return np.frombuffer(sample["tok"], dtype="<u2").astype(np.int64), int(sample["cls"])

    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(path)]),
        wds.tarfile_to_samples(),
        wds.shuffle(1000),
        wds.map(decode),
        wds.batched(BATCH),
    )
    rate = samples_per_s(pipeline, samples)
    rows.append({"what": "webdataset per-sample 32x32, 1 worker (baseline)", "samples_per_s": rate})
    return rows


def bench_checksums(folder: Path, samples: int, rounds: int = 3) -> list[dict]:
    """The first epoch of a fresh stream (each shard's sha256 checked as it is first opened) against the same stream
    with the checksums left out of its plan, alternating, best of `rounds`; then three epochs of each."""
    from megapixel.data.stream import Loader, make_loader

    checked = make_loader(str(folder), "train", BATCH, flip=True, shuffle_buffer=1000).plan
    unchecked = replace(checked, shard_sha256=(None,) * len(checked.shard_files))
    list(islice(Loader(checked, 0, True), 2))  # the files in the page cache, as for the rows above
    best: dict[tuple[str, int], float] = {}
    for _ in range(rounds):
        for label, plan in (("checked", checked), ("unchecked", unchecked)):
            for epochs in (1, 3):
                rate = samples_per_s(Loader(plan, 0, True), epochs * samples)
                best[label, epochs] = max(best.get((label, epochs), 0.0), rate)
    rows = []
    for epochs in (1, 3):
        cost = 1 - best["checked", epochs] / best["unchecked", epochs]
        for label in ("unchecked", "checked"):
            what = f"stream 32x32, {epochs} epoch{'s' if epochs > 1 else ''} from start, sha256 {label}"
            rows.append({"what": what, "samples_per_s": best[label, epochs]})
        rows[-1]["cost_percent"] = 100 * cost
    return rows


def bench_remote(folder: Path, samples: int) -> list[dict]:
    """The 32x32 set streamed by one worker from local files and from a web server on 127.0.0.1 (python -m
    http.server in its own process; webdataset's gopen, i.e. curl), as rank 0 of 1 and of 8 ranks (a rank of 8
    reads an eighth of each shard it fetches whole); each from the start, best of two."""
    from megapixel.data.stream import make_loader

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(100):
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        rows = []
        for ranks in (1, 8):
            for where, label in ((str(folder), "local files"), (url, "loopback http")):
                rate = max(
                    samples_per_s(
                        make_loader(where, "train", BATCH, world_size=ranks, flip=True, shuffle_buffer=1000),
                        samples // ranks,
                    )
                    for _ in range(2)
                )
                rows.append({"what": f"stream 32x32 from {label}, rank 0 of {ranks}, 1 worker", "samples_per_s": rate})
        return rows
    finally:
        server.terminate()
        server.wait()


def bench_downsampling(root: Path, samples: int) -> list[dict]:
    """64x64 shards streamed to a 32x32 model through the palette, in one loader process."""
    from megapixel.data.stream import make_loader

    rows = []
    # Random tokens and a random palette: nearly every averaged block is a colour not seen before, so the
    # nearest-colour table starts empty and fills slowly (the worst case).
    loader = make_loader(str(root / "tokens-64"), "train", BATCH, flip=True, n_px=32, downsample=True)
    batches = iter(loader)
    cold = samples_per_s(batches, 5_000)
    samples_per_s(batches, max(0, samples // 2 - 5_000))  # fill the table further
    warm = samples_per_s(batches, 5_000)
    rows.append({"what": "stream 64x64 -> 32x32, random tokens, first 5,000", "samples_per_s": cold})
    rows.append({"what": f"stream 64x64 -> 32x32, random tokens, after {samples // 2:,}", "samples_per_s": warm})
    # The JPEGs' own tokens at 64x64 (palette fitted to them): the colours of real images.
    source = open_source(str(root / "jpegs"))
    write_shards(source, root / "jpeg-shards-64", 64, k=512, val_fraction=0, progress=False)
    loader = make_loader(str(root / "jpeg-shards-64"), "train", BATCH, flip=True, n_px=32, downsample=True)
    batches = iter(loader)
    first = samples_per_s(batches, len(source))
    later = samples_per_s(batches, samples)
    rows.append({"what": f"stream 64x64 -> 32x32, JPEG tokens, first {len(source):,}", "samples_per_s": first})
    rows.append({"what": f"stream 64x64 -> 32x32, JPEG tokens, next {samples:,}", "samples_per_s": later})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run both benchmarks, print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data.json")
    parser.add_argument("--images", type=int, default=400, help="JPEGs to shard")
    parser.add_argument("--samples", type=int, default=50_000, help="samples to stream")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    palette = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "jpegs").mkdir()
        make_jpegs(root / "jpegs", args.images, rng)
        rows = bench_sharding(root, args.images, palette) + bench_streaming(root, args.samples, palette, rng)
    for row in rows:
        numbers = ", ".join(
            f"{k} {v:,.2f}" if k == "cost_percent" else f"{k} {v:,.0f}" for k, v in row.items() if k != "what"
        )
        print(f"{row['what']:<56} {numbers}")
    Path(args.out).write_text(json.dumps({"benchmark": "data", "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

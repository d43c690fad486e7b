"""Benchmark KV-cached sampling against naive sampling (the whole prefix recomputed at every position).

CPU or GPU. From the repository root:

    python -m benchmarks.sampling --out sampling.json [--device cuda] [--models tiny-16,s-16]

Each model is built at random (its weights do not change the cost), its head given random weights so the
draws are not uniform; both samplers draw the same tokens for a seed (tests/test_sample.py), so only time
differs. Reports seconds per batch, images/s and the speed-up of the cache; the naive sampler is timed on
the same batch in the same run. The naive sampler's cost grows with the square of the sequence length, so
the speed-up grows with the resolution.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from megapixel.config import preset
from megapixel.evaluation.sample import sample, sample_naive
from megapixel.model.igpt import IGPT

DEFAULT_MODELS = ("tiny-8", "tiny-16")


def build(name: str, device: str) -> IGPT:
    """A randomly initialised model of preset `name` (NAME-PX), fp32 on `device`."""
    cfg = preset(name).model
    cfg.n_vocab = 512
    cfg.kernels = "torch"
    torch.manual_seed(0)
    model = IGPT(cfg).to(device).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.3)
    return model


def seconds(fn: Any, device: str, repeats: int) -> float:
    """Best wall-clock seconds of `repeats` calls (the minimum is least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def run(models: list[str], batch: int, device: str, repeats: int) -> list[dict[str, Any]]:
    """One row per model: seconds per batch for each sampler and the cache's speed-up."""
    rows = []
    for name in models:
        model = build(name, device)
        cached = seconds(lambda m=model: sample(m, batch, batch_size=batch, seed=1), device, repeats)
        naive = seconds(lambda m=model: sample_naive(m, batch, batch_size=batch, seed=1), device, repeats)
        cfg = model.cfg
        rows.append(
            {
                "model": name,
                "layers": cfg.n_layer,
                "width": cfg.n_embd,
                "n_ctx": cfg.n_ctx,
                "batch": batch,
                "cached_s": cached,
                "naive_s": naive,
                "cached_img_s": batch / cached,
                "naive_img_s": batch / naive,
                "speedup": naive / cached,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| model | layers x width | tokens | batch | cached s | naive s | cached img/s | naive img/s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layers']}x{r['width']} | {r['n_ctx']} | {r['batch']} | {r['cached_s']:.2f} | "
            f"{r['naive_s']:.2f} | {r['cached_img_s']:.1f} | {r['naive_img_s']:.1f} | {r['speedup']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, time both samplers, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="presets NAME-PX, comma-separated")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="sampling.json")
    args = parser.parse_args()
    rows = run([m for m in args.models.split(",") if m], args.batch, args.device, args.repeats)
    cpu = f"{os.cpu_count()}-core CPU ({platform.machine()})"
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu
    print(table(rows))
    record = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

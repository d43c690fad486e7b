"""Benchmark the fused Triton RMS and layer norms (plain and with the residual add) against torch's.

GPU only. From the repository root:

    python -m benchmarks.norm --out norm.json [--dtype bf16]

Rows of 16384 tokens at widths 512, 1536 and 3072; torch's baseline is F.rms_norm / F.layer_norm,
preceded by `x + residual` in the fused cases. Reports median milliseconds (triton.testing.do_bench)
and GB/s of the least memory traffic, for the forward and forward+backward, and the ratio of the
Triton kernel's bandwidth to torch's (> 1: Triton is faster). Norms do too few FLOPs for TFLOP/s
to mean anything, so none is reported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROWS = 16384
WIDTHS = (512, 1536, 3072)
VARIANTS = ("rms", "rms+residual", "layer", "layer+residual")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def norm_bytes(rows: int, width: int, elem: int, residual: bool, backward: bool) -> float:
    """Least traffic: x (and residual) in, y (and h) out; the backward reads dy (and dh) and h, writes dx.

    x and residual share one gradient, so dx is written once.
    """
    streams = 4 if residual else 2
    if backward:
        streams += 4 if residual else 3
    return rows * width * elem * streams


def _implementations() -> dict[str, Callable]:
    import torch.nn.functional as F

    from megapixel_kernels.norm import layer_norm, rms_norm

    def torch_norm(x, w, b, r):
        h = x if r is None else x + r
        y = F.rms_norm(h, (h.shape[-1],), w) if b is None else F.layer_norm(h, (h.shape[-1],), w, b)
        return y if r is None else (y, h)

    def triton_norm(x, w, b, r):
        return rms_norm(x, w, residual=r) if b is None else layer_norm(x, w, b, residual=r)

    return {"triton": triton_norm, "torch": torch_norm}


def _time_one(fn: Callable, args: tuple, upstream: tuple, backward: bool) -> float:
    """Median milliseconds of fn(*args), or of it and its backward from the upstream gradients."""
    import torch

    from benchmarks.attention import median_ms

    if not backward:
        with torch.no_grad():
            return median_ms(lambda: fn(*args))

    def step():
        out = fn(*args)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), upstream)

    return median_ms(step, grad_to_none=[t for t in args if t is not None])


def run(dtype_name: str) -> tuple[list[list[str]], list[dict]]:
    """Time both implementations for every variant, width and pass."""
    import torch

    from benchmarks.attention import error_text

    dtype = getattr(torch, DTYPES[dtype_name])
    impls = _implementations()
    table, records = [], []
    for variant in VARIANTS:
        residual = variant.endswith("+residual")
        for width in WIDTHS:

            def make(*shape):
                return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)

            x, w = make(ROWS, width), make(width)
            b = make(width) if variant.startswith("layer") else None
            r = make(ROWS, width) if residual else None
            dy = torch.randn(ROWS, width, device="cuda", dtype=dtype)
            upstream = (dy, torch.randn_like(dy)) if residual else (dy,)
            for pass_name in ("fwd", "fwd+bwd"):
                backward = pass_name == "fwd+bwd"
                nbytes = norm_bytes(ROWS, width, x.element_size(), residual, backward)
                record: dict[str, Any] = {"variant": variant, "rows": ROWS, "width": width, "pass": pass_name}
                for name, fn in impls.items():
                    try:
                        ms = _time_one(fn, (x, w, b, r), upstream, backward)
                    except Exception as err:  # record and go on: one failing case should not void the run
                        record[name] = {"error": error_text(err)}
                        continue
                    record[name] = {"ms": ms, "gbps": nbytes / ms / 1e6}
                ok = all("ms" in record[n] for n in impls)
                record["ratio_to_torch"] = record["triton"]["gbps"] / record["torch"]["gbps"] if ok else None
                records.append(record)
                table.append(
                    [
                        variant,
                        str(width),
                        pass_name,
                        *(f"{record[n]['gbps']:.0f}" if "ms" in record[n] else "err" for n in impls),
                        f"{record['ratio_to_torch']:.2f}" if ok else "n/a",
                    ]
                )
                print(" ".join(table[-1]), flush=True)
    return table, records


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, benchmark, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="path of the JSON results")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args(argv)
    if __package__ in (None, ""):  # run as a file rather than with -m: make the repository importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.attention import print_table, require_cuda, write_json

    require_cuda("benchmarks/norm.py")
    table, records = run(args.dtype)
    print()
    print_table(["variant", "width", "pass", "triton GB/s", "torch GB/s", "ratio"], table)
    print(f"({ROWS} rows; ratio = Triton / torch, > 1 means Triton is faster)")
    write_json(args.out, {"benchmark": "norm", "dtype": args.dtype, "results": records})


if __name__ == "__main__":
    main()

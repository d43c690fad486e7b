"""Benchmark the fused Triton attention against torch SDPA's cuDNN, flash and memory-efficient backends.

GPU only. From the repository root:

    python -m benchmarks.attention --out attention.json [--dtype bf16] [--causal both]

Reports median milliseconds (triton.testing.do_bench), TFLOP/s (a causal mask counts half the
FLOPs) and GB/s of the minimum memory traffic, for the forward and for forward+backward, and the
ratio of the Triton kernel's throughput to the best torch backend's (> 1: Triton is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (batch, heads, seq, head_dim): iGPT-S, -M and -L heads at 32x32 pixels, iGPT-L at 48x48, iGPT-XL at 64x64.
SHAPES = [(16, 8, 1024, 64), (8, 8, 1024, 128), (8, 16, 1024, 96), (4, 16, 2304, 96), (2, 24, 4096, 128)]
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
PASSES = ("fwd", "fwd+bwd")


def require_cuda(script: str) -> None:
    """Exit with one line unless a CUDA GPU and the compiled (not interpreted) Triton are available."""
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device found (torch.cuda.is_available() is False); run it on a GPU machine.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit(f"{script}: TRITON_INTERPRET=1 is set; unset it to benchmark compiled kernels.")


def median_ms(fn: Callable[[], Any], grad_to_none: list | None = None) -> float:
    """Median wall time of fn on the GPU, in milliseconds."""
    import triton.testing

    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def attention_flops(b: int, h: int, s: int, d: int, causal: bool, backward: bool) -> float:
    """FLOPs of attention: QK^T and PV are 2*s*s*d each per head; the backward's five matmuls add 2.5x."""
    fwd = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    return fwd * 3.5 if backward else fwd


def attention_bytes(b: int, h: int, s: int, d: int, elem: int, backward: bool) -> float:
    """Least memory traffic: q, k, v in and o out; the backward adds q, k, v, o, dO in and dq, dk, dv out."""
    return b * h * s * d * elem * (12 if backward else 4)


def error_text(err: Exception) -> str:
    """An exception as one short line for the table and the JSON."""
    first_line = (str(err).splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:200]}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Print rows as aligned columns."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for line in (header, ["-" * w for w in widths], *rows):
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths, strict=True)))


def write_json(path: str | None, results: dict) -> None:
    """Write the results with the device and versions they were measured with."""
    import torch
    import triton

    if path is None:
        print("(no --out given: JSON not written)")
        return
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **results,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


def _implementations() -> dict[str, tuple[Callable, Any]]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from megapixel_kernels.attention import attention

    def sdpa(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return {
        "triton": (lambda q, k, v, causal: attention(q, k, v, causal=causal), None),
        "cudnn": (sdpa, SDPBackend.CUDNN_ATTENTION),
        "flash": (sdpa, SDPBackend.FLASH_ATTENTION),
        "efficient": (sdpa, SDPBackend.EFFICIENT_ATTENTION),
    }


def _time_one(fn, backend, q, k, v, do, causal: bool, backward: bool) -> float:
    import contextlib

    import torch
    from torch.nn.attention import sdpa_kernel

    # The backend is pinned around the whole timing loop so no call falls back to another one.
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        if backward:

            def step():
                fn(q, k, v, causal).backward(do)

            return median_ms(step, grad_to_none=[q, k, v])
        with torch.no_grad():
            return median_ms(lambda: fn(q, k, v, causal))


def _max_abs_diff(impls, q, k, v, causal: bool) -> float | str | None:
    """Largest difference between the Triton output and the first torch backend that runs."""
    import torch
    from torch.nn.attention import sdpa_kernel

    fn, _ = impls["triton"]
    with torch.no_grad():
        try:
            ours = fn(q, k, v, causal).float()
        except Exception as err:  # reported in the JSON; the timing below will fail the same way
            return error_text(err)
        for name in ("flash", "cudnn", "efficient"):
            other, backend = impls[name]
            try:
                with sdpa_kernel(backend):
                    return (ours - other(q, k, v, causal).float()).abs().max().item()
            except RuntimeError:  # no kernel of this backend for this shape or GPU
                continue
    return None


def run(dtype_name: str, causal_modes: list[bool]) -> tuple[list[list[str]], list[dict]]:
    """Time every implementation on every shape, mask and pass."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    impls = _implementations()
    table, records = [], []
    for b, h, s, d in SHAPES:
        for causal in causal_modes:
            q, k, v, do = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_()
            diff = _max_abs_diff(impls, q, k, v, causal)
            for pass_name in PASSES:
                backward = pass_name == "fwd+bwd"
                flops = attention_flops(b, h, s, d, causal, backward)
                nbytes = attention_bytes(b, h, s, d, q.element_size(), backward)
                record: dict[str, Any] = {
                    "shape": [b, h, s, d],
                    "causal": causal,
                    "pass": pass_name,
                    "max_abs_diff_vs_torch": diff,
                }
                for name, (fn, backend) in impls.items():
                    try:
                        ms = _time_one(fn, backend, q, k, v, do, causal, backward)
                    except Exception as err:  # e.g. a backend without a kernel for this shape or GPU
                        record[name] = {"error": error_text(err)}
                        continue
                    record[name] = {"ms": ms, "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6}
                timed = {n: r["tflops"] for n, r in record.items() if n in impls and n != "triton" and "ms" in r}
                best = max(timed, key=timed.get) if timed else None
                record["best_torch"] = best
                record["ratio_to_best_torch"] = (
                    record["triton"]["tflops"] / timed[best] if best and "ms" in record["triton"] else None
                )
                records.append(record)
                table.append(
                    [
                        f"{b}x{h}x{s}x{d}",
                        "causal" if causal else "full",
                        pass_name,
                        *(f"{record[n]['tflops']:.1f}" if "ms" in record[n] else "n/a" for n in impls),
                        f"{record['triton'].get('gbps', 0):.0f}",
                        f"{record['ratio_to_best_torch']:.2f}" if record["ratio_to_best_torch"] else "n/a",
                        best or "n/a",
                    ]
                )
                print(" ".join(table[-1]), flush=True)
    return table, records


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, benchmark, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="path of the JSON results")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--causal", choices=("both", "true", "false"), default="both")
    args = parser.parse_args(argv)
    require_cuda("benchmarks/attention.py")
    causal_modes = {"both": [True, False], "true": [True], "false": [False]}[args.causal]

    table, records = run(args.dtype, causal_modes)
    print()
    print_table(
        [
            "B x H x S x D",
            "mask",
            "pass",
            "triton",
            "cudnn",
            "flash",
            "efficient",
            "triton GB/s",
            "ratio",
            "best torch",
        ],
        table,
    )
    print("(TFLOP/s per implementation; ratio = Triton / best torch backend, > 1 means Triton is faster)")
    write_json(args.out, {"benchmark": "attention", "dtype": args.dtype, "results": records})


if __name__ == "__main__":
    main()

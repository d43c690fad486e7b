"""Benchmark whole training steps: megapixel's DeepSpeed engine against plain PyTorch iGPT and HF ImageGPT.

From the repository root, on a GPU:

    python -m benchmarks.train_step --out train_step.json [--models s,m,l,l-48,xl-64] [--steps 10]

Each case trains one model through one implementation, bf16, a fixed micro-batch, no gradient accumulation:
- `megapixel-triton`, `megapixel-torch`: megapixel's real path (`build_engine`: the DeepSpeed engine, bf16
  weights, ZeRO-0, gradient clipping at 1.0) with `model.kernels` set to triton or torch;
- `plain`, `plain-compiled`: the same network written plainly (fused qkv, F.scaled_dot_product_attention,
  torch's RMS norm), fp32 weights under bf16 autocast, fused AdamW, no clipping; eager and torch.compile'd;
- `hf`: transformers' ImageGPTForCausalImageModeling built from a config (eager attention), bf16 autocast.

Reports tokens/s, MFU (6N + 12 L d T FLOPs a token over a stated peak, 989 TFLOP/s for an H100 SXM's dense
bf16 by default), the step's peak GPU memory above what was allocated before the case, and for megapixel's
engine the planner's predicted peak (megapixel/planning/estimate.py) beside it. `--tiny` runs tiny shapes for a few
steps on whatever device there is (CI runs it on the CPU, where memory is not measured).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# (preset, micro-batch): the GPU README's baselines for S, M and L at 32x32, then L at 48x48 and an XL-width
# model at 64x64 whose depth --xl-layers cuts so that one GPU holds it.
MODELS = {"s": 32, "m": 16, "l": 8, "l-48": 4, "xl-64": 2}
IMPLS = ("megapixel-triton", "megapixel-torch", "plain", "plain-compiled", "hf")
TINY_MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_px": 8, "n_vocab": 512}


def model_config(name: str, xl_layers: int, tiny: bool) -> Any:
    """The megapixel Config of a benchmark model, with bf16 training and the whole batch in one micro-batch."""
    from megapixel.config import from_dict, preset

    if tiny:
        cfg = from_dict({"model": TINY_MODEL})
    else:
        cfg = preset(name)
        if name.startswith("xl"):
            cfg.model.n_layer = xl_layers
    return cfg


def plain_igpt(cfg: Any) -> Any:
    """iGPT written plainly: fused qkv, SDPA, torch's RMS norm, quick GELU, no biases, untied head."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    m = cfg.model
    d, heads = m.n_embd, m.n_head

    class PlainBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
            self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
            u = self.fc(self.norm2(x))
            return x + self.out(u * torch.sigmoid(1.702 * u))

    class PlainIGPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(m.n_vocab, d), nn.Embedding(m.n_ctx, d)
            self.sos = nn.Parameter(torch.randn(d) * 0.02)
            self.blocks = nn.ModuleList(PlainBlock() for _ in range(m.n_layer))
            self.ln_f, self.head = nn.RMSNorm(d, eps=1e-5), nn.Linear(d, m.n_vocab, bias=False)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            b, t = tokens.shape
            h = torch.cat([self.sos.expand(b, 1, d), self.wte(tokens[:, :-1])], dim=1) + self.wpe.weight[:t]
            for block in self.blocks:
                h = block(h)
            logits = self.head(self.ln_f(h)).float()
            return F.cross_entropy(logits.view(-1, m.n_vocab), tokens.view(-1))

    return PlainIGPT()


def hf_imagegpt(cfg: Any) -> Any:
    """transformers' ImageGPT of cfg's shape (no dropout), as a loss function of palette tokens."""
    import torch
    import torch.nn as nn
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    from megapixel.checkpoint.hf import ARCHITECTURE_FIELDS

    m = cfg.model
    # The architecture megapixel's HF export writes (quick GELU, its norm epsilon, untied head), no dropout.
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    sizes = {"n_positions": m.n_ctx, "n_embd": m.n_embd, "n_layer": m.n_layer, "n_head": m.n_head}
    # vocab_size: the palette and the start-of-sequence token.
    config = ImageGPTConfig(vocab_size=m.n_vocab + 1, **sizes, **no_dropout, **ARCHITECTURE_FIELDS, use_cache=False)

    class HFLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = ImageGPTForCausalImageModeling(config)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            sos = torch.full_like(tokens[:, :1], m.n_vocab)
            inputs = torch.cat([sos, tokens[:, :-1]], dim=1)
            return self.model(input_ids=inputs, labels=inputs).loss

    return HFLoss()


def eager_step(module: Any, device: Any) -> Callable[[Any], Any]:
    """One bf16-autocast training step of `module` (fp32 weights) with torch's fused AdamW."""
    import torch

    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")

    def step(tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = module(tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def megapixel_step(cfg: Any, kernels: str, batch: int) -> Callable[[Any], Any]:
    """megapixel's own training step: build_engine's DeepSpeed engine, forward, backward, step."""
    from megapixel.config import apply_overrides
    from megapixel.engine.build import build_engine, deepspeed_config
    from megapixel.parallel.distributed import init_distributed

    cfg = apply_overrides(
        copy.deepcopy(cfg),
        [f"model.kernels={kernels}", "train.precision=bf16", f"train.batch_size={batch}", "parallel.zero_stage=0"],
    )
    info = init_distributed()
    engine = build_engine(cfg, deepspeed_config(cfg, info.world_size, info.device), info)

    def step(tokens: Any) -> Any:
        loss = engine(tokens)
        engine.backward(loss)
        engine.step()
        return loss

    return step


def build_case(impl: str, cfg: Any, batch: int, device: Any, compile_backend: str) -> Callable:
    """The step function of one implementation (it holds the engine or model: drop it to free them)."""
    import torch

    if impl.startswith("megapixel"):
        return megapixel_step(cfg, impl.split("-")[1], batch)
    torch.manual_seed(0)
    module = (hf_imagegpt(cfg) if impl == "hf" else plain_igpt(cfg)).to(device)
    if impl == "plain-compiled":
        module = torch.compile(module, backend=compile_backend)
    return eager_step(module, device)


def planned_peak(cfg: Any, batch: int) -> float:
    """The planner's peak bytes for megapixel's engine on one GPU (ZeRO-0, bf16, flash-style attention)."""
    from megapixel.planning.estimate import Cluster, Layout, estimate

    return estimate(cfg, Layout(micro_batch=batch), Cluster()).peak


def time_case(step: Callable, tokens: Any, device: Any, warmup: int, steps: int) -> tuple[float, float, float]:
    """Mean seconds a step over `steps` after `warmup` untimed ones, the last loss, and the peak allocated bytes."""
    import torch

    cuda = device.type == "cuda"
    for _ in range(warmup):
        step(tokens)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(tokens)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = float(torch.cuda.max_memory_allocated()) if cuda else float("nan")
    return seconds, float(loss.item()), peak


def run(args: argparse.Namespace) -> tuple[list[list[str]], list[dict]]:
    """Time every implementation on every model."""
    import torch

    from benchmarks.attention import error_text
    from megapixel.planning.counts import flops_per_token, parameter_counts

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = ["tiny"] if args.tiny else args.models.split(",")
    impls = [i for i in args.impls.split(",") if device.type == "cuda" or i != "megapixel-triton"]
    table, records = [], []
    for name in names:
        cfg = model_config(name, args.xl_layers, args.tiny)
        batch = args.batch or (2 if args.tiny else MODELS[name])
        n_params = sum(parameter_counts(cfg).values())
        tokens = torch.randint(0, cfg.model.n_vocab, (batch, cfg.model.n_ctx), device=device)
        label = f"{name} ({cfg.model.n_layer} of 60 blocks)" if name.startswith("xl") else name
        for impl in impls:
            record: dict[str, Any] = {"model": label, "impl": impl, "batch": batch, "params": n_params}
            before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            step = None
            try:
                step = build_case(impl, cfg, batch, device, args.compile_backend)
                seconds, loss, peak = time_case(step, tokens, device, args.warmup, args.steps)
                tokens_per_s = batch * cfg.model.n_ctx / seconds
                record.update(
                    step_ms=1e3 * seconds,
                    loss=loss,
                    tokens_per_s=tokens_per_s,
                    mfu=flops_per_token(cfg) * tokens_per_s / (args.peak_tflops * 1e12),
                    peak_gib=(peak - before) / 2**30 if device.type == "cuda" else None,
                )
            except Exception as err:  # e.g. out of memory: reported in the table and the JSON
                record["error"] = error_text(err)
            if impl.startswith("megapixel"):
                record["planned_peak_gib"] = planned_peak(cfg, batch) / 2**30
            step = None  # frees the engine or model before the next case
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            records.append(record)
            table.append(_row(record))
            print("  ".join(table[-1]), flush=True)
    return table, records


def _row(r: dict) -> list[str]:
    def num(key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else "n/a"

    if "error" in r:
        return [r["model"], r["impl"], str(r["batch"]), r["error"][:60], "", "", "", num("planned_peak_gib", ".1f")]
    return [
        r["model"],
        r["impl"],
        str(r["batch"]),
        num("tokens_per_s", ",.0f"),
        f"{100 * r['mfu']:.1f}%",
        num("step_ms", ".1f"),
        num("peak_gib", ".1f"),
        num("planned_peak_gib", ".1f"),
    ]


def write_json(path: str | None, results: dict) -> None:
    """Write the results with the device and versions they were measured with."""
    import torch

    if path is None:
        print("(no --out given: JSON not written)")
        return
    cuda = torch.cuda.is_available()
    results = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **results,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, benchmark, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="path of the JSON results")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {','.join(IMPLS)}")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch for every model (default: per model)")
    parser.add_argument("--xl-layers", type=int, default=8, help="blocks of the XL-width model (default 8 of 60)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak for MFU (default 989: H100 SXM bf16)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of plain-compiled")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, a few steps, any device (for CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        # Inductor would compile C++ for minutes on a CPU; dynamo's tracing is what a smoke run checks.
        if args.compile_backend == "inductor":
            args.compile_backend = "eager"
    if __package__ in (None, ""):  # run as a file rather than with -m: make `benchmarks` importable
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.attention import print_table

    table, records = run(args)
    print()
    print_table(["model", "impl", "batch", "tokens/s", "MFU", "step ms", "peak GiB", "planned GiB"], table)
    print(
        f"(MFU: 6N + 12LdT FLOPs a token over {args.peak_tflops:.0f} TFLOP/s; peak GiB: the step's peak above "
        "what was allocated before the case; planned GiB: megapixel/planning/estimate.py's peak for the engine)"
    )
    write_json(
        args.out, {"benchmark": "train_step", "peak_tflops": args.peak_tflops, "tiny": args.tiny, "results": records}
    )


if __name__ == "__main__":
    main()

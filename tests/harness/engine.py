"""Workers that train through megapixel's real DeepSpeed engine (build_engine) in several gloo processes.

Spawned processes import only this module and parallel_harness, which starts them.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megapixel.config import Config, from_dict
from megapixel.engine.build import build_engine, deepspeed_config
from megapixel.engine.loop import train
from megapixel.parallel import ParallelGroups, make_groups
from megapixel.parallel.distributed import init_distributed
from tests.harness.parallel import jitter_gradients


def engine_config(
    model: dict[str, Any], parallel: dict[str, Any], seed: int, batch: int, lr: float, **train: Any
) -> Config:
    """A fp32 CPU config of `model` under `parallel`; clipping is tight so the tensor-parallel norm is exercised."""
    settings = {"batch_size": batch, "lr": lr, "warmup_steps": 2, "steps": 5, "seed": seed, "precision": "fp32"}
    return from_dict(
        {"model": model, "parallel": parallel, "train": {**settings, "grad_clip": 0.05, "progress": False, **train}}
    )


def mask_generator(seed: int, step: int, piece: int) -> torch.Generator:
    """The BERT-mask generator of one piece of a global batch, whichever rank or micro-step takes it."""
    return torch.Generator().manual_seed(seed * 1000 + step * 10 + piece)


def model_name(name: str, n_layer: int) -> str:
    """The IGPT state-dict name of an engine module's parameter (LossModule or PipelineModule layer)."""
    name = name.replace("._checkpoint_wrapped_module", "")
    if name.startswith("model."):
        return name.removeprefix("model.")
    # A pipeline layer: 0 the embeddings, 1..n_layer the blocks, n_layer + 1 the heads.
    index, rest = name.split(".", 1)
    if 1 <= int(index) <= n_layer:
        return f"blocks.{int(index) - 1}.{rest.removeprefix('block.')}"
    return rest


def deepspeed_on_gloo(rank: int) -> None:
    """Set up a spawned process for DeepSpeed on gloo: no shared-memory op, and the local rank a launcher gives."""
    import deepspeed

    # The shared-memory collective op would be JIT-built (45 s); gloo serves without it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # A launcher would set it; DeepSpeed's engine and pipeline module read it (one node: local rank = rank).
    os.environ["LOCAL_RANK"] = str(rank)


def run_engine(cfg: Config, groups: ParallelGroups, batches: list, jitter: int | None = None) -> dict[str, Any]:
    """Train cfg's engine on the global `batches`: data rank d takes pieces d*accum ... of each, one per
    micro-step. Returns each step's mean loss, the second step's gradients as the optimizer gets them (after
    clipping; ZeRO-0 only), this rank's final weights (not with ZeRO-3), under IGPT's names, and the class
    name of the optimizer the engine was handed. With a `jitter` seed, each gradient gets uniform noise of one
    fp32 ulp of its tensor's largest element before each step (ZeRO-0): a one-process run whose sums were
    rounded differently, which tells how far rounding alone carries this training."""
    info = init_distributed()
    engine = build_engine(cfg, deepspeed_config(cfg, groups.data_size, info.device), info, groups)
    accum = engine.gradient_accumulation_steps()
    # The second step's gradients: the first to reach every weight (the zero-initialised head stops them at
    # the first), before Adam has amplified rounding differences of near-zero gradients into the weights.
    seed, probed = cfg.train.seed, 1
    params = [(model_name(n, cfg.model.n_layer), p) for n, p in engine.module.named_parameters()]
    grads: dict[str, torch.Tensor] = {}
    steps = {"done": 0}

    def capture(optimizer: Any, args: Any, kwargs: Any) -> None:
        if steps["done"] == probed:
            grads.update({n: p.grad.clone() for n, p in params if p.grad is not None})
        steps["done"] += 1

    def perturb(optimizer: Any, args: Any, kwargs: Any) -> None:
        jitter_gradients([p for _, p in params], noise)

    if isinstance(engine.optimizer, torch.optim.Optimizer) and cfg.parallel.zero_stage == 0:
        engine.optimizer.register_step_pre_hook(capture)
        if jitter is not None:
            noise = torch.Generator().manual_seed(jitter)
            engine.optimizer.register_step_pre_hook(perturb)
    losses = []
    for step, (tokens, labels) in enumerate(batches):
        n = groups.data_size * accum
        pieces = list(zip(tokens.chunk(n), labels.chunk(n), strict=True))
        mine = [groups.data_rank * accum + micro for micro in range(accum)]
        if groups.pipeline_size > 1:
            micro_batches = []
            for piece in mine:
                tok, lab = pieces[piece]
                mask = torch.rand(tok.shape, generator=mask_generator(seed, step, piece)) < cfg.model.bert_mask_prob
                micro_batches.append(((tok, mask), (tok, mask, lab)))
            # The engine averages the micro-batches and the data replicas, and tells every stage.
            losses.append(engine.train_batch(data_iter=iter(micro_batches)).item())
            continue
        total = torch.zeros(())
        for piece in mine:
            tok, lab = pieces[piece]
            loss = engine(tok, lab if cfg.model.n_classes else None, generator=mask_generator(seed, step, piece))
            engine.backward(loss)
            total += loss.detach() / accum
            engine.step()
        dist.all_reduce(total, group=groups.data)
        losses.append(total.item() / groups.data_size)
    final = {n: p.detach().clone() for n, p in params}
    optimizer = type(engine.basic_optimizer).__name__
    return {"losses": losses, "grads": grads, "final": final, "tensor_rank": groups.tensor_rank, "optimizer": optimizer}


def engine_worker(
    rank: int, world_size: int, layouts: dict[str, dict], model: dict, seed: int, batches: list, lr: float
) -> dict[str, dict]:
    """Every layout in `layouts` (name -> parallel section) trained through the engine in this one spawn."""
    deepspeed_on_gloo(rank)
    results = {}
    for name, parallel in layouts.items():
        cfg = engine_config(model, parallel, seed, len(batches[0][0]), lr)
        results[name] = run_engine(cfg, make_groups(cfg.parallel, world_size, rank), batches)
    return results


def interrupted_run_worker(rank: int, world_size: int, cfg: Config, other: Config) -> dict[str, Any]:
    """train(cfg); keep only its checkpoint at train.save_every as if it died there; resume it; then try to
    resume it with `other` (another layout). Returns the losses of both runs and the error `other` met."""
    import shutil

    from megapixel.checkpoint.files import tag_name
    from megapixel.engine.metrics import read_metrics

    deepspeed_on_gloo(rank)

    def losses() -> list[float]:
        return [r["loss"] for r in read_metrics(cfg.train.run_dir) if "loss" in r]

    train(cfg)
    straight = losses()
    dist.barrier()
    if rank == 0:
        checkpoints = Path(cfg.train.run_dir) / "checkpoints"
        for tag in checkpoints.glob("step_*"):
            if tag.name != tag_name(cfg.train.save_every):
                shutil.rmtree(tag)
        (checkpoints / "latest").write_text(tag_name(cfg.train.save_every))
    dist.barrier()
    train(cfg, resume=True)
    resumed = losses()
    try:
        train(other, resume=True)
        refused = None
    except Exception as e:  # the test reads the message each rank gave
        refused = f"{type(e).__name__}: {e}"
    return {"straight": straight, "resumed": resumed, "refused": refused}


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _resident_bytes(field: str) -> int:
    """This process's VmRSS (resident now) or VmHWM (peak resident) from /proc, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def build_memory_worker(rank: int, world_size: int, model: dict, parallel: dict) -> dict[str, int]:
    """How far this process's peak resident memory grows while build_engine lays `model` out under `parallel`,
    and the bytes of the weights the engine then holds here."""
    deepspeed_on_gloo(rank)
    # glibc would raise its mmap threshold after the first large free and keep later freed weights resident in
    # its heap; a fixed threshold returns every large block on free, so the peak is what was really held.
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    info = init_distributed()

    def build(model: dict) -> Any:
        cfg = engine_config(model, parallel, seed=0, batch=4, lr=1e-3)
        groups = make_groups(cfg.parallel, world_size, rank)
        return build_engine(cfg, deepspeed_config(cfg, groups.data_size, info.device), info, groups)

    # A small engine first: DeepSpeed's lazily imported modules and first-use buffers are then resident already.
    build({**model, "n_embd": 64, "n_head": 4})
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the resident size
    before = _resident_bytes("VmRSS")
    engine = build(model)
    grown = _resident_bytes("VmHWM") - before
    return {"grown": grown, "held": sum(p.numel() * p.element_size() for p in engine.module.parameters())}

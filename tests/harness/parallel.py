"""Runs a function in several gloo processes on this machine and brings back what each rank returned.

Workers live here (not in the test files) so the spawned processes import only this module.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megapixel.config import ModelConfig, ParallelConfig
from megapixel.errors import ConfigError
from megapixel.model.igpt import IGPT
from megapixel.parallel import (
    ParallelGroups,
    copy_to_tensor_region,
    gather_from_tensor_region,
    make_groups,
    parallel_loss,
    reduce_from_tensor_region,
    scatter_to_tensor_region,
    tensor_parallelize,
    vocab_parallel_cross_entropy,
)

# A hung collective fails the test instead of blocking CI.
COLLECTIVE_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker: Callable, world_size: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    # Several processes share two cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_processes(worker: Callable, world_size: int, *args: Any, timeout_s: float = 120) -> list[Any]:
    """worker(rank, world_size, *args) in `world_size` spawned gloo processes; returns each rank's result."""
    with tempfile.TemporaryDirectory() as out:
        context = mp.start_processes(
            _entry,
            args=(worker, world_size, _free_port(), out, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.terminate()
                    process.join()
                raise TimeoutError(f"{world_size} processes did not finish in {timeout_s} s")
        return [torch.load(Path(out) / f"{rank}.pt") for rank in range(world_size)]


def primitives_worker(rank: int, world_size: int, x: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> dict:
    """Forward and backward of each mapping and of the vocab-parallel cross-entropy on this rank."""
    group = dist.group.WORLD
    result = {}
    # Each mapping gets a rank-dependent input and upstream gradient, so sums and slices are visible.
    for name, mapping in (
        ("copy", copy_to_tensor_region),
        ("reduce", reduce_from_tensor_region),
        ("scatter", scatter_to_tensor_region),
        ("gather", gather_from_tensor_region),
    ):
        inp = (x * (rank + 1)).requires_grad_()
        if name == "gather":
            inp = inp.chunk(world_size, dim=-1)[rank].detach().requires_grad_()
        y = mapping(inp, group)
        y.backward(torch.full_like(y, rank + 1.0))
        result[name] = (y.detach(), inp.grad)
    local = logits.chunk(world_size, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, group)
    loss.backward(torch.arange(1.0, len(target) + 1))
    result["cross_entropy"] = (loss.detach(), local.grad)
    return result


def reference_model(cfg: ModelConfig, seed: int) -> IGPT:
    """The size-1 model every layout starts from; the zero-initialised heads get weights so every gradient flows."""
    torch.manual_seed(seed)
    model = IGPT(cfg)
    with torch.no_grad():
        model.head.weight.normal_(std=0.3)
        if model.clf is not None:
            model.clf.weight.normal_(std=0.3)
    return model


def mask_generator(seed: int, step: int, data_rank: int) -> torch.Generator:
    """The BERT-mask generator of one micro-batch: the same on every tensor rank that sees it."""
    return torch.Generator().manual_seed(seed * 1000 + step * 10 + data_rank)


def new_optimizer(model: IGPT, lr: float) -> torch.optim.Optimizer:
    """The paper's Adam settings: betas (0.9, 0.95), no weight decay."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


# Which weights a tensor-parallel layout splits, and along which dimension; every other weight is replicated.
SPLIT_ROWS = (
    "attn.q_proj.weight",
    "attn.k_proj.weight",
    "attn.v_proj.weight",
    "mlp.c_fc.weight",
    "wte.weight",
    "head.weight",
)
SPLIT_COLUMNS = ("attn.c_proj.weight", "mlp.c_proj.weight")


def shard_of(name: str, full: torch.Tensor, tensor_rank: int, tensor_size: int) -> torch.Tensor:
    """The slice of the one-process tensor `name` that tensor rank `tensor_rank` of `tensor_size` must hold."""
    if name.endswith(SPLIT_ROWS):
        return full.chunk(tensor_size, dim=0)[tensor_rank]
    if name.endswith(SPLIT_COLUMNS):
        return full.chunk(tensor_size, dim=1)[tensor_rank]
    return full


def global_batches(
    seed: int, steps: int, batch: int, n_vocab: int, n_ctx: int, n_classes: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` global batches of (tokens, labels) drawn from `seed`: what every layout and its one-process
    reference train on."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, n_vocab, (batch, n_ctx), generator=gen),
            torch.randint(0, n_classes, (batch,), generator=gen),
        )
        for _ in range(steps)
    ]


# How close a parallel layout must come to one process. The layouts add the same fp32 products in another order
# (split matmuls, all-reduces, micro-batches), and Adam turns the rounding of near-zero gradients into steps of
# length lr, so how far a result may move depends on the seed; it is measured, not guessed: one process is rerun
# JITTERS times with its gradients rounded differently (one ulp of noise), and a layout may differ from the plain
# run by at most FACTOR times the largest of those reruns' differences, or by ROUNDING of the tensor's largest
# element (a dozen fp32 ulps, ten times over) where training carries rounding no further.
JITTERS, FACTOR = 3, 4
ROUNDING = 1e-5


def jitter_gradients(params: list[torch.nn.Parameter], noise: torch.Generator) -> None:
    """Add uniform noise of one fp32 ulp of each gradient's largest element: the gradients of a process whose
    sums were rounded differently."""
    for p in params:
        if p.grad is not None:
            ulp = torch.finfo(p.grad.dtype).eps * p.grad.abs().max()
            p.grad += ulp * (2 * torch.rand(p.grad.shape, generator=noise) - 1)


def assert_as_close_as_rounding_carries(actual: torch.Tensor, plain: torch.Tensor, jittered: list, what: str) -> None:
    """`actual` is within FACTOR times the jittered runs' largest distance from the plain one-process result, or
    within ROUNDING of its largest element."""
    error = (actual - plain).abs().max().item()
    spread = max((j - plain).abs().max().item() for j in jittered)
    bound = max(FACTOR * spread, ROUNDING * plain.abs().max().item())
    assert error <= bound, f"{what}: {error:.3g} off, jittered one process {spread:.3g}, bound {bound:.3g}"


def single_process_run(
    cfg: ModelConfig, seed: int, batches: list, data: int, lr: float, jitter: int | None = None
) -> dict:
    """One process, plain IGPT.loss, accumulating the same `data` micro-batches the parallel run spreads over ranks;
    with a `jitter` seed, its gradients get one ulp of noise before each step (jitter_gradients)."""
    noise = None if jitter is None else torch.Generator().manual_seed(jitter)
    model = reference_model(cfg, seed)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(batches[0][0]).logits
    opt = new_optimizer(model, lr)
    losses, grads = [], None
    for step, (tokens, labels) in enumerate(batches):
        opt.zero_grad()
        total = 0.0
        for r, (tok, lab) in enumerate(zip(tokens.chunk(data), labels.chunk(data), strict=True)):
            loss, _ = model.loss(tok, lab, generator=mask_generator(seed, step, r))
            (loss / data).backward()
            total += loss.item() / data
        losses.append(total)
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        if noise is not None:
            jitter_gradients(list(model.parameters()), noise)
        opt.step()
    final = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"start": start, "logits": logits, "grads": grads, "losses": losses, "final": final}


def training_worker(
    rank: int,
    world_size: int,
    tensor_sizes: list[int],
    cases: dict[str, ModelConfig],
    seed: int,
    batches: list,
    lr: float,
) -> dict[int, dict]:
    """For each tensor size (the rest of the processes data-parallel): this rank's place, and the parallel
    runs of each model config in `cases`. One spawn serves several layouts, as starting processes is the cost."""
    results = {}
    for tensor in tensor_sizes:
        groups = make_groups(ParallelConfig(tensor=tensor), world_size, rank)
        results[tensor] = {
            "coordinates": (groups.tensor_rank, groups.data_rank, groups.pipeline_rank),
            "sizes": (groups.tensor_size, groups.data_size, groups.pipeline_size),
            "bad_split": _bad_split_error(groups.tensor) if groups.tensor_size > 1 else None,
            "cases": {name: _parallel_run(groups, cfg, seed, batches, lr) for name, cfg in cases.items()},
        }
    return results


def _parallel_run(groups: ParallelGroups, cfg: ModelConfig, seed: int, batches: list, lr: float) -> dict:
    """Shard the reference model, then train on this data rank's slice of each global batch."""
    model = reference_model(cfg, seed)
    plain_loss = None
    if groups.tensor_size == 1:
        plain_loss = model.loss(*batches[0], generator=mask_generator(seed, 0, 0))[0].detach()
    tensor_parallelize(model, groups.tensor)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    marked = {name for name, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
    with torch.no_grad():
        logits = model(batches[0][0]).logits
        decoded = _decode_middle_position(model, batches[0][0]) if cfg.objective == "ar" else None
    size_one = None
    if plain_loss is not None:
        tokens, labels = batches[0]
        same_loss = parallel_loss(model, tokens, groups.tensor, labels, mask_generator(seed, 0, 0))[0]
        size_one = (plain_loss, same_loss.detach())
    opt = new_optimizer(model, lr)
    losses, grads = [], None
    for step, (tokens, labels) in enumerate(batches):
        tok, lab = tokens.chunk(groups.data_size)[groups.data_rank], labels.chunk(groups.data_size)[groups.data_rank]
        loss, _ = parallel_loss(model, tok, groups.tensor, lab, mask_generator(seed, step, groups.data_rank))
        opt.zero_grad()
        loss.backward()
        # Data parallelism: the mean of the replicas' gradients, as DeepSpeed's engine will take it.
        # (sos has no gradient under BERT: every rank skips it alike.)
        for p in (p for p in model.parameters() if p.grad is not None):
            dist.all_reduce(p.grad, group=groups.data)
            p.grad /= groups.data_size
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, group=groups.data)
        losses.append(mean_loss.item() / groups.data_size)
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        opt.step()
    final = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {
        "start": start,
        "marked": marked,
        "logits": logits,
        "decoded": decoded,
        "grads": grads,
        "losses": losses,
        "final": final,
        "size_one": size_one,
    }


def _decode_middle_position(model: IGPT, tokens: torch.Tensor) -> torch.Tensor:
    """Logits for the middle position by KV-cached decoding: prefill the first half, then one step."""
    half = tokens.shape[1] // 2
    caches = model.new_caches(len(tokens), torch.float32, tokens.device)
    model(tokens[:, :half], caches=caches)
    return model.decode_step(tokens[:, half - 1], half, caches)


def _bad_split_error(group: dist.ProcessGroup) -> tuple[str, bool]:
    """The error for heads the group cannot split, and whether the model was left untouched."""
    heads = dist.get_world_size(group) + 1
    model = IGPT(ModelConfig(n_layer=1, n_embd=8 * heads, n_head=heads, n_vocab=16, n_px=2, kernels="torch"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        tensor_parallelize(model, group)
    except ConfigError as e:
        untouched = all(torch.equal(p, before[name]) for name, p in model.named_parameters())
        return str(e), untouched and type(model.blocks[0].attn.q_proj) is torch.nn.Linear
    raise AssertionError("tensor_parallelize accepted heads its group cannot split")

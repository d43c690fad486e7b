"""Validation during training: the mean loss over the val split, computed through the engine on every rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megapixel.config import Config
from megapixel.engine.inputs import replica_loader
from megapixel.parallel import ParallelGroups
from megapixel.parallel.distributed import DistInfo
from megapixel.parallel.pipeline import pipeline_micro_batches


def validation_loss(engine: Any, cfg: Config, info: DistInfo, groups: ParallelGroups, max_batches: int) -> float | None:
    """Mean loss over min(max_batches, the whole val split) batches of each rank; None without any."""
    if max_batches == 0:
        return None
    loader = replica_loader(cfg, "val", engine.train_micro_batch_size_per_gpu(), groups, infinite=False)
    # A fixed mask stream (BERT) makes every evaluation score the same masked positions.
    generator = torch.Generator(device=info.device).manual_seed(cfg.train.seed)
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)  # sum of loss x images, images
    batches = iter(loader)
    engine.eval()
    with torch.no_grad():
        for _ in range(max_batches):
            batch = next(batches, None)
            # Ranks stop together: with ZeRO-3 every forward is a collective.
            more = torch.tensor([batch is not None], dtype=torch.int32, device=info.device)
            dist.all_reduce(more, op=dist.ReduceOp.MIN)
            if not more.item():
                break
            tokens = batch["tokens"].to(info.device, non_blocking=True)
            if groups.pipeline_size > 1:
                micro = pipeline_micro_batches([batch], cfg.model, info.device, generator)
                # The last stage gets a 0-d loss, the others a broadcast copy of shape (1,).
                loss = engine.eval_batch(micro, num_micro_batches=1).reshape(())
            else:
                labels = batch["labels"].to(info.device, non_blocking=True) if cfg.model.n_classes else None
                loss = engine(tokens, labels, generator=generator)
            totals += torch.stack([loss.double() * len(tokens), totals.new_tensor(len(tokens))])
    engine.train()
    # Tensor ranks of a replica count its images once each: the mean is the same.
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else None

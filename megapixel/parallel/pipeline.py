"""An IGPT laid out as DeepSpeed PipelineModule layer specs: embedding stage, blocks, final norm + heads + loss.

The same modules as the one-piece model (built from the same seed on the meta device, then tensor-parallelized)
are handed to the specs. DeepSpeed builds only this stage's specs, and each stage gives its own weights their
values as it is built (`own`, megapixel.model.init.materialize): a rank never holds another stage's weights, and
every stage holds exactly the weights one process would. The micro-batch comes in as (tokens, mask) for the
first stage and (tokens, mask, labels) for the loss on the last stage: the BERT mask is drawn by the data side,
so both ends see the same one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megapixel.model.igpt import IGPT
from megapixel.parallel.cross_entropy import vocab_parallel_cross_entropy
from megapixel.parallel.groups import ParallelGroups
from megapixel.parallel.layers import ColumnParallelLinear

# Gives this rank's weights whose names (IGPT's) a filter accepts their initial values.
Own = Callable[[Callable[[str], bool]], None]


class EmbedStage(nn.Module):
    """wte, wpe and sos of a model: (tokens, mask) -> input embeddings, as IGPT.embed computes them."""

    def __init__(self, model: IGPT, own: Own) -> None:
        super().__init__()
        own(lambda name: name in ("wte.weight", "wpe.weight", "sos"))
        self.cfg = model.cfg
        self.wte, self.wpe, self.sos = model.wte, model.wpe, model.sos

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, mask = inputs
        # IGPT.embed reads only these attributes: the computation is the model's own.
        return IGPT.embed(self, tokens, mask if self.cfg.objective == "bert" else None)


class BlockStage(nn.Module):
    """One transformer block (the unit activation checkpointing recomputes)."""

    def __init__(self, model: IGPT, index: int, own: Own) -> None:
        super().__init__()
        own(lambda name: name.startswith(f"blocks.{index}."))
        self.block = model.blocks[index]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block(h)


class HeadStage(nn.Module):
    """ln_f, the output head (this tensor rank's vocabulary slice) and the class head."""

    def __init__(self, model: IGPT, own: Own) -> None:
        super().__init__()
        own(lambda name: name.startswith(("ln_f.", "head.", "clf.")))
        self.ln_f, self.head, self.clf = model.ln_f, model.head, model.clf

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.ln_f(h)
        logits = self.head.forward_local(h) if isinstance(self.head, ColumnParallelLinear) else self.head(h)
        return (logits,) if self.clf is None else (logits, self.clf(h.mean(dim=1)))


def pipeline_loss(objective: str, tensor_group: dist.ProcessGroup) -> Callable[[Any, Any], torch.Tensor]:
    """The last stage's loss: IGPT.loss's formula on (logits slice, class logits) and (tokens, mask, labels)."""

    def loss_fn(outputs: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        tokens, mask, labels = targets
        logits = outputs[0].float()
        nll = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), tensor_group)
        nll = nll.view_as(tokens)
        loss = nll.mean() if objective == "ar" else (nll * mask).sum() / mask.sum().clamp(min=1)
        if len(outputs) > 1:
            loss = loss + F.cross_entropy(outputs[1].float(), labels)
        return loss

    return loss_fn


def pipeline_module(model: IGPT, groups: ParallelGroups, checkpoint_blocks: bool, own: Own) -> nn.Module:
    """A DeepSpeed PipelineModule over `model`'s (already tensor-parallel, still meta) modules, the blocks split
    evenly over the stages; `own(only)` gives this rank's weights that `only` names their values."""
    specs = [
        LayerSpec(EmbedStage, model, own),
        *(LayerSpec(BlockStage, model, index, own) for index in range(len(model.blocks))),
        LayerSpec(HeadStage, model, own),
    ]
    # Axes pipe, data, model with model fastest: the same rank order as megapixel's groups.
    topology = PipeModelDataParallelTopology(
        num_pp=groups.pipeline_size, num_mp=groups.tensor_size, num_dp=groups.data_size
    )
    module = PipelineModule(
        layers=specs,
        topology=topology,
        loss_fn=pipeline_loss(model.cfg.objective, groups.tensor),
        # By block count (GPT-NeoX's "type:transformer"): partitioning "parameters" would build every spec to
        # count its weights, giving every stage's weights values on every rank.
        partition_method="type:BlockStage",
        activation_checkpoint_interval=1 if checkpoint_blocks else 0,
        # Only blocks: checkpointing the embedding stage fails (its input needs no gradient).
        checkpointable_layers=["BlockStage"],
    )
    # DeepSpeed's gradient-norm sum counts a parameter not marked model-parallel only on model-parallel rank
    # 0, and with a pipeline that rank spans stages x tensor ranks: the later stages' replicated weights would
    # be left out of the clipping norm. Marking them on tensor rank 0 counts each exactly once.
    for param in module.parameters():
        if not getattr(param, "tensor_model_parallel", False):
            param.model_parallel = groups.tensor_rank == 0
    return module


def pipeline_micro_batches(batches: Any, cfg: Any, device: torch.device, generator: torch.Generator) -> Any:
    """The pipeline engine's micro-batches ((tokens, mask), (tokens, mask, labels)) from a loader's batches.

    The first and last stages of a replica each draw from their own loader and mask generator, seeded alike,
    so they see the same micro-batches; the stages between never draw.
    """
    for batch in batches:
        tokens = batch["tokens"].to(device, non_blocking=True)
        if cfg.objective == "bert":
            # IGPT.bert_mask's draw, from the same stream a one-piece model would use.
            mask = torch.rand(tokens.shape, device=device, generator=generator) < cfg.bert_mask_prob
        else:
            mask = torch.zeros_like(tokens, dtype=torch.bool)
        labels = batch["labels"].to(device, non_blocking=True) if cfg.n_classes else torch.zeros_like(tokens[:, 0])
        yield (tokens, mask), (tokens, mask, labels)

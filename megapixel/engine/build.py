"""The DeepSpeed engine of a run: its config derived from megapixel's, the optimizer, and IGPT built on the meta
device, laid out over the tensor and pipeline groups, each rank making only its own weights.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.ops.op_builder import CPUAdamBuilder
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from megapixel.checkpoint.load import load_initial_weights
from megapixel.checkpoint.resume import guard_loads
from megapixel.config import Config, TrainConfig
from megapixel.engine.nonfinite import guard_optimizer
from megapixel.engine.rank_state import seed_all
from megapixel.engine.schedule import make_scheduler
from megapixel.errors import ConfigError
from megapixel.model import IGPT
from megapixel.model.igpt import Block
from megapixel.model.init import materialize
from megapixel.parallel import ParallelGroups, make_groups, parallel_loss, tensor_parallelize, validate_layout
from megapixel.parallel.distributed import DistInfo
from megapixel.parallel.mpu import ModelParallelUnit
from megapixel.parallel.pipeline import pipeline_module

# Never let DeepSpeed print its own step lines: the progress bar and metrics.jsonl report progress.
QUIET_STEPS = 2**62


class LossModule(nn.Module):
    """The engine's module: IGPT's training loss, so every call goes through the engine (and ZeRO-3's hooks).

    With a tensor group of more than one rank the model must be tensor-parallelized over it, and the loss is
    taken on vocabulary shards (the full logits are never gathered).
    """

    def __init__(self, model: IGPT, tensor_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.model = model
        self.tensor_group = tensor_group

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.tensor_group is not None:
            return parallel_loss(self.model, tokens, self.tensor_group, labels, generator)[0]
        return self.model.loss(tokens, labels, generator)[0]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deepspeed_config(cfg: Config, dp_world: int, device: torch.device) -> dict[str, Any]:
    """DeepSpeed's config derived from `cfg`, with cfg.deepspeed merged over it (the user's keys win)."""
    t = cfg.train
    if t.micro_batch == 0 and t.batch_size % dp_world:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a multiple of the {dp_world} data-parallel ranks: "
            "change train.batch_size"
        )
    micro = t.micro_batch or t.batch_size // dp_world
    if t.batch_size % (micro * dp_world):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch ({micro}) x {dp_world} "
            f"data-parallel ranks = {micro * dp_world}: change train.batch_size or train.micro_batch"
        )
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    derived = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.batch_size // (micro * dp_world),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": QUIET_STEPS,
    }
    return _deep_merge(derived, cfg.deepspeed)


def check_layout(cfg: Config, world_size: int) -> None:
    """Refuse, with one line, a layout that cannot run on `world_size` processes, before any work."""
    p = cfg.parallel
    if p.pipeline > 1 and p.zero_stage > 1:
        raise ConfigError(
            f"ZeRO stage {p.zero_stage} cannot partition gradients across pipeline stages: "
            "set parallel.zero_stage=1 (or 0) with parallel.pipeline > 1"
        )
    validate_layout(cfg, world_size)


def checkpoint_blocks(model: IGPT) -> None:
    """Recompute each block's activations in backward instead of keeping them: memory of one block's
    activations plus the blocks' inputs, for a third more compute. State-dict names stay unchanged."""
    # Non-reentrant checkpointing: works with inputs that need no gradient and with the tensor-parallel
    # collectives (recomputed in the same order on every tensor rank).
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, Block))


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether DeepSpeed's config moves the optimizer state and step off the GPU (ZeRO-Offload, to CPU or NVMe)."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def make_optimizer(
    params: Any, t: TrainConfig, ds_config: dict[str, Any], device: torch.device
) -> torch.optim.Optimizer:
    """AdamW with the run's rate, betas and weight decay: DeepSpeed's CPU Adam where ZeRO-Offload steps on the
    host (unless the config sets zero_force_ds_cpu_optimizer false), torch's otherwise (fused on CUDA)."""
    settings = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, weight_decay=t.weight_decay)
    if offloads_optimizer(ds_config) and ds_config.get("zero_force_ds_cpu_optimizer", True):
        try:
            # Its C++ op is compiled on first use (a minute or more) and cached in ~/.cache/torch_extensions.
            CPUAdamBuilder().load()
        except Exception as error:  # a failed build comes as one of several types; all mean the same to the user
            last = str(error).strip().splitlines()[-1] if str(error).strip() else "no message"
            raise ConfigError(
                f"ZeRO-Offload steps with DeepSpeed's CPU Adam, whose C++ op did not build ({type(error).__name__}: "
                f"{last}): install a C++ compiler and ninja, or set deepspeed.zero_force_ds_cpu_optimizer=false to "
                "step with torch's AdamW on the host"
            ) from error
        return DeepSpeedCPUAdam(params, adamw_mode=True, **settings)
    return torch.optim.AdamW(params, fused=device.type == "cuda", **settings)


def build_engine(cfg: Config, ds_config: dict[str, Any], info: DistInfo, groups: ParallelGroups | None = None) -> Any:
    """A DeepSpeed engine over LossModule(IGPT(cfg.model)) with AdamW and the warmup-cosine schedule, laid out
    over `groups` (made from cfg.parallel when not given): weights split over the tensor group, gradients
    averaged and ZeRO partitions taken over the data group."""
    if groups is None:
        groups = make_groups(cfg.parallel, info.world_size, info.rank)
    # Built on the meta device (no memory), laid out there, then each rank gives only the weights it holds their
    # values: the slices of its tensor rank, in its pipeline stage (megapixel.model.init). Every layout starts
    # from the weights one process would make from the same seed.
    seed_all(cfg.train.seed)
    with torch.device("meta"):
        model = IGPT(cfg.model)
    if cfg.train.init_from:
        # The whole model is filled before it is split, so every layout starts from the same weights.
        materialize(model, info.device)
        load_initial_weights(model, cfg)
    tensor_group = None
    if groups.tensor_size > 1:
        tensor_group = groups.tensor
        tensor_parallelize(model, tensor_group)
    own = functools.partial(materialize, model, info.device, groups.tensor_rank, groups.tensor_size)
    if groups.pipeline_size > 1:
        module = pipeline_module(model, groups, cfg.parallel.activation_checkpointing, own)
        mpu = None  # the PipelineModule brings its own grid, in the same rank order as `groups`
    else:
        own()
        if cfg.parallel.activation_checkpointing:
            checkpoint_blocks(model)
        module = LossModule(model, tensor_group)
        mpu = ModelParallelUnit(groups)
    if cfg.parallel.zero_stage == 3:
        # IGPT.embed reads these without calling their owners' forward, so ZeRO-3 would not gather them
        # (nor again for backward); the wrapper's hooks keep them gathered across forward and backward.
        for param in (model.sos, model.wpe.weight):
            deepspeed.zero.register_external_parameter(module, param)
    t = cfg.train
    optimizer = make_optimizer(module.parameters(), t, ds_config, info.device)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=make_scheduler(optimizer, t),
        config=ds_config,
        mpu=mpu,
    )
    guard_optimizer(engine, optimizer)
    guard_loads(engine)
    return engine

"""iGPT's initial weights, one named tensor at a time, so that a process can make only the pieces it holds.

Each weight is drawn from its own generator, seeded by the model's seed and the weight's name. A model built on
the meta device, tensor-parallelized and split into pipeline stages there, can then give each of this rank's
shards its value (the matching slice of the full tensor) without ever holding the whole model: the largest
transient is one full weight. Every layout of the same seed starts from the same numbers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn as nn

from megapixel.config import ModelConfig

NORM_GAINS = ("norm1.weight", "norm2.weight", "ln_f.weight")
ZERO_HEADS = ("head.weight", "clf.weight")


def init_std(name: str, cfg: ModelConfig) -> float:
    """The reference init's standard deviation for the named normal-drawn weight: q/k/v 1/sqrt(d), attention out
    1/sqrt(d*L), MLP and wte 0.02, wpe 0.01, sos 0.02."""
    d = cfg.n_embd
    stds = {
        "wte.weight": 0.02,
        "wpe.weight": 0.01,
        "sos": 0.02,
        "attn.q_proj.weight": 1 / math.sqrt(d),
        "attn.k_proj.weight": 1 / math.sqrt(d),
        "attn.v_proj.weight": 1 / math.sqrt(d),
        "attn.c_proj.weight": 1 / math.sqrt(d * cfg.n_layer),
        "mlp.c_fc.weight": 0.02,
        "mlp.c_proj.weight": 0.02,
    }
    # Block weights are named blocks.<i>.<suffix>.
    key = name.split(".", 2)[2] if name.startswith("blocks.") else name
    assert key in stds, f"no initial value is defined for {name}"
    return stds[key]


def tensor_seed(seed: int, name: str) -> int:
    """The seed of the named weight's own generator: a hash of the model's seed and the name."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are signed 64-bit


def initial_value(
    name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int, device: torch.device | str
) -> torch.Tensor:
    """The full initial fp32 value of the named weight: norm gains one, output heads zero, the rest normal."""
    if name.endswith(NORM_GAINS):
        return torch.ones(shape, device=device)
    if name in ZERO_HEADS:
        return torch.zeros(shape, device=device)
    generator = torch.Generator(device=device).manual_seed(tensor_seed(seed, name))
    return torch.empty(shape, device=device).normal_(0.0, init_std(name, cfg), generator=generator)


@torch.no_grad()
def materialize(
    model: nn.Module,
    device: torch.device | str,
    tensor_rank: int = 0,
    tensor_size: int = 1,
    only: Callable[[str], bool] | None = None,
) -> None:
    """Give each of `model`'s parameters still on the meta device (those `only` accepts) its initial value on
    `device`. A parameter marked with `tensor_model_parallel` and `partition_dim` (megapixel.parallel's shards)
    gets slice `tensor_rank` of `tensor_size` of the full weight along that dimension. Parameters keep their
    names and attributes; ones already holding values are left alone."""
    for name, param in list(model.named_parameters()):
        if not param.is_meta or (only is not None and not only(name)):
            continue
        shape = list(param.shape)
        split = getattr(param, "tensor_model_parallel", False)
        if split:
            shape[param.partition_dim] *= tensor_size
        value = initial_value(name, tuple(shape), model.cfg, model.init_seed, device)
        if split:
            # A copy, not a view: the full weight's memory is released when `value` goes.
            value = value.chunk(tensor_size, dim=param.partition_dim)[tensor_rank].clone()
        new = nn.Parameter(value, requires_grad=param.requires_grad)
        new.__dict__.update(param.__dict__)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, new)

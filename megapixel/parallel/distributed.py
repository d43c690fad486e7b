"""Process setup: join (or create) the process group and say which rank and device this process is.

This is the only module that reads the launchers' RANK / WORLD_SIZE / LOCAL_RANK variables.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import deepspeed
import torch

from megapixel.errors import ConfigError

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the number of processes, its rank on the node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints progress (rank 0)."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Marks the variables a plain process invented for itself (its pid and port), so that a program it starts
# (which inherits them) does not take them for a launcher's and try to listen on the parent's port.
_INVENTED = "MEGAPIXEL_INVENTED_RANK_VARS"


def _inherited_from_plain_process() -> bool:
    pid, _, port = os.environ.get(_INVENTED, "").partition(":")
    return bool(pid) and pid != str(os.getpid()) and os.environ.get("MASTER_PORT") == port


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA); safe to call twice."""
    if not torch.distributed.is_initialized():
        if ("RANK" not in os.environ and "WORLD_SIZE" not in os.environ) or _inherited_from_plain_process():
            # A plain `python ...` process: without these DeepSpeed falls back to MPI discovery and fails.
            port = str(_free_port())
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            os.environ[_INVENTED] = f"{os.getpid()}:{port}"
        os.environ.setdefault("LOCAL_RANK", "0")
        missing = [name for name in _LAUNCH_VARS if name not in os.environ]
        if missing:
            raise ConfigError(
                f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not: start with torchrun or the deepspeed "
                "launcher, or unset RANK and WORLD_SIZE for a single process"
            )
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        else:
            # The shared-memory collective op is JIT-built on first use (45 s) and gloo works without it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Also when torch.distributed was initialised by someone else: DeepSpeed's own comm layer (which a
    # PipelineModule asks for ranks) then wraps the existing group.
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )

"""What each rank carries from step to step besides the engine, and saves in every checkpoint: its data
position, its random streams and the loss of the steps since the last log line."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megapixel.config import Config
from megapixel.parallel.distributed import DistInfo


def rng_state() -> dict[str, Any]:
    """This process's random states (torch, numpy, python, cuda) as tensors and plain values."""
    _, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed torch, numpy and python's random generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class RankState:
    """What one rank carries from step to step besides the engine: its data position, random streams, and
    the loss of the applied steps since the last log line (summed on the device: no host sync until it is
    logged; a skipped step's loss, inf or NaN, is left out).

    Making one seeds this rank's random generators (torch, numpy, python, BERT masks) from (train.seed, data
    rank): the tensor ranks of a replica draw the same masks, as they compute one loss together.
    """

    def __init__(self, cfg: Config, info: DistInfo, loader: Any, data_rank: int) -> None:
        self.loader = loader
        self.loss_sum = torch.zeros((), device=info.device)
        self.loss_count = 0
        self.step_loss = torch.zeros((), device=info.device)
        self.step_count = 0
        # BERT's training masks come from their own stream, so nothing else that draws random numbers
        # (data-loader workers, evaluation) can change them.
        seed = int(np.random.SeedSequence([cfg.train.seed, data_rank]).generate_state(1)[0])
        self.masks = torch.Generator(device=info.device).manual_seed(seed)
        seed_all(seed)

    def add(self, loss: torch.Tensor) -> None:
        """Count one micro-batch's loss in the current step."""
        self.step_loss += loss.detach()
        self.step_count += 1

    def end_step(self, applied: bool) -> None:
        """Close the current step: its losses count if the engine applied it, not if it skipped it."""
        if applied:
            self.loss_sum += self.step_loss
            self.loss_count += self.step_count
        self.step_loss.zero_()
        self.step_count = 0

    def take_mean_loss(self) -> float | None:
        """The mean loss over all ranks since the last call (a host sync); None if every step was skipped."""
        total = torch.stack([self.loss_sum, self.loss_sum.new_tensor(self.loss_count)])
        dist.all_reduce(total)
        self.loss_sum.zero_()
        self.loss_count = 0
        return (total[0] / total[1]).item() if total[1] > 0 else None

    def state_dict(self) -> dict[str, Any]:
        """Plain types and tensors only, so a checkpoint reads with weights_only=True."""
        return {
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "masks": self.masks.get_state(),
            "loss_sum": self.loss_sum.item(),
            "loss_count": self.loss_count,
        }

    def load_state_dict(self, ranks: list[dict[str, Any]], rank: int) -> None:
        """Continue exactly where rank `rank` stopped; with another number of ranks, continue the data exactly at
        the saved global position (the same on every rank), with fresh random streams and running loss."""
        if len(ranks) != dist.get_world_size():
            self.loader.load_state_dict(ranks[0]["loader"])
            return
        state = ranks[rank]
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.masks.set_state(state["masks"])
        self.loss_sum.fill_(state["loss_sum"])
        self.loss_count = state["loss_count"]

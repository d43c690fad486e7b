"""Bad numbers: a step whose gradients are not all finite is skipped (no weight, optimizer or schedule change),
counted, and the run stops when train.max_skipped_steps of them come in a row.

DeepSpeed skips such steps itself wherever it wraps the optimizer: ZeRO 1-3 (an inf/NaN global gradient norm),
bf16 (its optimizer's norm check, `bf16.check_grad_overflow`, on by default) and fp16 (the loss scaler). With fp32
and ZeRO-0 it steps the client optimizer directly, so guard_optimizer makes the same check there and reports it
through the `overflow` attribute the engine reads after every optimizer step. Either way the engine keeps its
accumulation counters, counts the step in `skipped_steps`, and says so through `was_step_applied()`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megapixel.errors import NonFiniteError


def _skip_unless_finite(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """A step pre-hook: unless every rank's gradients are finite, drop them all, so that the step changes no
    weight and no optimizer state (torch's optimizers pass over parameters without a gradient), and say so in
    `overflow`, which DeepSpeed's engine reads after each optimizer step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # inf or NaN anywhere makes the norm non-finite (as does a finite norm past fp32's range).
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    flag = (~norm.isfinite()).to(device=params[0].device, dtype=torch.int32).reshape(1)
    # Gradients are already averaged over data ranks, but tensor ranks and pipeline stages hold different ones;
    # every rank takes this step together, so all of them decide together.
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    optimizer.overflow = bool(flag.item())
    if optimizer.overflow:
        for p in params:
            p.grad = None


def guard_optimizer(engine: Any, optimizer: torch.optim.Optimizer) -> None:
    """Where DeepSpeed's engine steps the client `optimizer` itself (fp32, ZeRO-0), skip its non-finite steps."""
    if engine.optimizer is optimizer:
        optimizer.overflow = False
        optimizer.register_step_pre_hook(_skip_unless_finite)


class SkipCounter:
    """Skipped steps: the run's total (kept by the engine across resumes) and how many came in a row."""

    def __init__(self, limit: int, total: int) -> None:
        self.limit = limit
        self.total = total
        self.in_a_row = 0

    def record(self, applied: bool) -> None:
        """Count one step, applied or skipped."""
        self.in_a_row = 0 if applied else self.in_a_row + 1
        self.total += not applied

    @property
    def exhausted(self) -> bool:
        """Whether the last `limit` steps were all skipped (never, with limit 0)."""
        return self.limit > 0 and self.in_a_row >= self.limit

    def error(self, step: int, tag: str) -> NonFiniteError:
        """The one-line stop message, once `tag` holds the last good state."""
        last_good = step - self.in_a_row
        return NonFiniteError(
            f"steps {last_good + 1}-{step} all had non-finite losses or gradients and were skipped "
            f"(train.max_skipped_steps={self.limit}): stopped and saved {tag} with the weights of step {last_good}; "
            "lower train.lr or check the data, then continue with --resume"
        )

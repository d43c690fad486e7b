"""Cross-entropy over logits whose vocabulary is split across a tensor-parallel group, without gathering them.

Each rank holds logits for a contiguous slice of the vocabulary. The softmax needs only three
all-reduces of one number per token (the max, the target's logit, the sum of exponentials), so the
full (tokens x vocabulary) logits never exist on any rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        n_local = logits.shape[-1]
        start = dist.get_rank(group) * n_local
        # Subtracting the global max keeps exp() in range; it cancels in the loss.
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - top.unsqueeze(-1)

        local_target = target - start
        outside = (local_target < 0) | (local_target >= n_local)
        local_target = local_target.masked_fill(outside, 0)
        picked = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(picked, group=group)

        exp = shifted.exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)

        ctx.save_for_backward(exp / total.unsqueeze(-1), outside, local_target)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, outside, local_target = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target), the one-hot falling on the rank that holds the target.
        hit = (~outside).to(softmax.dtype).unsqueeze(-1)
        grad_logits = softmax.scatter_add(-1, local_target.unsqueeze(-1), -hit)
        return grad_logits * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Per-token loss (N,) from this rank's vocabulary slice of the logits (N, V / size) and the targets (N,)."""
    if dist.get_world_size(group) == 1:
        return F.cross_entropy(logits, target, reduction="none")
    return _VocabParallelCrossEntropy.apply(logits, target, group)

"""Lay an IGPT out over a tensor-parallel group, and its loss computed on vocabulary shards.

The model code knows nothing of parallelism (torchtitan's split): `tensor_parallelize` swaps its
linears and embedding for the Megatron layers in place, and `parallel_loss` runs the model's own
modules up to the head and feeds the head's local vocabulary slice to the vocab-parallel
cross-entropy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megapixel.model.igpt import IGPT
from megapixel.parallel.cross_entropy import vocab_parallel_cross_entropy
from megapixel.parallel.groups import check_tensor_split
from megapixel.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def tensor_parallelize(model: IGPT, group: dist.ProcessGroup) -> IGPT:
    """Shard `model` in place over `group`: heads, MLP width and vocabulary split, the rest replicated.

    q/k/v and c_fc become column-parallel (each rank holds n_head / size heads and 4d / size MLP
    units), the attention and MLP out-projections row-parallel, wte a vocab-parallel embedding and
    the head column-parallel over the vocabulary (a plain call gathers full logits; `parallel_loss`
    uses the local slice). Norm gains, wpe, sos and the classification head stay whole on every rank.

    Shards are copied from the full model, which every process builds first from the same seed: a
    process transiently holds the whole model (4 bytes a parameter in fp32) before the full weights
    are dropped.
    """
    check_tensor_split(model.cfg, dist.get_world_size(group))
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        attn.q_proj = ColumnParallelLinear(attn.q_proj, group)
        attn.k_proj = ColumnParallelLinear(attn.k_proj, group)
        attn.v_proj = ColumnParallelLinear(attn.v_proj, group)
        attn.c_proj = RowParallelLinear(attn.c_proj, group)
        mlp.c_fc = ColumnParallelLinear(mlp.c_fc, group)
        mlp.c_proj = RowParallelLinear(mlp.c_proj, group)
    model.wte = VocabParallelEmbedding(model.wte, group)
    model.head = ColumnParallelLinear(model.head, group, gather_output=True)
    return model


def parallel_loss(
    model: IGPT,
    tokens: torch.Tensor,
    group: dist.ProcessGroup,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IGPT.loss for a tensor-parallel model, the logits never gathered; returns (total, parts).

    Every rank of `group` must pass the same tokens, labels and generator state (BERT masks must agree).
    """
    assert isinstance(model.head, ColumnParallelLinear), "call tensor_parallelize on the model first"

    def sharded_nll(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model.head.forward_local(h).float()
        return vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), group).view_as(
            targets
        )

    return model.loss(tokens, labels, generator, token_nll=sharded_nll)

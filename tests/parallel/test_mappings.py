"""The four mappings move activations and gradients as Megatron's do; the vocab-parallel cross-entropy
equals F.cross_entropy on the full logits, forward and backward. Two gloo processes, one spawn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.harness.parallel import primitives_worker, run_processes

pytestmark = pytest.mark.slow

WORLD = 2
N_TOKENS, N_VOCAB = 12, 16


@pytest.fixture(scope="module")
def problem() -> dict:
    # Logits of scale 30: exp() overflows fp32 beyond ~88, so only the max-shift keeps this finite.
    return {
        "x": torch.randn(3, 8),
        "logits": 30 * torch.randn(N_TOKENS, N_VOCAB),
        "target": torch.randint(0, N_VOCAB, (N_TOKENS,)),
    }


@pytest.fixture(scope="module")
def ranks(problem) -> list[dict]:
    return run_processes(primitives_worker, WORLD, problem["x"], problem["logits"], problem["target"], timeout_s=300)


def rank_sum() -> float:
    """Sum over ranks of (rank + 1): each rank's input is x * (rank + 1), its upstream gradient rank + 1."""
    return WORLD * (WORLD + 1) / 2


def test_copy_is_identity_forward_and_all_reduce_backward(ranks, problem):
    for rank, result in enumerate(ranks):
        y, grad = result["copy"]
        torch.testing.assert_close(y, problem["x"] * (rank + 1), rtol=0, atol=0)
        torch.testing.assert_close(grad, torch.full_like(y, rank_sum()), rtol=0, atol=0)


def test_reduce_is_all_reduce_forward_and_identity_backward(ranks, problem):
    for rank, result in enumerate(ranks):
        y, grad = result["reduce"]
        torch.testing.assert_close(y, problem["x"] * rank_sum())
        torch.testing.assert_close(grad, torch.full_like(y, rank + 1.0), rtol=0, atol=0)


def test_scatter_keeps_this_ranks_slice_and_gathers_the_gradient(ranks, problem):
    for rank, result in enumerate(ranks):
        y, grad = result["scatter"]
        torch.testing.assert_close(y, (problem["x"] * (rank + 1)).chunk(WORLD, dim=-1)[rank], rtol=0, atol=0)
        slices = [torch.full_like(y, r + 1.0) for r in range(WORLD)]
        torch.testing.assert_close(grad, torch.cat(slices, dim=-1), rtol=0, atol=0)


def test_gather_concatenates_the_slices_and_splits_the_gradient(ranks, problem):
    full = torch.cat([(problem["x"] * (r + 1)).chunk(WORLD, dim=-1)[r] for r in range(WORLD)], dim=-1)
    for rank, result in enumerate(ranks):
        y, grad = result["gather"]
        torch.testing.assert_close(y, full, rtol=0, atol=0)
        torch.testing.assert_close(grad, torch.full((3, 8 // WORLD), rank + 1.0), rtol=0, atol=0)


def test_vocab_parallel_cross_entropy_equals_the_full_one_with_its_gradient(ranks, problem):
    logits = problem["logits"].clone().requires_grad_()
    loss = F.cross_entropy(logits, problem["target"], reduction="none")
    loss.backward(torch.arange(1.0, N_TOKENS + 1))
    for rank, result in enumerate(ranks):
        local_loss, local_grad = result["cross_entropy"]
        # fp32: a log-sum-exp over a split vocabulary rounds like the fused one to a few ulps of values ~30.
        torch.testing.assert_close(local_loss, loss.detach(), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(local_grad, logits.grad.chunk(WORLD, dim=-1)[rank], rtol=1e-5, atol=1e-6)

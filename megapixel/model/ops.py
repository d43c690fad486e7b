"""The two hot operations of a block, routed to Triton kernels or torch by `model.kernels`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def use_triton(kernels: str, x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor: `auto` means on CUDA only."""
    if kernels == "torch":
        return False
    if kernels == "triton":
        return True
    return x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: str) -> torch.Tensor:
    """iGPT's norm: x * rsqrt(mean(x^2) + eps) * weight (no mean subtraction, no bias)."""
    if use_triton(kernels, x):
        # Imported here: importing the kernels imports Triton, which chooses then between compiling and
        # interpreting them; models on the CPU never need it.
        from megapixel_kernels.norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps=eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, kernels: str) -> torch.Tensor:
    """Softmax attention on (batch, heads, seq, head_dim) tensors."""
    if use_triton(kernels, q):
        # Imported here, as the norm above.
        from megapixel_kernels.attention import attention as triton_attention

        return triton_attention(q, k, v, causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

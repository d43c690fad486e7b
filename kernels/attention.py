"""Fused softmax attention (FlashAttention-2 in Triton) and the plain-torch reference it is tested against.

`attention(q, k, v, causal, scale)` takes (batch, heads, seq, head_dim) tensors of any strides,
fp16 or bf16 (fp32 accepted, with exact fp32 dots), head dims up to 128 (96 is padded to a
128-wide block), any sequence length, and is differentiable. The kernels live in
`attention_fwd.py` and `attention_bwd.py`.
"""

from __future__ import annotations

import math

import torch

from megapixel_kernels.attention_bwd import attention_backward
from megapixel_kernels.attention_fwd import INTERPRET, attention_forward

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # larger tiles would not fit Hopper's shared memory with the tuned block sizes
MIN_HEAD_DIM = 16  # tl.dot needs every tile dimension >= 16


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention in plain torch, in the inputs' dtype: softmax(q k^T * scale) v."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        s_q, s_k = scores.shape[-2:]
        visible = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
        o, lse = attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, o, lse, do, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"attention wants q, k, v of one (batch, heads, seq, head_dim) shape; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"attention wants q, k, v of one dtype among fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    head_dim = q.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention supports head_dim in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]; got {head_dim}")
    if not INTERPRET and not q.is_cuda:
        raise ValueError(
            "the Triton attention kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before "
            "importing it, to run on the CPU)"
        )


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention on (batch, heads, seq, head_dim) tensors with fused Triton kernels."""
    _check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _FusedAttention.apply(q, k, v, causal, float(scale))

"""Fused attention forward: FlashAttention-2's online softmax, one program per block of queries.

The kernel never materialises the (seq x seq) score matrix: it streams blocks of keys and values
past a block of queries, keeping a running row maximum `m`, a running normaliser `l` and an
unnormalised output accumulator, all in fp32. It also writes the row's logsumexp (in base 2,
of the scaled scores) so the backward can rebuild the softmax without a second reduction.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, at import, because Triton itself decides between the compiler and the interpreter
# when a kernel is decorated: the flag cannot change for these kernels later in the process.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# exp(x) == exp2(x * log2(e)); exp2 is the cheaper instruction on NVIDIA GPUs.
LOG2E = 1.4426950408889634


def fwd_configs() -> list[triton.Config]:
    """Autotuning candidates: a sweep sized for Hopper GPUs, or the single config the interpreter accepts."""
    if INTERPRET:
        # The interpreter fails with more than one config; BLOCK_M != BLOCK_N keeps the
        # diagonal-block bookkeeping of the causal path exercised by the CPU tests.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        if bm % bn == 0  # the causal split assumes a query block starts on a key-block boundary
        for s in (3, 4)
        for w in (4, 8)
    ]


# fmt: off
# The formatter would give each of a kernel's ~30 arguments its own line; by hand they stay
# grouped by tensor, which is how Triton kernels are read.

# INTERPRETED (True only under TRITON_INTERPRET=1) switches on two workarounds for the interpreter,
# so that the CPU tests see the numerics a GPU gives; both compile away on a GPU.

@triton.jit
def dot(a, b, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with an fp32 result."""
    # The interpreter stores bf16 as integers and its dot of them is garbage; fp32 holds them exactly.
    return tl.dot(a.to(tl.float32), b.to(tl.float32)) if INTERPRETED else tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 x cast down to dtype, rounding to nearest even as a GPU does."""
    if INTERPRETED and dtype == tl.bfloat16:
        # The interpreter truncates fp32 -> bf16. Truncation only ever shrinks magnitudes, so on
        # the P and dS tiles fed to the dots its error piles up instead of averaging out. Round
        # the 16 dropped bits to nearest even first; the truncation after it is then exact.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def load_tile(base, rows, offs_d, stride_r, stride_d, n_rows,
              HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr, PAD_D: tl.constexpr):
    """Load a (rows x head_dim) tile, zero-filled past the sequence end and the head dimension."""
    ptrs = base + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    if CHECK_ROWS:
        if PAD_D:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0) if PAD_D else tl.load(ptrs)
    return x


@triton.jit
def store_tile(base, rows, offs_d, n_rows, value, HEAD_DIM: tl.constexpr):
    """Store a tile into a contiguous (seq, head_dim) slab, masked on both edges."""
    ptrs = base + rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
               offs_m, offs_d, lo, hi, S, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    # MASKED is a compile-time switch so that the bulk of the key blocks, which need no causal
    # or sequence-end mask, pay for none; only the diagonal and the tail take this path.
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_base, offs_n, offs_d, stride_ks, stride_kd, S, HEAD_DIM, MASKED, PAD_D)
        v = load_tile(v_base, offs_n, offs_d, stride_vs, stride_vd, S, HEAD_DIM, MASKED, PAD_D)
        s = dot(q, tl.trans(k), INTERPRETED, PRECISION) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < S
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        # Every row sees at least one unmasked key in the first block it visits (key 0, or the
        # diagonal key of its own block), so m_new is finite and no exp2(-inf - -inf) arises.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(round_to(p, v.dtype, INTERPRETED), v, INTERPRETED, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=fwd_configs(), key=["S", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_fwd(Q, K, V, Out, LSE,
              stride_qb, stride_qh, stride_qs, stride_qd,
              stride_kb, stride_kh, stride_ks, stride_kd,
              stride_vb, stride_vh, stride_vs, stride_vd,
              H, S, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, CAUSAL: tl.constexpr,
              INTERPRETED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Under a causal mask late query blocks do the most work; launching them first evens out the
    # tail of the grid.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qs, stride_qd, S, HEAD_DIM, True, PAD_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys before `split` need no mask at all: under a causal mask, those left of this query
    # block (seen by all its rows); otherwise every whole key block. The rest takes the masks.
    if CAUSAL:
        split = m0
        end = tl.minimum(m0 + BLOCK_M, S)
    else:
        split = (S // BLOCK_N) * BLOCK_N
        end = S
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               offs_m, offs_d, 0, split, S, qk_scale,
                               HEAD_DIM, BLOCK_N, PAD_D, False, CAUSAL, INTERPRETED, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               offs_m, offs_d, split, end, S, qk_scale,
                               HEAD_DIM, BLOCK_N, PAD_D, True, CAUSAL, INTERPRETED, PRECISION)

    o = acc / l_i[:, None]
    store_tile(Out + pid_bh * S * HEAD_DIM, offs_m, offs_d, S, round_to(o, Out.dtype.element_ty, INTERPRETED), HEAD_DIM)
    tl.store(LSE + pid_bh * S + offs_m, m_i + tl.log2(l_i), mask=offs_m < S)

# fmt: on


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 for fp32 inputs (no silent TF32), native for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (contiguous, q's dtype) and the base-2 logsumexp of each row's scaled scores."""
    B, H, S, D = q.shape
    o = torch.empty((B, H, S, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    block_d = max(triton.next_power_of_2(D), 16)  # tl.dot needs every dimension >= 16

    def grid(meta):
        return (triton.cdiv(S, meta["BLOCK_M"]), B * H)

    # fmt: off
    _attn_fwd[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), H, S, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=block_d, PAD_D=block_d != D, CAUSAL=causal,
        INTERPRETED=INTERPRET, PRECISION=dot_precision(q.dtype),
    )
    # fmt: on
    return o, lse

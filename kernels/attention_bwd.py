"""Fused attention backward, FlashAttention-2 style: dK/dV per key block, dQ per query block.

Both kernels rebuild the softmax from the forward's logsumexp, P = exp2(S * scale * log2(e) - lse),
so no (seq x seq) matrix is stored. With dP = dO V^T and delta = rowsum(O * dO) (a small
preprocessing kernel), the score gradient is dS = P * (dP - delta); then dV = P^T dO,
dK = scale * dS^T Q and dQ = scale * dS K. Splitting dK/dV from dQ costs one more recomputation
of P but needs no atomics, so the gradients are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megapixel_kernels.attention_fwd import INTERPRET, LOG2E, dot, dot_precision, load_tile, round_to, store_tile


def _bwd_configs(pairs: tuple[tuple[int, int], ...], interpret_pair: tuple[int, int]) -> list[triton.Config]:
    """Autotuning candidates for one backward kernel: a Hopper sweep, or one config under the interpreter."""
    if INTERPRET:
        bm, bn = interpret_pair
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn in pairs
        for s in (2, 3)
        for w in (4, 8)
    ]


# dK/dV walks query blocks past a key block: BLOCK_N % BLOCK_M == 0 keeps the diagonal aligned.
DKDV_CONFIGS = _bwd_configs(((32, 64), (32, 128), (64, 64), (64, 128)), (32, 64))
# dQ walks key blocks past a query block: BLOCK_M % BLOCK_N == 0, as in the forward.
DQ_CONFIGS = _bwd_configs(((64, 32), (128, 32), (64, 64), (128, 64)), (64, 32))
DELTA_BLOCK_M = 64


# fmt: off
# As in attention_fwd.py: arguments stay grouped by tensor rather than one to a line.

@triton.jit
def _delta_kernel(Out, DO, DELTA, stride_dob, stride_doh, stride_dos, stride_dod, H, S,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    do_base = DO + (pid_bh // H) * stride_dob + (pid_bh % H) * stride_doh
    o = load_tile(Out + pid_bh * S * HEAD_DIM, offs_m, offs_d, HEAD_DIM, 1, S, HEAD_DIM, True, PAD_D)
    do = load_tile(do_base, offs_m, offs_d, stride_dos, stride_dod, S, HEAD_DIM, True, PAD_D)
    tl.store(DELTA + pid_bh * S + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < S)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                stride_qs, stride_qd, stride_dos, stride_dod, offs_n, offs_d, lo, hi, S, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    # Works on transposed tiles (keys x queries) so the accumulators stay rows of dK and dV.
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(q_base, offs_m, offs_d, stride_qs, stride_qd, S, HEAD_DIM, MASKED, PAD_D)
        do = load_tile(do_base, offs_m, offs_d, stride_dos, stride_dod, S, HEAD_DIM, MASKED, PAD_D)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=offs_m < S, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < S, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        p_t = tl.exp2(dot(k, tl.trans(q), INTERPRETED, PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            keep = offs_m[None, :] < S
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            # A masked score may exceed the row's logsumexp and overflow to inf; where() drops it
            # before it meets any multiplication, so no inf * 0 = nan can appear.
            p_t = tl.where(keep, p_t, 0.0)
        dv += dot(round_to(p_t, do.dtype, INTERPRETED), do, INTERPRETED, PRECISION)
        dp_t = dot(v, tl.trans(do), INTERPRETED, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += dot(round_to(ds_t, q.dtype, INTERPRETED), q, INTERPRETED, PRECISION)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=["S", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   stride_qb, stride_qh, stride_qs, stride_qd,
                   stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd,
                   stride_dob, stride_doh, stride_dos, stride_dod,
                   H, S, qk_scale, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, CAUSAL: tl.constexpr,
                   INTERPRETED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh * S
    delta_base = DELTA + pid_bh * S

    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_ks, stride_kd, S, HEAD_DIM, True, PAD_D)
    v = load_tile(V + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vs, stride_vd, S, HEAD_DIM, True, PAD_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    full = (S // BLOCK_M) * BLOCK_M  # query blocks before this need no sequence-end mask
    if CAUSAL:
        # Queries before n0 see none of these keys. The diagonal blocks need the causal mask,
        # the ones after it none, and a ragged last block the sequence-end mask.
        diag_end = n0 + BLOCK_N
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qs, stride_qd, stride_dos, stride_dod, offs_n, offs_d,
                             n0, tl.minimum(diag_end, S), S, qk_scale,
                             HEAD_DIM, BLOCK_M, PAD_D, True, CAUSAL, INTERPRETED, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qs, stride_qd, stride_dos, stride_dod, offs_n, offs_d,
                             diag_end, full, S, qk_scale,
                             HEAD_DIM, BLOCK_M, PAD_D, False, CAUSAL, INTERPRETED, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qs, stride_qd, stride_dos, stride_dod, offs_n, offs_d,
                             tl.maximum(diag_end, full), S, S, qk_scale,
                             HEAD_DIM, BLOCK_M, PAD_D, True, CAUSAL, INTERPRETED, PRECISION)
    else:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qs, stride_qd, stride_dos, stride_dod, offs_n, offs_d,
                             0, full, S, qk_scale,
                             HEAD_DIM, BLOCK_M, PAD_D, False, CAUSAL, INTERPRETED, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qs, stride_qd, stride_dos, stride_dod, offs_n, offs_d,
                             full, S, S, qk_scale,
                             HEAD_DIM, BLOCK_M, PAD_D, True, CAUSAL, INTERPRETED, PRECISION)

    out = pid_bh * S * HEAD_DIM
    store_tile(DK + out, offs_n, offs_d, S, round_to(dk * scale, DK.dtype.element_ty, INTERPRETED), HEAD_DIM)
    store_tile(DV + out, offs_n, offs_d, S, round_to(dv, DV.dtype.element_ty, INTERPRETED), HEAD_DIM)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
              offs_m, offs_d, lo, hi, S, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_base, offs_n, offs_d, stride_ks, stride_kd, S, HEAD_DIM, MASKED, PAD_D)
        v = load_tile(v_base, offs_n, offs_d, stride_vs, stride_vd, S, HEAD_DIM, MASKED, PAD_D)
        p = tl.exp2(dot(q, tl.trans(k), INTERPRETED, PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            keep = offs_n[None, :] < S
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = dot(do, tl.trans(v), INTERPRETED, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += dot(round_to(ds, k.dtype, INTERPRETED), k, INTERPRETED, PRECISION)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=["S", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 stride_qb, stride_qh, stride_qs, stride_qd,
                 stride_kb, stride_kh, stride_ks, stride_kd,
                 stride_vb, stride_vh, stride_vs, stride_vd,
                 stride_dob, stride_doh, stride_dos, stride_dod,
                 H, S, qk_scale, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, CAUSAL: tl.constexpr,
                 INTERPRETED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)  # heaviest first
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qs, stride_qd, S, HEAD_DIM, True, PAD_D)
    do = load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dos, stride_dod, S, HEAD_DIM,
                   True, PAD_D)
    lse = tl.load(LSE + pid_bh * S + offs_m, mask=offs_m < S, other=0.0)
    delta = tl.load(DELTA + pid_bh * S + offs_m, mask=offs_m < S, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # The same split of the keys as in the forward: unmasked before `split`, masked after.
    if CAUSAL:
        split = m0
        end = tl.minimum(m0 + BLOCK_M, S)
    else:
        split = (S // BLOCK_N) * BLOCK_N
        end = S
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                   offs_m, offs_d, 0, split, S, qk_scale,
                   HEAD_DIM, BLOCK_N, PAD_D, False, CAUSAL, INTERPRETED, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                   offs_m, offs_d, split, end, S, qk_scale,
                   HEAD_DIM, BLOCK_N, PAD_D, True, CAUSAL, INTERPRETED, PRECISION)

    dq = round_to(dq * scale, DQ.dtype.element_ty, INTERPRETED)
    store_tile(DQ + pid_bh * S * HEAD_DIM, offs_m, offs_d, S, dq, HEAD_DIM)

# fmt: on


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), contiguous, of attention given the forward's output and logsumexp."""
    B, H, S, D = q.shape
    block_d = max(triton.next_power_of_2(D), 16)
    tile = dict(HEAD_DIM=D, BLOCK_D=block_d, PAD_D=block_d != D)
    delta = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    delta_grid = (triton.cdiv(S, DELTA_BLOCK_M), B * H)
    _delta_kernel[delta_grid](o, do, delta, *do.stride(), H, S, BLOCK_M=DELTA_BLOCK_M, **tile)

    dq = torch.empty((B, H, S, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, S, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, S, D), dtype=v.dtype, device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    common = dict(CAUSAL=causal, INTERPRETED=INTERPRET, PRECISION=dot_precision(q.dtype), **tile)

    def dkdv_grid(meta):
        return (triton.cdiv(S, meta["BLOCK_N"]), B * H)

    def dq_grid(meta):
        return (triton.cdiv(S, meta["BLOCK_M"]), B * H)

    _attn_bwd_dkdv[dkdv_grid](q, k, v, do, dk, dv, lse, delta, *strides, H, S, scale * LOG2E, scale, **common)
    _attn_bwd_dq[dq_grid](q, k, v, do, dq, lse, delta, *strides, H, S, scale * LOG2E, scale, **common)
    return dq, dk, dv

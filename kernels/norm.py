"""Fused RMS norm and layer norm (optionally after a residual add) in Triton, beside plain-torch references.

`rms_norm` is iGPT's norm: y = x * rsqrt(mean(x^2) + eps) * weight, no mean subtraction, no
bias. `layer_norm` subtracts the mean and takes an optional bias. Given `residual`, both first
form h = x + residual and return (norm(h), h): the caller keeps h as the new residual stream,
and the add costs no extra pass over memory. Any leading shape is flattened to rows; one
program normalises one row of up to next_power_of_2(width) lanes, with fp32 math inside.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton chooses interpreter or compiler when the kernels below are decorated, i.e. at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _norm_fwd(
    X,
    RES,
    W,
    B,
    Y,
    H,
    MEAN,
    RSTD,
    stride_x,
    stride_res,
    stride_y,
    stride_h,
    N,
    eps,
    SUBTRACT_MEAN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = x.to(tl.float32) + tl.load(RES + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        # Round h to the stream's dtype first and normalise that, so y is exactly norm(returned h).
        x = h.to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    x = x.to(tl.float32)
    if SUBTRACT_MEAN:
        mean = tl.sum(x, axis=0) / N
        tl.store(MEAN + row, mean)
        x = tl.where(mask, x - mean, 0.0)  # padding lanes must not enter the variance
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    y = x * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(
    DY,
    DH,
    H,
    W,
    MEAN,
    RSTD,
    DX,
    DW_PART,
    DB_PART,
    stride_dy,
    stride_dh,
    stride_h,
    stride_dx,
    n_rows,
    N,
    SUBTRACT_MEAN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Each program takes every G-th row and keeps its own fp32 partial sums of dweight and dbias;
    # the host adds the G partials. That avoids both atomics and one row of partials per row.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    db = tl.zeros([BLOCK], tl.float32)
    # Row indices in int64: row * stride can pass 2**31 for long, wide activations.
    first = pid.to(tl.int64)
    step = tl.num_programs(0).to(tl.int64)
    for i in tl.range(0, tl.cdiv(n_rows - first, step)):
        row = first + i * step
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (h - tl.load(MEAN + row)) * rstd, 0.0) if SUBTRACT_MEAN else h * rstd
        g = dy * w  # gradient with respect to xhat; zero on padding lanes since dy is
        dx = g - xhat * (tl.sum(g * xhat, axis=0) / N)
        if SUBTRACT_MEAN:
            dx -= tl.sum(g, axis=0) / N
        dx *= rstd
        if HAS_DH:
            # The returned residual stream h has consumers of its own; their gradient adds here.
            dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, db, mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _num_warps(block: int) -> int:
    # About 8 lanes per thread: a 4096-wide row gets 16 warps, a 128-wide row one.
    return min(max(block // 256, 1), 16)


def _num_partials(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        # A few resident programs per SM fill the GPU; more would only lengthen the host's sum.
        return min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)


class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps: float, subtract_mean: bool):
        shape = x.shape
        x2 = _as_rows(x)
        n_rows, n = x2.shape
        block = triton.next_power_of_2(n)
        y = torch.empty_like(x2)
        h = torch.empty_like(x2) if residual is not None else x2
        res = _as_rows(residual) if residual is not None else x2  # unused pointer when absent
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        _norm_fwd[(n_rows,)](
            x2,
            res,
            weight,
            bias if bias is not None else weight,
            y,
            h,
            mean,
            rstd,
            x2.stride(0),
            res.stride(0),
            y.stride(0),
            h.stride(0),
            n,
            eps,
            SUBTRACT_MEAN=subtract_mean,
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.shape = shape
        ctx.subtract_mean = subtract_mean
        ctx.has_bias = bias is not None
        ctx.has_residual = residual is not None
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, mean, rstd = ctx.saved_tensors
        n_rows, n = h.shape
        block = triton.next_power_of_2(n)
        dy2 = _as_rows(dy)
        dh2 = _as_rows(dh) if dh is not None else dy2  # unused pointer when absent
        dx = torch.empty_like(h)
        g = _num_partials(n_rows, h.device)
        dw_part = torch.empty((g, n), dtype=torch.float32, device=h.device)
        db_part = torch.empty((g, n), dtype=torch.float32, device=h.device) if ctx.has_bias else dw_part
        _norm_bwd[(g,)](
            dy2,
            dh2,
            h,
            weight,
            mean,
            rstd,
            dx,
            dw_part,
            db_part,
            dy2.stride(0),
            dh2.stride(0),
            h.stride(0),
            dx.stride(0),
            n_rows,
            n,
            SUBTRACT_MEAN=ctx.subtract_mean,
            HAS_BIAS=ctx.has_bias,
            HAS_DH=dh is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
        dx = dx.view(ctx.shape)
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(weight.dtype) if ctx.has_bias else None
        # x and residual enter only through h = x + residual, so both receive dh.
        return dx, dw, db, dx if ctx.has_residual else None, None, None


def _check_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
) -> None:
    width = x.shape[-1]
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"norm kernels support fp32/fp16/bf16 inputs; got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (width,):
            raise ValueError(
                f"{name} must have shape ({width},) to match the input's last dimension; got {tuple(t.shape)}"
            )
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x in shape and dtype; got {tuple(residual.shape)} {residual.dtype} "
            f"for x {tuple(x.shape)} {x.dtype}"
        )
    if not INTERPRET and not x.is_cuda:
        raise ValueError(
            "the Triton norm kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing "
            "them, to run on the CPU)"
        )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMS norm over the last dimension; with `residual`, returns (rms_norm(x + residual), x + residual)."""
    _check_inputs(x, weight, None, residual)
    return _FusedNorm.apply(x, weight, None, residual, float(eps), False)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Layer norm over the last dimension; with `residual`, returns (layer_norm(x + residual), x + residual)."""
    _check_inputs(x, weight, bias, residual)
    return _FusedNorm.apply(x, weight, bias, residual, float(eps), True)


def reference_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm in plain torch, computed in the input's dtype."""
    h = x if residual is None else x + residual
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(h.dtype)
    return y if residual is None else (y, h)


def reference_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """layer_norm in plain torch, computed in the input's dtype."""
    h = x if residual is None else x + residual
    centred = h - h.mean(-1, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight.to(h.dtype)
    if bias is not None:
        y = y + bias.to(h.dtype)
    return y if residual is None else (y, h)

"""Fused (LayerNorm | RMSNorm) + adaptive modulate in Triton: one pass forward, one pass backward.

    LayerNorm: y = (x - mean) * rstd * (1 + scale) + shift,  rstd = 1 / sqrt(var(x) + eps)
    RMSNorm:   y =  x         * rstd * (1 + scale) + shift,  rstd = 1 / sqrt(mean(x^2) + eps)
    x: (B, T, D); shift, scale: (B, D)

One kernel pair serves both norms: RMS is a constexpr flag that drops the centring (mean = 0) and
the mean(g) term of the backward. Forward: each program normalises BLOCK_T rows of one sample b
(statistics in fp32) and stores y and the per-row mean / rstd. Backward: each program computes dx
for its rows and writes its partial sums of dshift = sum_t dy and dscale = sum_t dy * xhat to a
(B, tiles, D) buffer; a second reduction over tiles finishes them. No atomics, so gradients are
deterministic.

bf16 / fp16 / fp32 in and out; every load is cast to fp32 first (also what keeps the CPU
interpreter correct for bf16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_D = 8192


def _configs():
    if INTERPRET:  # the interpreter cannot autotune over several configs
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)]


@triton.jit
def _tile(T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sample b and BLOCK_T tokens: row/column indices, masks, element offsets."""
    tile = tl.program_id(0)
    b = tl.program_id(1)
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # token indices
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    offs = (b * T + rows)[:, None] * D + cols[None, :]
    return tile, b, rows, cols, row_ok, col_ok, mask, offs


@triton.autotune(configs=_configs(), key=["D", "BLOCK_T", "RMS"])
@triton.jit
def _fwd_kernel(
    X, SHIFT, SCALE, Y, MEAN, RSTD, T, D, eps, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, RMS: tl.constexpr
):
    tile, b, rows, cols, row_ok, col_ok, mask, offs = _tile(T, D, BLOCK_T, BLOCK_D)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        mean = tl.zeros([BLOCK_T], dtype=tl.float32)
        xc = x  # masked elements loaded as 0
    else:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D  # LayerNorm: variance; RMSNorm: mean square
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(SCALE + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + b * T + rows, mean, mask=row_ok)
    tl.store(RSTD + b * T + rows, rstd, mask=row_ok)


@triton.autotune(configs=_configs(), key=["D", "BLOCK_T", "RMS"])
@triton.jit
def _bwd_kernel(
    DY,
    X,
    SCALE,
    MEAN,
    RSTD,
    DX,
    DSHIFT_PART,
    DSCALE_PART,
    T,
    D,
    n_tiles,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RMS: tl.constexpr,
):
    tile, b, rows, cols, row_ok, col_ok, mask, offs = _tile(T, D, BLOCK_T, BLOCK_D)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + b * T + rows, mask=row_ok, other=0.0)  # zeros for RMSNorm
    rstd = tl.load(RSTD + b * T + rows, mask=row_ok, other=0.0)
    scale = tl.load(SCALE + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    # Partial reductions over this program's tokens (finished by a second reduction over tiles).
    part = (b * n_tiles + tile) * D + cols
    tl.store(DSHIFT_PART + part, tl.sum(dy, axis=0), mask=col_ok)
    tl.store(DSCALE_PART + part, tl.sum(dy * xhat, axis=0), mask=col_ok)
    # g = dy * (1 + scale). LayerNorm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat));
    # RMSNorm has no centring, so no mean(g) term: dx = rstd * (g - xhat * mean(g * xhat)).
    g = dy * (1.0 + scale[None, :])
    c1 = tl.sum(g * xhat, axis=1) / D
    if RMS:
        dx = (g - xhat * c1[:, None]) * rstd[:, None]
    else:
        c2 = tl.sum(g, axis=1) / D
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _blocks(T: int, D: int) -> tuple[int, int]:
    """BLOCK_D covers a row; BLOCK_T rows per program, ~4K elements per program on GPU (fewer
    programs under the interpreter, which runs them one by one)."""
    if D > MAX_D:
        raise ValueError(f"layernorm_modulate: hidden size {D} > {MAX_D} is not supported by the fused kernel")
    block_d = triton.next_power_of_2(D)
    budget = 1 << (16 if INTERPRET else 12)
    block_t = max(1, min(triton.next_power_of_2(T), budget // block_d))
    return block_t, block_d


def forward(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, rms: bool = False):
    """-> y (like x), mean (zeros for RMSNorm) and rstd (B*T fp32)."""
    B, T, D = x.shape
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    y = torch.empty_like(x)
    mean = torch.empty(B * T, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_t, block_d = _blocks(T, D)
    grid = (triton.cdiv(T, block_t), B)
    _fwd_kernel[grid](x, shift, scale, y, mean, rstd, T, D, eps, BLOCK_T=block_t, BLOCK_D=block_d, RMS=rms)
    return y, mean, rstd


def backward(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, rms: bool = False
):
    """-> dx (like x), dshift and dscale (like scale)."""
    B, T, D = x.shape
    dy, x, scale = dy.contiguous(), x.contiguous(), scale.contiguous()
    block_t, block_d = _blocks(T, D)
    n_tiles = triton.cdiv(T, block_t)
    dx = torch.empty_like(x)
    dshift_part = torch.empty(B, n_tiles, D, device=x.device, dtype=torch.float32)
    dscale_part = torch.empty_like(dshift_part)
    _bwd_kernel[(n_tiles, B)](
        dy, x, scale, mean, rstd, dx, dshift_part, dscale_part, T, D, n_tiles, BLOCK_T=block_t, BLOCK_D=block_d, RMS=rms
    )
    # Second, deterministic reduction over the per-program partial sums.
    return dx, dshift_part.sum(1).to(scale.dtype), dscale_part.sum(1).to(scale.dtype)

"""Triton backend of lowrank.ops.dora_linear (see that module for the contract).

  forward     xa = x·Aᵀ (matmul_kernel), then y = g⊙(x·Wᵀ + s·xa·Bᵀ) + b in one pass over [M, N]:
              lora_linear's _lora_matmul_kernel with its per-column output scale
  norm        W·Aᵀ [N, r] (matmul_kernel); the [N]- and [r, r]-sized rest in torch (column_norm)
  backward    dyB = dy·(g⊙B), dA, dB, dW: matmul_kernel; dx = (g⊙dy)·W + s·dyB·A: _lora_matmul_kernel,
              g folded into the smaller of dy [M, N] and W [N, K]; dm and db: _column_dots_kernel,
              one pass over dy and y that recovers z = (y − b)/g and, in a column block holding a
              column with g = 0 (rare), recomputes z = x·W[j]ᵀ + s·xa·B[j]ᵀ in the kernel: no host sync
  dropout     PEFT's two-GEMM form, not fused further: the dropped x only ever as matmul_kernel's
              masked operand; z_D's low-rank term, y's (g − 1)⊙z_D and dx's dy·W in torch; dx's masked
              term added by _add_dropped_kernel

Inference is the forward (no single-launch kernel for few rows, unlike lora_linear).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank import _backends
from lowrank.kernels.lora_linear import _BLOCK_R, _lora_matmul
from lowrank.kernels.matmul import (
    DROPOUT_A,
    DROPOUT_A_TRANSPOSED,
    check_dtype,
    dot_options,
    empty_batch_gradients,
    fit,
    keep_mask,
    matmul,
    matmul_tile,
    to_acc,
)
from lowrank.ops import hash_dropout
from lowrank.ops._dispatch import inference_through
from lowrank.ops.dora_linear import accumulate_dtype, column_norm, column_scale, magnitude_grad, unscale_recovered


@triton.jit
def _column_dots_kernel(
    dy_ptr, y_ptr, bias_ptr, scale_ptr, norm_ptr, x_ptr, w_ptr, xa_ptr, b_ptr, out_ptr,
    M, N, K, R, ROWS_PER_SPLIT,
    stride_dym, stride_dyn, stride_ym, stride_yn, stride_bias,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_xam, stride_xar, stride_br, stride_bn,
    stride_os, stride_oc,
    lora_scale: tl.float64,
    HAS_BIAS: tl.constexpr, RECOVER: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Over the rows of slice program_id(1), for the columns j of block program_id(0):
    out[s, 0, j] = Σ_i dy[i, j]·(y[i, j] − bias[j]), and out[s, 1, j] = Σ_i dy[i, j].
    RECOVER (y is the DoRA output): where scale[j] = 0 < norm[j], y − bias carries nothing, so
    z = x·w + lora_scale·xa·b (w = Wᵀ [K, N], b = Bᵀ [R, N]) is recomputed for the tile instead."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    cols = offs_n.to(tl.int64)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=n_in, other=0.0).to(ACC_DTYPE)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    if RECOVER:
        scale = tl.load(scale_ptr + offs_n, mask=n_in, other=1.0)
        norm = tl.load(norm_ptr + offs_n, mask=n_in, other=0.0)
        recompute = (scale == 0) & (norm > 0)
        any_recompute = tl.max(recompute.to(tl.int32), axis=0) > 0
    # Summed elementwise over the row tiles and across rows once at the end: no reduction per tile.
    dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    sums = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    row_begin = split * ROWS_PER_SPLIT
    row_end = min(M, row_begin + ROWS_PER_SPLIT)
    for m0 in range(row_begin, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_tile = (offs_m < row_end)[:, None] & n_in[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + rows * stride_dym + cols * stride_dyn, mask=in_tile, other=0.0).to(ACC_DTYPE)
        centred = tl.load(y_ptr + rows * stride_ym + cols * stride_yn, mask=in_tile, other=0.0).to(ACC_DTYPE)
        centred -= bias[None, :]
        if RECOVER:
            if any_recompute:
                z = matmul_tile(x_ptr, w_ptr, offs_m, offs_n, row_end, N, K, stride_xm, stride_xk, stride_wk,
                                stride_wn, ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
                z += to_acc(lora_scale, ACC_DTYPE) * matmul_tile(
                    xa_ptr, b_ptr, offs_m, offs_n, row_end, N, R, stride_xam, stride_xar, stride_br, stride_bn,
                    ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R,
                )
                centred = tl.where(recompute[None, :], z, centred)
        dots += dy * centred
        sums += dy
    out = out_ptr + split.to(tl.int64) * stride_os + offs_n
    tl.store(out, tl.sum(dots, axis=0), mask=n_in)
    tl.store(out + stride_oc, tl.sum(sums, axis=0), mask=n_in)


@triton.jit
def _add_dropped_kernel(
    t_ptr, out_ptr, seed_ptr, M, N,
    stride_tm, stride_tn, stride_om, stride_on,
    keep_scale: tl.float64, threshold,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[M, N] += keep_scale·D⊙t, D the hash mask of an [M, N] input."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_tile = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    rows, cols = offs_m.to(tl.int64)[:, None], offs_n.to(tl.int64)[None, :]
    t = tl.load(t_ptr + rows * stride_tm + cols * stride_tn, mask=in_tile, other=0.0).to(ACC_DTYPE)
    out_ptrs = out_ptr + rows * stride_om + cols * stride_on
    out = tl.load(out_ptrs, mask=in_tile, other=0.0).to(ACC_DTYPE)
    kept = keep_mask(seed_ptr, offs_m, offs_n, threshold, False)
    out += tl.where(kept, to_acc(keep_scale, ACC_DTYPE) * t, 0.0)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=in_tile)


# ---------------------------------------------------------------- host side


# Column reductions: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps). 32 rows keep the recompute tile off
# wgmma's 64-row shapes; on FMA units (fp32 without TF32, fp64) the recompute's operand slices sit in
# registers: 32x64 spilled on sm_90 (fp64: 496 B per thread), and so did 32x32 over 8 warps at
# 128 registers (triton 3.6, fp32); 16x32 over 4 warps fits both triton 3.6 and 3.8.
# In the interpreter, small blocks so that test shapes cross their edges.
_DOTS_CONFIG = (32, 64, 32, 4)
_FMA_DOTS_CONFIG = (16, 32, 32, 4)
# A bandwidth-bound pass: more programs per SM than the GEMMs' split reductions, to keep loads in flight.
_DOTS_PROGRAMS_PER_SM = 8
_INTERPRETER_DOTS_CONFIG = (16, 16, 16, 1)
_ELEMENTWISE_BLOCK = (32, 128, 4)  # BLOCK_M, BLOCK_N, num_warps of _add_dropped_kernel
_INTERPRETER_ELEMENTWISE_BLOCK = (16, 16, 1)


def _column_dots(grad_y, y, bias, x, weight, xa, lora_B, scaling, scale=None, norm=None):
    """[2, N] in the accumulator dtype: Σ_rows dy⊙(y − b) (z recomputed where scale = 0 < norm, when
    scale and norm are given) and Σ_rows dy."""
    (M, N), K, R = grad_y.shape, x.shape[1], xa.shape[1]
    options = dot_options(x.dtype)
    interpret = _backends.triton_interpret()
    on_fma = options["DOT_PRECISION"] == "ieee" and x.dtype in (torch.float32, torch.float64)
    block_m, block_n, block_k, warps = (
        _INTERPRETER_DOTS_CONFIG if interpret else _FMA_DOTS_CONFIG if on_fma else _DOTS_CONFIG
    )
    block_n, block_k = fit(block_n, N), fit(block_k, K)
    column_blocks = triton.cdiv(N, block_n)
    programs = 4 if interpret else _DOTS_PROGRAMS_PER_SM * _backends.multiprocessor_count(x.device)
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(programs, column_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty((splits, 2, N), dtype=accumulate_dtype(x.dtype), device=x.device)
    w_t, b_t = weight.t(), lora_B.t()
    if norm is not None:  # the kernel reads scale and norm with unit stride
        scale, norm = scale.contiguous(), norm.contiguous()
    _column_dots_kernel[(column_blocks, splits)](
        grad_y, y, bias, scale, norm, x, w_t, xa, b_t, partial,
        M, N, K, R, rows_per_split,
        grad_y.stride(0), grad_y.stride(1), y.stride(0), y.stride(1), 0 if bias is None else bias.stride(0),
        x.stride(0), x.stride(1), w_t.stride(0), w_t.stride(1), xa.stride(0), xa.stride(1),
        b_t.stride(0), b_t.stride(1),
        partial.stride(0), partial.stride(1),
        scaling,
        HAS_BIAS=bias is not None, RECOVER=scale is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=fit(32 if interpret else _BLOCK_R, R),
        num_warps=warps, **options,
    )
    return partial.sum(0)


def _add_dropped(out, t, seed, dropout_p):
    """out += D⊙t (D: keep mask / (1 - p)) in place, for [M, K] out and t."""
    M, K = out.shape
    block_m, block_n, warps = _INTERPRETER_ELEMENTWISE_BLOCK if _backends.triton_interpret() else _ELEMENTWISE_BLOCK
    _add_dropped_kernel[(triton.cdiv(M, block_m), triton.cdiv(K, block_n))](
        t, out, seed, M, K, t.stride(0), t.stride(1), out.stride(0), out.stride(1),
        1.0 / (1.0 - dropout_p), hash_dropout.threshold(dropout_p),
        ACC_DTYPE=dot_options(out.dtype)["ACC_DTYPE"], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )


def forward(x, weight, bias, lora_A, lora_B, magnitude, weight_norm_sq, scaling, dropout_p, seed):
    """(y, xa, norm, z): see the module docstring."""
    check_dtype("dora_linear", x)
    norm = column_norm(weight_norm_sq, matmul(weight, lora_A.t()), lora_A, lora_B, scaling)
    scale = column_scale(magnitude, norm)
    if dropout_p == 0.0:
        xa = matmul(x, lora_A.t())
        y = _lora_matmul(x, weight.t(), xa, lora_B.t(), bias, scaling, col_scale=scale)
        return y, xa, norm, x.new_empty(0)
    keep_scale = 1.0 / (1.0 - dropout_p)
    dropped = dict(alpha=keep_scale, dropout_p=dropout_p, seed=seed, dropout_on=DROPOUT_A)
    xa = matmul(x, lora_A.t(), **dropped)
    z = matmul(x, weight.t(), **dropped).addmm_(xa * scaling, lora_B.t())  # s on the small factor
    y = _lora_matmul(x, weight.t(), xa, lora_B.t(), bias, scaling)
    y.addcmul_(z, (scale - 1).to(x.dtype))  # g − 1 before rounding: in bf16, g near 1 would give 0
    return y, xa, norm, z


inference = inference_through(forward)


def backward(grad_y, x, xa, y_or_z, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed,
             needs_dx, needs_dweight, needs_dbias):
    """(dx, dW, db, dA, dB, dm); dx, dW, db are None when not needed."""
    check_dtype("dora_linear", x)
    (M, K), N = x.shape, weight.shape[0]
    if M == 0:
        shapes = ((0, K), (N, K), (N,), lora_A.shape, lora_B.shape, magnitude.shape)
        return empty_batch_gradients(x, shapes, (needs_dx, needs_dweight, needs_dbias, True, True, True))
    scale = column_scale(magnitude, norm)
    scale_rows = scale.to(x.dtype)[:, None]
    keep_scale = 1.0 / (1.0 - dropout_p)
    dyB = matmul(grad_y, lora_B * scale_rows)
    dA = lora_A.new_empty(lora_A.shape)  # as dAᵀ = (D⊙x)ᵀ·dyB, K along the tile rows (see lora_linear)
    matmul(x.t(), dyB, alpha=scaling * keep_scale, dropout_p=dropout_p, seed=seed, dropout_on=DROPOUT_A_TRANSPOSED,
           out=dA.t())
    dB = matmul(grad_y.t(), xa, alpha=scaling).mul_(scale_rows)
    dx = dW = None
    if dropout_p == 0.0:
        if needs_dx:  # g on whichever of dy and W is smaller
            if M <= K:
                dx = _lora_matmul(grad_y * scale_rows.t(), weight, dyB, lora_A, None, scaling)
            else:
                dx = _lora_matmul(grad_y, weight * scale_rows, dyB, lora_A, None, scaling)
        if needs_dweight:
            dW = matmul(grad_y.t(), x).mul_(scale_rows)
        dots, sums = _column_dots(grad_y, y_or_z, bias, x, weight, xa, lora_B, scaling, scale, norm)
        dy_z = unscale_recovered(dots, scale)
    else:
        shifted_grad = grad_y * (scale - 1).to(x.dtype)
        if needs_dx:  # dy·W through torch: matmul_kernel spilled on sm_90 (triton 3.8, fp32) at this layout
            dx = grad_y @ weight
            _add_dropped(dx, _lora_matmul(shifted_grad, weight, dyB, lora_A, None, scaling), seed, dropout_p)
        if needs_dweight:  # dyᵀ·x + Hᵀ·(D⊙x), the second as ((D⊙x)ᵀ·H)ᵀ
            dW = matmul(grad_y.t(), x)
            dW += matmul(x.t(), shifted_grad, alpha=keep_scale, dropout_p=dropout_p, seed=seed,
                         dropout_on=DROPOUT_A_TRANSPOSED).t()
        dy_z, sums = _column_dots(grad_y, y_or_z, None, x, weight, xa, lora_B, scaling)
    db = sums.to(grad_y.dtype, copy=True) if needs_dbias else None  # not a view of the [2, N] sums
    return dx, dW, db, dA, dB, magnitude_grad(dy_z, norm, magnitude.dtype)

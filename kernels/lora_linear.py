"""Triton backend of lowrank.ops.lora_linear (see that module for the contract).

Two kernels serve training, a third serves inference:

  _lora_matmul_kernel  out = a·b + lora_scale·D⊙(l·r) + bias: the two big matmuls with the
                       low-rank term folded in, so y and dx are each written once (optionally
                       with each output column scaled before the bias: DoRA's g, lowrank.kernels.dora_linear).
                         y  = x·Wᵀ  + s·(xa·Bᵀ)      + bias
                         dx = dy·W  + s·D⊙(dyB·A)
  matmul_kernel        (lowrank.kernels.matmul) c = alpha·a·b, split along K where the output is
                       skinny, optionally dropping elements of a with the hash mask:
                       xa = D⊙x·Aᵀ, dyB = dy·B, dAᵀ = s·(D⊙x)ᵀ·dyB, dB = s·dyᵀ·xa, dW = dyᵀ·x
  _inference_kernel    y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ + bias in one launch for few rows (no grad,
                       no dropout): x·Aᵀ is built in the same K loop and never stored

The dropout mask is never stored: every kernel that needs it recomputes the keep bits of
hash_dropout from the seed (read through a pointer, so no host sync). All kernels take
explicit strides, so transposed views and expanded (stride-0) gradients are read in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank import _backends
from lowrank.kernels.matmul import (
    DROPOUT_A,
    DROPOUT_A_TRANSPOSED,
    GPU_TILES,
    accumulate_tile,
    autotuned,
    check_dtype,
    empty_batch_gradients,
    fit,
    keep_mask,
    launch,
    matmul,
    matmul_tile,
    tile_offsets,
    to_acc,
)
from lowrank.ops import hash_dropout


@triton.jit
def _lora_matmul_kernel(
    a_ptr, b_ptr, l_ptr, r_ptr, bias_ptr, seed_ptr, scale_ptr, out_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_lm, stride_lr, stride_rr, stride_rn,
    stride_om, stride_on, stride_bias, stride_scale,
    lora_scale: tl.float64, threshold,
    M_KEY, N_KEY, K_KEY,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, COL_SCALE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, N] = a[M, K]·b[K, N] + lora_scale·D⊙(l[M, R]·r[R, N]) + bias[N], or with COL_SCALE
    scale[N]⊙(a·b + lora_scale·D⊙(l·r)) + bias (scale in the accumulator dtype)."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_in = offs_m < M
    n_in = offs_n < N
    lora_scale = to_acc(lora_scale, ACC_DTYPE)

    # The accumulator is seeded with the low-rank term: one small dot, and no second
    # [BLOCK_M, BLOCK_N] tile held through the main loop (which made large tiles spill).
    acc = lora_scale * matmul_tile(
        l_ptr, r_ptr, offs_m, offs_n, M, N, R, stride_lm, stride_lr, stride_rr, stride_rn,
        ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R,
    )
    if DROPOUT:  # D acts on the low-rank term only, which is all the accumulator holds yet
        acc = tl.where(keep_mask(seed_ptr, offs_m, offs_n, threshold, False), acc, 0.0)

    acc = accumulate_tile(acc, a_ptr, b_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                          ACC_DTYPE, DOT_PRECISION, BLOCK_K)

    if COL_SCALE:
        acc *= tl.load(scale_ptr + offs_n * stride_scale, mask=n_in, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_in, other=0.0).to(ACC_DTYPE)[None, :]

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


@triton.jit
def _inference_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, out_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar, stride_br, stride_bn,
    stride_om, stride_on, stride_bias,
    lora_scale: tl.float64,
    M_KEY, N_KEY, K_KEY,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = x·w + lora_scale·(x·a)·b + bias in one launch, R <= BLOCK_R: each program builds
    its own x·a tile in the K loop from the x tile it loads anyway, so xa never goes to memory.
    For few rows (decoding) the layer is bound by reading W; A stays in L2 across programs."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_in = offs_m < M
    n_in = offs_n < N
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rk[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn
    a_ptrs = a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        k_in = k0 + rk < K
        x = tl.load(x_ptrs, mask=m_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None] & n_in[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_in[:, None] & (rr < R)[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        xa = tl.dot(x, a, xa, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    # Round xa to the input dtype as the two-kernel path does when it stores xa.
    b = tl.load(b_ptr + rr[:, None] * stride_br + offs_n.to(tl.int64)[None, :] * stride_bn,
                mask=(rr < R)[:, None] & n_in[None, :], other=0.0)
    low_rank = tl.dot(xa.to(b.dtype), b, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    acc += to_acc(lora_scale, ACC_DTYPE) * low_rank
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_in, other=0.0).to(ACC_DTYPE)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])



# ---------------------------------------------------------------- host side


_BLOCK_R = 64  # rank chunk of the low-rank tile (32 in the interpreter)
# Up to this many rows, inference takes the single-launch kernel (a first guess for Hopper,
# where 256 rows of x·Wᵀ at K=N=4096 are still bound by reading W).
INFERENCE_FUSED_MAX_ROWS = 256

# Inference runs at few rows, where reading W bounds the kernel: no 256-wide tiles, narrow ones
# for more programs, and a smaller budget for x·Aᵀ, a second accumulator held through the K loop.
_INFERENCE_TILES = [tile for tile in GPU_TILES if max(tile[:2]) <= 128] + [(64, 32, 128, 4, 3)]
# With dropout, the keep mask of the whole tile is live beside the accumulator.
_lora_matmul_tuned = autotuned(
    _lora_matmul_kernel, accumulator_budget=lambda options: 64 if options["DROPOUT"] else 128
)
_inference_tuned = autotuned(_inference_kernel, _INFERENCE_TILES, lambda options: 64)


def _lora_matmul(a, b, left, right, bias, lora_scale, dropout_p=0.0, seed=None, col_scale=None):
    """a·b + lora_scale·D⊙(left·right) + bias for strided a [M, K], b [K, N], left [M, R], right [R, N];
    with col_scale [N], col_scale⊙(a·b + lora_scale·D⊙(left·right)) + bias."""
    (M, K), N, R = a.shape, b.shape[1], left.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    block_r = fit(32 if _backends.triton_interpret() else _BLOCK_R, R)
    launch(
        _lora_matmul_kernel, _lora_matmul_tuned, a.dtype, M, N, K,
        a, b, left, right, bias, seed, col_scale, out,
        M, N, K, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        out.stride(0), out.stride(1), 0 if bias is None else bias.stride(0),
        0 if col_scale is None else col_scale.stride(0),
        lora_scale, hash_dropout.threshold(dropout_p),
        HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0, COL_SCALE=col_scale is not None, BLOCK_R=block_r,
    )
    return out


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """(y, xa): xa = D⊙x·Aᵀ [M, r], then y = x·Wᵀ + s·xa·Bᵀ + b written by one kernel."""
    check_dtype("lora_linear", x)
    keep_scale = 1.0 / (1.0 - dropout_p)
    xa = matmul(x, lora_A.t(), alpha=keep_scale, dropout_p=dropout_p, seed=seed, dropout_on=DROPOUT_A)
    y = _lora_matmul(x, weight.t(), xa, lora_B.t(), bias, scaling)
    return y, xa


def inference(x, weight, bias, lora_A, lora_B, scaling):
    """y alone, without dropout. Few rows: one launch (_inference_kernel); many rows: the
    compute-bound training forward, whose separate xa pass costs less than the fused kernel's
    per-column-tile recomputation of x·Aᵀ."""
    check_dtype("lora_linear", x)
    (M, K), N, R = x.shape, weight.shape[0], lora_A.shape[0]
    if M > INFERENCE_FUSED_MAX_ROWS or R > _BLOCK_R:
        return forward(x, weight, bias, lora_A, lora_B, scaling, 0.0, None)[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    w_t, a_t, b_t = weight.t(), lora_A.t(), lora_B.t()
    launch(
        _inference_kernel, _inference_tuned, x.dtype, M, N, K,
        x, w_t, a_t, b_t, bias, out,
        M, N, K, R,
        x.stride(0), x.stride(1), w_t.stride(0), w_t.stride(1), a_t.stride(0), a_t.stride(1),
        b_t.stride(0), b_t.stride(1), out.stride(0), out.stride(1), 0 if bias is None else bias.stride(0),
        scaling,
        HAS_BIAS=bias is not None, BLOCK_R=fit(_BLOCK_R, R),
    )
    return out


def backward(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, needs_dx, needs_dweight, needs_dbias):
    """(dx, dW, db, dA, dB); dx, dW, db are None when not needed."""
    check_dtype("lora_linear", x)
    (M, K), N = x.shape, weight.shape[0]
    if M == 0:
        shapes = ((0, K), (N, K), (N,), lora_A.shape, lora_B.shape)
        return empty_batch_gradients(x, shapes, (needs_dx, needs_dweight, needs_dbias, True, True))
    keep_scale = 1.0 / (1.0 - dropout_p)
    dyB = matmul(grad_y, lora_B)
    dx = _lora_matmul(grad_y, weight, dyB, lora_A, None, scaling * keep_scale, dropout_p, seed) if needs_dx else None
    # dA [r, K] is computed as dAᵀ = (D⊙x)ᵀ·dyB [K, r]: K along the tile rows gives wgmma-sized
    # tiles, where r along them would give 16-row ones.
    dA = lora_A.new_empty(lora_A.shape)
    matmul(x.t(), dyB, alpha=scaling * keep_scale, dropout_p=dropout_p, seed=seed,
            dropout_on=DROPOUT_A_TRANSPOSED, out=dA.t())
    dB = matmul(grad_y.t(), xa, alpha=scaling)
    dW = matmul(grad_y.t(), x) if needs_dweight else None
    db = grad_y.sum(0) if needs_dbias else None
    return dx, dW, db, dA, dB

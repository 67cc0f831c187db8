"""Triton backend of lowrank.ops.adapter (see that module for the contract).

Each projection is one matmul kernel whose epilogue does the elementwise work, so every
[M, D] tensor is written exactly once and nothing is re-read for bias, activation or residual:

  _down_projection_kernel   z = h·W_dᵀ + b_d, written together with a_s = s·act(z)    [M, Bn]
  _residual_matmul_kernel   out = a_s·W_uᵀ + s·b_u [+ h]                              [M, D]
                            dh  = dz·W_d [+ g]                                        [M, D]
  _activation_grad_kernel   dz = (g·W_u)⊙s·act'(z), with a_s = s·act(z) for dW_u     [M, Bn]

The weight gradients dW_d = dzᵀ·h and dW_u = gᵀ·a_s are plain matmuls (the LoRA kernels'
matmul of lowrank.kernels.matmul), the bias gradients column sums. All kernels take explicit strides, so transposed
views and expanded (stride-0) gradients are read in place.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowrank.kernels.matmul import (
    autotuned,
    check_dtype,
    empty_batch_gradients,
    launch,
    matmul,
    matmul_tile,
    tile_offsets,
    to_acc,
)

_ACTIVATION_CODES = {"relu": 0, "gelu": 1, "silu": 2}


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    # Float literals enter Triton as fp32, so irrational constants go through tl.full to be
    # exact in fp64 kernels.
    if ACTIVATION == 0:
        return tl.maximum(z, 0.0)
    elif ACTIVATION == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * tl.full((), 0.7071067811865476, z.dtype)))
    else:
        return z / (1.0 + tl.exp(-z))


@triton.jit
def _activate_grad(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        return tl.where(z > 0.0, 1.0, 0.0).to(z.dtype)
    elif ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * tl.full((), 0.7071067811865476, z.dtype)))
        return cdf + z * tl.exp(-0.5 * z * z) * tl.full((), 0.3989422804014327, z.dtype)
    else:
        sigmoid = 1.0 / (1.0 + tl.exp(-z))
        return sigmoid * (1.0 + z * (1.0 - sigmoid))


@triton.jit
def _down_projection_kernel(
    h_ptr, w_ptr, bias_ptr, z_ptr, a_ptr,
    M, N, K,
    stride_hm, stride_hk, stride_wk, stride_wn, stride_bias,
    stride_zm, stride_zn, stride_am, stride_an,
    scaling: tl.float64,
    M_KEY, N_KEY, K_KEY,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """z[M, N] = h[M, K]·w[K, N] + bias[N] and a[M, N] = scaling·act(z)."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    n_in = offs_n < N
    z = matmul_tile(h_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_hm, stride_hk, stride_wk, stride_wn,
                     ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_n * stride_bias, mask=n_in, other=0.0).to(ACC_DTYPE)[None, :]
    # z is stored rounded to its dtype; act(z) is computed from that rounded value, as the
    # backward will recompute it, so forward and backward see the same activation.
    z = z.to(z_ptr.dtype.element_ty)
    a = to_acc(scaling, ACC_DTYPE) * _activate(z.to(ACC_DTYPE), ACTIVATION)
    in_tile = (offs_m < M)[:, None] & n_in[None, :]
    rows, cols = offs_m.to(tl.int64)[:, None], offs_n.to(tl.int64)[None, :]
    tl.store(z_ptr + rows * stride_zm + cols * stride_zn, z, mask=in_tile)
    tl.store(a_ptr + rows * stride_am + cols * stride_an, a.to(a_ptr.dtype.element_ty), mask=in_tile)


@triton.jit
def _residual_matmul_kernel(
    a_ptr, b_ptr, bias_ptr, residual_ptr, out_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_bias,
    stride_rm, stride_rn, stride_om, stride_on,
    bias_scale: tl.float64,
    M_KEY, N_KEY, K_KEY,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = a[M, K]·b[K, N] + bias_scale·bias[N] + residual[M, N]."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    n_in = offs_n < N
    in_tile = (offs_m < M)[:, None] & n_in[None, :]
    rows, cols = offs_m.to(tl.int64)[:, None], offs_n.to(tl.int64)[None, :]
    acc = matmul_tile(a_ptr, b_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                       ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=n_in, other=0.0).to(ACC_DTYPE)
        acc += to_acc(bias_scale, ACC_DTYPE) * bias[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + rows * stride_rm + cols * stride_rn, mask=in_tile, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + rows * stride_om + cols * stride_on, acc.to(out_ptr.dtype.element_ty), mask=in_tile)


@triton.jit
def _activation_grad_kernel(
    g_ptr, w_ptr, z_ptr, dz_ptr, a_ptr,
    M, N, K,
    stride_gm, stride_gk, stride_wk, stride_wn,
    stride_zm, stride_zn, stride_dm, stride_dn, stride_am, stride_an,
    scaling: tl.float64,
    M_KEY, N_KEY, K_KEY,
    WRITE_ACTIVATION: tl.constexpr, ACTIVATION: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dz[M, N] = (g[M, K]·w[K, N])⊙scaling·act'(z) and, if asked, a[M, N] = scaling·act(z)."""
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    in_tile = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    rows, cols = offs_m.to(tl.int64)[:, None], offs_n.to(tl.int64)[None, :]
    g_w = matmul_tile(g_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_gm, stride_gk, stride_wk, stride_wn,
                       ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    z = tl.load(z_ptr + rows * stride_zm + cols * stride_zn, mask=in_tile, other=0.0).to(ACC_DTYPE)
    scaling = to_acc(scaling, ACC_DTYPE)
    dz = g_w * (scaling * _activate_grad(z, ACTIVATION))
    tl.store(dz_ptr + rows * stride_dm + cols * stride_dn, dz.to(dz_ptr.dtype.element_ty), mask=in_tile)
    if WRITE_ACTIVATION:
        a = scaling * _activate(z, ACTIVATION)
        tl.store(a_ptr + rows * stride_am + cols * stride_an, a.to(a_ptr.dtype.element_ty), mask=in_tile)


# ---------------------------------------------------------------- host side

# Register budgets (accumulator values per thread), from sm_90 compiles: the residual tile
# loaded in the epilogue, and the activation's derivative beside z, spill at 128 and 64.
_down_projection_tuned = autotuned(_down_projection_kernel)
_residual_matmul_tuned = autotuned(
    _residual_matmul_kernel, accumulator_budget=lambda options: 64 if options["HAS_RESIDUAL"] else 128
)
_activation_grad_tuned = autotuned(_activation_grad_kernel, accumulator_budget=lambda options: 32)


def _down_projection(h, w_down, b_down, activation, scaling):
    """(z, a_s) = (h·W_dᵀ + b_d, s·act(z))."""
    (M, D), Bn = h.shape, w_down.shape[0]
    z = h.new_empty((M, Bn))
    a_s = h.new_empty((M, Bn))
    w = w_down.t()
    launch(
        _down_projection_kernel, _down_projection_tuned, h.dtype, M, Bn, D,
        h, w, b_down, z, a_s,
        M, Bn, D,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), 0 if b_down is None else b_down.stride(0),
        z.stride(0), z.stride(1), a_s.stride(0), a_s.stride(1),
        scaling,
        HAS_BIAS=b_down is not None, ACTIVATION=_ACTIVATION_CODES[activation],
    )
    return z, a_s


def _residual_matmul(a, b, bias, bias_scale, residual):
    """a·b + bias_scale·bias + residual for strided a [M, K], b [K, N]; bias, residual optional."""
    (M, K), N = a.shape, b.shape[1]
    out = a.new_empty((M, N))
    launch(
        _residual_matmul_kernel, _residual_matmul_tuned, a.dtype, M, N, K,
        a, b, bias, residual, out,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), 0 if bias is None else bias.stride(0),
        0 if residual is None else residual.stride(0), 0 if residual is None else residual.stride(1),
        out.stride(0), out.stride(1),
        bias_scale,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
    )
    return out


def _activation_grad(grad_out, w_up, z, activation, scaling, write_activation):
    """(dz, a_s or None) = ((g·W_u)⊙s·act'(z), s·act(z))."""
    (M, D), Bn = grad_out.shape, w_up.shape[1]
    dz = grad_out.new_empty((M, Bn))
    a_s = grad_out.new_empty((M, Bn)) if write_activation else None
    launch(
        _activation_grad_kernel, _activation_grad_tuned, grad_out.dtype, M, Bn, D,
        grad_out, w_up, z, dz, a_s,
        M, Bn, D,
        grad_out.stride(0), grad_out.stride(1), w_up.stride(0), w_up.stride(1),
        z.stride(0), z.stride(1), dz.stride(0), dz.stride(1),
        0 if a_s is None else a_s.stride(0), 0 if a_s is None else a_s.stride(1),
        scaling,
        WRITE_ACTIVATION=write_activation, ACTIVATION=_ACTIVATION_CODES[activation],
    )
    return dz, a_s


def forward(h, w_down, b_down, w_up, b_up, activation, scaling, residual):
    """(out, z): two kernels, z/a_s then out written once."""
    check_dtype("adapter", h)
    if h.shape[0] == 0:
        return h.new_empty((0, w_up.shape[0])), h.new_empty((0, w_down.shape[0]))
    z, a_s = _down_projection(h, w_down, b_down, activation, scaling)
    out = _residual_matmul(a_s, w_up.t(), b_up, scaling, h if residual else None)
    return out, z


def backward(grad_out, h, z, w_down, w_up, activation, scaling, residual,
             needs_dh, needs_dw_down, needs_db_down, needs_dw_up, needs_db_up):
    """(dh, dw_down, db_down, dw_up, db_up); those not needed are None."""
    check_dtype("adapter", h)
    (M, D), Bn = h.shape, w_down.shape[0]
    if M == 0:
        needed = (needs_dh, needs_dw_down, needs_db_down, needs_dw_up, needs_db_up)
        return empty_batch_gradients(h, ((0, D), (Bn, D), (Bn,), (D, Bn), (D,)), needed)
    dz, a_s = _activation_grad(grad_out, w_up, z, activation, scaling, needs_dw_up)
    dh = _residual_matmul(dz, w_down, None, 0.0, grad_out if residual else None) if needs_dh else None
    dw_down = None
    if needs_dw_down:  # as dW_dᵀ = hᵀ·dz [D, Bn], D along the tile rows (wgmma-sized tiles)
        dw_down = w_down.new_empty(w_down.shape)
        matmul(h.t(), dz, out=dw_down.t())
    db_down = dz.sum(0) if needs_db_down else None
    dw_up = matmul(grad_out.t(), a_s) if needs_dw_up else None
    db_up = grad_out.sum(0).mul_(scaling) if needs_db_up else None
    return dh, dw_down, db_down, dw_up, db_up

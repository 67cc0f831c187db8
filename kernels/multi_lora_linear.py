"""Triton backend of lowrank.ops.multi_lora_linear (see that module for the contract).

The rows are sorted by adapter once per forward and once per backward (torch.sort and
searchsorted on the device: no host sync), and every kernel walks the sorted order, reading and
writing rows in place through the permutation. No padding: a tile of sorted rows holds one
adapter, or a few where segments meet, and its adapter loop runs over just those.

  _rows_times_adapter_kernel  out[i] = D_i⊙l[i]·R[a_i] for the rank-r products
                                xa = D⊙x·A[a]ᵀ,  dyB = dy·B[a]
  _adapter_matmul_kernel      out[i] = a[i]·b + scale[a_i]·D_i⊙(l[i]·R[a_i]) + bias: the base
                              GEMM (matmul.accumulate_tile, lora_linear's main loop) with the
                              low-rank term seeding its accumulator, so y and dx are each
                              written once
                                y  = x·Wᵀ + s·(xa·B[a]ᵀ) + b
                                dx = dy·W + s·D⊙(dyB·A[a])
  _segment_reduce_kernel      out[a] = alpha[a]·Σ_{i of a} (D_i⊙l[i])ᵀ·r[i], one adapter's
                              segment per program row, split into slices to fill the GPU
                                dAᵀ[a] = s·(D⊙x)ᵀ·dyB,  dB[a] = s·dyᵀ·xa

A tile's rows of other adapters read as 0 in an adapter's product, and 0·NaN would carry a NaN
of that adapter's factor into them: a factor's non-finite entries enter the dots as 0 and make
the adapter's own rows NaN in their columns (_add_adapter_product), so a NaN reaches exactly
the rows the contract says, at scaling 0 too; an inf there comes out as NaN rather than ±inf.

Per-adapter constants (scaling, dropout threshold and keep scale) live in small device tables,
cached per value, so steady-state calls copy nothing to the device. The dropout mask is the hash
of hash_dropout at each row's index in the batch, recomputed in every kernel that needs it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lowrank import _backends
from lowrank.kernels import matmul
from lowrank.kernels.matmul import accumulate_tile, keep_mask, tile_offsets
from lowrank.ops import hash_dropout
from lowrank.ops.multi_lora_linear import group_rows

OP = "multi_lora_linear"


@triton.jit
def _sorted_rows(order_ptr, sorted_adapter_ptr, positions, M):
    """(rows, their adapters) at `positions` of the sorted order (row M and adapter -1 past the
    batch), and the adapter range present, [first, last] (empty when no row has an adapter)."""
    in_batch = positions < M
    rows = tl.load(order_ptr + positions, mask=in_batch, other=M)
    adapters = tl.load(sorted_adapter_ptr + positions, mask=in_batch, other=-1)
    first = tl.min(tl.where(adapters >= 0, adapters, 2**30))
    last = tl.max(adapters)
    return rows, adapters, first, last


@triton.jit
def _add_adapter_product(
    acc, l_ptr, r_ptr, rows, mine, offs_n, N, K,
    stride_lm, stride_lk, stride_rk, stride_rn,
    seed_ptr, threshold,
    DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc + (D⊙l)[rows]·r on the rows where `mine`: one adapter's product, r [K, N] its factor,
    the tile's other rows read as 0 (D: the hash mask at `threshold`, with DROPOUT). Their 0·NaN
    would carry a NaN of r into them, so r's non-finite entries enter the dot as 0 and make the
    adapter's own rows NaN in their columns (an inf too: NaN, never ±inf)."""
    rk = tl.arange(0, BLOCK_K)
    n_in = offs_n < N
    non_finite = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + rk
        k_in = offs_k < K
        l_tile = tl.load(l_ptr + rows.to(tl.int64)[:, None] * stride_lm + offs_k[None, :].to(tl.int64) * stride_lk,
                         mask=mine[:, None] & k_in[None, :], other=0.0)
        if DROPOUT:
            l_tile = tl.where(keep_mask(seed_ptr, rows, offs_k, threshold, False), l_tile, tl.zeros_like(l_tile))
        r_tile = tl.load(r_ptr + offs_k[:, None].to(tl.int64) * stride_rk + offs_n.to(tl.int64)[None, :] * stride_rn,
                         mask=k_in[:, None] & n_in[None, :], other=0.0)
        finite = tl.abs(r_tile) < float("inf")
        non_finite = tl.maximum(non_finite, tl.max(tl.where(finite, 0, 1), axis=0))
        r_tile = tl.where(finite, r_tile, tl.zeros_like(r_tile))
        acc = tl.dot(l_tile, r_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return tl.where(mine[:, None] & (non_finite > 0)[None, :], float("nan"), acc)


@triton.jit
def _rows_times_adapter_kernel(
    l_ptr, r_ptr, order_ptr, sorted_adapter_ptr, threshold_ptr, keep_scale_ptr, seed_ptr, out_ptr,
    M, N, K,
    stride_lm, stride_lk, stride_ra, stride_rk, stride_rn, stride_om, stride_on,
    M_KEY, N_KEY, K_KEY,
    DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[i, :] = D_i⊙l[i, :]·r[a_i] for the rows i of one tile of sorted rows, l [M, K],
    r [n, K, N] (N = the rank); rows without an adapter get 0."""
    positions, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows, adapters, first, last = _sorted_rows(order_ptr, sorted_adapter_ptr, positions, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    # One pass over K per adapter present (one, or two where segments meet), each reading only
    # that adapter's rows: its threshold and keep scale are scalars.
    for adapter in range(first, last + 1):
        acc = _add_adapter_product(
            acc, l_ptr, r_ptr + adapter * stride_ra, rows, adapters == adapter, offs_n, N, K,
            stride_lm, stride_lk, stride_rk, stride_rn, seed_ptr, tl.load(threshold_ptr + adapter).to(tl.uint32),
            DROPOUT, ACC_DTYPE, DOT_PRECISION, BLOCK_N, BLOCK_K,
        )
    if DROPOUT:
        acc *= tl.load(keep_scale_ptr + adapters, mask=adapters >= 0, other=1.0).to(ACC_DTYPE)[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _adapter_matmul_kernel(
    a_ptr, b_ptr, l_ptr, r_ptr, bias_ptr, order_ptr, sorted_adapter_ptr, scale_ptr, threshold_ptr, seed_ptr,
    out_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_ra, stride_rr, stride_rn,
    stride_om, stride_on, stride_bias,
    M_KEY, N_KEY, K_KEY,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[i] = a[i]·b + scale[a_i]·D_i⊙(l[i]·r[a_i]) + bias for the rows i of one tile of sorted
    rows: a [M, K], b [K, N], l [M, R], r [n, R, N]."""
    positions, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows, adapters, first, last = _sorted_rows(order_ptr, sorted_adapter_ptr, positions, M)
    n_in = offs_n < N
    has_adapter = adapters >= 0

    # The accumulator is seeded with the low-rank term of each adapter present in the tile (as
    # lora_linear's: no second [BLOCK_M, BLOCK_N] tile held through the main loop).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for adapter in range(first, last + 1):
        acc = _add_adapter_product(
            acc, l_ptr, r_ptr + adapter * stride_ra, rows, adapters == adapter, offs_n, N, R,
            stride_lm, stride_lr, stride_rr, stride_rn, seed_ptr, 0, False, ACC_DTYPE, DOT_PRECISION, BLOCK_N, BLOCK_R,
        )
    acc *= tl.load(scale_ptr + adapters, mask=has_adapter, other=0.0).to(ACC_DTYPE)[:, None]
    if DROPOUT:  # D acts on the low-rank term only, which is all the accumulator holds yet
        thresholds = tl.load(threshold_ptr + adapters, mask=has_adapter, other=0).to(tl.uint32)
        acc = tl.where(keep_mask(seed_ptr, rows, offs_n, thresholds[:, None], False), acc, 0.0)

    acc = accumulate_tile(acc, a_ptr, b_ptr, rows, offs_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                          ACC_DTYPE, DOT_PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_in, other=0.0).to(ACC_DTYPE)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & n_in[None, :])


@triton.jit
def _segment_reduce_kernel(
    l_ptr, r_ptr, order_ptr, offsets_ptr, alpha_ptr, threshold_ptr, seed_ptr, out_ptr,
    M, N, K,
    stride_lk, stride_lm, stride_rk, stride_rn, stride_os, stride_oa, stride_om, stride_on,
    M_KEY, N_KEY, K_KEY,
    DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[s, a] = alpha[a]·Σ_i (D_i⊙l[i])ᵀ·r[i] [M, N] over slice s = program_id(1) of adapter
    a's rows i (sorted positions offsets[a] .. offsets[a + 1]); l [rows, M], r [rows, N]. K, the
    average segment length, sizes the tiles only."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    adapter = tl.program_id(0) // tiles
    pid_m = tl.program_id(0) % tiles // tiles_n
    pid_n = tl.program_id(0) % tiles_n
    split = tl.program_id(1)
    segment_begin = tl.load(offsets_ptr + adapter)
    segment_end = tl.load(offsets_ptr + adapter + 1)
    slice_length = tl.cdiv(segment_end - segment_begin, tl.num_programs(1))
    begin = segment_begin + split * slice_length
    end = tl.minimum(segment_end, begin + slice_length)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N
    if DROPOUT:
        threshold = tl.load(threshold_ptr + adapter).to(tl.uint32)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(begin, end, BLOCK_K):
        k_in = k0 + rk < end
        rows = tl.load(order_ptr + k0 + rk, mask=k_in, other=0)
        l_tile = tl.load(l_ptr + rows.to(tl.int64)[None, :] * stride_lk + offs_m.to(tl.int64)[:, None] * stride_lm,
                         mask=m_in[:, None] & k_in[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]: lᵀ
        if DROPOUT:
            l_tile = tl.where(keep_mask(seed_ptr, rows, offs_m, threshold, True), l_tile, tl.zeros_like(l_tile))
        r_tile = tl.load(r_ptr + rows.to(tl.int64)[:, None] * stride_rk + offs_n.to(tl.int64)[None, :] * stride_rn,
                         mask=k_in[:, None] & n_in[None, :], other=0.0)
        acc = tl.dot(l_tile, r_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    acc *= tl.load(alpha_ptr + adapter).to(ACC_DTYPE)
    out_ptrs = (out_ptr + split.to(tl.int64) * stride_os + adapter.to(tl.int64) * stride_oa
                + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


# ---------------------------------------------------------------- host side


_BLOCK_R = 64  # rank chunk of the low-rank seed (32 in the interpreter)
# The FMA tiles (IEEE fp32, fp64) of the two kernels that gather rows hold each row's pointer
# beside the operand slices: they do not pipeline (with stages they spill under triton 3.8).
_rows_times_adapter_tuned = matmul.autotuned(_rows_times_adapter_kernel, fma_max_stages=1)
# With dropout, the keep mask of the whole tile is live beside the accumulator (as in lora_linear);
# on FMA units the 64×64 tile spills beside the gathered rows' pointers.
_adapter_matmul_tuned = matmul.autotuned(
    _adapter_matmul_kernel, accumulator_budget=lambda options: 64 if options["DROPOUT"] else 128,
    fma_accumulator_budget=lambda options: 16, fma_max_stages=1,
)
_segment_reduce_tuned = matmul.autotuned(_segment_reduce_kernel)


class Groups(NamedTuple):
    """The batch's rows sorted by adapter: order [M] (int32 row indices), sorted_adapter [M] (int32,
    -1 for rows without an adapter), offsets [n + 1] (adapter a at offsets[a] .. offsets[a + 1])."""

    order: torch.Tensor
    sorted_adapter: torch.Tensor
    offsets: torch.Tensor


def _groups(adapter_index: torch.Tensor, count: int) -> Groups:
    order, offsets = group_rows(adapter_index, count)
    in_range = (adapter_index >= 0) & (adapter_index < count)  # out-of-range rows count as -1 (see group_rows)
    sorted_adapter = torch.where(in_range, adapter_index, -1)[order].to(torch.int32)
    # int32 row indices: half the registers of int64 in the kernels, which widen them for addressing.
    return Groups(order.to(torch.int32), sorted_adapter, offsets)


class AdapterTables(NamedTuple):
    """Per-adapter constants on the device: scaling, scaling·keep_scale, hash threshold, keep_scale."""

    scaling: torch.Tensor
    dropped_scaling: torch.Tensor
    threshold: torch.Tensor
    keep_scale: torch.Tensor


@functools.lru_cache(maxsize=256)
def _adapter_tables(device: torch.device, scaling: tuple, dropout_p: tuple) -> AdapterTables:
    keep_scale = [1.0 / (1.0 - p) for p in dropout_p]
    return AdapterTables(
        torch.tensor(scaling, dtype=torch.float64, device=device),
        torch.tensor([s * k for s, k in zip(scaling, keep_scale)], dtype=torch.float64, device=device),
        torch.tensor([hash_dropout.threshold(p) for p in dropout_p], dtype=torch.int64, device=device),
        torch.tensor(keep_scale, dtype=torch.float64, device=device),
    )


def _rows_times_adapter(left, right, groups, tables, seed, dropout):
    """out[i] = D_i⊙left[i]·right[a_i] for left [M, K] and right [n, K, N] (strided views)."""
    (M, K), N = left.shape, right.shape[2]
    out = torch.empty((M, N), dtype=left.dtype, device=left.device)
    if out.numel() == 0:
        return out
    matmul.launch(
        _rows_times_adapter_kernel, _rows_times_adapter_tuned, left.dtype, M, N, K,
        left, right, groups.order, groups.sorted_adapter, tables.threshold, tables.keep_scale, seed, out,
        M, N, K,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), right.stride(2), out.stride(0),
        out.stride(1),
        DROPOUT=dropout,
    )
    return out


def _adapter_matmul(a, b, left, right, bias, groups, scale, tables, seed, dropout):
    """a·b + scale[a_i]·D_i⊙(left[i]·right[a_i]) + bias for a [M, K], b [K, N], left [M, R], right [n, R, N]."""
    (M, K), N, R = a.shape, b.shape[1], left.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    block_r = matmul.fit(32 if _backends.triton_interpret() else _BLOCK_R, R)
    matmul.launch(
        _adapter_matmul_kernel, _adapter_matmul_tuned, a.dtype, M, N, K,
        a, b, left, right, bias, groups.order, groups.sorted_adapter, scale, tables.threshold, seed, out,
        M, N, K, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), left.stride(0), left.stride(1),
        right.stride(0), right.stride(1), right.stride(2), out.stride(0), out.stride(1),
        0 if bias is None else bias.stride(0),
        HAS_BIAS=bias is not None, DROPOUT=dropout, BLOCK_R=block_r,
    )
    return out


def _segment_reduce(left, right, groups, alpha, tables, seed, dropout, out):
    """out[a] = alpha[a]·Σ_{i of a} (D_i⊙left[i])ᵀ·right[i] for left [rows, M], right [rows, N],
    out [n, M, N] (any strides; adapters without rows get 0)."""
    count, M, N = out.shape
    rows = left.shape[0]
    average = max(triton.cdiv(rows, count), 1)
    splits = triton.cdiv(average, matmul.split_length(left.device, M, N, average, batches=count))
    if splits == 1:
        target, stride_split = out, 0
    else:  # [splits, n, M, N] partial sums, added in a fixed order: deterministic
        accumulate = torch.float64 if left.dtype == torch.float64 else torch.float32
        target = torch.empty((splits, count, M, N), dtype=accumulate, device=left.device)
        stride_split = target.stride(0)
    matmul.launch(
        _segment_reduce_kernel, _segment_reduce_tuned, left.dtype, M, N, average,
        left, right, groups.order, groups.offsets, alpha, tables.threshold, seed, target,
        M, N, average,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), stride_split, target.stride(-3),
        target.stride(-2), target.stride(-1),
        DROPOUT=dropout, splits=splits, batches=count,
    )
    if splits > 1:
        out.copy_(target.sum(0))
    return out


def forward(x, weight, bias, adapter_index, lora_A, lora_B, scaling, dropout_p, seed):
    """(y, xa): xa = D⊙x·A[a]ᵀ [M, r], then y = x·Wᵀ + s·xa·B[a]ᵀ + b written by one kernel."""
    matmul.check_dtype(OP, x)
    groups = _groups(adapter_index, lora_A.shape[0])
    tables = _adapter_tables(x.device, tuple(scaling), tuple(dropout_p))
    dropout = any(p > 0.0 for p in dropout_p)
    xa = _rows_times_adapter(x, lora_A.transpose(1, 2), groups, tables, seed, dropout)
    y = _adapter_matmul(x, weight.t(), xa, lora_B.transpose(1, 2), bias, groups, tables.scaling, tables, seed, False)
    return y, xa


def backward(grad_y, x, xa, weight, adapter_index, lora_A, lora_B, scaling, dropout_p, seed, needs_dx, needs_dweight,
             needs_dbias):
    """(dx, dW, db, dA, dB); dx, dW, db are None when not needed."""
    matmul.check_dtype(OP, x)
    (M, K), N = x.shape, weight.shape[0]
    if M == 0:
        shapes = ((0, K), (N, K), (N,), lora_A.shape, lora_B.shape)
        return matmul.empty_batch_gradients(x, shapes, (needs_dx, needs_dweight, needs_dbias, True, True))
    groups = _groups(adapter_index, lora_A.shape[0])
    tables = _adapter_tables(x.device, tuple(scaling), tuple(dropout_p))
    dropout = any(p > 0.0 for p in dropout_p)
    dyB = _rows_times_adapter(grad_y, lora_B, groups, tables, seed, False)
    dx = None
    if needs_dx:
        dx = _adapter_matmul(grad_y, weight, dyB, lora_A, None, groups, tables.dropped_scaling, tables, seed, dropout)
    # Every element of dA and dB is written, adapters without rows included (with 0).
    dA, dB = torch.empty_like(lora_A), torch.empty_like(lora_B)
    # dA [n, r, K] as dAᵀ [n, K, r]: K along the tile rows gives wgmma-sized tiles (as lora_linear).
    _segment_reduce(x, dyB, groups, tables.dropped_scaling, tables, seed, dropout, dA.transpose(1, 2))
    _segment_reduce(grad_y, xa, groups, tables.scaling, tables, seed, False, dB)
    dW = matmul.matmul(grad_y.t(), x) if needs_dweight else None
    db = grad_y.sum(0) if needs_dbias else None
    return dx, dW, db, dA, dB

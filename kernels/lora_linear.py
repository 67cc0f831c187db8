"""Triton backend of lowrank.ops.lora_linear (see that module for the contract).

Two kernels serve training, a third serves inference:

  _lora_matmul_kernel  out = a·b + lora_scale·D⊙(l·r) + bias: the two big matmuls with the
                       low-rank term folded in, so y and dx are each written once.
                         y  = x·Wᵀ  + s·(xa·Bᵀ)      + bias
                         dx = dy·W  + s·D⊙(dyB·A)
  _matmul_kernel       c = alpha·a·b, optionally dropping elements of a or b with the hash
                       mask: xa = D⊙x·Aᵀ, dyB = dy·B, dA = s·dyBᵀ·(D⊙x), dB = s·dyᵀ·xa, dW = dyᵀ·x
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
from lowrank.ops import hash_dropout

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _mix32(h):
    # lowbias32 on uint32: multiplications wrap mod 2**32 exactly like hash_dropout.mix32.
    h ^= h >> 16
    h *= 0x21F0AAAD
    h ^= h >> 15
    h *= 0x735A2D97
    h ^= h >> 15
    return h


@triton.jit
def _keep_mask(seed_ptr, rows, cols, threshold):
    """Keep bits of hash_dropout.keep_mask for the tile rows × cols."""
    seed_key = _mix32(tl.load(seed_ptr).to(tl.uint32))
    row_key = _mix32(rows.to(tl.uint32) ^ seed_key)
    bits = _mix32(cols.to(tl.uint32)[None, :] ^ row_key[:, None])
    return bits >= threshold


@triton.jit
def _to_acc(scale, ACC_DTYPE: tl.constexpr):
    # Float arguments are declared fp64 (a plain Python float arrives as fp32, which would
    # round scaling and 1/(1-p) in fp64 kernels); cast once to the accumulator type.
    return tl.full((), scale, ACC_DTYPE)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row blocks share the same column blocks while they are in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _low_rank_tile(
    l_ptr, r_ptr, offs_m, offs_n, M, N, R,
    stride_lm, stride_lr, stride_rr, stride_rn,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """l[offs_m, :]·r[:, offs_n]; a single tl.dot unless r exceeds BLOCK_R."""
    rr = tl.arange(0, BLOCK_R)
    l_ptrs = l_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + rr[None, :] * stride_lr
    r_ptrs = r_ptr + rr[:, None] * stride_rr + offs_n.to(tl.int64)[None, :] * stride_rn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        r_in = r0 + rr < R
        l_tile = tl.load(l_ptrs, mask=(offs_m < M)[:, None] & r_in[None, :], other=0.0)
        r_tile = tl.load(r_ptrs, mask=r_in[:, None] & (offs_n < N)[None, :], other=0.0)
        acc = tl.dot(l_tile, r_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        l_ptrs += BLOCK_R * stride_lr
        r_ptrs += BLOCK_R * stride_rr
    return acc


@triton.jit
def _lora_matmul_kernel(
    a_ptr, b_ptr, l_ptr, r_ptr, bias_ptr, seed_ptr, out_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_lm, stride_lr, stride_rr, stride_rn,
    stride_om, stride_on, stride_bias,
    lora_scale: tl.float64, threshold,
    M_KEY, N_KEY, K_KEY,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, N] = a[M, K]·b[K, N] + lora_scale·D⊙(l[M, R]·r[R, N]) + bias[N]."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N
    lora_scale = _to_acc(lora_scale, ACC_DTYPE)

    if DROPOUT:
        # D acts on the low-rank term only, so it is added after the main loop.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    else:
        # Seeding the accumulator costs one small dot and no extra registers.
        acc = lora_scale * _low_rank_tile(
            l_ptr, r_ptr, offs_m, offs_n, M, N, R, stride_lm, stride_lr, stride_rr, stride_rn,
            ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R,
        )

    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        k_in = k0 + rk < K
        a = tl.load(a_ptrs, mask=m_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None] & n_in[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if DROPOUT:
        low_rank = _low_rank_tile(
            l_ptr, r_ptr, offs_m, offs_n, M, N, R, stride_lm, stride_lr, stride_rr, stride_rn,
            ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R,
        )
        keep = _keep_mask(seed_ptr, offs_m, offs_n, threshold)
        acc += tl.where(keep, lora_scale * low_rank, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_in, other=0.0).to(ACC_DTYPE)[None, :]

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, seed_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    alpha: tl.float64, threshold,
    M_KEY, N_KEY, K_KEY,
    DROPOUT_A: tl.constexpr, DROPOUT_B: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[M, N] = alpha·a[M, K]·b[K, N]; DROPOUT_A/B zero the dropped elements of that operand
    (the mask is indexed by the operand's own (row, col)); alpha carries the 1/(1-p)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N

    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + rk
        k_in = offs_k < K
        a = tl.load(a_ptrs, mask=m_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None] & n_in[None, :], other=0.0)
        if DROPOUT_A:
            a = tl.where(_keep_mask(seed_ptr, offs_m, offs_k, threshold), a, tl.zeros_like(a))
        if DROPOUT_B:
            b = tl.where(_keep_mask(seed_ptr, offs_k, offs_n, threshold), b, tl.zeros_like(b))
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, (_to_acc(alpha, ACC_DTYPE) * acc).to(c_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


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
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
    acc += _to_acc(lora_scale, ACC_DTYPE) * low_rank
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_in, other=0.0).to(ACC_DTYPE)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


# ---------------------------------------------------------------- host side


def _tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


# Interpreter tiles: one numpy program at a time, and small enough that test shapes cross edges.
_INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
_BLOCK_R = 64  # rank chunk of the low-rank tile (32 in the interpreter)
# Up to this many rows, inference takes the single-launch kernel (a first guess for Hopper,
# where 256 rows of x·Wᵀ at K=N=4096 are still bound by reading W).
INFERENCE_FUSED_MAX_ROWS = 256

# Hopper-oriented search space (tile M, N, K, warps, stages). Half precision and TF32 run on
# tensor cores (wgmma wants 64-row multiples per warpgroup); IEEE fp32 and fp64 run tl.dot on
# FMA units, which keep whole operand slices in registers, so only the small tiles stay.
_GPU_TILES = [
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4), (64, 64, 64, 4, 3),
    (64, 64, 32, 4, 3), (64, 64, 16, 4, 3), (32, 64, 32, 4, 2),
]
_FMA_MAX_TILE = 64 * 64


def _fit(block: int, dim: int) -> int:
    # No wider than the (power-of-two padded) dimension, and at least 16, tl.dot's minimum.
    return min(block, max(16, triton.next_power_of_2(dim)))


def _prune_tiles(configs, named_args, **kwargs):
    """Drop tiles that suit neither the dtype nor the problem: shrink each to the padded
    problem size (the skinny rank-r matmuls would otherwise waste most of a tile)."""
    M, N, K = named_args["M"], named_args["N"], named_args["K"]
    dtype = next(arg.dtype for arg in named_args.values() if isinstance(arg, torch.Tensor))  # the first operand's
    on_fma = kwargs["DOT_PRECISION"] == "ieee" and dtype not in (torch.float16, torch.bfloat16)
    kept = {}
    for config in configs:
        block_m, block_n, block_k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        if on_fma and (block_m * block_n > _FMA_MAX_TILE or block_k > 32):
            continue
        fitted = (_fit(block_m, M), _fit(block_n, N), _fit(block_k, K), config.num_warps, config.num_stages)
        kept.setdefault(fitted, config)
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in kept
    ]


def _autotuned(kernel):
    """The kernel with Hopper autotuning, keyed by power-of-two size buckets (M_KEY, N_KEY, K_KEY)
    so that varying sequence lengths reuse one measurement; dtypes are part of Triton's key."""
    configs = [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in _GPU_TILES
    ]
    return triton.autotune(
        configs, key=["M_KEY", "N_KEY", "K_KEY", "DOT_PRECISION"], prune_configs_by={"early_config_prune": _prune_tiles}
    )(kernel)


_lora_matmul_tuned = _autotuned(_lora_matmul_kernel)
_matmul_tuned = _autotuned(_matmul_kernel)
_inference_tuned = _autotuned(_inference_kernel)


def _dot_options(dtype: torch.dtype) -> dict:
    return dict(
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION="tf32" if _tf32(dtype) else "ieee",
    )


def _launch(kernel, tuned_kernel, dtype: torch.dtype, M: int, N: int, K: int, *args, **options) -> None:
    """Launch for an [M, N] output reduced over K: autotuned on the GPU, fixed tiles in the interpreter."""
    options.update(_dot_options(dtype), M_KEY=triton.next_power_of_2(M), N_KEY=triton.next_power_of_2(N),
                   K_KEY=triton.next_power_of_2(K))
    if _backends.triton_interpret():
        config = dict(_INTERPRETER_CONFIG, BLOCK_M=_fit(32, M), BLOCK_N=_fit(32, N), BLOCK_K=_fit(32, K))
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        kernel[grid](*args, **options, **config)
        return
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    tuned_kernel[grid](*args, **options)


def _matmul(a, b, alpha=1.0, dropout_p=0.0, seed=None, dropout_on="none"):
    """alpha·a·b for strided 2-D a [M, K], b [K, N]; dropout_on is "a", "b" or "none"."""
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if c.numel() == 0:
        return c
    _launch(
        _matmul_kernel, _matmul_tuned, a.dtype, M, N, K,
        a, b, seed, c,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        alpha, hash_dropout.threshold(dropout_p),
        DROPOUT_A=dropout_p > 0.0 and dropout_on == "a",
        DROPOUT_B=dropout_p > 0.0 and dropout_on == "b",
    )
    return c


def _lora_matmul(a, b, l, r, bias, lora_scale, dropout_p=0.0, seed=None):
    """a·b + lora_scale·D⊙(l·r) + bias for strided a [M, K], b [K, N], l [M, R], r [R, N]."""
    (M, K), N, R = a.shape, b.shape[1], l.shape[1]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    block_r = _fit(32 if _backends.triton_interpret() else _BLOCK_R, R)
    _launch(
        _lora_matmul_kernel, _lora_matmul_tuned, a.dtype, M, N, K,
        a, b, l, r, bias, seed, out,
        M, N, K, R,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        l.stride(0), l.stride(1), r.stride(0), r.stride(1),
        out.stride(0), out.stride(1), 0 if bias is None else bias.stride(0),
        lora_scale, hash_dropout.threshold(dropout_p),
        HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0, BLOCK_R=block_r,
    )
    return out


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"lora_linear (triton): dtype {x.dtype} is not supported; use float16, bfloat16, float32 or float64")
    if x.dtype == torch.bfloat16 and _backends.triton_interpret():
        # triton 3.6's interpreter runs tl.dot on the raw uint16 bits of bf16: wrong results, no error.
        raise TypeError("lora_linear (triton): bfloat16 is not supported under TRITON_INTERPRET=1; use float16, float32 or float64")


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """(y, xa): xa = D⊙x·Aᵀ [M, r], then y = x·Wᵀ + s·xa·Bᵀ + b written by one kernel."""
    _check_dtype(x)
    keep_scale = 1.0 / (1.0 - dropout_p)
    xa = _matmul(x, lora_A.t(), alpha=keep_scale, dropout_p=dropout_p, seed=seed, dropout_on="a")
    y = _lora_matmul(x, weight.t(), xa, lora_B.t(), bias, scaling)
    return y, xa


def inference(x, weight, bias, lora_A, lora_B, scaling):
    """y alone, without dropout. Few rows: one launch (_inference_kernel); many rows: the
    compute-bound training forward, whose separate xa pass costs less than the fused kernel's
    per-column-tile recomputation of x·Aᵀ."""
    _check_dtype(x)
    (M, K), N, R = x.shape, weight.shape[0], lora_A.shape[0]
    if M > INFERENCE_FUSED_MAX_ROWS or R > _BLOCK_R:
        return forward(x, weight, bias, lora_A, lora_B, scaling, 0.0, None)[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    w_t, a_t, b_t = weight.t(), lora_A.t(), lora_B.t()
    _launch(
        _inference_kernel, _inference_tuned, x.dtype, M, N, K,
        x, w_t, a_t, b_t, bias, out,
        M, N, K, R,
        x.stride(0), x.stride(1), w_t.stride(0), w_t.stride(1), a_t.stride(0), a_t.stride(1),
        b_t.stride(0), b_t.stride(1), out.stride(0), out.stride(1), 0 if bias is None else bias.stride(0),
        scaling,
        HAS_BIAS=bias is not None, BLOCK_R=_fit(_BLOCK_R, R),
    )
    return out


def backward(grad_y, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, needs_dx, needs_dweight, needs_dbias):
    """(dx, dW, db, dA, dB); dx, dW, db are None when not needed."""
    _check_dtype(x)
    (M, K), N = x.shape, weight.shape[0]
    if M == 0:
        return (
            x.new_empty((0, K)) if needs_dx else None,
            x.new_zeros((N, K)) if needs_dweight else None,
            grad_y.new_zeros(N) if needs_dbias else None,
            torch.zeros_like(lora_A),
            torch.zeros_like(lora_B),
        )
    keep_scale = 1.0 / (1.0 - dropout_p)
    dyB = _matmul(grad_y, lora_B)
    dx = _lora_matmul(grad_y, weight, dyB, lora_A, None, scaling * keep_scale, dropout_p, seed) if needs_dx else None
    dA = _matmul(dyB.t(), x, alpha=scaling * keep_scale, dropout_p=dropout_p, seed=seed, dropout_on="b")
    dB = _matmul(grad_y.t(), xa, alpha=scaling)
    dW = _matmul(grad_y.t(), x) if needs_dweight else None
    db = grad_y.sum(0) if needs_dbias else None
    return dx, dW, db, dA, dB

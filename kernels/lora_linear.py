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
def _keep_mask(seed_ptr, rows, cols, threshold, TRANSPOSED: tl.constexpr):
    """Keep bits of hash_dropout.keep_mask for the tile rows × cols, laid out [rows, cols], or
    [cols, rows] if TRANSPOSED (the mask of the tensor that an operand is the transpose of)."""
    seed_key = _mix32(tl.load(seed_ptr).to(tl.uint32))
    row_key = _mix32(rows.to(tl.uint32) ^ seed_key)
    if TRANSPOSED:
        bits = _mix32(cols.to(tl.uint32)[:, None] ^ row_key[None, :])
    else:
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

    # The accumulator is seeded with the low-rank term: one small dot, and no second
    # [BLOCK_M, BLOCK_N] tile held through the main loop (which made large tiles spill).
    acc = lora_scale * _low_rank_tile(
        l_ptr, r_ptr, offs_m, offs_n, M, N, R, stride_lm, stride_lr, stride_rr, stride_rn,
        ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R,
    )
    if DROPOUT:  # D acts on the low-rank term only, which is all the accumulator holds yet
        acc = tl.where(_keep_mask(seed_ptr, offs_m, offs_n, threshold, False), acc, 0.0)

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

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_in, other=0.0).to(ACC_DTYPE)[None, :]

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


# What _matmul_kernel's hash-dropout mask applies to: nothing, a, or the tensor a is the transpose of.
NO_DROPOUT, DROPOUT_A, DROPOUT_A_TRANSPOSED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, seed_ptr, c_ptr,
    M, N, K, K_PER_SPLIT,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    alpha: tl.float64, threshold,
    M_KEY, N_KEY, K_KEY,
    DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[s, M, N] = alpha·a[:, k_s]·b[k_s, :] over slice s = program_id(1) of the reduction,
    k_s = [s·K_PER_SPLIT, (s+1)·K_PER_SPLIT) ∩ [0, K) (one slice: the whole product).
    DROPOUT zeroes the dropped elements of a (DROPOUT_A: mask indexed by a's (row, col)) or
    of the tensor a is the transpose of (DROPOUT_A_TRANSPOSED: by (col, row)); alpha carries
    the 1/(1-p)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N
    k_begin = split * K_PER_SPLIT
    k_end = min(K, k_begin + K_PER_SPLIT)

    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + (k_begin + rk)[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + (k_begin + rk)[:, None].to(tl.int64) * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + rk
        k_in = offs_k < k_end
        a = tl.load(a_ptrs, mask=m_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None] & n_in[None, :], other=0.0)
        if DROPOUT == DROPOUT_A:
            a = tl.where(_keep_mask(seed_ptr, offs_m, offs_k, threshold, False), a, tl.zeros_like(a))
        elif DROPOUT == DROPOUT_A_TRANSPOSED:
            a = tl.where(_keep_mask(seed_ptr, offs_k, offs_m, threshold, True), a, tl.zeros_like(a))
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = (c_ptr + split.to(tl.int64) * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm
              + offs_n.to(tl.int64)[None, :] * stride_cn)
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
# FMA units, which keep whole operand slices in registers, so only the small tiles with
# BLOCK_K = 32 stay (at 16, triton 3.8 spills the 64×64 tile with a bias).
_GPU_TILES = [
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4), (64, 64, 64, 4, 3),
    (64, 64, 32, 4, 3), (64, 64, 16, 4, 3), (32, 64, 32, 4, 2),
]
_FMA_MAX_TILE = 64 * 64


def _fit(block: int, dim: int) -> int:
    # No wider than the (power-of-two padded) dimension, and at least 16, tl.dot's minimum.
    return min(block, max(16, triton.next_power_of_2(dim)))


def _tile_pruner(accumulator_budget):
    """The autotuner's early pruning for one kernel. accumulator_budget(launch constexprs) is
    the most accumulator values per thread (BLOCK_M·BLOCK_N / threads) the kernel may hold:
    128 fp32 values (a 128×256 tile over 8 warps) fit beside one accumulator's pointers and
    pipeline; kernels holding more live tiles, or heavy epilogues, get less.
    tests/compile_triton_sm90.py checks that no config left in a search space spills on sm_90."""

    def prune(configs, named_args, **kwargs):
        """Drop tiles that suit neither the dtype, the kernel's register budget nor the problem:
        shrink each to the padded problem size (the skinny rank-r matmuls would otherwise waste
        most of a tile)."""
        M, N, K = named_args["M"], named_args["N"], named_args["K"]
        dtype = next(arg.dtype for arg in named_args.values() if isinstance(arg, torch.Tensor))  # the first operand's
        on_fma = kwargs["DOT_PRECISION"] == "ieee" and dtype not in (torch.float16, torch.bfloat16)
        budget = accumulator_budget(kwargs)
        kept = {}
        for config in configs:
            block_m, block_n, block_k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            if on_fma and (block_m * block_n > _FMA_MAX_TILE or block_k != 32):
                continue
            block_m, block_n, block_k, warps = _fit(block_m, M), _fit(block_n, N), _fit(block_k, K), config.num_warps
            if on_fma:  # FMA layouts spread thinner than 16 accumulators per thread spill (fp64 on sm_90)
                warps = min(warps, max(1, block_m * block_n // (16 * 32)))
            if block_m * block_n > budget * 32 * warps:
                continue
            fitted = (block_m, block_n, block_k, warps, config.num_stages)
            kept.setdefault(fitted, config)
        return [
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in kept
        ]

    return prune


def _autotuned(kernel, tiles=_GPU_TILES, accumulator_budget=lambda options: 128):
    """The kernel with Hopper autotuning over `tiles`, keyed by power-of-two size buckets
    (M_KEY, N_KEY, K_KEY) so that varying sequence lengths reuse one measurement; dtypes are part
    of Triton's key. Timings persist in Triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache),
    so a new process reuses them instead of timing every config again."""
    configs = [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in tiles
    ]
    return triton.autotune(
        configs, key=["M_KEY", "N_KEY", "K_KEY", "DOT_PRECISION"],
        prune_configs_by={"early_config_prune": _tile_pruner(accumulator_budget)}, cache_results=True,
    )(kernel)


# Inference runs at few rows, where reading W bounds the kernel: no 256-wide tiles, narrow ones
# for more programs, and a smaller budget for x·Aᵀ, a second accumulator held through the K loop.
_INFERENCE_TILES = [tile for tile in _GPU_TILES if max(tile[:2]) <= 128] + [(64, 32, 128, 4, 3)]
# With dropout, the keep mask of the whole tile is live beside the accumulator.
_lora_matmul_tuned = _autotuned(_lora_matmul_kernel, accumulator_budget=lambda options: 64 if options["DROPOUT"] else 128)
_matmul_tuned = _autotuned(_matmul_kernel)
_inference_tuned = _autotuned(_inference_kernel, _INFERENCE_TILES, lambda options: 64)


def _dot_options(dtype: torch.dtype) -> dict:
    return dict(
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION="tf32" if _tf32(dtype) else "ieee",
    )


def _launch(kernel, tuned_kernel, dtype: torch.dtype, M: int, N: int, K: int, *args, splits: int = 1,
            **options) -> None:
    """Launch for an [M, N] output reduced over K (in `splits` slices along grid axis 1):
    autotuned on the GPU, fixed tiles in the interpreter."""
    options.update(_dot_options(dtype), M_KEY=triton.next_power_of_2(M), N_KEY=triton.next_power_of_2(N),
                   K_KEY=triton.next_power_of_2(K))
    if _backends.triton_interpret():
        config = dict(_INTERPRETER_CONFIG, BLOCK_M=_fit(32, M), BLOCK_N=_fit(32, N), BLOCK_K=_fit(32, K))
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]), splits)
        kernel[grid](*args, **options, **config)
        return
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    tuned_kernel[grid](*args, **options)


# Split reductions: the rank-r products (xa, dyB, dA, dB) have outputs of one or a few tile
# columns, so an unsplit grid leaves most SMs idle. Aim for _PROGRAMS_PER_SM programs per SM
# (estimated with 128×128 tiles), each slice a multiple of _SPLIT_QUANTUM long.
_PROGRAMS_PER_SM = 2
_SPLIT_QUANTUM = 512
# In the interpreter: 8 programs wanted, 32×32 tiles and 32-long slices, so test shapes split too.
_INTERPRETER_SPLIT = dict(programs=8, tile=32, quantum=32)


def _split_length(device: torch.device, M: int, N: int, K: int) -> int:
    """The length of each slice of the K reduction of an [M, N] output (K itself: no split)."""
    if _backends.triton_interpret():
        programs, tile, quantum = (_INTERPRETER_SPLIT[key] for key in ("programs", "tile", "quantum"))
    else:
        programs, tile, quantum = _PROGRAMS_PER_SM * _backends.multiprocessor_count(device), 128, _SPLIT_QUANTUM
    tiles = triton.cdiv(M, tile) * triton.cdiv(N, tile)
    splits = min(triton.cdiv(programs, tiles), triton.cdiv(K, quantum))
    if splits <= 1:
        return K
    return triton.cdiv(triton.cdiv(K, splits), quantum) * quantum


def _matmul(a, b, alpha=1.0, dropout_p=0.0, seed=None, dropout_on=NO_DROPOUT, out=None):
    """alpha·a·b for strided 2-D a [M, K], b [K, N], written into `out` (any strides; default a
    new [M, N] tensor). dropout_on: NO_DROPOUT, DROPOUT_A or DROPOUT_A_TRANSPOSED. A reduction
    too long for the output's tiles to fill the GPU is split: fp32 (fp64) partial products, one
    per slice, are summed in a fixed order, so results stay deterministic."""
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
    if c.numel() == 0:
        return c
    split_length = _split_length(a.device, M, N, K)
    splits = triton.cdiv(K, split_length) if K else 1
    if splits == 1:
        target, stride_split = c, 0
    else:  # [splits, M, N] partial products
        accumulate = torch.float64 if a.dtype == torch.float64 else torch.float32
        target = torch.empty((splits, M, N), dtype=accumulate, device=a.device)
        stride_split = target.stride(0)
    _launch(
        _matmul_kernel, _matmul_tuned, a.dtype, M, N, K,
        a, b, seed, target,
        M, N, K, split_length,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), stride_split, target.stride(-2), target.stride(-1),
        alpha, hash_dropout.threshold(dropout_p),
        DROPOUT=dropout_on if dropout_p > 0.0 else NO_DROPOUT, splits=splits,
    )
    if splits > 1:
        c.copy_(target.sum(0))
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
    xa = _matmul(x, lora_A.t(), alpha=keep_scale, dropout_p=dropout_p, seed=seed, dropout_on=DROPOUT_A)
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
    # dA [r, K] is computed as dAᵀ = (D⊙x)ᵀ·dyB [K, r]: K along the tile rows gives wgmma-sized
    # tiles, where r along them would give 16-row ones.
    dA = lora_A.new_empty(lora_A.shape)
    _matmul(x.t(), dyB, alpha=scaling * keep_scale, dropout_p=dropout_p, seed=seed,
            dropout_on=DROPOUT_A_TRANSPOSED, out=dA.t())
    dB = _matmul(grad_y.t(), xa, alpha=scaling)
    dW = _matmul(grad_y.t(), x) if needs_dweight else None
    db = grad_y.sum(0) if needs_dbias else None
    return dx, dW, db, dA, dB

"""Shared Triton mechanics of lowrank's matmul-based kernels (lowrank.kernels.lora_linear,
lowrank.kernels.multi_lora_linear and lowrank.kernels.adapter): the hash-dropout keep bits, tile
order, a tile's main loop (accumulate_tile, matmul_tile), the Hopper tile search space and its
pruning, the launcher, and the plain (optionally split-K, optionally dropped-out) matmul:

  matmul_kernel        c = alpha·a·b, optionally dropping elements of a (or of the tensor a is the
                       transpose of) with the hash mask, over one slice of the reduction per
                       program_id(1)

All kernels take explicit strides, so transposed views and expanded (stride-0) gradients are
read in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank import _backends
from lowrank.ops import hash_dropout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def mix32(h):
    # lowbias32 on uint32: multiplications wrap mod 2**32 exactly like hash_dropout.mix32.
    h ^= h >> 16
    h *= 0x21F0AAAD
    h ^= h >> 15
    h *= 0x735A2D97
    h ^= h >> 15
    return h


@triton.jit
def keep_mask(seed_ptr, rows, cols, threshold, TRANSPOSED: tl.constexpr):
    """Keep bits of hash_dropout.keep_mask for the tile rows × cols, laid out [rows, cols], or
    [cols, rows] if TRANSPOSED (the mask of the tensor that an operand is the transpose of)."""
    seed_key = mix32(tl.load(seed_ptr).to(tl.uint32))
    row_key = mix32(rows.to(tl.uint32) ^ seed_key)
    if TRANSPOSED:
        bits = mix32(cols.to(tl.uint32)[:, None] ^ row_key[None, :])
    else:
        bits = mix32(cols.to(tl.uint32)[None, :] ^ row_key[:, None])
    return bits >= threshold


@triton.jit
def to_acc(scale, ACC_DTYPE: tl.constexpr):
    # Float arguments are declared fp64 (a plain Python float arrives as fp32, which would
    # round scaling and 1/(1-p) in fp64 kernels); cast once to the accumulator type.
    return tl.full((), scale, ACC_DTYPE)


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The row and column offsets of this program's output tile.

    Grouped order: GROUP_M row blocks share the same column blocks while they are in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def accumulate_tile(
    acc, a_ptr, b_ptr, offs_m, offs_n, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc + a[offs_m, :]·b[:, offs_n]: a kernel's main loop, into an accumulator it has seeded
    (rows and columns outside M, N read as 0; offs_m may be gathered rows)."""
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        k_in = k0 + rk < K
        a = tl.load(a_ptrs, mask=(offs_m < M)[:, None] & k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None] & (offs_n < N)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def matmul_tile(
    a_ptr, b_ptr, offs_m, offs_n, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """a[offs_m, :]·b[:, offs_n] in the accumulator dtype (rows and columns outside M, N read as 0)."""
    return accumulate_tile(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE), a_ptr, b_ptr, offs_m, offs_n, M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, ACC_DTYPE, DOT_PRECISION, BLOCK_K,
    )


# What matmul_kernel's hash-dropout mask applies to: nothing, a, or the tensor a is the transpose of.
NO_DROPOUT, DROPOUT_A, DROPOUT_A_TRANSPOSED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def matmul_kernel(
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
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
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
            a = tl.where(keep_mask(seed_ptr, offs_m, offs_k, threshold, False), a, tl.zeros_like(a))
        elif DROPOUT == DROPOUT_A_TRANSPOSED:
            a = tl.where(keep_mask(seed_ptr, offs_k, offs_m, threshold, True), a, tl.zeros_like(a))
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = (c_ptr + split.to(tl.int64) * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm
              + offs_n.to(tl.int64)[None, :] * stride_cn)
    tl.store(c_ptrs, (to_acc(alpha, ACC_DTYPE) * acc).to(c_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


# ---------------------------------------------------------------- host side


def tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


# Interpreter tiles: one numpy program at a time, and small enough that test shapes cross edges.
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
# Hopper-oriented search space (tile M, N, K, warps, stages). Half precision and TF32 run on
# tensor cores (wgmma wants 64-row multiples per warpgroup); IEEE fp32 and fp64 run tl.dot on
# FMA units, which keep whole operand slices in registers, so only the small tiles with
# BLOCK_K = 32 stay (at 16, triton 3.8 spills the 64×64 tile with a bias).
GPU_TILES = [
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4), (64, 64, 64, 4, 3),
    (64, 64, 32, 4, 3), (64, 64, 16, 4, 3), (32, 64, 32, 4, 2),
]
FMA_MAX_TILE = 64 * 64


def fit(block: int, dim: int) -> int:
    # No wider than the (power-of-two padded) dimension, and at least 16, tl.dot's minimum.
    return min(block, max(16, triton.next_power_of_2(dim)))


def tile_pruner(accumulator_budget, fma_accumulator_budget=None, fma_max_stages=None):
    """The autotuner's early pruning for one kernel. accumulator_budget(launch constexprs) is
    the most accumulator values per thread (BLOCK_M·BLOCK_N / threads) the kernel may hold:
    128 fp32 values (a 128×256 tile over 8 warps) fit beside one accumulator's pointers and
    pipeline; kernels holding more live tiles, or heavy epilogues, get less.
    fma_accumulator_budget, if given, replaces it where tl.dot runs on FMA units (IEEE fp32,
    fp64), whose operand slices live in registers too; fma_max_stages, if given, caps their
    pipeline stages (each stage keeps another set of operand slices in flight).
    tests/compile_triton_sm90.py checks that no config left in a search space spills on sm_90."""

    def prune(configs, named_args, **kwargs):
        """Drop tiles that suit neither the dtype, the kernel's register budget nor the problem:
        shrink each to the padded problem size (the skinny rank-r matmuls would otherwise waste
        most of a tile)."""
        M, N, K = named_args["M"], named_args["N"], named_args["K"]
        dtype = next(arg.dtype for arg in named_args.values() if isinstance(arg, torch.Tensor))  # the first operand's
        on_fma = kwargs["DOT_PRECISION"] == "ieee" and dtype not in (torch.float16, torch.bfloat16)
        budget = (fma_accumulator_budget if on_fma and fma_accumulator_budget else accumulator_budget)(kwargs)
        kept = {}
        for config in configs:
            block_m, block_n, block_k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            if on_fma and (block_m * block_n > FMA_MAX_TILE or block_k != 32):
                continue
            block_m, block_n, block_k, warps = fit(block_m, M), fit(block_n, N), fit(block_k, K), config.num_warps
            if on_fma:  # FMA layouts spread thinner than 16 accumulators per thread spill (fp64 on sm_90)
                warps = min(warps, max(1, block_m * block_n // (16 * 32)))
            if block_m * block_n > budget * 32 * warps:
                continue
            stages = min(config.num_stages, fma_max_stages) if on_fma and fma_max_stages else config.num_stages
            fitted = (block_m, block_n, block_k, warps, stages)
            kept.setdefault(fitted, config)
        return [
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in kept
        ]

    return prune


def autotuned(kernel, tiles=GPU_TILES, accumulator_budget=lambda options: 128, fma_accumulator_budget=None,
              fma_max_stages=None):
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
        prune_configs_by={"early_config_prune": tile_pruner(accumulator_budget, fma_accumulator_budget,
                                                            fma_max_stages)},
        cache_results=True,
    )(kernel)


# With dropout, the keep mask of the whole a tile is live beside the accumulator: a 256×128 tile
# spilled on sm_90 (DoRA's dropped x·Wᵀ; LoRA's dropped products are skinny, pruned to small tiles).
matmul_tuned = autotuned(matmul_kernel, accumulator_budget=lambda options: 64 if options["DROPOUT"] else 128)


def dot_options(dtype: torch.dtype) -> dict:
    return dict(
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION="tf32" if tf32(dtype) else "ieee",
    )


def launch(kernel, tuned_kernel, dtype: torch.dtype, M: int, N: int, K: int, *args, splits: int = 1,
           batches: int = 1, **options) -> None:
    """Launch for `batches` [M, N] outputs (tiles of batch b at grid axis 0 from b·tiles) reduced
    over K (in `splits` slices along grid axis 1): autotuned on the GPU, fixed tiles in the
    interpreter."""
    options.update(dot_options(dtype), M_KEY=triton.next_power_of_2(M), N_KEY=triton.next_power_of_2(N),
                   K_KEY=triton.next_power_of_2(K))
    if _backends.triton_interpret():
        config = dict(INTERPRETER_CONFIG, BLOCK_M=fit(32, M), BLOCK_N=fit(32, N), BLOCK_K=fit(32, K))
        grid = (batches * triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]), splits)
        kernel[grid](*args, **options, **config)
        return
    grid = lambda meta: (batches * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    tuned_kernel[grid](*args, **options)


# Split reductions: the rank-r products (xa, dyB, dA, dB) have outputs of one or a few tile
# columns, so an unsplit grid leaves most SMs idle. Aim for PROGRAMS_PER_SM programs per SM
# (estimated with 128×128 tiles), each slice a multiple of SPLIT_QUANTUM long.
PROGRAMS_PER_SM = 2
SPLIT_QUANTUM = 512
# In the interpreter: 8 programs wanted, 32×32 tiles and 32-long slices, so test shapes split too.
INTERPRETER_SPLIT = dict(programs=8, tile=32, quantum=32)


def split_length(device: torch.device, M: int, N: int, K: int, batches: int = 1) -> int:
    """The length of each slice of the K reduction of an [M, N] output, or of each of `batches`
    such outputs reduced over K each (K itself: no split)."""
    if _backends.triton_interpret():
        programs, tile, quantum = (INTERPRETER_SPLIT[key] for key in ("programs", "tile", "quantum"))
    else:
        programs, tile, quantum = PROGRAMS_PER_SM * _backends.multiprocessor_count(device), 128, SPLIT_QUANTUM
    tiles = batches * triton.cdiv(M, tile) * triton.cdiv(N, tile)
    splits = min(triton.cdiv(programs, tiles), triton.cdiv(K, quantum))
    if splits <= 1:
        return K
    return triton.cdiv(triton.cdiv(K, splits), quantum) * quantum


def matmul(a, b, alpha=1.0, dropout_p=0.0, seed=None, dropout_on=NO_DROPOUT, out=None):
    """alpha·a·b for strided 2-D a [M, K], b [K, N], written into `out` (any strides; default a
    new [M, N] tensor). dropout_on: NO_DROPOUT, DROPOUT_A or DROPOUT_A_TRANSPOSED. A reduction
    too long for the output's tiles to fill the GPU is split: fp32 (fp64) partial products, one
    per slice, are summed in a fixed order, so results stay deterministic."""
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
    if c.numel() == 0:
        return c
    slice_length = split_length(a.device, M, N, K)
    splits = triton.cdiv(K, slice_length) if K else 1
    if splits == 1:
        target, stride_split = c, 0
    else:  # [splits, M, N] partial products
        accumulate = torch.float64 if a.dtype == torch.float64 else torch.float32
        target = torch.empty((splits, M, N), dtype=accumulate, device=a.device)
        stride_split = target.stride(0)
    launch(
        matmul_kernel, matmul_tuned, a.dtype, M, N, K,
        a, b, seed, target,
        M, N, K, slice_length,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), stride_split, target.stride(-2), target.stride(-1),
        alpha, hash_dropout.threshold(dropout_p),
        DROPOUT=dropout_on if dropout_p > 0.0 else NO_DROPOUT, splits=splits,
    )
    if splits > 1:
        c.copy_(target.sum(0))
    return c



def empty_batch_gradients(like: torch.Tensor, shapes: tuple, needed: tuple[bool, ...]) -> tuple:
    """A backward's gradients for a batch of no rows: zeros of each shape (the input's has no rows
    either), None where not needed. No kernel is launched on an empty grid."""
    return tuple(like.new_zeros(shape) if need else None for shape, need in zip(shapes, needed))


def check_dtype(op: str, x: torch.Tensor) -> None:
    """TypeError unless the Triton kernels of `op` can run x's dtype here."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op} (triton): dtype {x.dtype} is not supported; use float16, bfloat16, float32 or float64")
    if x.dtype == torch.bfloat16 and _backends.triton_interpret():
        # triton 3.6's interpreter runs tl.dot on the raw uint16 bits of bf16: wrong results, no error.
        raise TypeError(
            f"{op} (triton): bfloat16 is not supported under TRITON_INTERPRET=1; use float16, float32 or float64"
        )

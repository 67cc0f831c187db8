// CUDA kernels declared in lora_linear_kernels.cuh.
#include "kernel_utils.cuh"
#include "lora_linear_kernels.cuh"

#include "../hash_dropout.h"

namespace lowrank::cuda {
namespace {

// Keep-scale factor D[row, col]: keep_scale or 0, or 1 without dropout.
template <typename A>
__device__ __forceinline__ A dropout_factor(const HashDropout& dropout, uint32_t row_key, int64_t col, A keep_scale) {
  if (dropout.seed == nullptr) {
    return A(1);
  }
  return dropout_keep(row_key, col, dropout.threshold) ? keep_scale : A(0);
}

// D[row, col]·value: 0 where dropped whatever value holds (a NaN too, as hash_dropout.apply_mask).
template <typename A>
__device__ __forceinline__ A apply_mask(const HashDropout& dropout, uint32_t row_key, int64_t col, A keep_scale,
                                        A value) {
  const A factor = dropout_factor(dropout, row_key, col, keep_scale);
  return factor == A(0) ? A(0) : value * factor;
}

__device__ __forceinline__ uint32_t row_key_of(const HashDropout& dropout, int64_t row) {
  return dropout.seed == nullptr ? 0u : dropout_row_key(*dropout.seed, row);
}

// ---- xa = dropout(x)·Aᵀ: one block owns kXaRows rows and a tile of up to kRankTile ranks, so
// x is read once when r <= 128. Each warp covers kXaRows/8 rows, each lane kRankTile/32 ranks.
constexpr int kXaThreads = 256;
constexpr int kXaRows = 32;
constexpr int kXaDepth = 32;  // K columns staged in shared memory per step
constexpr int kXaWarps = kXaThreads / 32;
constexpr int kMaxRankTile = 128;

template <typename T, int kRankTile>
__global__ void __launch_bounds__(kXaThreads)
    dropout_times_lora_a_kernel(int64_t M, int64_t K, int64_t r, StridedMatrix<const T> x,
                                StridedMatrix<const T> lora_A, StridedMatrix<T> xa, HashDropout dropout) {
  using A = accumulate_t<T>;
  constexpr int kRanksPerLane = kRankTile / 32;
  constexpr int kRowsPerWarp = kXaRows / kXaWarps;
  // +1 column of padding: lanes read a_tile[lane + 32c][kk] without bank conflicts.
  __shared__ A x_tile[kXaRows][kXaDepth + 1];
  __shared__ A a_tile[kRankTile][kXaDepth + 1];
  __shared__ uint32_t row_keys[kXaRows];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * kXaRows;
  const int64_t rank_begin = static_cast<int64_t>(blockIdx.y) * kRankTile;
  const A keep_scale = static_cast<A>(dropout.keep_scale);
  if (threadIdx.x < kXaRows) {
    row_keys[threadIdx.x] = row_key_of(dropout, row_begin + threadIdx.x);
  }

  A acc[kRowsPerWarp][kRanksPerLane];
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
#pragma unroll
    for (int c = 0; c < kRanksPerLane; ++c) {
      acc[q][c] = A(0);
    }
  }

  for (int64_t k_begin = 0; k_begin < K; k_begin += kXaDepth) {
    __syncthreads();  // row_keys ready; previous tiles consumed
    fill_tile<kXaThreads, kXaRows, kXaDepth>(x_tile, row_begin, k_begin, M, K, [&](int i, int64_t row, int64_t col) {
      return apply_mask(dropout, row_keys[i], col, keep_scale, load(x, row, col));
    });
    load_tile<kXaThreads, kRankTile, kXaDepth>(a_tile, lora_A, rank_begin, k_begin, r, K);
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kXaDepth; ++kk) {
      A a_values[kRanksPerLane];
#pragma unroll
      for (int c = 0; c < kRanksPerLane; ++c) {
        a_values[c] = a_tile[lane + 32 * c][kk];
      }
#pragma unroll
      for (int q = 0; q < kRowsPerWarp; ++q) {
        const A x_value = x_tile[warp + kXaWarps * q][kk];
#pragma unroll
        for (int c = 0; c < kRanksPerLane; ++c) {
          acc[q][c] += x_value * a_values[c];
        }
      }
    }
  }

#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    const int64_t row = row_begin + warp + kXaWarps * q;
#pragma unroll
    for (int c = 0; c < kRanksPerLane; ++c) {
      const int64_t rank = rank_begin + lane + 32 * c;
      if (row < M && rank < r) {
        *element(xa, row, rank) = from_accumulate<T>(acc[q][c]);
      }
    }
  }
}

template <typename T, int kRankTile>
cudaError_t launch_xa_tile(int64_t M, int64_t K, int64_t r, StridedMatrix<const T> x, StridedMatrix<const T> lora_A,
                           StridedMatrix<T> xa, HashDropout dropout, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kXaRows)), static_cast<unsigned>(ceil_div(r, kRankTile)));
  dropout_times_lora_a_kernel<T, kRankTile><<<grid, kXaThreads, 0, stream>>>(M, K, r, x, lora_A, xa, dropout);
  return cudaGetLastError();
}

// ---- dx += D⊙(s·dyB·A): a block owns a 32 x 64 tile of dx, forms the rank-r products from
// shared memory (32 ranks a step), and touches each dx element once in the epilogue.
using AccTile = LowRankTile</*kThreads=*/256, /*kRows=*/32, /*kCols=*/64, /*kDepth=*/32>;

template <typename T>
__global__ void __launch_bounds__(AccTile::kBlockThreads)
    masked_lowrank_accumulate_kernel(int64_t M, int64_t K, int64_t r, StridedMatrix<const T> dyB,
                                     StridedMatrix<const T> lora_A, StridedMatrix<T> dx, accumulate_t<T> scaling,
                                     HashDropout dropout) {
  using A = accumulate_t<T>;
  __shared__ uint32_t row_keys[AccTile::kTileRows];

  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * AccTile::kTileRows;
  const int64_t col_begin = static_cast<int64_t>(blockIdx.y) * AccTile::kTileCols;
  if (threadIdx.x < AccTile::kTileRows) {  // read after the barriers of products()
    row_keys[threadIdx.x] = row_key_of(dropout, row_begin + threadIdx.x);
  }
  A acc[AccTile::kRowsPerThread];
  AccTile::products(acc, dyB, lora_A, row_begin, col_begin, M, K, r);

  const int64_t col = AccTile::column(col_begin);
  if (col >= K) {
    return;
  }
  const A keep_scale = static_cast<A>(dropout.keep_scale);
#pragma unroll
  for (int q = 0; q < AccTile::kRowsPerThread; ++q) {
    const int local_row = AccTile::local_row(q);
    const int64_t row = row_begin + local_row;
    const A factor = dropout_factor(dropout, row_keys[local_row], col, keep_scale);
    if (row < M && factor != A(0)) {  // dropped elements keep their dx: skip the write
      T* target = element(dx, row, col);
      *target = from_accumulate<T>(to_accumulate(*target) + scaling * factor * acc[q]);
    }
  }
}

// ---- out = D⊙x for a row chunk: one block per row (grid-strided), threads along K.
constexpr int kDropoutThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDropoutThreads)
    apply_dropout_kernel(int64_t rows, int64_t K, int64_t row_offset, StridedMatrix<const T> x, StridedMatrix<T> out,
                         HashDropout dropout) {
  using A = accumulate_t<T>;
  const A keep_scale = static_cast<A>(dropout.keep_scale);
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const int64_t row = row_offset + i;
    const uint32_t row_key = row_key_of(dropout, row);
    for (int64_t col = threadIdx.x; col < K; col += blockDim.x) {
      *element(out, i, col) = from_accumulate<T>(apply_mask(dropout, row_key, col, keep_scale, load(x, row, col)));
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_dropout_times_lora_a(int64_t M, int64_t K, int64_t r, StridedMatrix<const T> x,
                                        StridedMatrix<const T> lora_A, StridedMatrix<T> xa, HashDropout dropout,
                                        cudaStream_t stream) {
  if (M == 0 || r == 0) {
    return cudaSuccess;
  }
  // The smallest rank tile that covers r keeps lanes busy for small ranks; above 128 the
  // rank tiles go to grid.y and x is read once per tile.
  if (r <= 32) {
    return launch_xa_tile<T, 32>(M, K, r, x, lora_A, xa, dropout, stream);
  }
  if (r <= 64) {
    return launch_xa_tile<T, 64>(M, K, r, x, lora_A, xa, dropout, stream);
  }
  return launch_xa_tile<T, kMaxRankTile>(M, K, r, x, lora_A, xa, dropout, stream);
}

template <typename T>
cudaError_t launch_masked_lowrank_accumulate(int64_t M, int64_t K, int64_t r, StridedMatrix<const T> dyB,
                                             StridedMatrix<const T> lora_A, StridedMatrix<T> dx, double scaling,
                                             HashDropout dropout, cudaStream_t stream) {
  if (M == 0 || K == 0 || r == 0) {
    return cudaSuccess;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(M, AccTile::kTileRows)),
                  static_cast<unsigned>(ceil_div(K, AccTile::kTileCols)));
  masked_lowrank_accumulate_kernel<T><<<grid, AccTile::kBlockThreads, 0, stream>>>(
      M, K, r, dyB, lora_A, dx, static_cast<accumulate_t<T>>(scaling), dropout);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_apply_dropout(int64_t rows, int64_t K, int64_t row_offset, StridedMatrix<const T> x,
                                 StridedMatrix<T> out, HashDropout dropout, cudaStream_t stream) {
  if (rows == 0 || K == 0) {
    return cudaSuccess;
  }
  apply_dropout_kernel<T><<<capped_blocks(rows), kDropoutThreads, 0, stream>>>(rows, K, row_offset, x, out, dropout);
  return cudaGetLastError();
}

#define LOWRANK_INSTANTIATE_KERNELS(T)                                                                             \
  template cudaError_t launch_dropout_times_lora_a<T>(int64_t, int64_t, int64_t, StridedMatrix<const T>,          \
                                                      StridedMatrix<const T>, StridedMatrix<T>, HashDropout,      \
                                                      cudaStream_t);                                              \
  template cudaError_t launch_masked_lowrank_accumulate<T>(int64_t, int64_t, int64_t, StridedMatrix<const T>,     \
                                                           StridedMatrix<const T>, StridedMatrix<T>, double,      \
                                                           HashDropout, cudaStream_t);                            \
  template cudaError_t launch_apply_dropout<T>(int64_t, int64_t, int64_t, StridedMatrix<const T>, StridedMatrix<T>, \
                                               HashDropout, cudaStream_t);

LOWRANK_FOR_EACH_KERNEL_TYPE(LOWRANK_INSTANTIATE_KERNELS)

#undef LOWRANK_INSTANTIATE_KERNELS

}  // namespace lowrank::cuda

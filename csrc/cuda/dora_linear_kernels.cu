// CUDA kernels declared in dora_linear_kernels.cuh.
#include <algorithm>

#include "dora_linear_kernels.cuh"
#include "kernel_utils.cuh"

namespace lowrank::cuda {
namespace {

// ---- y = g⊙(y + s·xa·Bᵀ) + b: a block owns a 32 x 64 tile of y, forms the rank-r products from
// shared memory (32 ranks a step), and touches each y element once: lora_linear's
// masked_lowrank_accumulate_kernel with DoRA's epilogue.
using EpilogueTile = LowRankTile</*kThreads=*/256, /*kRows=*/32, /*kCols=*/64, /*kDepth=*/32>;

template <typename T>
__global__ void __launch_bounds__(EpilogueTile::kBlockThreads)
    dora_epilogue_kernel(int64_t M, int64_t N, int64_t r, StridedMatrix<const T> xa, StridedMatrix<const T> lora_B_t,
                         const accumulate_t<T>* scale, StridedMatrix<const T> bias, StridedMatrix<T> y,
                         accumulate_t<T> scaling) {
  using A = accumulate_t<T>;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * EpilogueTile::kTileRows;
  const int64_t col_begin = static_cast<int64_t>(blockIdx.y) * EpilogueTile::kTileCols;
  A acc[EpilogueTile::kRowsPerThread];
  EpilogueTile::products(acc, xa, lora_B_t, row_begin, col_begin, M, N, r);

  const int64_t col = EpilogueTile::column(col_begin);
  if (col >= N) {
    return;
  }
  const A g = scale[col];
  const A b = bias.data == nullptr ? A(0) : load(bias, 0, col);
#pragma unroll
  for (int q = 0; q < EpilogueTile::kRowsPerThread; ++q) {
    const int64_t row = row_begin + EpilogueTile::local_row(q);
    if (row < M) {
      T* target = element(y, row, col);
      *target = from_accumulate<T>(g * (to_accumulate(*target) + scaling * acc[q]) + b);
    }
  }
}

// ---- column sums: a block of kDotsCols × kDotsRowLanes threads owns kDotsCols columns of one
// row slice; a warp reads consecutive columns of a row (coalesced), the row lanes stride down
// the slice and are summed in shared memory at the end.
constexpr int kDotsCols = 32;
constexpr int kDotsRowLanes = 8;
// Slices of at least this many rows, and about this many blocks in all: enough to fill a GPU
// when N is narrow, few enough partial sums to add.
constexpr int64_t kDotsMinRowsPerSplit = 256;
constexpr int64_t kDotsTargetBlocks = 1024;

template <typename T>
__global__ void __launch_bounds__(kDotsCols * kDotsRowLanes)
    column_dots_kernel(int64_t M, int64_t N, int64_t K, int64_t r, int64_t rows_per_split,
                       StridedMatrix<const T> grad_y, StridedMatrix<const T> y, StridedMatrix<const T> bias,
                       const accumulate_t<T>* scale, const accumulate_t<T>* norm, StridedMatrix<const T> x,
                       StridedMatrix<const T> weight, StridedMatrix<const T> xa, StridedMatrix<const T> lora_B,
                       accumulate_t<T> scaling, accumulate_t<T>* out) {
  using A = accumulate_t<T>;
  __shared__ A partial[2][kDotsRowLanes][kDotsCols];
  const int lane = threadIdx.x, row_lane = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kDotsCols + lane;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t row_end = row_begin + rows_per_split < M ? row_begin + rows_per_split : M;
  A dots = A(0), sums = A(0);
  if (col < N) {
    const A b = bias.data == nullptr ? A(0) : load(bias, 0, col);
    const bool recompute = scale != nullptr && scale[col] == A(0) && norm[col] > A(0);
    for (int64_t row = row_begin + row_lane; row < row_end; row += kDotsRowLanes) {
      const A grad = load(grad_y, row, col);
      A z;
      if (recompute) {  // rare: a column whose g is 0, one dot product of length K + r per element
        A base = A(0), low_rank = A(0);
        for (int64_t k = 0; k < K; ++k) {
          base += load(x, row, k) * load(weight, col, k);
        }
        for (int64_t j = 0; j < r; ++j) {
          low_rank += load(xa, row, j) * load(lora_B, col, j);
        }
        z = base + scaling * low_rank;
      } else {
        z = load(y, row, col) - b;
      }
      dots += grad * z;
      sums += grad;
    }
  }
  partial[0][row_lane][lane] = dots;
  partial[1][row_lane][lane] = sums;
  __syncthreads();
  if (row_lane < 2 && col < N) {  // row lane 0 adds up the dots, row lane 1 the sums
    A total = A(0);
#pragma unroll
    for (int q = 0; q < kDotsRowLanes; ++q) {
      total += partial[row_lane][q][lane];
    }
    out[(static_cast<int64_t>(blockIdx.y) * 2 + row_lane) * N + col] = total;
  }
}

}  // namespace

int64_t column_dots_splits(int64_t M, int64_t N) {
  const int64_t column_blocks = std::max<int64_t>(1, ceil_div(N, kDotsCols));
  const int64_t by_rows = std::max<int64_t>(1, ceil_div(M, kDotsMinRowsPerSplit));
  const int64_t by_blocks = std::max<int64_t>(1, kDotsTargetBlocks / column_blocks);
  return std::min(by_rows, by_blocks);
}

template <typename T>
cudaError_t launch_dora_epilogue(int64_t M, int64_t N, int64_t r, StridedMatrix<const T> xa,
                                 StridedMatrix<const T> lora_B_t, const accumulate_t<T>* scale,
                                 StridedMatrix<const T> bias, StridedMatrix<T> y, double scaling, cudaStream_t stream) {
  if (M == 0 || N == 0) {
    return cudaSuccess;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(M, EpilogueTile::kTileRows)),
                  static_cast<unsigned>(ceil_div(N, EpilogueTile::kTileCols)));
  dora_epilogue_kernel<T><<<grid, EpilogueTile::kBlockThreads, 0, stream>>>(
      M, N, r, xa, lora_B_t, scale, bias, y, static_cast<accumulate_t<T>>(scaling));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_column_dots(int64_t M, int64_t N, int64_t K, int64_t r, StridedMatrix<const T> grad_y,
                               StridedMatrix<const T> y, StridedMatrix<const T> bias, const accumulate_t<T>* scale,
                               const accumulate_t<T>* norm, StridedMatrix<const T> x, StridedMatrix<const T> weight,
                               StridedMatrix<const T> xa, StridedMatrix<const T> lora_B, double scaling,
                               accumulate_t<T>* out, cudaStream_t stream) {
  if (N == 0) {
    return cudaSuccess;
  }
  const int64_t splits = column_dots_splits(M, N);
  const int64_t rows_per_split = std::max<int64_t>(1, ceil_div(M, splits));
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kDotsCols)), static_cast<unsigned>(splits));
  column_dots_kernel<T><<<grid, dim3(kDotsCols, kDotsRowLanes), 0, stream>>>(
      M, N, K, r, rows_per_split, grad_y, y, bias, scale, norm, x, weight, xa, lora_B,
      static_cast<accumulate_t<T>>(scaling), out);
  return cudaGetLastError();
}

#define LOWRANK_INSTANTIATE_KERNELS(T)                                                                              \
  template cudaError_t launch_dora_epilogue<T>(int64_t, int64_t, int64_t, StridedMatrix<const T>,                  \
                                               StridedMatrix<const T>, const accumulate_t<T>*, StridedMatrix<const T>, \
                                               StridedMatrix<T>, double, cudaStream_t);                             \
  template cudaError_t launch_column_dots<T>(int64_t, int64_t, int64_t, int64_t, StridedMatrix<const T>,           \
                                             StridedMatrix<const T>, StridedMatrix<const T>, const accumulate_t<T>*, \
                                             const accumulate_t<T>*, StridedMatrix<const T>, StridedMatrix<const T>, \
                                             StridedMatrix<const T>, StridedMatrix<const T>, double, accumulate_t<T>*, \
                                             cudaStream_t);

LOWRANK_FOR_EACH_KERNEL_TYPE(LOWRANK_INSTANTIATE_KERNELS)

#undef LOWRANK_INSTANTIATE_KERNELS

}  // namespace lowrank::cuda

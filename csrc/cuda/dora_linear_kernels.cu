// CUDA kernels declared in dora_linear_kernels.cuh.
#include <algorithm>

#include "dora_linear_kernels.cuh"
#include "numeric.cuh"

namespace lowrank::cuda {
namespace {

template <typename T>
__device__ __forceinline__ accumulate_t<T> load_element(StridedMatrix<const T> m, int64_t i, int64_t j) {
  return to_accumulate(m.data[i * m.row_stride + j * m.col_stride]);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- y = g⊙(y + s·xa·Bᵀ) + b: a block owns a [kEpilogueRows, kEpilogueCols] tile of y, forms the
// rank-r products from shared memory, and touches each y element once.
constexpr int kEpilogueThreads = 256;
constexpr int kEpilogueRows = 32;
constexpr int kEpilogueCols = 64;
constexpr int kEpilogueDepth = 32;  // ranks staged in shared memory per step
constexpr int kEpilogueRowGroups = kEpilogueThreads / kEpilogueCols;

template <typename T>
__global__ void __launch_bounds__(kEpilogueThreads)
    dora_epilogue_kernel(int64_t M, int64_t N, int64_t r, StridedMatrix<const T> xa, StridedMatrix<const T> lora_B,
                         const accumulate_t<T>* scale, StridedMatrix<const T> bias, StridedMatrix<T> y,
                         accumulate_t<T> scaling) {
  using A = accumulate_t<T>;
  constexpr int kRowsPerThread = kEpilogueRows / kEpilogueRowGroups;
  __shared__ A xa_tile[kEpilogueRows][kEpilogueDepth + 1];
  __shared__ A b_tile[kEpilogueDepth][kEpilogueCols];

  const int col_lane = threadIdx.x % kEpilogueCols, row_group = threadIdx.x / kEpilogueCols;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * kEpilogueRows;
  const int64_t col_begin = static_cast<int64_t>(blockIdx.y) * kEpilogueCols;
  A acc[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    acc[q] = A(0);
  }
  for (int64_t rank_begin = 0; rank_begin < r; rank_begin += kEpilogueDepth) {
    __syncthreads();  // previous tiles consumed
    for (int idx = threadIdx.x; idx < kEpilogueRows * kEpilogueDepth; idx += kEpilogueThreads) {
      const int i = idx / kEpilogueDepth, jj = idx % kEpilogueDepth;
      const int64_t row = row_begin + i, rank = rank_begin + jj;
      xa_tile[i][jj] = (row < M && rank < r) ? load_element(xa, row, rank) : A(0);
    }
    for (int idx = threadIdx.x; idx < kEpilogueDepth * kEpilogueCols; idx += kEpilogueThreads) {
      const int jj = idx / kEpilogueCols, kk = idx % kEpilogueCols;
      const int64_t rank = rank_begin + jj, col = col_begin + kk;
      b_tile[jj][kk] = (rank < r && col < N) ? load_element(lora_B, col, rank) : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < kEpilogueDepth; ++jj) {
      const A b_value = b_tile[jj][col_lane];
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) {
        acc[q] += xa_tile[row_group + kEpilogueRowGroups * q][jj] * b_value;
      }
    }
  }

  const int64_t col = col_begin + col_lane;
  if (col >= N) {
    return;
  }
  const A g = scale[col];
  const A b = bias.data == nullptr ? A(0) : load_element(bias, 0, col);
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t row = row_begin + row_group + kEpilogueRowGroups * q;
    if (row < M) {
      T* target = y.data + row * y.row_stride + col * y.col_stride;
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
    const A b = bias.data == nullptr ? A(0) : load_element(bias, 0, col);
    const bool recompute = scale != nullptr && scale[col] == A(0) && norm[col] > A(0);
    for (int64_t row = row_begin + row_lane; row < row_end; row += kDotsRowLanes) {
      const A grad = load_element(grad_y, row, col);
      A z;
      if (recompute) {  // rare: a column whose g is 0, one dot product of length K + r per element
        A base = A(0), low_rank = A(0);
        for (int64_t k = 0; k < K; ++k) {
          base += load_element(x, row, k) * load_element(weight, col, k);
        }
        for (int64_t j = 0; j < r; ++j) {
          low_rank += load_element(xa, row, j) * load_element(lora_B, col, j);
        }
        z = base + scaling * low_rank;
      } else {
        z = load_element(y, row, col) - b;
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

template <typename T, typename S>
cudaError_t launch_dora_epilogue(int64_t M, int64_t N, int64_t r, StridedMatrix<const T> xa,
                                 StridedMatrix<const T> lora_B, const S* scale, StridedMatrix<const T> bias,
                                 StridedMatrix<T> y, double scaling, cudaStream_t stream) {
  if (M == 0 || N == 0) {
    return cudaSuccess;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kEpilogueRows)), static_cast<unsigned>(ceil_div(N, kEpilogueCols)));
  dora_epilogue_kernel<T><<<grid, kEpilogueThreads, 0, stream>>>(M, N, r, xa, lora_B, scale, bias, y,
                                                                  static_cast<S>(scaling));
  return cudaGetLastError();
}

template <typename T, typename S>
cudaError_t launch_column_dots(int64_t M, int64_t N, int64_t K, int64_t r, StridedMatrix<const T> grad_y,
                               StridedMatrix<const T> y, StridedMatrix<const T> bias, const S* scale, const S* norm,
                               StridedMatrix<const T> x, StridedMatrix<const T> weight, StridedMatrix<const T> xa,
                               StridedMatrix<const T> lora_B, double scaling, S* out, cudaStream_t stream) {
  if (N == 0) {
    return cudaSuccess;
  }
  const int64_t splits = column_dots_splits(M, N);
  const int64_t rows_per_split = std::max<int64_t>(1, ceil_div(M, splits));
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kDotsCols)), static_cast<unsigned>(splits));
  column_dots_kernel<T><<<grid, dim3(kDotsCols, kDotsRowLanes), 0, stream>>>(
      M, N, K, r, rows_per_split, grad_y, y, bias, scale, norm, x, weight, xa, lora_B, static_cast<S>(scaling), out);
  return cudaGetLastError();
}

#define LOWRANK_INSTANTIATE_KERNELS(T, S)                                                                          \
  template cudaError_t launch_dora_epilogue<T, S>(int64_t, int64_t, int64_t, StridedMatrix<const T>,              \
                                                  StridedMatrix<const T>, const S*, StridedMatrix<const T>,       \
                                                  StridedMatrix<T>, double, cudaStream_t);                        \
  template cudaError_t launch_column_dots<T, S>(int64_t, int64_t, int64_t, int64_t, StridedMatrix<const T>,       \
                                                StridedMatrix<const T>, StridedMatrix<const T>, const S*, const S*, \
                                                StridedMatrix<const T>, StridedMatrix<const T>,                   \
                                                StridedMatrix<const T>, StridedMatrix<const T>, double, S*,       \
                                                cudaStream_t);

LOWRANK_INSTANTIATE_KERNELS(float, float)
LOWRANK_INSTANTIATE_KERNELS(double, double)
LOWRANK_INSTANTIATE_KERNELS(__half, float)
LOWRANK_INSTANTIATE_KERNELS(__nv_bfloat16, float)

#undef LOWRANK_INSTANTIATE_KERNELS

}  // namespace lowrank::cuda

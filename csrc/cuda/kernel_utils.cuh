// What the framework-free kernels of csrc/cuda/*.cu share: grid sizes, grid-stride loops,
// element access through StridedMatrix, shared-memory tile staging, and the list of element
// types every launcher is instantiated for. The ATen side of the same idea is
// csrc/native_op_utils.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "numeric.cuh"
#include "strided_matrix.cuh"

// Calls MACRO(T) for each element type the launchers are instantiated for (numeric.cuh).
#define LOWRANK_FOR_EACH_KERNEL_TYPE(MACRO) \
  MACRO(float)                              \
  MACRO(double)                             \
  MACRO(__half)                             \
  MACRO(__nv_bfloat16)

namespace lowrank::cuda {

// ---- Host: grid sizes

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid-stride kernels take at most this many blocks; the loops cover the rest.
constexpr int64_t kMaxGridBlocks = 65535;

inline unsigned capped_blocks(int64_t blocks) { return static_cast<unsigned>(std::min(blocks, kMaxGridBlocks)); }

// ---- Device

__device__ __forceinline__ int64_t global_thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t global_thread_count() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Calls body(i, j) for each element of a [rows, cols] matrix: a grid-stride loop over the
// row-major flat index, so consecutive threads take consecutive columns of a row.
template <typename Body>
__device__ __forceinline__ void for_each_element(int64_t rows, int64_t cols, const Body& body) {
  const int64_t total = rows * cols;
  for (int64_t index = global_thread_index(); index < total; index += global_thread_count()) {
    body(index / cols, index % cols);
  }
}

template <typename T>
__device__ __forceinline__ accumulate_t<T> load(StridedMatrix<const T> m, int64_t i, int64_t j) {
  return to_accumulate(*element(m, i, j));
}

// Stages a kRows x kCols tile in shared memory: tile[i][j] = value(i, row, col) at
// (row, col) = (row_begin + i, col_begin + j) inside [rows, cols), 0 past it. The block's
// kThreads threads share the loads, consecutive threads on consecutive columns.
template <int kThreads, int kRows, int kCols, typename A, int kPitch, typename Value>
__device__ __forceinline__ void fill_tile(A (&tile)[kRows][kPitch], int64_t row_begin, int64_t col_begin,
                                          int64_t rows, int64_t cols, const Value& value) {
  static_assert(kCols <= kPitch, "a tile row is wider than its pitch");
  for (int idx = threadIdx.x; idx < kRows * kCols; idx += kThreads) {
    const int i = idx / kCols, j = idx % kCols;
    const int64_t row = row_begin + i, col = col_begin + j;
    tile[i][j] = (row < rows && col < cols) ? value(i, row, col) : A(0);
  }
}

// The plain case: the tile of m at (row_begin, col_begin), m being [rows, cols].
template <int kThreads, int kRows, int kCols, typename A, int kPitch, typename T>
__device__ __forceinline__ void load_tile(A (&tile)[kRows][kPitch], StridedMatrix<const T> m, int64_t row_begin,
                                          int64_t col_begin, int64_t rows, int64_t cols) {
  fill_tile<kThreads, kRows, kCols>(tile, row_begin, col_begin, rows, cols,
                                    [&](int, int64_t row, int64_t col) { return load(m, row, col); });
}

// The rank-r products of one kRows x kCols output tile, for a block of kThreads threads:
// out[row, col] = Σ_j left[row, j]·right[j, col], left [rows, r] and right [r, cols], both staged
// kDepth ranks at a time in shared memory (entries outside read as 0). Each thread owns one
// column of the tile, column(col_begin), and kRowsPerThread of its rows, local_row(q); a kernel
// calls products() and then touches each of its output elements once (the low-rank updates of
// lora_linear's dx and dora_linear's y).
template <int kThreads, int kRows, int kCols, int kDepth>
struct LowRankTile {
  static constexpr int kBlockThreads = kThreads, kTileRows = kRows, kTileCols = kCols;
  static constexpr int kRowGroups = kThreads / kCols;
  static constexpr int kRowsPerThread = kRows / kRowGroups;
  static_assert(kThreads % kCols == 0 && kRows % kRowGroups == 0, "the threads must tile the rows evenly");

  __device__ static int64_t column(int64_t col_begin) { return col_begin + threadIdx.x % kCols; }
  __device__ static int local_row(int q) { return threadIdx.x / kCols + kRowGroups * q; }

  template <typename T>
  __device__ static void products(accumulate_t<T> (&acc)[kRowsPerThread], StridedMatrix<const T> left,
                                  StridedMatrix<const T> right, int64_t row_begin, int64_t col_begin, int64_t rows,
                                  int64_t cols, int64_t r) {
    using A = accumulate_t<T>;
    __shared__ A left_tile[kRows][kDepth + 1];  // +1: the threads of a warp read one column of it
    __shared__ A right_tile[kDepth][kCols];
    const int col_lane = threadIdx.x % kCols;
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) {
      acc[q] = A(0);
    }
    for (int64_t rank_begin = 0; rank_begin < r; rank_begin += kDepth) {
      __syncthreads();  // previous tiles consumed
      load_tile<kThreads, kRows, kDepth>(left_tile, left, row_begin, rank_begin, rows, r);
      load_tile<kThreads, kDepth, kCols>(right_tile, right, rank_begin, col_begin, r, cols);
      __syncthreads();
#pragma unroll 8
      for (int jj = 0; jj < kDepth; ++jj) {
        const A right_value = right_tile[jj][col_lane];
#pragma unroll
        for (int q = 0; q < kRowsPerThread; ++q) {
          acc[q] += left_tile[local_row(q)][jj] * right_value;
        }
      }
    }
  }
};

}  // namespace lowrank::cuda

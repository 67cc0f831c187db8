// CUDA kernels declared in multi_lora_linear_kernels.cuh.
#include "kernel_utils.cuh"
#include "multi_lora_linear_kernels.cuh"

#include "../hash_dropout.h"

namespace lowrank::cuda {
namespace {

constexpr int kThreads = 256;

// ---- out = D⊙in: one block per row (grid-strided), threads along K.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_dropout_kernel(int64_t M, int64_t K, StridedMatrix<const T> in, StridedMatrix<T> out, RowAdapters rows) {
  using A = accumulate_t<T>;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t adapter = rows.adapter[row];
    const uint32_t row_key = dropout_row_key(*rows.seed, row);
    const uint32_t threshold = adapter < 0 ? 0u : static_cast<uint32_t>(rows.thresholds[adapter]);
    const A keep_scale = adapter < 0 ? A(0) : static_cast<A>(rows.keep_scales[adapter]);
    for (int64_t col = threadIdx.x; col < K; col += blockDim.x) {
      const bool kept = adapter >= 0 && dropout_keep(row_key, col, threshold);
      *element(out, row, col) = from_accumulate<T>(kept ? keep_scale * load(in, row, col) : A(0));
    }
  }
}

// ---- out += D⊙(s·left·factor_a): one thread per element of out, the rank-R sum in registers.
// Rows of one adapter read the same factor columns, which stay in L1/L2.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_adapter_products_kernel(int64_t M, int64_t C, int64_t R, StridedMatrix<const T> left,
                                StridedMatrix<const T> factors, int64_t adapter_stride, StridedMatrix<T> out,
                                RowAdapters rows, bool dropout) {
  using A = accumulate_t<T>;
  for_each_element(M, C, [&](int64_t i, int64_t c) {
    const int64_t adapter = rows.adapter[i];
    if (adapter < 0) {
      return;
    }
    A scale = static_cast<A>(rows.scaling[adapter]);
    if (dropout) {
      if (!dropout_keep(dropout_row_key(*rows.seed, i), c, static_cast<uint32_t>(rows.thresholds[adapter]))) {
        return;  // a dropped element keeps its value
      }
      scale *= static_cast<A>(rows.keep_scales[adapter]);
    }
    const StridedMatrix<const T> factor{factors.data + adapter * adapter_stride, factors.row_stride,
                                        factors.col_stride};
    A sum = A(0);
    for (int64_t j = 0; j < R; ++j) {
      sum += load(left, i, j) * load(factor, j, c);
    }
    T* target = element(out, i, c);
    *target = from_accumulate<T>(to_accumulate(*target) + scale * sum);
  });
}

}  // namespace

template <typename T>
cudaError_t launch_row_dropout(int64_t M, int64_t K, StridedMatrix<const T> in, StridedMatrix<T> out,
                               RowAdapters rows, cudaStream_t stream) {
  if (M == 0 || K == 0) {
    return cudaSuccess;
  }
  row_dropout_kernel<T><<<capped_blocks(M), kThreads, 0, stream>>>(M, K, in, out, rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_add_adapter_products(int64_t M, int64_t C, int64_t R, StridedMatrix<const T> left,
                                        StridedMatrix<const T> factors, int64_t adapter_stride, StridedMatrix<T> out,
                                        RowAdapters rows, bool dropout, cudaStream_t stream) {
  if (M == 0 || C == 0) {
    return cudaSuccess;
  }
  add_adapter_products_kernel<T><<<capped_blocks(ceil_div(M * C, kThreads)), kThreads, 0, stream>>>(
      M, C, R, left, factors, adapter_stride, out, rows, dropout);
  return cudaGetLastError();
}

#define LOWRANK_INSTANTIATE_KERNELS(T)                                                                            \
  template cudaError_t launch_row_dropout<T>(int64_t, int64_t, StridedMatrix<const T>, StridedMatrix<T>,         \
                                             RowAdapters, cudaStream_t);                                         \
  template cudaError_t launch_add_adapter_products<T>(int64_t, int64_t, int64_t, StridedMatrix<const T>,         \
                                                      StridedMatrix<const T>, int64_t, StridedMatrix<T>,         \
                                                      RowAdapters, bool, cudaStream_t);

LOWRANK_FOR_EACH_KERNEL_TYPE(LOWRANK_INSTANTIATE_KERNELS)

#undef LOWRANK_INSTANTIATE_KERNELS

}  // namespace lowrank::cuda

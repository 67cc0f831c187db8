// CUDA kernel declared in multi_lora_linear_kernels.cuh.
#include "multi_lora_linear_kernels.cuh"
#include "numeric.cuh"

#include "../hash_dropout.h"

namespace lowrank::cuda {
namespace {

// One block per row (grid-strided), threads along K.
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_dropout_kernel(int64_t M, int64_t K, StridedMatrix<const T> in, StridedMatrix<T> out, bool accumulate,
                       RowDropout dropout) {
  using A = accumulate_t<T>;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const uint32_t row_key = dropout_row_key(*dropout.seed, row);
    const uint32_t threshold = static_cast<uint32_t>(dropout.thresholds[row]);
    const A scale = static_cast<A>(dropout.scales[row]);
    for (int64_t col = threadIdx.x; col < K; col += blockDim.x) {
      const A value =
          dropout_keep(row_key, col, threshold) ? scale * to_accumulate(in.data[row * in.row_stride + col * in.col_stride])
                                                : A(0);
      T* target = out.data + row * out.row_stride + col * out.col_stride;
      *target = from_accumulate<T>(accumulate ? to_accumulate(*target) + value : value);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_row_dropout(int64_t M, int64_t K, StridedMatrix<const T> in, StridedMatrix<T> out, bool accumulate,
                               RowDropout dropout, cudaStream_t stream) {
  if (M == 0 || K == 0) {
    return cudaSuccess;
  }
  const unsigned blocks = static_cast<unsigned>(M < kMaxBlocks ? M : kMaxBlocks);
  row_dropout_kernel<T><<<blocks, kThreads, 0, stream>>>(M, K, in, out, accumulate, dropout);
  return cudaGetLastError();
}

#define LOWRANK_INSTANTIATE_KERNELS(T)                                                                             \
  template cudaError_t launch_row_dropout<T>(int64_t, int64_t, StridedMatrix<const T>, StridedMatrix<T>, bool,    \
                                             RowDropout, cudaStream_t);

LOWRANK_INSTANTIATE_KERNELS(float)
LOWRANK_INSTANTIATE_KERNELS(double)
LOWRANK_INSTANTIATE_KERNELS(__half)
LOWRANK_INSTANTIATE_KERNELS(__nv_bfloat16)

#undef LOWRANK_INSTANTIATE_KERNELS

}  // namespace lowrank::cuda

// Framework-free CUDA kernel of the multi-adapter LoRA op: raw pointers, sizes, strides and a
// stream in, cudaError_t out. Instantiated for float, double, __half and __nv_bfloat16. The
// GEMMs are cuBLAS calls in the ATen binding, multi_lora_linear_cuda.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "strided_matrix.cuh"

namespace lowrank::cuda {

// Hash dropout of lowrank/ops/hash_dropout.py with one rate per row (its adapter's): device
// pointers, read by the kernel, so no host sync.
struct RowDropout {
  const int64_t* seed;        // the 0-dim int64 seed
  const int64_t* thresholds;  // [M]: hashes below a row's threshold are dropped
  const double* scales;       // [M]: what a row's kept elements are multiplied by (0: the row adds nothing)
};

// out[i, k] = (accumulate ? out[i, k] : 0) + D[i, k]·in[i, k], D[i, k] = scales[i] if kept, else 0;
// one pass over [M, K].
template <typename T>
cudaError_t launch_row_dropout(int64_t M, int64_t K, StridedMatrix<const T> in, StridedMatrix<T> out, bool accumulate,
                               RowDropout dropout, cudaStream_t stream);

}  // namespace lowrank::cuda

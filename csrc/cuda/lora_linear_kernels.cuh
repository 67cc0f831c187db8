// Framework-free CUDA kernels for the LoRA linear op: raw pointers, sizes, strides and a
// stream in, cudaError_t out. Instantiated for float, double, __half and __nv_bfloat16;
// products accumulate in fp32 (fp64 for double). The ATen binding is lora_linear_cuda.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "strided_matrix.cuh"

namespace lowrank::cuda {

// Hash dropout of lowrank/ops/hash_dropout.py. seed == nullptr means no dropout.
struct HashDropout {
  const int64_t* seed;  // device pointer to the 0-dim int64 seed: read by the kernels, no host sync
  uint32_t threshold;   // hashes below it are dropped
  double keep_scale;    // 1 / (1 - p)
};

// xa[M, r] = dropout(x)[M, K] · lora_Aᵀ, reading x once with the mask applied on load.
template <typename T>
cudaError_t launch_dropout_times_lora_a(int64_t M, int64_t K, int64_t r, StridedMatrix<const T> x,
                                        StridedMatrix<const T> lora_A, StridedMatrix<T> xa, HashDropout dropout,
                                        cudaStream_t stream);

// dx[i, k] += D[i, k] · scaling · Σ_j dyB[i, j] · lora_A[j, k] in one read-modify-write pass
// over dx[M, K]; dyB is [M, r], lora_A is [r, K].
template <typename T>
cudaError_t launch_masked_lowrank_accumulate(int64_t M, int64_t K, int64_t r, StridedMatrix<const T> dyB,
                                             StridedMatrix<const T> lora_A, StridedMatrix<T> dx, double scaling,
                                             HashDropout dropout, cudaStream_t stream);

// out[i, k] = D[row_offset + i, k] · x[row_offset + i, k] for i < rows; x is the whole
// [M, K] input (the mask depends on the global row), out is a [rows, K] chunk.
template <typename T>
cudaError_t launch_apply_dropout(int64_t rows, int64_t K, int64_t row_offset, StridedMatrix<const T> x,
                                 StridedMatrix<T> out, HashDropout dropout, cudaStream_t stream);

}  // namespace lowrank::cuda

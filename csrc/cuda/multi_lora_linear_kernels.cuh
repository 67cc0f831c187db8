// Framework-free CUDA kernels of the multi-adapter LoRA op: raw pointers, sizes, strides and a
// stream in, cudaError_t out. Instantiated for float, double, __half and __nv_bfloat16;
// products accumulate in fp32 (fp64 for double). The ATen binding is multi_lora_linear_cuda.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "strided_matrix.cuh"

namespace lowrank::cuda {

// Each row's adapter and the adapters' constants: device pointers, read by the kernels, so no
// host sync.
struct RowAdapters {
  const int64_t* adapter;     // [M]: row i's adapter, -1 for none
  const double* scaling;      // [n]
  const int64_t* seed;        // the 0-dim int64 seed of the hash dropout; nullptr: no dropout
  const int64_t* thresholds;  // [n]: hashes below an adapter's threshold are dropped (with a seed)
  const double* keep_scales;  // [n]: 1 / (1 - p) (with a seed)
};

// out[i, k] = D[i, k]·in[i, k] with row i's adapter's dropout, 0 on rows without an adapter.
template <typename T>
cudaError_t launch_row_dropout(int64_t M, int64_t K, StridedMatrix<const T> in, StridedMatrix<T> out,
                               RowAdapters rows, cudaStream_t stream);

// out[i, c] += D[i, c]·s[a]·Σ_j left[i, j]·factor_a[j, c], a = row i's adapter, in one
// read-modify-write pass over out [M, C]; rows without an adapter and dropped elements keep
// their value. left is [M, R]; factor_a the [R, C] matrix at factors.data + a·adapter_stride
// with factors' strides. D (per adapter rate) applies when `dropout`.
template <typename T>
cudaError_t launch_add_adapter_products(int64_t M, int64_t C, int64_t R, StridedMatrix<const T> left,
                                        StridedMatrix<const T> factors, int64_t adapter_stride, StridedMatrix<T> out,
                                        RowAdapters rows, bool dropout, cudaStream_t stream);

}  // namespace lowrank::cuda

// Framework-free CUDA kernels for the DoRA linear op: raw pointers, sizes, strides and a stream
// in, cudaError_t out. T is float, double, __half or __nv_bfloat16; the column scale g, the norm
// and the sums are of accumulate_t<T> (double for double, float otherwise), and products
// accumulate in it. The ATen binding is dora_linear_cuda.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "numeric.cuh"
#include "strided_matrix.cuh"

namespace lowrank::cuda {

// y[i, j] = scale[j]·(y[i, j] + scaling·Σ_k xa[i, k]·lora_B_t[k, j]) + bias[0, j] in one
// read-modify-write pass over y [M, N], after the GEMM y = x·Wᵀ: DoRA's low-rank term, column
// scale and bias. xa is [M, r], lora_B_t = Bᵀ [r, N]; bias.data == nullptr means no bias.
template <typename T>
cudaError_t launch_dora_epilogue(int64_t M, int64_t N, int64_t r, StridedMatrix<const T> xa,
                                 StridedMatrix<const T> lora_B_t, const accumulate_t<T>* scale,
                                 StridedMatrix<const T> bias, StridedMatrix<T> y, double scaling, cudaStream_t stream);

// How many row slices launch_column_dots splits M rows into (its out has that many [2, N] blocks).
int64_t column_dots_splits(int64_t M, int64_t N);

// For each row slice s: out[s][0][j] = Σ_i dy[i, j]·(y[i, j] − bias[0, j]) and out[s][1][j] =
// Σ_i dy[i, j], out contiguous [splits, 2, N]. With scale and norm (recover: y is DoRA's output),
// where scale[j] = 0 < norm[j] the column's z = x[i]·weight[j] + scaling·xa[i]·lora_B[j] is
// recomputed in place of y − bias, which carries nothing there; x is [M, K], weight [N, K].
template <typename T>
cudaError_t launch_column_dots(int64_t M, int64_t N, int64_t K, int64_t r, StridedMatrix<const T> grad_y,
                               StridedMatrix<const T> y, StridedMatrix<const T> bias, const accumulate_t<T>* scale,
                               const accumulate_t<T>* norm, StridedMatrix<const T> x, StridedMatrix<const T> weight,
                               StridedMatrix<const T> xa, StridedMatrix<const T> lora_B, double scaling,
                               accumulate_t<T>* out, cudaStream_t stream);

}  // namespace lowrank::cuda

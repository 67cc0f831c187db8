// Framework-free CUDA kernels for the adapter-bottleneck op's elementwise epilogues: raw
// pointers, sizes, strides and a stream in, cudaError_t out. Instantiated for float, double,
// __half and __nv_bfloat16; math runs in fp32 (fp64 for double). The GEMMs are cuBLAS calls
// in the ATen binding, adapter_cuda.cpp; these kernels work on its [M, Bn] results.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../adapter_activation.h"
#include "strided_matrix.cuh"

namespace lowrank::cuda {

// Down-projection epilogue: z ← z + bias (bias == nullptr: none), rounded to T, then
// a_s = scaling·act(z); z and a_s are [M, Bn].
template <typename T>
cudaError_t launch_bias_activation(int64_t M, int64_t Bn, const T* bias, int64_t bias_stride, StridedMatrix<T> z,
                                   StridedMatrix<T> a_s, Activation act, double scaling, cudaStream_t stream);

// Backward mask: dz ← dz ⊙ scaling·act'(z) in place (dz holds g·W_u on entry) and, when
// a_s.data != nullptr, a_s = scaling·act(z) for dW_u; one read of z for both.
template <typename T>
cudaError_t launch_activation_backward(int64_t M, int64_t Bn, StridedMatrix<const T> z, StridedMatrix<T> dz,
                                       StridedMatrix<T> a_s, Activation act, double scaling, cudaStream_t stream);

}  // namespace lowrank::cuda

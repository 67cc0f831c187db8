// Framework-free CUDA kernel of gradient reversal's backward: out = −λ·grad in one read and
// one write. Raw pointers, sizes, strides and a stream in, cudaError_t out. Instantiated for
// float, double, __half and __nv_bfloat16; the product is formed in fp32 (fp64 for double).
// The ATen binding is grad_reverse_cuda.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lowrank::cuda {

constexpr int kMaxGradReverseDims = 6;

// How grad is read. ndim == 0: as a flat array, element i at grad[i]. Otherwise element i
// (row-major over sizes[0..ndim)) sits at grad[Σ index_d · strides[d]]; strides may be 0.
struct GradLayout {
  int ndim;
  int64_t sizes[kMaxGradReverseDims];
  int64_t strides[kMaxGradReverseDims];
};

// λ from device memory when device != nullptr (no host sync), else the host value.
struct ReversalScale {
  const double* device;
  double host;
};

// out[i] = −λ·grad[layout(i)] for i < numel; out is flat. out may equal grad when ndim == 0
// (in place). Flat arrays take 16-byte loads and stores when both pointers are 16-byte aligned.
template <typename T>
cudaError_t launch_grad_reverse(const T* grad, T* out, int64_t numel, GradLayout layout, ReversalScale lambda,
                                cudaStream_t stream);

}  // namespace lowrank::cuda

// The ATen side of the CUDA bindings (csrc/cuda/*_cuda.cpp): the CUDA element type of an ATen
// scalar type, and a 2-D tensor seen as the kernels' StridedMatrix.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "strided_matrix.cuh"

namespace lowrank {

// at::Half and at::BFloat16 are layout-compatible with __half and __nv_bfloat16.
template <typename scalar_t>
struct CudaScalar {
  using type = scalar_t;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
cuda::StridedMatrix<const typename CudaScalar<scalar_t>::type> read_only_matrix(const at::Tensor& t) {
  using cuda_t = typename CudaScalar<scalar_t>::type;
  return {reinterpret_cast<const cuda_t*>(t.const_data_ptr<scalar_t>()), t.stride(0), t.stride(1)};
}

template <typename scalar_t>
cuda::StridedMatrix<typename CudaScalar<scalar_t>::type> writable_matrix(at::Tensor& t) {
  using cuda_t = typename CudaScalar<scalar_t>::type;
  return {reinterpret_cast<cuda_t*>(t.mutable_data_ptr<scalar_t>()), t.stride(0), t.stride(1)};
}

}  // namespace lowrank

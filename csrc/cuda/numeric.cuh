// Element types of the CUDA kernels and their accumulation type: float for float, __half and
// __nv_bfloat16, double for double. Half types convert through explicit intrinsics only:
// torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lowrank::cuda {

template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};
template <typename T>
using accumulate_t = typename Accumulate<T>::type;

__device__ __forceinline__ float to_accumulate(float v) { return v; }
__device__ __forceinline__ double to_accumulate(double v) { return v; }
__device__ __forceinline__ float to_accumulate(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_accumulate(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_accumulate(accumulate_t<T> v);
template <>
__device__ __forceinline__ float from_accumulate<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_accumulate<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_accumulate<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_accumulate<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace lowrank::cuda

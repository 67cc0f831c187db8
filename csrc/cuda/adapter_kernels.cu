// CUDA kernels declared in adapter_kernels.cuh.
#include "adapter_kernels.cuh"
#include "kernel_utils.cuh"

namespace lowrank::cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t elements) { return capped_blocks(ceil_div(elements, kThreads)); }

// Grid-stride loops over the M·Bn elements; the bottleneck is small, so (i, j) come from
// one flat index and consecutive threads touch consecutive columns of a row.
template <typename T>
__global__ void bias_activation_kernel(int64_t M, int64_t Bn, const T* bias, int64_t bias_stride,
                                       StridedMatrix<T> z, StridedMatrix<T> a_s, Activation act, double scaling) {
  using A = accumulate_t<T>;
  const A s = static_cast<A>(scaling);
  for_each_element(M, Bn, [&](int64_t i, int64_t j) {
    T* z_at = element(z, i, j);
    A value = to_accumulate(*z_at);
    if (bias != nullptr) {
      value += to_accumulate(bias[j * bias_stride]);
    }
    const T rounded = from_accumulate<T>(value);  // act sees z as stored, as the backward will
    *z_at = rounded;
    *element(a_s, i, j) = from_accumulate<T>(s * activate(act, to_accumulate(rounded)));
  });
}

template <typename T>
__global__ void activation_backward_kernel(int64_t M, int64_t Bn, StridedMatrix<const T> z, StridedMatrix<T> dz,
                                           StridedMatrix<T> a_s, Activation act, double scaling) {
  using A = accumulate_t<T>;
  const A s = static_cast<A>(scaling);
  for_each_element(M, Bn, [&](int64_t i, int64_t j) {
    const A zi = load(z, i, j);
    T* dz_at = element(dz, i, j);
    *dz_at = from_accumulate<T>(to_accumulate(*dz_at) * s * activate_grad(act, zi));
    if (a_s.data != nullptr) {
      *element(a_s, i, j) = from_accumulate<T>(s * activate(act, zi));
    }
  });
}

}  // namespace

template <typename T>
cudaError_t launch_bias_activation(int64_t M, int64_t Bn, const T* bias, int64_t bias_stride, StridedMatrix<T> z,
                                   StridedMatrix<T> a_s, Activation act, double scaling, cudaStream_t stream) {
  if (M == 0 || Bn == 0) {
    return cudaSuccess;
  }
  bias_activation_kernel<T><<<blocks_for(M * Bn), kThreads, 0, stream>>>(M, Bn, bias, bias_stride, z, a_s, act,
                                                                         scaling);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_activation_backward(int64_t M, int64_t Bn, StridedMatrix<const T> z, StridedMatrix<T> dz,
                                       StridedMatrix<T> a_s, Activation act, double scaling, cudaStream_t stream) {
  if (M == 0 || Bn == 0) {
    return cudaSuccess;
  }
  activation_backward_kernel<T><<<blocks_for(M * Bn), kThreads, 0, stream>>>(M, Bn, z, dz, a_s, act, scaling);
  return cudaGetLastError();
}

#define LOWRANK_INSTANTIATE_KERNELS(T)                                                                          \
  template cudaError_t launch_bias_activation<T>(int64_t, int64_t, const T*, int64_t, StridedMatrix<T>,        \
                                                 StridedMatrix<T>, Activation, double, cudaStream_t);          \
  template cudaError_t launch_activation_backward<T>(int64_t, int64_t, StridedMatrix<const T>, StridedMatrix<T>, \
                                                     StridedMatrix<T>, Activation, double, cudaStream_t);

LOWRANK_FOR_EACH_KERNEL_TYPE(LOWRANK_INSTANTIATE_KERNELS)

#undef LOWRANK_INSTANTIATE_KERNELS

}  // namespace lowrank::cuda

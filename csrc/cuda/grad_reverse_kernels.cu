// CUDA kernels declared in grad_reverse_kernels.cuh.
#include "grad_reverse_kernels.cuh"
#include "kernel_utils.cuh"

#include <algorithm>

namespace lowrank::cuda {
namespace {

template <typename T>
__device__ __forceinline__ T scaled(T v, accumulate_t<T> neg_lambda) {
  return from_accumulate<T>(to_accumulate(v) * neg_lambda);
}

template <typename T>
__device__ __forceinline__ accumulate_t<T> negated_lambda(const ReversalScale& lambda) {
  return static_cast<accumulate_t<T>>(-(lambda.device != nullptr ? *lambda.device : lambda.host));
}

// kVec elements moved as one aligned load/store (16 bytes when kVec = 16 / sizeof(T)).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Packet {
  T v[kVec];
};

constexpr int kThreads = 256;

// Grid-stride over packets of kVec elements, then the numel % kVec tail element by element.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    flat_grad_reverse_kernel(const T* grad, T* out, int64_t numel, ReversalScale lambda) {
  const accumulate_t<T> neg_lambda = negated_lambda<T>(lambda);
  const int64_t packets = numel / kVec;
  const auto* grad_packets = reinterpret_cast<const Packet<T, kVec>*>(grad);
  auto* out_packets = reinterpret_cast<Packet<T, kVec>*>(out);
  for (int64_t p = global_thread_index(); p < packets; p += global_thread_count()) {
    Packet<T, kVec> packet = grad_packets[p];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      packet.v[j] = scaled(packet.v[j], neg_lambda);
    }
    out_packets[p] = packet;
  }
  for (int64_t i = packets * kVec + global_thread_index(); i < numel; i += global_thread_count()) {
    out[i] = scaled(grad[i], neg_lambda);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    strided_grad_reverse_kernel(const T* grad, T* out, int64_t numel, GradLayout layout, ReversalScale lambda) {
  const accumulate_t<T> neg_lambda = negated_lambda<T>(lambda);
  for (int64_t i = global_thread_index(); i < numel; i += global_thread_count()) {
    int64_t rem = i, offset = 0;
#pragma unroll
    for (int d = kMaxGradReverseDims - 1; d > 0; --d) {
      if (d < layout.ndim) {
        offset += (rem % layout.sizes[d]) * layout.strides[d];
        rem /= layout.sizes[d];
      }
    }
    out[i] = scaled(grad[offset + rem * layout.strides[0]], neg_lambda);
  }
}

// Enough blocks to fill every SM a few times over; the grid-stride loops cover the rest.
cudaError_t block_count(int64_t work, int* blocks) {
  int device = 0, sms = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  const int64_t wanted = std::max<int64_t>(1, ceil_div(work, kThreads));
  *blocks = static_cast<int>(std::min<int64_t>(wanted, int64_t{8} * std::max(sms, 1)));
  return status;
}

}  // namespace

template <typename T>
cudaError_t launch_grad_reverse(const T* grad, T* out, int64_t numel, GradLayout layout, ReversalScale lambda,
                                cudaStream_t stream) {
  if (numel == 0) {
    return cudaSuccess;
  }
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(grad) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  int blocks = 0;
  cudaError_t status = block_count(layout.ndim == 0 && aligned ? numel / kVec : numel, &blocks);
  if (status != cudaSuccess) {
    return status;
  }
  if (layout.ndim != 0) {
    strided_grad_reverse_kernel<T><<<blocks, kThreads, 0, stream>>>(grad, out, numel, layout, lambda);
  } else if (aligned) {
    flat_grad_reverse_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(grad, out, numel, lambda);
  } else {
    flat_grad_reverse_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(grad, out, numel, lambda);
  }
  return cudaGetLastError();
}

#define LOWRANK_INSTANTIATE_KERNELS(T) \
  template cudaError_t launch_grad_reverse<T>(const T*, T*, int64_t, GradLayout, ReversalScale, cudaStream_t);

LOWRANK_FOR_EACH_KERNEL_TYPE(LOWRANK_INSTANTIATE_KERNELS)

#undef LOWRANK_INSTANTIATE_KERNELS

}  // namespace lowrank::cuda

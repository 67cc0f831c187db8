// CUDA kernels of lowrank::grad_reverse_backward_native (out-of-place) and
// lowrank::grad_reverse_backward_native_ (in place): the ATen side of grad_reverse_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../grad_reverse_common.h"
#include "aten_views.h"
#include "grad_reverse_kernels.cuh"

namespace lowrank {
namespace {

using at::Tensor;

// A CUDA λ is read by the kernel (no sync); a CPU λ is read here (no sync either).
cuda::ReversalScale reversal_scale(const Tensor& lambda) {
  if (lambda.is_cuda()) {
    return {lambda.const_data_ptr<double>(), 0.0};
  }
  return {nullptr, lambda.item<double>()};
}

// out (dense, flat in memory) = −λ·source read through `layout`.
void launch(const Tensor& source, const cuda::GradLayout& layout, Tensor& out, const Tensor& lambda) {
  const cuda::ReversalScale scale = reversal_scale(lambda);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, source.scalar_type(), "lowrank_grad_reverse", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    C10_CUDA_CHECK(cuda::launch_grad_reverse<cuda_t>(reinterpret_cast<const cuda_t*>(source.const_data_ptr<scalar_t>()),
                                                     reinterpret_cast<cuda_t*>(out.mutable_data_ptr<scalar_t>()),
                                                     source.numel(), layout, scale, stream));
  });
}

constexpr cuda::GradLayout kFlat{0, {}, {}};

Tensor grad_reverse_backward_cuda(const Tensor& grad, const Tensor& lambda) {
  check_grad_reverse_inputs(kGradReverseOp, grad, lambda, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  Tensor out = at::empty_like(grad);
  if (grad.numel() == 0) {
    return out;
  }
  if (grad.is_non_overlapping_and_dense()) {  // out has grad's strides: both are flat arrays
    launch(grad, kFlat, out, lambda);
    return out;
  }
  const StridedWalk walk = strided_walk(grad, out);
  if (walk.sizes.size() > static_cast<size_t>(cuda::kMaxGradReverseDims)) {
    // More unmergeable dims than the kernel spells out: gather first (one extra pass).
    launch(grad.permute(walk.order).contiguous(), kFlat, out, lambda);
    return out;
  }
  cuda::GradLayout layout{static_cast<int>(walk.sizes.size()), {}, {}};
  std::copy(walk.sizes.begin(), walk.sizes.end(), layout.sizes);
  std::copy(walk.strides.begin(), walk.strides.end(), layout.strides);
  launch(grad, layout, out, lambda);
  return out;
}

void grad_reverse_backward_cuda_(const Tensor& grad, const Tensor& lambda) {
  check_grad_reverse_inputs(kGradReverseInPlaceOp, grad, lambda, c10::DeviceType::CUDA);
  check_overwritable(kGradReverseInPlaceOp, grad);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  Tensor out = grad;
  launch(grad, kFlat, out, lambda);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl(kGradReverseOp, &grad_reverse_backward_cuda);
  m.impl(kGradReverseInPlaceOp, &grad_reverse_backward_cuda_);
}

}  // namespace lowrank

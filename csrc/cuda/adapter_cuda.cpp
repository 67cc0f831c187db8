// CUDA kernels of lowrank::adapter_forward_native and lowrank::adapter_backward_native.
//
// GEMMs go to cuBLAS through at::mm/addmm, with the [M, D] adds folded into them: the up
// projection accumulates onto h (+ s·b_u) in place, dh onto g. The elementwise work on the
// [M, Bn] GEMM results (bias + activation, act'-masking) runs in the kernels of
// adapter_kernels.cu, one pass each, with scaling folded in (a_s = s·act(z)).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream (at::cuda re-exports c10::cuda)
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../adapter_common.h"
#include "adapter_kernels.cuh"
#include "aten_views.h"

namespace lowrank {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> adapter_forward_cuda(const Tensor& h, const Tensor& w_down,
                                                const std::optional<Tensor>& b_down, const Tensor& w_up,
                                                const std::optional<Tensor>& b_up, c10::string_view activation,
                                                double scaling, bool residual) {
  const AdapterSizes n = check_adapter_forward_inputs(c10::DeviceType::CUDA, h, w_down, b_down, w_up, b_up);
  const Activation act = parse_activation(kAdapterOps.forward, activation);
  const c10::cuda::CUDAGuard device_guard(h.device());
  const bool has_b_down = is_given(b_down), has_b_up = is_given(b_up);

  Tensor z = at::mm(h, w_down.t());
  Tensor a_s = at::empty_like(z);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "lowrank_adapter_bias_activation", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    const cuda_t* bias = has_b_down ? reinterpret_cast<const cuda_t*>(b_down->const_data_ptr<scalar_t>()) : nullptr;
    C10_CUDA_CHECK(cuda::launch_bias_activation<cuda_t>(n.M, n.Bn, bias, has_b_down ? b_down->stride(0) : 0,
                                                        writable_matrix<scalar_t>(z), writable_matrix<scalar_t>(a_s),
                                                        act, scaling, stream));
  });

  Tensor out;
  if (residual && has_b_up) {
    out = at::add(h, *b_up, scaling);
    out.addmm_(a_s, w_up.t());
  } else if (residual) {
    out = at::addmm(h, a_s, w_up.t());
  } else if (has_b_up) {
    out = at::addmm(b_up->mul(scaling), a_s, w_up.t());  // not beta=s: at beta=0 a NaN in b_up would vanish
  } else {
    out = at::mm(a_s, w_up.t());
  }
  return {std::move(out), std::move(z)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_backward_cuda(
    const Tensor& grad_out, const Tensor& h, const Tensor& z, const Tensor& w_down, const Tensor& w_up,
    c10::string_view activation, double scaling, bool residual, bool needs_dh, bool needs_dw_down,
    bool needs_db_down, bool needs_dw_up, bool needs_db_up) {
  const AdapterSizes n = check_adapter_backward_inputs(c10::DeviceType::CUDA, grad_out, h, z, w_down, w_up);
  const Activation act = parse_activation(kAdapterOps.backward, activation);
  const c10::cuda::CUDAGuard device_guard(h.device());

  Tensor dz = at::mm(grad_out, w_up);
  Tensor a_s = needs_dw_up ? at::empty_like(dz) : Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "lowrank_adapter_activation_backward",
                                  [&] {
                                    using cuda_t = typename CudaScalar<scalar_t>::type;
                                    const cuda::StridedMatrix<cuda_t> activation_out =
                                        needs_dw_up ? writable_matrix<scalar_t>(a_s)
                                                    : cuda::StridedMatrix<cuda_t>{nullptr, 0, 0};
                                    C10_CUDA_CHECK(cuda::launch_activation_backward<cuda_t>(
                                        n.M, n.Bn, read_only_matrix<scalar_t>(z), writable_matrix<scalar_t>(dz),
                                        activation_out, act, scaling, stream));
                                  });

  Tensor dh = skipped_grad(h);
  if (needs_dh) {
    dh = residual ? at::addmm(grad_out, dz, w_down) : at::mm(dz, w_down);
  }
  Tensor dw_down = needs_dw_down ? at::mm(dz.t(), h) : skipped_grad(h);
  Tensor db_down = needs_db_down ? dz.sum(0) : skipped_grad(h);
  Tensor dw_up = needs_dw_up ? at::mm(grad_out.t(), a_s) : skipped_grad(h);
  Tensor db_up = needs_db_up ? grad_out.sum(0).mul_(scaling) : skipped_grad(h);
  return {std::move(dh), std::move(dw_down), std::move(db_down), std::move(dw_up), std::move(db_up)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  impl_forward_backward(m, kAdapterOps, &adapter_forward_cuda, &adapter_backward_cuda);
}

}  // namespace lowrank

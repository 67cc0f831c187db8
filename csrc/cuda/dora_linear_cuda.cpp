// CUDA kernels of lowrank::dora_linear_forward_native and lowrank::dora_linear_backward_native.
//
// GEMMs go to cuBLAS through at::mm. The kernels of dora_linear_kernels.cu are used where they
// save passes over [M, N]: the forward's epilogue (low-rank term, column scale g and bias in one
// read-modify-write of y after the GEMM y = x·Wᵀ, where addmm_ and a separate scaling would take
// two), and the backward's column sums behind dm and db (one read of dy and y, the z of columns
// with g = 0 recomputed in the kernel, so no host sync). Without dropout the backward folds g into
// whichever of dy [M, N] and W [N, K] is smaller before the dx GEMM. With dropout, the shared ATen
// path of dora_linear_common.h with lora_linear's dropout kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../dora_linear_common.h"
#include "../hash_dropout.h"
#include "aten_views.h"
#include "dora_linear_kernels.cuh"
#include "lora_linear_kernels.cuh"

namespace lowrank {
namespace {

using at::Tensor;

// The bias as a [1, N] matrix for the kernels; a null one without bias.
template <typename scalar_t>
cuda::StridedMatrix<const typename CudaScalar<scalar_t>::type> bias_row(const std::optional<Tensor>& bias) {
  if (!is_given(bias)) {
    return {nullptr, 0, 0};
  }
  return read_only_matrix<scalar_t>(bias->unsqueeze(0));
}

// drop(t) = D⊙t for an [M, K] tensor, through lora_linear's dropout kernel.
auto make_drop(const std::optional<Tensor>& seed, double dropout_p) {
  const cuda::HashDropout dropout{seed->const_data_ptr<int64_t>(), dropout_threshold(dropout_p),
                                  1.0 / (1.0 - dropout_p)};
  return [dropout](const Tensor& t) {
    Tensor out = at::empty(t.sizes(), t.options());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lowrank_dora_dropout", [&] {
      using cuda_t = typename CudaScalar<scalar_t>::type;
      C10_CUDA_CHECK(cuda::launch_apply_dropout<cuda_t>(t.size(0), t.size(1), 0, read_only_matrix<scalar_t>(t),
                                                        writable_matrix<scalar_t>(out), dropout, stream));
    });
    return out;
  };
}

// [2, N] in scale's dtype: Σ_rows dy⊙(y − b) and Σ_rows dy; with recover, y is DoRA's output and
// the columns with g = 0 < n get Σ_rows dy⊙z, z recomputed (see dora_linear_kernels.cuh).
Tensor column_sums(const Tensor& grad_y, const Tensor& y, const std::optional<Tensor>& bias, const Tensor& scale,
                   const Tensor& norm, const Tensor& x, const Tensor& weight, const Tensor& xa, const Tensor& lora_B,
                   double scaling, bool recover) {
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  const Tensor scale_values = scale.contiguous(), norm_values = norm.contiguous();  // read with unit stride
  Tensor partial = at::empty({cuda::column_dots_splits(M, N), 2, N}, scale.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_dora_column_dots", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using acc_t = cuda::accumulate_t<cuda_t>;
    C10_CUDA_CHECK(cuda::launch_column_dots<cuda_t>(
        M, N, x.size(1), xa.size(1), read_only_matrix<scalar_t>(grad_y), read_only_matrix<scalar_t>(y),
        bias_row<scalar_t>(bias), recover ? scale_values.const_data_ptr<acc_t>() : nullptr,
        recover ? norm_values.const_data_ptr<acc_t>() : nullptr, read_only_matrix<scalar_t>(x),
        read_only_matrix<scalar_t>(weight), read_only_matrix<scalar_t>(xa), read_only_matrix<scalar_t>(lora_B),
        scaling, partial.mutable_data_ptr<acc_t>(), stream));
  });
  return partial.sum(0);
}

DoraOutputs dora_linear_forward_cuda(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                     const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude,
                                     const Tensor& weight_norm_sq, double scaling, double dropout_p,
                                     const std::optional<Tensor>& seed) {
  const LoraSizes n = check_dora_forward_inputs(c10::DeviceType::CUDA, x, weight, bias, lora_A, lora_B, magnitude,
                                                weight_norm_sq, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Tensor A = lora_A.to(weight_norm_sq.scalar_type());
  Tensor norm = column_norm(weight_norm_sq, at::mm(weight, lora_A.t()), lora_B,
                            at::mm(lora_B.to(A.scalar_type()), at::mm(A, A.t())), scaling);
  const Tensor scale = column_scale(magnitude, norm);
  if (dropout_p > 0.0) {
    auto [y, xa, z] = dora_dropout_forward(x, weight, bias, lora_A, lora_B, scale, scaling, make_drop(seed, dropout_p));
    return {std::move(y), std::move(xa), std::move(norm), std::move(z)};
  }
  Tensor xa = at::mm(x, lora_A.t());
  Tensor y = at::mm(x, weight.t());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_dora_epilogue", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using acc_t = cuda::accumulate_t<cuda_t>;
    C10_CUDA_CHECK(cuda::launch_dora_epilogue<cuda_t>(
        n.M, n.N, n.r, read_only_matrix<scalar_t>(xa), read_only_matrix<scalar_t>(lora_B.t()),
        scale.const_data_ptr<acc_t>(), bias_row<scalar_t>(bias), writable_matrix<scalar_t>(y), scaling, stream));
  });
  return {std::move(y), std::move(xa), std::move(norm), at::empty({0}, x.options())};
}

DoraGrads dora_linear_backward_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& y_or_z,
                                    const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                                    const Tensor& lora_B, const Tensor& magnitude, const Tensor& norm, double scaling,
                                    double dropout_p, const std::optional<Tensor>& seed, bool needs_dx,
                                    bool needs_dweight, bool needs_dbias) {
  const LoraSizes n = check_dora_backward_inputs(c10::DeviceType::CUDA, grad_y, x, xa, y_or_z, weight, bias, lora_A,
                                                 lora_B, magnitude, norm, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto dtype = x.scalar_type();
  const Tensor scale = column_scale(magnitude, norm);
  if (dropout_p > 0.0) {  // Σ dy⊙z, Σ dy
    const Tensor sums = column_sums(grad_y, y_or_z, std::nullopt, scale, norm, x, weight, xa, lora_B, scaling, false);
    return dora_dropout_backward(grad_y, x, xa, weight, lora_A, lora_B, norm, scale, sums, scaling, needs_dx,
                                 needs_dweight, needs_dbias, make_drop(seed, dropout_p));
  }
  const Tensor scale_rows = scale.to(dtype).unsqueeze(1);
  const Tensor scaled_dyB = at::mm(grad_y, lora_B * scale_rows).mul_(scaling);
  Tensor dA = at::mm(scaled_dyB.t(), x);
  Tensor dB = at::mm(grad_y.t(), xa).mul_(scale_rows).mul_(scaling);
  Tensor dx = skipped_grad(x);
  if (needs_dx) {  // g on whichever of dy [M, N] and W [N, K] is smaller
    dx = n.M <= n.K ? at::mm(grad_y * scale_rows.t(), weight) : at::mm(grad_y, weight * scale_rows);
    dx.addmm_(scaled_dyB, lora_A);
  }
  Tensor dweight = needs_dweight ? at::mm(grad_y.t(), x).mul_(scale_rows) : skipped_grad(x);
  const Tensor sums = column_sums(grad_y, y_or_z, bias, scale, norm, x, weight, xa, lora_B, scaling, true);
  return dora_grads(std::move(dx), std::move(dweight), std::move(dA), std::move(dB), sums,
                    unscale_recovered(sums[0], scale), norm, x, needs_dbias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  impl_forward_backward(m, kDoraLinearOps, &dora_linear_forward_cuda, &dora_linear_backward_cuda);
}

}  // namespace lowrank

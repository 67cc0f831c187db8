// CUDA kernels of lowrank::lora_linear_forward_native and lowrank::lora_linear_backward_native.
//
// GEMMs go to cuBLAS through at::mm/addmm (bias in the beta = 1 epilogue, the low-rank term
// accumulated in place with addmm_). The kernels of lora_linear_kernels.cu are used where they save
// a pass over an [M, K] tensor: dropout fused into x·Aᵀ, and the masked dx update.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream (at::cuda re-exports c10::cuda)
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../hash_dropout.h"
#include "../lora_linear_common.h"
#include "aten_views.h"
#include "lora_linear_kernels.cuh"

namespace lowrank {
namespace {

using at::Tensor;

// dA with dropout needs D⊙x as a GEMM operand; it is formed in row chunks of at most this
// many elements (64 MiB of fp32), so large inputs get no [M, K] temporary.
constexpr int64_t kDropoutChunkElements = int64_t{1} << 24;

cuda::HashDropout make_hash_dropout(const std::optional<Tensor>& seed, double dropout_p) {
  if (dropout_p == 0.0) {
    return {nullptr, 0u, 1.0};
  }
  return {seed->const_data_ptr<int64_t>(), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)};
}

// dA = s·dyBᵀ·(D⊙x), with D⊙x written one row chunk at a time.
Tensor lora_a_grad_with_dropout(const Tensor& x, const Tensor& dyB, double scaling, const cuda::HashDropout& dropout,
                                const LoraSizes& n) {
  Tensor dA = at::zeros({n.r, n.K}, x.options().dtype(chunk_accumulate_dtype(x.scalar_type())));
  const int64_t chunk = rows_in(kDropoutChunkElements, n.K);
  Tensor buffer = at::empty({std::min(chunk, n.M), n.K}, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t row = 0; row < n.M; row += chunk) {
    const int64_t rows = std::min(chunk, n.M - row);
    Tensor dropped = buffer.narrow(0, 0, rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_apply_dropout", [&] {
      using cuda_t = typename CudaScalar<scalar_t>::type;
      C10_CUDA_CHECK(cuda::launch_apply_dropout<cuda_t>(rows, n.K, row, read_only_matrix<scalar_t>(x),
                                                        writable_matrix<scalar_t>(dropped), dropout, stream));
    });
    accumulate_product(dA, dyB.narrow(0, row, rows).t(), dropped, scaling);
  }
  return dA.to(x.scalar_type());
}

std::tuple<Tensor, Tensor> lora_linear_forward_cuda(const Tensor& x, const Tensor& weight,
                                                    const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                    const Tensor& lora_B, double scaling, double dropout_p,
                                                    const std::optional<Tensor>& seed) {
  const LoraSizes n = check_forward_inputs(c10::DeviceType::CUDA, x, weight, bias, lora_A, lora_B, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(x.device());
  Tensor xa;
  if (dropout_p == 0.0) {
    xa = at::mm(x, lora_A.t());
  } else {
    xa = at::empty({n.M, n.r}, x.options());
    const cuda::HashDropout dropout = make_hash_dropout(seed, dropout_p);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_dropout_times_lora_a", [&] {
      using cuda_t = typename CudaScalar<scalar_t>::type;
      C10_CUDA_CHECK(cuda::launch_dropout_times_lora_a<cuda_t>(n.M, n.K, n.r, read_only_matrix<scalar_t>(x),
                                                               read_only_matrix<scalar_t>(lora_A),
                                                               writable_matrix<scalar_t>(xa), dropout, stream));
    });
  }
  return {lora_output(x, weight, bias, xa, lora_B, scaling), std::move(xa)};
}

LoraGrads lora_linear_backward_cuda(
    const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& weight, const Tensor& lora_A,
    const Tensor& lora_B, double scaling, double dropout_p, const std::optional<Tensor>& seed, bool needs_dx,
    bool needs_dweight, bool needs_dbias) {
  const LoraSizes n =
      check_backward_inputs(c10::DeviceType::CUDA, grad_y, x, xa, weight, lora_A, lora_B, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cuda::HashDropout dropout = make_hash_dropout(seed, dropout_p);
  const Tensor dyB = at::mm(grad_y, lora_B);
  Tensor dB = at::mm(grad_y.t(), xa).mul_(scaling);

  Tensor dx = skipped_grad(x);
  if (needs_dx) {
    dx = at::mm(grad_y, weight);
    if (dropout_p == 0.0) {
      dx.addmm_(dyB, lora_A.mul(scaling));
    } else {
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_masked_lowrank_accumulate",
                                      [&] {
                                        using cuda_t = typename CudaScalar<scalar_t>::type;
                                        C10_CUDA_CHECK(cuda::launch_masked_lowrank_accumulate<cuda_t>(
                                            n.M, n.K, n.r, read_only_matrix<scalar_t>(dyB),
                                            read_only_matrix<scalar_t>(lora_A), writable_matrix<scalar_t>(dx),
                                            scaling, dropout, stream));
                                      });
    }
  }
  Tensor dA = dropout_p == 0.0 ? at::mm(dyB.t(), x).mul_(scaling)
                               : lora_a_grad_with_dropout(x, dyB, scaling, dropout, n);
  return lora_grads(std::move(dx), std::move(dA), std::move(dB), grad_y, x, needs_dweight, needs_dbias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  impl_forward_backward(m, kLoraLinearOps, &lora_linear_forward_cuda, &lora_linear_backward_cuda);
}

}  // namespace lowrank

// Names and input validation shared by the CPU and CUDA kernels of
// lowrank::lora_linear_forward_native and lowrank::lora_linear_backward_native.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "native_op_utils.h"

namespace lowrank {

// The ops' names (schemas: csrc/lora_linear.cpp), for error messages and kernel registration.
constexpr NativeOpNames kLoraLinearOps{"lora_linear_forward_native", "lora_linear_backward_native"};

// Problem sizes: x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r].
struct LoraSizes {
  int64_t M, K, N, r;
};

// The backward's outputs, in the schema's order: (dx, dweight, dbias, dA, dB).
using LoraGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

namespace detail {

inline LoraSizes check_lora_inputs(const OperandChecks& check, c10::DeviceType device_type, const at::Tensor& x,
                                   const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  check_rows_input(check.op, x, "x", "[M, K]", device_type);
  TORCH_CHECK(weight.dim() == 2, check.op, ": weight must be 2-D [N, K], got shape ", shape_text(weight.sizes()));
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(0) >= 1, check.op,
              ": lora_A must be 2-D [r, K] with r >= 1, got shape ", shape_text(lora_A.sizes()));
  const LoraSizes n{x.size(0), x.size(1), weight.size(0), lora_A.size(0)};
  check(weight, "weight", {n.N, n.K}, "[N, K]");
  check(lora_A, "lora_A", {n.r, n.K}, "[r, K]");
  check(lora_B, "lora_B", {n.N, n.r}, "[N, r]");
  return n;
}

}  // namespace detail

inline LoraSizes check_forward_inputs(c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                      const at::Tensor& lora_B, double dropout_p,
                                      const std::optional<at::Tensor>& seed) {
  const OperandChecks check{kLoraLinearOps.forward, x, "x"};
  const LoraSizes n = detail::check_lora_inputs(check, device_type, x, weight, lora_A, lora_B);
  check(bias, "bias", {n.N}, "[N]");
  check_dropout(check.op, dropout_p, seed, x);
  return n;
}

inline LoraSizes check_backward_inputs(c10::DeviceType device_type, const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& lora_A,
                                       const at::Tensor& lora_B, double dropout_p,
                                       const std::optional<at::Tensor>& seed) {
  const OperandChecks check{kLoraLinearOps.backward, x, "x"};
  const LoraSizes n = detail::check_lora_inputs(check, device_type, x, weight, lora_A, lora_B);
  check(grad_y, "grad_y", {n.M, n.N}, "[M, N]");
  check(xa, "xa", {n.M, n.r}, "[M, r]");
  check_dropout(check.op, dropout_p, seed, x);
  return n;
}

// y = x·Wᵀ + b + scaling·xa·Bᵀ, from xa = dropout(x)·Aᵀ. The scaling multiplies B, not the GEMM's
// alpha: BLAS may skip the product at alpha = 0, which would hide a NaN in xa or B.
inline at::Tensor lora_output(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& xa, const at::Tensor& lora_B, double scaling) {
  at::Tensor y = linear_output(x, weight.t(), bias);
  y.addmm_(xa, lora_B.mul(scaling).t());
  return y;
}

// The backward's outputs from the device kernel's dx, dA and dB, with the base layer's dweight
// and dbias (or empty tensors where not needed).
inline LoraGrads lora_grads(at::Tensor dx, at::Tensor dA, at::Tensor dB, const at::Tensor& grad_y, const at::Tensor& x,
                            bool needs_dweight, bool needs_dbias) {
  auto [dweight, dbias] = linear_weight_bias_grads(grad_y, x, needs_dweight, needs_dbias);
  return {std::move(dx), std::move(dweight), std::move(dbias), std::move(dA), std::move(dB)};
}

}  // namespace lowrank

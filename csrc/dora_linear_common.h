// Input checks and the ATen algebra shared by the CPU and CUDA kernels of
// lowrank::dora_linear_forward_native and lowrank::dora_linear_backward_native (the maths:
// lowrank/ops/dora_linear.py). The device files bring what differs: the dropout mask, the fused
// forward epilogue and the reduction behind dm.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

#include "lora_linear_common.h"

namespace lowrank {

// The dtype of the norm, ‖W‖²_row and g: fp64 for fp64 inputs, fp32 for every other.
inline at::ScalarType dora_accumulate_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace detail {

inline void check_accumulate_vector(const char* op, const at::Tensor& t, const char* name, int64_t N,
                                    const at::Tensor& x) {
  check_shape(op, t, name, {N}, "[N]");
  const auto expected = dora_accumulate_dtype(x.scalar_type());
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " has dtype ", t.scalar_type(), "; with x in ",
              x.scalar_type(), " it must be ", expected);
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all inputs must be on one device");
}

inline void check_magnitude_and_bias(const char* op, const at::Tensor& magnitude, const std::optional<at::Tensor>& bias,
                                     const at::Tensor& x, int64_t N) {
  check_shape(op, magnitude, "magnitude", {N}, "[N]");
  check_same_dtype_device(op, magnitude, "magnitude", x);
  if (bias.has_value() && bias->defined()) {
    check_shape(op, *bias, "bias", {N}, "[N]");
    check_same_dtype_device(op, *bias, "bias", x);
  }
}

}  // namespace detail

inline LoraSizes check_dora_forward_inputs(const char* op, c10::DeviceType device_type, const at::Tensor& x,
                                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                           const at::Tensor& magnitude, const at::Tensor& weight_norm_sq,
                                           double dropout_p, const std::optional<at::Tensor>& seed) {
  const LoraSizes n = check_forward_inputs(op, device_type, x, weight, bias, lora_A, lora_B, dropout_p, seed);
  detail::check_magnitude_and_bias(op, magnitude, bias, x, n.N);
  detail::check_accumulate_vector(op, weight_norm_sq, "weight_norm_sq", n.N, x);
  return n;
}

inline LoraSizes check_dora_backward_inputs(const char* op, c10::DeviceType device_type, const at::Tensor& grad_y,
                                            const at::Tensor& x, const at::Tensor& xa, const at::Tensor& y_or_z,
                                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            const at::Tensor& magnitude, const at::Tensor& norm, double dropout_p,
                                            const std::optional<at::Tensor>& seed) {
  const LoraSizes n =
      check_backward_inputs(op, device_type, grad_y, x, xa, weight, lora_A, lora_B, dropout_p, seed);
  detail::check_shape(op, y_or_z, dropout_p == 0.0 ? "y_or_z (y, as dropout_p = 0)" : "y_or_z (z, as dropout_p > 0)",
                      {n.M, n.N}, "[M, N]");
  detail::check_same_dtype_device(op, y_or_z, "y_or_z", x);
  detail::check_magnitude_and_bias(op, magnitude, bias, x, n.N);
  detail::check_accumulate_vector(op, norm, "norm", n.N, x);
  return n;
}

// n = sqrt(max(‖W‖²_row + Σ_r B⊙(2s·W·Aᵀ + s²·B·(A·Aᵀ)), 0)) [N], in weight_norm_sq's dtype:
// the norm of W + s·B·A without forming it, from W·Aᵀ and B·(A·Aᵀ), both [N, r] (the device
// files form these small products: ATen's fp32 GEMMs of this size take milliseconds on CPU).
inline at::Tensor column_norm(const at::Tensor& weight_norm_sq, const at::Tensor& weight_times_a,
                              const at::Tensor& lora_B, const at::Tensor& b_times_aat, double scaling) {
  const auto acc = weight_norm_sq.scalar_type();
  const at::Tensor cross = at::add(weight_times_a.to(acc) * (2.0 * scaling), b_times_aat.to(acc), scaling * scaling);
  return (weight_norm_sq + (lora_B.to(acc) * cross).sum(1)).clamp_min_(0.0).sqrt_();
}

// g = m / n, 0 where n = 0, in the norm's dtype.
inline at::Tensor column_scale(const at::Tensor& magnitude, const at::Tensor& norm) {
  return at::where(norm > 0, magnitude.to(norm.scalar_type()) / norm, at::zeros({}, norm.options()));
}

// Σ_rows dy⊙z from dots = Σ_rows dy⊙(y − b) = g·Σ_rows dy⊙z where g ≠ 0; where g = 0 the dots
// already hold Σ_rows dy⊙z (z recomputed).
inline at::Tensor unscale_recovered(const at::Tensor& dots, const at::Tensor& scale) {
  return at::where(scale != 0, dots / scale, dots);
}

// dm = Σ_rows dy⊙z / n, 0 where n = 0, in dtype.
inline at::Tensor magnitude_grad(const at::Tensor& dy_z, const at::Tensor& norm, at::ScalarType dtype) {
  return at::where(norm > 0, dy_z / norm, at::zeros({}, norm.options())).to(dtype);
}

// PEFT's training forward with dropout, (y, xa, z):
//   xa = (D⊙x)·Aᵀ   z = (D⊙x)·Wᵀ + s·xa·Bᵀ   y = x·Wᵀ + b + (g − 1)⊙z + s·xa·Bᵀ
// drop(t) returns D⊙t for an [M, K] tensor (the mask of the device's kernels). D⊙x is one [M, K]
// temporary; this path takes two GEMMs over W in any case.
template <typename Drop>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_dropout_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                    const std::optional<at::Tensor>& bias,
                                                                    const at::Tensor& lora_A,
                                                                    const at::Tensor& lora_B, const at::Tensor& scale,
                                                                    double scaling, const Drop& drop) {
  const at::Tensor x_drop = drop(x);
  at::Tensor xa = at::mm(x_drop, lora_A.t());
  at::Tensor z = at::mm(x_drop, weight.t());
  z.addmm_(xa, lora_B.t(), 1.0, scaling);
  at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addcmul_(z, (scale - 1).to(x.scalar_type()));  // g − 1 before rounding: in bf16, g near 1 would give 0
  y.addmm_(xa, lora_B.t(), 1.0, scaling);
  return {std::move(y), std::move(xa), std::move(z)};
}

// Its backward, (dx, dweight, dA, dB), H = (g − 1)⊙dy:
//   dx = dy·W + D⊙(H·W + s·dyB·A)   dA = s·dyBᵀ·(D⊙x)   dB = s·(g⊙dy)ᵀ·xa   dW = dyᵀ·x + Hᵀ·(D⊙x)
// with dyB = (g⊙dy)·B; gradients not needed are undefined. dm = Σ_rows dy⊙z / n and db are the
// device's column sums.
template <typename Drop>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_dropout_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& xa, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scale, double scaling, bool needs_dx,
    bool needs_dweight, const Drop& drop) {
  const auto dtype = x.scalar_type();
  const at::Tensor scaled_grad = grad_y * scale.to(dtype);
  const at::Tensor shifted_grad = grad_y * (scale - 1).to(dtype);
  const at::Tensor dyB = at::mm(scaled_grad, lora_B);
  at::Tensor dB = at::mm(scaled_grad.t(), xa).mul_(scaling);
  const at::Tensor x_drop = drop(x);
  at::Tensor dA = at::mm(dyB.t(), x_drop).mul_(scaling);
  at::Tensor dx, dweight;
  if (needs_dx) {
    at::Tensor masked = at::mm(shifted_grad, weight);
    masked.addmm_(dyB, lora_A, 1.0, scaling);
    dx = at::mm(grad_y, weight).add_(drop(masked));
  }
  if (needs_dweight) {
    dweight = at::mm(grad_y.t(), x).add_(at::mm(shifted_grad.t(), x_drop));
  }
  return {std::move(dx), std::move(dweight), std::move(dA), std::move(dB)};
}

}  // namespace lowrank

// Names, input checks and the ATen algebra shared by the CPU and CUDA kernels of
// lowrank::dora_linear_forward_native and lowrank::dora_linear_backward_native (the maths:
// lowrank/ops/dora_linear.py). The device files bring what differs: the dropout mask, the fused
// forward epilogue and the reduction behind dm. As in lora_linear_common.h, the scaling s
// multiplies small factors, never a GEMM's alpha or beta.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>
#include <utility>

#include "lora_linear_common.h"
#include "native_op_utils.h"

namespace lowrank {

// The ops' names (schemas: csrc/dora_linear.cpp), for error messages and kernel registration.
constexpr NativeOpNames kDoraLinearOps{"dora_linear_forward_native", "dora_linear_backward_native"};

// The forward's outputs, (y, xa, norm, z), and the backward's, (dx, dweight, dbias, dA, dB,
// dmagnitude), in the schemas' order.
using DoraOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using DoraGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The dtype of the norm, ‖W‖²_row and g: fp64 for fp64 inputs, fp32 for every other.
inline at::ScalarType dora_accumulate_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace detail {

// An [N] vector of the accumulate dtype (weight_norm_sq, norm) on x's device.
inline void check_accumulate_vector(const OperandChecks& check, const at::Tensor& t, const char* name, int64_t N) {
  check_shape(check.op, t, name, {N}, "[N]");
  const auto expected = dora_accumulate_dtype(check.lead.scalar_type());
  TORCH_CHECK(t.scalar_type() == expected, check.op, ": ", name, " has dtype ", t.scalar_type(), "; with x in ",
              check.lead.scalar_type(), " it must be ", expected);
  TORCH_CHECK(t.device() == check.lead.device(), check.op, ": ", name, " is on ", t.device(), " but x is on ",
              check.lead.device(), "; all inputs must be on one device");
}

}  // namespace detail

inline LoraSizes check_dora_forward_inputs(c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                           const at::Tensor& lora_B, const at::Tensor& magnitude,
                                           const at::Tensor& weight_norm_sq, double dropout_p,
                                           const std::optional<at::Tensor>& seed) {
  const OperandChecks check{kDoraLinearOps.forward, x, "x"};
  const LoraSizes n = detail::check_lora_inputs(check, device_type, x, weight, lora_A, lora_B);
  check(bias, "bias", {n.N}, "[N]");
  check(magnitude, "magnitude", {n.N}, "[N]");
  detail::check_accumulate_vector(check, weight_norm_sq, "weight_norm_sq", n.N);
  check_dropout(check.op, dropout_p, seed, x);
  return n;
}

inline LoraSizes check_dora_backward_inputs(c10::DeviceType device_type, const at::Tensor& grad_y,
                                            const at::Tensor& x, const at::Tensor& xa, const at::Tensor& y_or_z,
                                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            const at::Tensor& magnitude, const at::Tensor& norm, double dropout_p,
                                            const std::optional<at::Tensor>& seed) {
  const OperandChecks check{kDoraLinearOps.backward, x, "x"};
  const LoraSizes n = detail::check_lora_inputs(check, device_type, x, weight, lora_A, lora_B);
  check(grad_y, "grad_y", {n.M, n.N}, "[M, N]");
  check(xa, "xa", {n.M, n.r}, "[M, r]");
  check(y_or_z, dropout_p == 0.0 ? "y_or_z (y, as dropout_p = 0)" : "y_or_z (z, as dropout_p > 0)", {n.M, n.N},
        "[M, N]");
  check(bias, "bias", {n.N}, "[N]");
  check(magnitude, "magnitude", {n.N}, "[N]");
  detail::check_accumulate_vector(check, norm, "norm", n.N);
  check_dropout(check.op, dropout_p, seed, x);
  return n;
}

// n = sqrt(max(‖W‖²_row + Σ_r B⊙(2s·W·Aᵀ + s²·B·(A·Aᵀ)), 0)) [N], in weight_norm_sq's dtype:
// the norm of W + s·B·A without forming it, from W·Aᵀ and B·(A·Aᵀ), both [N, r] (the device
// files form these small products: ATen's fp32 GEMMs of this size take milliseconds on CPU).
inline at::Tensor column_norm(const at::Tensor& weight_norm_sq, const at::Tensor& weight_times_a,
                              const at::Tensor& lora_B, const at::Tensor& b_times_aat, double scaling) {
  const auto acc = weight_norm_sq.scalar_type();
  const at::Tensor cross = weight_times_a.to(acc) * (2.0 * scaling) + b_times_aat.to(acc) * (scaling * scaling);
  return (weight_norm_sq + (lora_B.to(acc) * cross).sum(1)).clamp_min_(0.0).sqrt_();
}

// g = m / n, 0 where n = 0 (NaN where n is), in the norm's dtype.
inline at::Tensor column_scale(const at::Tensor& magnitude, const at::Tensor& norm) {
  return at::where(norm == 0, at::zeros({}, norm.options()), magnitude.to(norm.scalar_type()) / norm);
}

// Σ_rows dy⊙z from dots = Σ_rows dy⊙(y − b) = g·Σ_rows dy⊙z where g ≠ 0; where g = 0 the dots
// already hold Σ_rows dy⊙z (z recomputed).
inline at::Tensor unscale_recovered(const at::Tensor& dots, const at::Tensor& scale) {
  return at::where(scale != 0, dots / scale, dots);
}

// dm = Σ_rows dy⊙z / n, 0 where n = 0, in dtype.
inline at::Tensor magnitude_grad(const at::Tensor& dy_z, const at::Tensor& norm, at::ScalarType dtype) {
  return at::where(norm == 0, at::zeros({}, norm.options()), dy_z / norm).to(dtype);
}

// The backward's outputs from the device's dx, dweight, dA and dB, its column sums [2, N] (row 1:
// Σ_rows dy, which becomes db, in x's dtype and not a view of sums) and dy_z = Σ_rows dy⊙z.
inline DoraGrads dora_grads(at::Tensor dx, at::Tensor dweight, at::Tensor dA, at::Tensor dB, const at::Tensor& sums,
                            const at::Tensor& dy_z, const at::Tensor& norm, const at::Tensor& x, bool needs_dbias) {
  at::Tensor dbias = needs_dbias ? sums[1].to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true) : skipped_grad(x);
  return {std::move(dx), std::move(dweight), std::move(dbias), std::move(dA), std::move(dB),
          magnitude_grad(dy_z, norm, x.scalar_type())};
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
  const at::Tensor scaled_xa = xa.mul(scaling);
  at::Tensor z = at::mm(x_drop, weight.t());
  z.addmm_(scaled_xa, lora_B.t());
  at::Tensor y = linear_output(x, weight.t(), bias);
  y.addcmul_(z, (scale - 1).to(x.scalar_type()));  // g − 1 before rounding: in bf16, g near 1 would give 0
  y.addmm_(scaled_xa, lora_B.t());
  return {std::move(y), std::move(xa), std::move(z)};
}

// Its backward, H = (g − 1)⊙dy:
//   dx = dy·W + D⊙(H·W + s·dyB·A)   dA = s·dyBᵀ·(D⊙x)   dB = s·(g⊙dy)ᵀ·xa   dW = dyᵀ·x + Hᵀ·(D⊙x)
// with dyB = (g⊙dy)·B; dm = Σ_rows dy⊙z / n and db from the device's column sums [2, N] of
// dy⊙z and dy (z: the forward's).
template <typename Drop>
DoraGrads dora_dropout_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& xa,
                                const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                const at::Tensor& norm, const at::Tensor& scale, const at::Tensor& sums, double scaling,
                                bool needs_dx, bool needs_dweight, bool needs_dbias, const Drop& drop) {
  const auto dtype = x.scalar_type();
  const at::Tensor scaled_grad = grad_y * scale.to(dtype);
  const at::Tensor shifted_grad = grad_y * (scale - 1).to(dtype);
  const at::Tensor scaled_dyB = at::mm(scaled_grad, lora_B).mul_(scaling);
  at::Tensor dB = at::mm(scaled_grad.t(), xa).mul_(scaling);
  const at::Tensor x_drop = drop(x);
  at::Tensor dA = at::mm(scaled_dyB.t(), x_drop);
  at::Tensor dx = skipped_grad(x), dweight = skipped_grad(x);
  if (needs_dx) {
    at::Tensor masked = at::mm(shifted_grad, weight);
    masked.addmm_(scaled_dyB, lora_A);
    dx = at::mm(grad_y, weight).add_(drop(masked));
  }
  if (needs_dweight) {
    dweight = at::mm(grad_y.t(), x).add_(at::mm(shifted_grad.t(), x_drop));
  }
  return dora_grads(std::move(dx), std::move(dweight), std::move(dA), std::move(dB), sums, sums[0], norm, x,
                    needs_dbias);
}

}  // namespace lowrank

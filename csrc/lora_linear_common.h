// Input validation and small helpers shared by the CPU and CUDA kernels of
// lowrank::lora_linear_forward_native and lowrank::lora_linear_backward_native.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

namespace lowrank {

// Problem sizes: x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r].
struct LoraSizes {
  int64_t M, K, N, r;
};

namespace detail {

inline std::string shape_text(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

inline void check_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef expected,
                        const char* meaning) {
  TORCH_CHECK(t.sizes().equals(expected), op, ": ", name, " must have shape ", meaning, " = ",
              shape_text(expected), ", got ", shape_text(t.sizes()));
}

inline void check_same_dtype_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but x has ",
              x.scalar_type(), "; all floating-point inputs must share x's dtype");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all inputs must be on one device");
}

inline void check_x(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K] (flatten leading dims first), got shape ",
              shape_text(x.sizes()));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x has dtype ", dtype, "; supported dtypes are float32, float64, float16 and bfloat16");
  TORCH_CHECK(x.device().type() == device_type, op, ": this kernel expects tensors on ", device_type,
              " but x is on ", x.device());
}

inline void check_dropout(const char* op, double dropout_p, const std::optional<at::Tensor>& seed,
                          const at::Tensor& x) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) {
    return;
  }
  TORCH_CHECK(seed.has_value() && seed->defined(), op, ": dropout_p = ", dropout_p,
              " > 0 needs a seed: a 0-dim int64 tensor on ", x.device());
  TORCH_CHECK(seed->dim() == 0 && seed->scalar_type() == at::kLong, op,
              ": seed must be a 0-dim int64 tensor, got shape ", shape_text(seed->sizes()), " and dtype ",
              seed->scalar_type());
  TORCH_CHECK(seed->device() == x.device(), op, ": seed is on ", seed->device(), " but x is on ", x.device(),
              "; it must be on the data's device");
}

inline void check_lora_factors(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& lora_A, const at::Tensor& lora_B) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [N, K], got shape ", shape_text(weight.sizes()));
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(0) >= 1, op, ": lora_A must be 2-D [r, K] with r >= 1, got shape ",
              shape_text(lora_A.sizes()));
  const int64_t K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  check_shape(op, weight, "weight", {N, K}, "[N, K]");
  check_shape(op, lora_A, "lora_A", {r, K}, "[r, K]");
  check_shape(op, lora_B, "lora_B", {N, r}, "[N, r]");
  check_same_dtype_device(op, weight, "weight", x);
  check_same_dtype_device(op, lora_A, "lora_A", x);
  check_same_dtype_device(op, lora_B, "lora_B", x);
}

}  // namespace detail

inline LoraSizes check_forward_inputs(const char* op, c10::DeviceType device_type, const at::Tensor& x,
                                      const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& lora_A, const at::Tensor& lora_B, double dropout_p,
                                      const std::optional<at::Tensor>& seed) {
  detail::check_x(op, x, device_type);
  detail::check_lora_factors(op, x, weight, lora_A, lora_B);
  const LoraSizes sizes{x.size(0), x.size(1), weight.size(0), lora_A.size(0)};
  if (bias.has_value() && bias->defined()) {
    detail::check_shape(op, *bias, "bias", {sizes.N}, "[N]");
    detail::check_same_dtype_device(op, *bias, "bias", x);
  }
  detail::check_dropout(op, dropout_p, seed, x);
  return sizes;
}

inline LoraSizes check_backward_inputs(const char* op, c10::DeviceType device_type, const at::Tensor& grad_y,
                                       const at::Tensor& x, const at::Tensor& xa, const at::Tensor& weight,
                                       const at::Tensor& lora_A, const at::Tensor& lora_B, double dropout_p,
                                       const std::optional<at::Tensor>& seed) {
  detail::check_x(op, x, device_type);
  detail::check_lora_factors(op, x, weight, lora_A, lora_B);
  const LoraSizes sizes{x.size(0), x.size(1), weight.size(0), lora_A.size(0)};
  detail::check_shape(op, grad_y, "grad_y", {sizes.M, sizes.N}, "[M, N]");
  detail::check_same_dtype_device(op, grad_y, "grad_y", x);
  detail::check_shape(op, xa, "xa", {sizes.M, sizes.r}, "[M, r]");
  detail::check_same_dtype_device(op, xa, "xa", x);
  detail::check_dropout(op, dropout_p, seed, x);
  return sizes;
}

// Accumulator dtype for sums of per-chunk GEMM products: fp32 for half and bfloat16, so the
// chunked sum rounds once per chunk like a single GEMM would, not once per running sum.
inline at::ScalarType chunk_accumulate_dtype(at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

// acc += scaling · a·b, for acc of chunk_accumulate_dtype(a's dtype). The scaling multiplies the
// small factor a, not the GEMM's alpha, so a NaN in a or b propagates at scaling 0 as well.
inline void accumulate_product(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, double scaling) {
  const at::Tensor scaled = a.mul(scaling);
  if (acc.scalar_type() == a.scalar_type()) {
    acc.addmm_(scaled, b);
  } else {
    acc.add_(at::mm(scaled, b));
  }
}

}  // namespace lowrank

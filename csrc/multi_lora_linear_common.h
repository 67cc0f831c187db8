// Input validation and per-adapter dropout shared by the CPU and CUDA kernels of
// lowrank::multi_lora_linear_forward_native and lowrank::multi_lora_linear_backward_native.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "hash_dropout.h"
#include "lora_linear_common.h"

namespace lowrank {

// Problem sizes: x [M, K], weight [N, K], lora_A [n, r, K], lora_B [n, N, r].
struct MultiLoraSizes {
  int64_t M, K, N, r, n;
};

// One adapter's dropout as the kernels apply it: elements whose hash is below `threshold` are
// dropped, kept ones scaled by keep_scale = 1 / (1 - p). active is false for p = 0.
struct AdapterDropout {
  bool active;
  uint32_t threshold;
  double keep_scale;
};

namespace detail {

inline void check_multi_factors(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lora_A, const at::Tensor& lora_B) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [N, K], got shape ", shape_text(weight.sizes()));
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(0) >= 1 && lora_A.size(1) >= 1, op,
              ": lora_A must be 3-D [n_adapters, r, K] with n_adapters >= 1 and r >= 1, got shape ",
              shape_text(lora_A.sizes()));
  const int64_t K = x.size(1), N = weight.size(0), n = lora_A.size(0), r = lora_A.size(1);
  check_shape(op, weight, "weight", {N, K}, "[N, K]");
  check_shape(op, lora_A, "lora_A", {n, r, K}, "[n_adapters, r, K]");
  check_shape(op, lora_B, "lora_B", {n, N, r}, "[n_adapters, N, r]");
  check_same_dtype_device(op, weight, "weight", x);
  check_same_dtype_device(op, lora_A, "lora_A", x);
  check_same_dtype_device(op, lora_B, "lora_B", x);
}

// The index's values are checked where the rows are grouped (CPU) or by a device assert (CUDA).
inline void check_adapter_index(const char* op, const at::Tensor& adapter_index, const at::Tensor& x) {
  TORCH_CHECK(adapter_index.scalar_type() == at::kInt || adapter_index.scalar_type() == at::kLong, op,
              ": adapter_index must be an int32 or int64 tensor, got dtype ", adapter_index.scalar_type());
  check_shape(op, adapter_index, "adapter_index", {x.size(0)}, "[M]");
  TORCH_CHECK(adapter_index.device() == x.device(), op, ": adapter_index is on ", adapter_index.device(),
              " but x is on ", x.device(), "; all inputs must be on one device");
}

inline void check_per_adapter(const char* op, at::ArrayRef<double> scaling, at::ArrayRef<double> dropout_p,
                              int64_t n, const std::optional<at::Tensor>& seed, const at::Tensor& x) {
  TORCH_CHECK(static_cast<int64_t>(scaling.size()) == n, op, ": scaling must hold one number per adapter (", n,
              "), got ", scaling.size());
  TORCH_CHECK(static_cast<int64_t>(dropout_p.size()) == n, op, ": dropout_p must hold one number per adapter (", n,
              "), got ", dropout_p.size());
  for (const double p : dropout_p) {
    check_dropout(op, p, seed, x);
  }
}

}  // namespace detail

inline MultiLoraSizes check_multi_forward_inputs(const char* op, c10::DeviceType device_type, const at::Tensor& x,
                                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                 const at::Tensor& adapter_index, const at::Tensor& lora_A,
                                                 const at::Tensor& lora_B, at::ArrayRef<double> scaling,
                                                 at::ArrayRef<double> dropout_p,
                                                 const std::optional<at::Tensor>& seed) {
  detail::check_x(op, x, device_type);
  detail::check_multi_factors(op, x, weight, lora_A, lora_B);
  const MultiLoraSizes sizes{x.size(0), x.size(1), weight.size(0), lora_A.size(1), lora_A.size(0)};
  if (bias.has_value() && bias->defined()) {
    detail::check_shape(op, *bias, "bias", {sizes.N}, "[N]");
    detail::check_same_dtype_device(op, *bias, "bias", x);
  }
  detail::check_adapter_index(op, adapter_index, x);
  detail::check_per_adapter(op, scaling, dropout_p, sizes.n, seed, x);
  return sizes;
}

inline MultiLoraSizes check_multi_backward_inputs(const char* op, c10::DeviceType device_type,
                                                  const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& xa,
                                                  const at::Tensor& weight, const at::Tensor& adapter_index,
                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                  at::ArrayRef<double> scaling, at::ArrayRef<double> dropout_p,
                                                  const std::optional<at::Tensor>& seed) {
  detail::check_x(op, x, device_type);
  detail::check_multi_factors(op, x, weight, lora_A, lora_B);
  const MultiLoraSizes sizes{x.size(0), x.size(1), weight.size(0), lora_A.size(1), lora_A.size(0)};
  detail::check_shape(op, grad_y, "grad_y", {sizes.M, sizes.N}, "[M, N]");
  detail::check_same_dtype_device(op, grad_y, "grad_y", x);
  detail::check_shape(op, xa, "xa", {sizes.M, sizes.r}, "[M, r]");
  detail::check_same_dtype_device(op, xa, "xa", x);
  detail::check_adapter_index(op, adapter_index, x);
  detail::check_per_adapter(op, scaling, dropout_p, sizes.n, seed, x);
  return sizes;
}

inline std::vector<AdapterDropout> adapter_dropouts(at::ArrayRef<double> dropout_p) {
  std::vector<AdapterDropout> dropouts;
  for (const double p : dropout_p) {
    dropouts.push_back({p > 0.0, dropout_threshold(p), 1.0 / (1.0 - p)});
  }
  return dropouts;
}

inline bool any_dropout(at::ArrayRef<double> dropout_p) {
  for (const double p : dropout_p) {
    if (p > 0.0) {
      return true;
    }
  }
  return false;
}

}  // namespace lowrank

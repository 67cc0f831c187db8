// Names, input validation and per-adapter dropout shared by the CPU and CUDA kernels of
// lowrank::multi_lora_linear_forward_native and lowrank::multi_lora_linear_backward_native.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "hash_dropout.h"
#include "native_op_utils.h"

namespace lowrank {

// The ops' names (schemas: csrc/multi_lora_linear.cpp), for error messages and kernel registration.
constexpr NativeOpNames kMultiLoraLinearOps{"multi_lora_linear_forward_native", "multi_lora_linear_backward_native"};

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

// The checks the forward and the backward share; the index's values are checked where the rows
// are grouped (CPU) or by a device assert (CUDA).
inline MultiLoraSizes check_multi_lora_inputs(const OperandChecks& check, c10::DeviceType device_type,
                                              const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& adapter_index, const at::Tensor& lora_A,
                                              const at::Tensor& lora_B, at::ArrayRef<double> scaling,
                                              at::ArrayRef<double> dropout_p, const std::optional<at::Tensor>& seed) {
  check_rows_input(check.op, x, "x", "[M, K]", device_type);
  TORCH_CHECK(weight.dim() == 2, check.op, ": weight must be 2-D [N, K], got shape ", shape_text(weight.sizes()));
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(0) >= 1 && lora_A.size(1) >= 1, check.op,
              ": lora_A must be 3-D [n_adapters, r, K] with n_adapters >= 1 and r >= 1, got shape ",
              shape_text(lora_A.sizes()));
  const MultiLoraSizes n{x.size(0), x.size(1), weight.size(0), lora_A.size(1), lora_A.size(0)};
  check(weight, "weight", {n.N, n.K}, "[N, K]");
  check(lora_A, "lora_A", {n.n, n.r, n.K}, "[n_adapters, r, K]");
  check(lora_B, "lora_B", {n.n, n.N, n.r}, "[n_adapters, N, r]");
  TORCH_CHECK(adapter_index.scalar_type() == at::kInt || adapter_index.scalar_type() == at::kLong, check.op,
              ": adapter_index must be an int32 or int64 tensor, got dtype ", adapter_index.scalar_type());
  check_shape(check.op, adapter_index, "adapter_index", {n.M}, "[M]");
  TORCH_CHECK(adapter_index.device() == x.device(), check.op, ": adapter_index is on ", adapter_index.device(),
              " but x is on ", x.device(), "; all inputs must be on one device");
  TORCH_CHECK(static_cast<int64_t>(scaling.size()) == n.n, check.op, ": scaling must hold one number per adapter (",
              n.n, "), got ", scaling.size());
  TORCH_CHECK(static_cast<int64_t>(dropout_p.size()) == n.n, check.op,
              ": dropout_p must hold one number per adapter (", n.n, "), got ", dropout_p.size());
  for (const double p : dropout_p) {
    check_dropout(check.op, p, seed, x);
  }
  return n;
}

}  // namespace detail

inline MultiLoraSizes check_multi_forward_inputs(c10::DeviceType device_type, const at::Tensor& x,
                                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                 const at::Tensor& adapter_index, const at::Tensor& lora_A,
                                                 const at::Tensor& lora_B, at::ArrayRef<double> scaling,
                                                 at::ArrayRef<double> dropout_p,
                                                 const std::optional<at::Tensor>& seed) {
  const OperandChecks check{kMultiLoraLinearOps.forward, x, "x"};
  const MultiLoraSizes n = detail::check_multi_lora_inputs(check, device_type, x, weight, adapter_index, lora_A,
                                                           lora_B, scaling, dropout_p, seed);
  check(bias, "bias", {n.N}, "[N]");
  return n;
}

inline MultiLoraSizes check_multi_backward_inputs(c10::DeviceType device_type, const at::Tensor& grad_y,
                                                  const at::Tensor& x, const at::Tensor& xa,
                                                  const at::Tensor& weight, const at::Tensor& adapter_index,
                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                  at::ArrayRef<double> scaling, at::ArrayRef<double> dropout_p,
                                                  const std::optional<at::Tensor>& seed) {
  const OperandChecks check{kMultiLoraLinearOps.backward, x, "x"};
  const MultiLoraSizes n = detail::check_multi_lora_inputs(check, device_type, x, weight, adapter_index, lora_A,
                                                           lora_B, scaling, dropout_p, seed);
  check(grad_y, "grad_y", {n.M, n.N}, "[M, N]");
  check(xa, "xa", {n.M, n.r}, "[M, r]");
  return n;
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

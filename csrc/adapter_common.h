// Names and input validation shared by the CPU and CUDA kernels of
// lowrank::adapter_forward_native and lowrank::adapter_backward_native.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "adapter_activation.h"
#include "native_op_utils.h"

namespace lowrank {

// The ops' names (schemas: csrc/adapter.cpp), for error messages and kernel registration.
constexpr NativeOpNames kAdapterOps{"adapter_forward_native", "adapter_backward_native"};

// Problem sizes: h [M, D], w_down [Bn, D], w_up [D, Bn].
struct AdapterSizes {
  int64_t M, D, Bn;
};

inline Activation parse_activation(const char* op, std::string_view name) {
  if (name == "relu") return Activation::Relu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "silu") return Activation::Silu;
  TORCH_CHECK(false, op, ": unknown activation '", name, "'; expected relu, gelu or silu");
}

namespace detail {

inline AdapterSizes check_adapter_weights(const OperandChecks& check, c10::DeviceType device_type,
                                          const at::Tensor& h, const at::Tensor& w_down, const at::Tensor& w_up) {
  check_rows_input(check.op, h, "h", "[M, D]", device_type);
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(0) >= 1, check.op,
              ": w_down must be 2-D [Bn, D] with Bn >= 1, got shape ", shape_text(w_down.sizes()));
  const AdapterSizes n{h.size(0), h.size(1), w_down.size(0)};
  TORCH_CHECK(n.Bn <= n.D, check.op, ": bottleneck ", n.Bn, " is larger than dim ", n.D, " (w_down shape ",
              shape_text(w_down.sizes()), ")");
  check(w_down, "w_down", {n.Bn, n.D}, "[Bn, D]");
  check(w_up, "w_up", {n.D, n.Bn}, "[D, Bn]");
  return n;
}

}  // namespace detail

inline AdapterSizes check_adapter_forward_inputs(c10::DeviceType device_type, const at::Tensor& h,
                                                 const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                                                 const at::Tensor& w_up, const std::optional<at::Tensor>& b_up) {
  const OperandChecks check{kAdapterOps.forward, h, "h"};
  const AdapterSizes n = detail::check_adapter_weights(check, device_type, h, w_down, w_up);
  check(b_down, "b_down", {n.Bn}, "[Bn]");
  check(b_up, "b_up", {n.D}, "[D]");
  return n;
}

inline AdapterSizes check_adapter_backward_inputs(c10::DeviceType device_type, const at::Tensor& grad_out,
                                                  const at::Tensor& h, const at::Tensor& z, const at::Tensor& w_down,
                                                  const at::Tensor& w_up) {
  const OperandChecks check{kAdapterOps.backward, h, "h"};
  const AdapterSizes n = detail::check_adapter_weights(check, device_type, h, w_down, w_up);
  check(grad_out, "grad_out", {n.M, n.D}, "[M, D]");
  check(z, "z", {n.M, n.Bn}, "[M, Bn]");
  return n;
}

}  // namespace lowrank

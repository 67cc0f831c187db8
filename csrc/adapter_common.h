// Input validation shared by the CPU and CUDA kernels of lowrank::adapter_forward_native and
// lowrank::adapter_backward_native.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "adapter_activation.h"
#include "lora_linear_common.h"

namespace lowrank {

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

inline void check_like_h(const char* op, const at::Tensor& t, const char* name, const at::Tensor& h) {
  TORCH_CHECK(t.scalar_type() == h.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but h has ",
              h.scalar_type(), "; all floating-point inputs must share h's dtype");
  TORCH_CHECK(t.device() == h.device(), op, ": ", name, " is on ", t.device(), " but h is on ", h.device(),
              "; all inputs must be on one device");
}

inline AdapterSizes check_adapter_weights(const char* op, c10::DeviceType device_type, const at::Tensor& h,
                                          const at::Tensor& w_down, const at::Tensor& w_up) {
  TORCH_CHECK(h.dim() == 2, op, ": h must be 2-D [M, D] (flatten leading dims first), got shape ",
              shape_text(h.sizes()));
  const auto dtype = h.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": h has dtype ", dtype, "; supported dtypes are float32, float64, float16 and bfloat16");
  TORCH_CHECK(h.device().type() == device_type, op, ": this kernel expects tensors on ", device_type,
              " but h is on ", h.device());
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(0) >= 1, op,
              ": w_down must be 2-D [Bn, D] with Bn >= 1, got shape ", shape_text(w_down.sizes()));
  const AdapterSizes n{h.size(0), h.size(1), w_down.size(0)};
  TORCH_CHECK(n.Bn <= n.D, op, ": bottleneck ", n.Bn, " is larger than dim ", n.D, " (w_down shape ",
              shape_text(w_down.sizes()), ")");
  check_shape(op, w_down, "w_down", {n.Bn, n.D}, "[Bn, D]");
  check_shape(op, w_up, "w_up", {n.D, n.Bn}, "[D, Bn]");
  check_like_h(op, w_down, "w_down", h);
  check_like_h(op, w_up, "w_up", h);
  return n;
}

}  // namespace detail

inline AdapterSizes check_adapter_forward_inputs(const char* op, c10::DeviceType device_type, const at::Tensor& h,
                                                 const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                                                 const at::Tensor& w_up, const std::optional<at::Tensor>& b_up) {
  const AdapterSizes n = detail::check_adapter_weights(op, device_type, h, w_down, w_up);
  if (b_down.has_value() && b_down->defined()) {
    detail::check_shape(op, *b_down, "b_down", {n.Bn}, "[Bn]");
    detail::check_like_h(op, *b_down, "b_down", h);
  }
  if (b_up.has_value() && b_up->defined()) {
    detail::check_shape(op, *b_up, "b_up", {n.D}, "[D]");
    detail::check_like_h(op, *b_up, "b_up", h);
  }
  return n;
}

inline AdapterSizes check_adapter_backward_inputs(const char* op, c10::DeviceType device_type,
                                                  const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& z,
                                                  const at::Tensor& w_down, const at::Tensor& w_up) {
  const AdapterSizes n = detail::check_adapter_weights(op, device_type, h, w_down, w_up);
  detail::check_shape(op, grad_out, "grad_out", {n.M, n.D}, "[M, D]");
  detail::check_like_h(op, grad_out, "grad_out", h);
  detail::check_shape(op, z, "z", {n.M, n.Bn}, "[M, Bn]");
  detail::check_like_h(op, z, "z", h);
  return n;
}

}  // namespace lowrank

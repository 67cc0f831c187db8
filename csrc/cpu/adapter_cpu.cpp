// CPU kernels of lowrank::adapter_forward_native and lowrank::adapter_backward_native.
//
// The GEMMs go to MKL through at::mm/addmm with every add folded into them: b_down rides
// addmm's beta epilogue, and the up projection accumulates onto h (+ s·b_up) in place, so
// `out` is the only [M, D] tensor written. The activation work runs in one parallel pass
// over the small [M, Bn] tile, and scaling is folded into it (a_s = s·act(z)), so no GEMM
// result needs a second pass. The backward works the same way: dz = (g·W_u)⊙(s·act'(z)) in
// place, dh accumulated onto g by addmm.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../adapter_common.h"

namespace lowrank {
namespace {

using at::Tensor;

constexpr const char* kForwardOp = "adapter_forward_native";
constexpr const char* kBackwardOp = "adapter_backward_native";
// Smallest piece of elementwise work worth handing to another thread.
constexpr int64_t kParallelGrainElements = int64_t{1} << 14;

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(cols, 1)); }

// a_s = s·act(z) for contiguous [M, Bn] tensors.
template <typename scalar_t>
void scaled_activation(const Tensor& z, Tensor& a_s, Activation act, double scaling) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t cols = z.size(1);
  const scalar_t* z_data = z.const_data_ptr<scalar_t>();
  scalar_t* a_data = a_s.mutable_data_ptr<scalar_t>();
  const opmath_t s = static_cast<opmath_t>(scaling);
  at::parallel_for(0, z.size(0), grain_rows(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * cols; i < end * cols; ++i) {
      a_data[i] = static_cast<scalar_t>(s * activate(act, static_cast<opmath_t>(z_data[i])));
    }
  });
}

// dz ← dz ⊙ s·act'(z) in place (dz holds g·W_u on entry), and, when a_s is given,
// a_s = s·act(z): one pass over z for both. All contiguous [M, Bn].
template <typename scalar_t>
void activation_backward(const Tensor& z, Tensor& dz, std::optional<Tensor>& a_s, Activation act, double scaling) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t cols = z.size(1);
  const scalar_t* z_data = z.const_data_ptr<scalar_t>();
  scalar_t* dz_data = dz.mutable_data_ptr<scalar_t>();
  scalar_t* a_data = a_s.has_value() ? a_s->mutable_data_ptr<scalar_t>() : nullptr;
  const opmath_t s = static_cast<opmath_t>(scaling);
  at::parallel_for(0, z.size(0), grain_rows(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * cols; i < end * cols; ++i) {
      const opmath_t zi = static_cast<opmath_t>(z_data[i]);
      dz_data[i] = static_cast<scalar_t>(static_cast<opmath_t>(dz_data[i]) * s * activate_grad(act, zi));
      if (a_data != nullptr) {
        a_data[i] = static_cast<scalar_t>(s * activate(act, zi));
      }
    }
  });
}

std::tuple<Tensor, Tensor> adapter_forward_cpu(const Tensor& h, const Tensor& w_down,
                                               const std::optional<Tensor>& b_down, const Tensor& w_up,
                                               const std::optional<Tensor>& b_up, c10::string_view activation,
                                               double scaling, bool residual) {
  check_adapter_forward_inputs(kForwardOp, c10::DeviceType::CPU, h, w_down, b_down, w_up, b_up);
  const Activation act = parse_activation(kForwardOp, activation);
  const bool has_b_down = b_down.has_value() && b_down->defined();
  const bool has_b_up = b_up.has_value() && b_up->defined();

  Tensor z = has_b_down ? at::addmm(*b_down, h, w_down.t()) : at::mm(h, w_down.t());
  Tensor a_s = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "lowrank_adapter_activation",
                                  [&] { scaled_activation<scalar_t>(z, a_s, act, scaling); });

  Tensor out;
  if (residual && has_b_up) {
    out = at::add(h, *b_up, scaling);
    out.addmm_(a_s, w_up.t());
  } else if (residual) {
    out = at::addmm(h, a_s, w_up.t());
  } else if (has_b_up) {
    out = at::addmm(*b_up, a_s, w_up.t(), scaling, 1.0);
  } else {
    out = at::mm(a_s, w_up.t());
  }
  return {std::move(out), std::move(z)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_backward_cpu(
    const Tensor& grad_out, const Tensor& h, const Tensor& z_in, const Tensor& w_down, const Tensor& w_up,
    c10::string_view activation, double scaling, bool residual, bool needs_dh, bool needs_dw_down,
    bool needs_db_down, bool needs_dw_up, bool needs_db_up) {
  check_adapter_backward_inputs(kBackwardOp, c10::DeviceType::CPU, grad_out, h, z_in, w_down, w_up);
  const Activation act = parse_activation(kBackwardOp, activation);
  const auto not_needed = [&] { return at::empty({0}, h.options()); };
  const Tensor z = z_in.contiguous();

  Tensor dz = at::mm(grad_out, w_up);
  std::optional<Tensor> a_s;
  if (needs_dw_up) {
    a_s = at::empty_like(dz);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "lowrank_adapter_activation_backward",
                                  [&] { activation_backward<scalar_t>(z, dz, a_s, act, scaling); });

  Tensor dh = not_needed();
  if (needs_dh) {
    dh = residual ? at::addmm(grad_out, dz, w_down) : at::mm(dz, w_down);
  }
  Tensor dw_down = needs_dw_down ? at::mm(dz.t(), h) : not_needed();
  Tensor db_down = needs_db_down ? dz.sum(0) : not_needed();
  Tensor dw_up = needs_dw_up ? at::mm(grad_out.t(), *a_s) : not_needed();
  Tensor db_up = needs_db_up ? grad_out.sum(0).mul_(scaling) : not_needed();
  return {std::move(dh), std::move(dw_down), std::move(db_down), std::move(dw_up), std::move(db_up)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("adapter_forward_native", &adapter_forward_cpu);
  m.impl("adapter_backward_native", &adapter_backward_cpu);
}

}  // namespace lowrank

// What the ATen side of every native op shares (csrc/<op>_common.h, csrc/cpu/<op>_cpu.cpp,
// csrc/cuda/<op>_cuda.cpp): kernel registration; input checks whose errors name the op, the
// tensor and what was expected; Tensor? arguments; gradients a backward was not asked for; the
// base linear layer of the LoRA-style ops; chunked sums; CPU work sizes. The framework-free CUDA
// side of the same idea is csrc/cuda/kernel_utils.cuh.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

namespace lowrank {

// ---- Registration

// The names of an op's forward and backward native ops, as its schema file csrc/<op>.cpp
// defines them; <op>_common.h holds them for the error messages and the registrations.
struct NativeOpNames {
  const char* forward;
  const char* backward;
};

// Registers an op's two kernels in a TORCH_LIBRARY_IMPL(lowrank, <device>, m) block.
template <typename Forward, typename Backward>
void impl_forward_backward(torch::Library& m, const NativeOpNames& names, Forward* forward, Backward* backward) {
  m.impl(names.forward, forward);
  m.impl(names.backward, backward);
}

// ---- Inputs

// A Tensor? argument that is not given arrives as nullopt or as an undefined tensor.
inline bool is_given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

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

// An op's leading input (x, h, grad): one of the dtypes the kernels are instantiated for, on the
// device type of the kernel that was called.
inline void check_kernel_input(const char* op, const at::Tensor& t, const char* name, c10::DeviceType device_type) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": ", name, " has dtype ", dtype, "; supported dtypes are float32, float64, float16 and bfloat16");
  TORCH_CHECK(t.device().type() == device_type, op, ": this kernel expects tensors on ", device_type, " but ", name,
              " is on ", t.device());
}

// The same for a batch of rows, `meaning` its shape in words ("[M, K]").
inline void check_rows_input(const char* op, const at::Tensor& t, const char* name, const char* meaning,
                             c10::DeviceType device_type) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D ", meaning, " (flatten leading dims first), got shape ",
              shape_text(t.sizes()));
  check_kernel_input(op, t, name, device_type);
}

// Checks the other floating-point inputs of one call against its leading input: each must have
// its expected shape and the leading input's dtype and device.
struct OperandChecks {
  const char* op;
  const at::Tensor& lead;
  const char* lead_name;

  void operator()(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* meaning) const {
    check_shape(op, t, name, expected, meaning);
    TORCH_CHECK(t.scalar_type() == lead.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                lead_name, " has ", lead.scalar_type(), "; all floating-point inputs must share ", lead_name,
                "'s dtype");
    TORCH_CHECK(t.device() == lead.device(), op, ": ", name, " is on ", t.device(), " but ", lead_name, " is on ",
                lead.device(), "; all inputs must be on one device");
  }

  // A Tensor? input is checked when it is given.
  void operator()(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef expected,
                  const char* meaning) const {
    if (is_given(t)) {
      (*this)(*t, name, expected, meaning);
    }
  }
};

// dropout_p and seed of an op with the hash dropout of hash_dropout.h: the seed is a 0-dim int64
// tensor on the data's device, needed when dropout_p > 0.
inline void check_dropout(const char* op, double dropout_p, const std::optional<at::Tensor>& seed,
                          const at::Tensor& x) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) {
    return;
  }
  TORCH_CHECK(is_given(seed), op, ": dropout_p = ", dropout_p, " > 0 needs a seed: a 0-dim int64 tensor on ",
              x.device());
  TORCH_CHECK(seed->dim() == 0 && seed->scalar_type() == at::kLong, op,
              ": seed must be a 0-dim int64 tensor, got shape ", shape_text(seed->sizes()), " and dtype ",
              seed->scalar_type());
  TORCH_CHECK(seed->device() == x.device(), op, ": seed is on ", seed->device(), " but x is on ", x.device(),
              "; it must be on the data's device");
}

// ---- Outputs

// A gradient the backward was not asked for (its needs_* argument is false): an empty tensor.
inline at::Tensor skipped_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// y = x·w_t (+ bias), w_t being the weight's transpose: the bias goes in the GEMM's beta = 1
// epilogue.
inline at::Tensor linear_output(const at::Tensor& x, const at::Tensor& w_t, const std::optional<at::Tensor>& bias) {
  return is_given(bias) ? at::addmm(*bias, x, w_t) : at::mm(x, w_t);
}

// The gradients of the base layer y = x·Wᵀ + b: dW = dyᵀ·x and db = Σ_rows dy, or skipped.
inline std::pair<at::Tensor, at::Tensor> linear_weight_bias_grads(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  bool needs_dweight, bool needs_dbias) {
  return {needs_dweight ? at::mm(grad_y.t(), x) : skipped_grad(x), needs_dbias ? grad_y.sum(0) : skipped_grad(x)};
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

// ---- Work sizes

// Smallest piece of elementwise CPU work worth handing to another thread (128 KiB of fp32).
constexpr int64_t kParallelGrainElements = int64_t{1} << 15;

// How many rows of row_length elements make about `elements` elements; at least one.
inline int64_t rows_in(int64_t elements, int64_t row_length) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(row_length, 1));
}

}  // namespace lowrank

// Names, input checks and the strided walk shared by the CPU and CUDA kernels of
// lowrank::grad_reverse_backward_native(_).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "native_op_utils.h"

namespace lowrank {

// The ops' names (schemas: csrc/grad_reverse.cpp), for error messages and kernel registration.
constexpr const char* kGradReverseOp = "grad_reverse_backward_native";
constexpr const char* kGradReverseInPlaceOp = "grad_reverse_backward_native_";

inline void check_grad_reverse_inputs(const char* op, const at::Tensor& grad, const at::Tensor& lambda,
                                      c10::DeviceType device_type) {
  check_kernel_input(op, grad, "grad", device_type);
  TORCH_CHECK(grad.layout() == at::kStrided, op, ": grad must be a strided tensor, got layout ", grad.layout());
  TORCH_CHECK(lambda.dim() == 0 && lambda.scalar_type() == at::kDouble, op,
              ": lambda_ must be a 0-dim float64 tensor, got shape ", lambda.sizes(), " and dtype ",
              lambda.scalar_type());
  TORCH_CHECK(lambda.device().is_cpu() || lambda.device() == grad.device(), op, ": lambda_ is on ",
              lambda.device(), " but grad is on ", grad.device(), "; it must be on the CPU or on grad's device");
}

inline void check_overwritable(const char* op, const at::Tensor& grad) {
  TORCH_CHECK(grad.is_non_overlapping_and_dense(), op,
              ": in place needs a dense gradient (no overlapping elements, no stride 0), got sizes ", grad.sizes(),
              " and strides ", grad.strides());
}

// A non-dense gradient read in the memory order of its dense output: sizes and strides of grad
// from the output's outermost dim to its innermost, size-1 dims dropped and row-major-adjacent
// dims merged. Element i of the output (flat, in memory) is grad's element at row-major index i.
struct StridedWalk {
  std::vector<int64_t> order;  // the output's dims, outermost first
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
};

inline StridedWalk strided_walk(const at::Tensor& grad, const at::Tensor& out) {
  StridedWalk walk;
  walk.order.resize(out.dim());
  std::iota(walk.order.begin(), walk.order.end(), int64_t{0});
  std::stable_sort(walk.order.begin(), walk.order.end(),
                   [&](int64_t a, int64_t b) { return out.stride(a) > out.stride(b); });
  for (const int64_t dim : walk.order) {
    const int64_t size = grad.size(dim), stride = grad.stride(dim);
    if (size == 1) {
      continue;
    }
    if (!walk.sizes.empty() && walk.strides.back() == stride * size) {
      walk.sizes.back() *= size;
      walk.strides.back() = stride;
    } else {
      walk.sizes.push_back(size);
      walk.strides.push_back(stride);
    }
  }
  return walk;
}

}  // namespace lowrank

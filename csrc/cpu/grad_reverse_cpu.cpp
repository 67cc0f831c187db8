// CPU kernels of lowrank::grad_reverse_backward_native (out-of-place) and
// lowrank::grad_reverse_backward_native_ (in place): out = −λ·grad in one read and one write.
//
// A dense gradient is a flat array (its output has the same strides), split across threads
// and scaled by a loop the compiler vectorises. Any other gradient is walked in its
// output's memory order: each thread takes a range of output elements and reads grad through
// the merged sizes and strides, one innermost run at a time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../grad_reverse_common.h"

namespace lowrank {
namespace {

using at::Tensor;

// Element conversions to and from the opmath type. bfloat16 is done on the bits, branch-free
// (c10::BFloat16's round-to-nearest-even, NaN kept quiet), so the loops below vectorise; float16
// goes through c10::Half, which compilers do not vectorise without F16C: slower than a copy on CPU
// (backend "auto" measures that and picks the torch backend there).
template <typename scalar_t>
inline at::opmath_type<scalar_t> widen(scalar_t v) {
  return static_cast<at::opmath_type<scalar_t>>(v);
}
template <>
inline float widen<at::BFloat16>(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename scalar_t>
inline scalar_t narrow(at::opmath_type<scalar_t> v) {
  return static_cast<scalar_t>(v);
}
template <>
inline at::BFloat16 narrow<at::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return at::BFloat16(v != v ? uint16_t{0x7FC0} : rounded, at::BFloat16::from_bits());
}

// out[k] = neg_lambda · in[k·in_stride] for k < count; out may equal in when in_stride is 1.
// The unit-stride loop is written for the compiler's vectoriser.
template <typename scalar_t>
void scale_run(const scalar_t* in, int64_t in_stride, scalar_t* out, int64_t count,
               at::opmath_type<scalar_t> neg_lambda) {
  if (in_stride == 1) {
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) {
      out[k] = narrow<scalar_t>(neg_lambda * widen(in[k]));
    }
    return;
  }
  for (int64_t k = 0; k < count; ++k) {
    out[k] = narrow<scalar_t>(neg_lambda * widen(in[k * in_stride]));
  }
}

template <typename scalar_t>
void scale_dense(const scalar_t* in, scalar_t* out, int64_t numel, at::opmath_type<scalar_t> neg_lambda) {
  at::parallel_for(0, numel, kParallelGrainElements, [&](int64_t begin, int64_t end) {
    scale_run(in + begin, 1, out + begin, end - begin, neg_lambda);
  });
}

template <typename scalar_t>
void scale_strided(const scalar_t* in, const StridedWalk& walk, scalar_t* out, int64_t numel,
                   at::opmath_type<scalar_t> neg_lambda) {
  const int64_t dims = static_cast<int64_t>(walk.sizes.size());
  const int64_t inner = walk.sizes.back(), inner_stride = walk.strides.back();
  at::parallel_for(0, numel, kParallelGrainElements, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      int64_t rem = i / inner, offset = (i % inner) * inner_stride;
      for (int64_t d = dims - 2; d >= 0; --d) {
        offset += (rem % walk.sizes[d]) * walk.strides[d];
        rem /= walk.sizes[d];
      }
      const int64_t run = std::min(inner - i % inner, end - i);
      scale_run(in + offset, inner_stride, out + i, run, neg_lambda);
      i += run;
    }
  });
}

double lambda_value(const Tensor& lambda) { return lambda.item<double>(); }

Tensor grad_reverse_backward_cpu(const Tensor& grad, const Tensor& lambda) {
  check_grad_reverse_inputs(kGradReverseOp, grad, lambda, c10::DeviceType::CPU);
  Tensor out = at::empty_like(grad);
  if (grad.numel() == 0) {
    return out;
  }
  const double neg_lambda = -lambda_value(lambda);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), kGradReverseOp, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    if (grad.is_non_overlapping_and_dense()) {  // out has grad's strides: both are flat arrays
      scale_dense(grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), grad.numel(),
                  static_cast<opmath_t>(neg_lambda));
    } else {
      scale_strided(grad.const_data_ptr<scalar_t>(), strided_walk(grad, out), out.mutable_data_ptr<scalar_t>(),
                    grad.numel(), static_cast<opmath_t>(neg_lambda));
    }
  });
  return out;
}

void grad_reverse_backward_cpu_(const Tensor& grad, const Tensor& lambda) {
  check_grad_reverse_inputs(kGradReverseInPlaceOp, grad, lambda, c10::DeviceType::CPU);
  check_overwritable(kGradReverseInPlaceOp, grad);
  if (grad.numel() == 0) {
    return;
  }
  const double neg_lambda = -lambda_value(lambda);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), kGradReverseInPlaceOp, [&] {
    scalar_t* data = grad.mutable_data_ptr<scalar_t>();
    scale_dense(data, data, grad.numel(), static_cast<at::opmath_type<scalar_t>>(neg_lambda));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl(kGradReverseOp, &grad_reverse_backward_cpu);
  m.impl(kGradReverseInPlaceOp, &grad_reverse_backward_cpu_);
}

}  // namespace lowrank

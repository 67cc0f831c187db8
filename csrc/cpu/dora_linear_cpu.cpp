// CPU kernels of lowrank::dora_linear_forward_native and lowrank::dora_linear_backward_native.
//
// The large GEMMs go to MKL through at::mm/addmm, as in lora_linear_cpu.cpp. Without dropout,
// when the batch is taller than the weight is wide (fp32, fp64), the column scale is merged with
// the LoRA update into the weight, W' = g⊙(W + s·B·A), an [N, K] temporary: the forward is one
// GEMM with the bias in MKL's beta = 1 epilogue, and dx = dy·W' one more. Otherwise the forward
// runs x·Wᵀ, the low-rank addmm_ and one pass that scales each column by g and adds b.
// For fp32 on AVX-512 CPUs the rank-r products go to skinny_gemm.h through lora_linear's pieces
// (lora_linear_cpu.h): W·Aᵀ for the norm, x·Aᵀ, the merge, and a backward that walks row blocks
// of dy once for dyB, dA, dB and the column sums behind dm and db.
// dm: z = (y − b)/g is recovered from the saved output where g ≠ 0; the columns with g = 0 (rare)
// recompute z = x·W[j]ᵀ + s·xa·B[j]ᵀ. With dropout, the shared ATen path of dora_linear_common.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../dora_linear_common.h"
#include "lora_linear_cpu.h"

namespace lowrank {
namespace {

using at::Tensor;

// The norm n [N] (column_norm), its small products A·Aᵀ [r, r] and B·(A·Aᵀ) [N, r] on the skinny
// kernels for fp32: through ATen, oneDNN took milliseconds for them here.
Tensor norm_of(const Tensor& weight_norm_sq, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_A_t,
               const Tensor& lora_B, double scaling) {
  Tensor b_times_aat;
  if (cpu::skinny_kernels_fit(lora_A) && cpu::skinny_kernels_fit(lora_B)) {
    b_times_aat = cpu::rows_times_small(lora_B, cpu::rows_times_small(lora_A, lora_A_t));
  } else {
    const Tensor A = lora_A.to(weight_norm_sq.scalar_type());
    b_times_aat = at::mm(lora_B.to(A.scalar_type()), at::mm(A, A.t()));
  }
  return column_norm(weight_norm_sq, cpu::rows_times_small(weight, lora_A_t), lora_B, b_times_aat, scaling);
}

// y[i, j] ← g[j]·y[i, j] + b[j] in place, in the op-math type; y is contiguous.
template <typename scalar_t>
void scale_columns_add_bias(Tensor& y, const Tensor& scale, const std::optional<Tensor>& bias) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t M = y.size(0), N = y.size(1);
  const Tensor g = scale.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
  const Tensor b = is_given(bias) ? bias->to(g.scalar_type()).contiguous() : at::zeros({N}, g.options());
  const opmath_t* g_data = g.const_data_ptr<opmath_t>();
  const opmath_t* b_data = b.const_data_ptr<opmath_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  at::parallel_for(0, M, rows_in(kParallelGrainElements, N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* row = y_data + i * N;
      for (int64_t j = 0; j < N; ++j) {
        row[j] = static_cast<scalar_t>(g_data[j] * static_cast<opmath_t>(row[j]) + b_data[j]);
      }
    }
  });
}

// dots[j] += Σ_i dy[i, j]·(y[i, j] − b[j]) and dbias[j] += Σ_i dy[i, j] over `rows` rows
// (strided dy, y, b), in the op-math type.
template <typename scalar_t, typename opmath_t>
void accumulate_column_sums(const scalar_t* dy, int64_t dy_row_stride, int64_t dy_col_stride, const scalar_t* y,
                            int64_t y_row_stride, int64_t y_col_stride, const opmath_t* b, int64_t rows, int64_t N,
                            opmath_t* dots, opmath_t* dbias) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* dy_row = dy + i * dy_row_stride;
    const scalar_t* y_row = y + i * y_row_stride;
    for (int64_t j = 0; j < N; ++j) {
      const opmath_t grad = static_cast<opmath_t>(dy_row[j * dy_col_stride]);
      dots[j] += grad * (static_cast<opmath_t>(y_row[j * y_col_stride]) - b[j]);
      dbias[j] += grad;
    }
  }
}

// [2, N] in the op-math dtype: Σ_rows dy⊙(y − b) and Σ_rows dy, each thread summing its rows
// privately (any strides, any dtype).
Tensor column_sums(const Tensor& grad_y, const Tensor& y, const std::optional<Tensor>& bias, at::ScalarType acc) {
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M / 64));
  Tensor partial = at::zeros({parts, 2, N}, grad_y.options().dtype(acc));
  const Tensor b = is_given(bias) ? bias->to(acc).contiguous() : at::zeros({N}, partial.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "lowrank_dora_column_sums", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* dy_data = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    const opmath_t* b_data = b.const_data_ptr<opmath_t>();
    opmath_t* out = partial.data_ptr<opmath_t>();
    at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
      for (int64_t part = part_begin; part < part_end; ++part) {
        const int64_t row = M * part / parts, rows = M * (part + 1) / parts - row;
        accumulate_column_sums<scalar_t, opmath_t>(dy_data + row * grad_y.stride(0), grad_y.stride(0),
                                                   grad_y.stride(1), y_data + row * y.stride(0), y.stride(0),
                                                   y.stride(1), b_data, rows, N, out + part * 2 * N,
                                                   out + part * 2 * N + N);
      }
    });
  });
  return partial.sum(0);
}

// fp32, no dropout, unit column strides: (dyB, dA, dB, sums) on lora_linear's walk over row blocks
// of dy (cpu::skinny_backward) with g folded into B, dyB = dy·(g⊙B), and the column sums [2, N] =
// Σ_rows dy⊙(y − b), Σ_rows dy on each block while it is in cache; dB's rows are scaled by g at
// the end.
std::tuple<Tensor, Tensor, Tensor, Tensor> skinny_backward(const Tensor& grad_y, const Tensor& x, const Tensor& xa,
                                                           const Tensor& y, const std::optional<Tensor>& bias,
                                                           const Tensor& lora_B, const Tensor& scale, double scaling,
                                                           const LoraSizes& n) {
  const Tensor b = is_given(bias) ? bias->contiguous() : at::zeros({n.N}, x.options());
  Tensor sum_parts = at::zeros({cpu::skinny_backward_parts(n.M), 2, n.N}, x.options());
  const float* dy_data = grad_y.const_data_ptr<float>();
  const float* y_data = y.const_data_ptr<float>();
  const float* b_data = b.const_data_ptr<float>();
  float* sum_data = sum_parts.data_ptr<float>();
  const int64_t ld_dy = grad_y.stride(0), ld_y = y.stride(0);
  auto [dyB, dA, dB] = cpu::skinny_backward(
      grad_y, x, xa, lora_B * scale.unsqueeze(1), scaling, n, [&](int64_t part, int64_t row, int64_t rows) {
        float* sums = sum_data + part * 2 * n.N;
        accumulate_column_sums<float, float>(dy_data + row * ld_dy, ld_dy, 1, y_data + row * ld_y, ld_y, 1, b_data,
                                             rows, n.N, sums, sums + n.N);
      });
  dB.mul_(scale.unsqueeze(1));
  return {std::move(dyB), std::move(dA), std::move(dB), sum_parts.sum(0)};
}

// Σ_rows dy⊙z for the columns with g = 0 and n > 0, written over their entries of dots: their z
// cannot come from y, so it is recomputed, x·W[j]ᵀ + s·xa·B[j]ᵀ.
void recompute_zero_scale_columns(Tensor& dots, const Tensor& grad_y, const Tensor& x, const Tensor& xa,
                                  const Tensor& weight, const Tensor& lora_B, const Tensor& scale, const Tensor& norm,
                                  double scaling) {
  const Tensor columns = ((scale == 0) & (norm > 0)).nonzero().squeeze(1);
  if (columns.numel() == 0) {
    return;
  }
  Tensor z = at::mm(x, weight.index_select(0, columns).t());
  accumulate_product(z, xa, lora_B.index_select(0, columns).t(), scaling);
  const auto acc = dots.scalar_type();
  dots.index_copy_(0, columns, (grad_y.index_select(1, columns).to(acc) * z.to(acc)).sum(0));
}

// drop(t) = D⊙t for an [M, K] tensor, with the mask of lora_linear's CPU kernels.
auto make_drop(const std::optional<Tensor>& seed, double dropout_p) {
  return [mask = cpu::make_mask(seed, dropout_p)](const Tensor& t) { return cpu::dropped(t, mask); };
}

DoraOutputs dora_linear_forward_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                    const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude,
                                    const Tensor& weight_norm_sq, double scaling, double dropout_p,
                                    const std::optional<Tensor>& seed) {
  const LoraSizes n = check_dora_forward_inputs(c10::DeviceType::CPU, x, weight, bias, lora_A, lora_B, magnitude,
                                                weight_norm_sq, dropout_p, seed);
  const Tensor lora_A_t = lora_A.t().contiguous();
  Tensor norm = norm_of(weight_norm_sq, weight, lora_A, lora_A_t, lora_B, scaling);
  const Tensor scale = column_scale(magnitude, norm);
  if (dropout_p > 0.0) {
    auto [y, xa, z] = dora_dropout_forward(x, weight, bias, lora_A, lora_B, scale, scaling, make_drop(seed, dropout_p));
    return {std::move(y), std::move(xa), std::move(norm), std::move(z)};
  }
  Tensor xa = cpu::rows_times_small(x, lora_A_t);
  Tensor y;
  if (cpu::merging_pays_off(x.scalar_type(), n.M, n.K)) {
    y = linear_output(x, cpu::merged_weight(weight, lora_A, lora_B, scaling, scale.to(x.scalar_type())).t(), bias);
  } else {
    y = lora_output(x, weight, std::nullopt, xa, lora_B, scaling);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_dora_epilogue",
                                    [&] { scale_columns_add_bias<scalar_t>(y, scale, bias); });
  }
  return {std::move(y), std::move(xa), std::move(norm), at::empty({0}, x.options())};
}

DoraGrads dora_linear_backward_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& y_or_z,
                                   const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                                   const Tensor& lora_B, const Tensor& magnitude, const Tensor& norm, double scaling,
                                   double dropout_p, const std::optional<Tensor>& seed, bool needs_dx,
                                   bool needs_dweight, bool needs_dbias) {
  const LoraSizes n = check_dora_backward_inputs(c10::DeviceType::CPU, grad_y, x, xa, y_or_z, weight, bias, lora_A,
                                                 lora_B, magnitude, norm, dropout_p, seed);
  const auto dtype = x.scalar_type();
  const Tensor scale = column_scale(magnitude, norm);
  if (dropout_p > 0.0) {
    const Tensor sums = column_sums(grad_y, y_or_z, std::nullopt, scale.scalar_type());  // Σ dy⊙z, Σ dy
    return dora_dropout_backward(grad_y, x, xa, weight, lora_A, lora_B, norm, scale, sums, scaling, needs_dx,
                                 needs_dweight, needs_dbias, make_drop(seed, dropout_p));
  }

  const Tensor& y = y_or_z;
  const Tensor scale_x = scale.to(dtype);
  Tensor dyB, dA, dB, sums;
  if (cpu::skinny_kernels_fit(grad_y) && cpu::skinny_kernels_fit(x) && cpu::skinny_kernels_fit(y)) {
    std::tie(dyB, dA, dB, sums) = skinny_backward(grad_y, x, xa, y, bias, lora_B, scale, scaling, n);
  } else {
    dyB = at::mm(grad_y, lora_B * scale_x.unsqueeze(1));
    dA = at::mm(dyB.t(), x).mul_(scaling);
    dB = at::mm(grad_y.t(), xa).mul_(scale_x.unsqueeze(1)).mul_(scaling);
    sums = column_sums(grad_y, y, bias, scale.scalar_type());
  }
  Tensor dots = sums[0];
  recompute_zero_scale_columns(dots, grad_y, x, xa, weight, lora_B, scale, norm, scaling);

  Tensor dx = skipped_grad(x);
  if (needs_dx && cpu::merging_pays_off(dtype, n.M, n.N)) {
    dx = at::mm(grad_y, cpu::merged_weight(weight, lora_A, lora_B, scaling, scale_x));
  } else if (needs_dx) {
    dx = at::mm(grad_y * scale_x, weight);
    dx.addmm_(dyB, lora_A.mul(scaling));
  }
  Tensor dweight = needs_dweight ? at::mm(grad_y.t(), x).mul_(scale_x.unsqueeze(1)) : skipped_grad(x);
  return dora_grads(std::move(dx), std::move(dweight), std::move(dA), std::move(dB), sums,
                    unscale_recovered(dots, scale), norm, x, needs_dbias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  impl_forward_backward(m, kDoraLinearOps, &dora_linear_forward_cpu, &dora_linear_backward_cpu);
}

}  // namespace lowrank

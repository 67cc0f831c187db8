// CPU kernels of lowrank::dora_linear_forward_native and lowrank::dora_linear_backward_native.
//
// The large GEMMs go to MKL through at::mm/addmm, as in lora_linear_cpu.cpp. Without dropout,
// when the batch is taller than the weight is wide (fp32, fp64), the column scale is merged with
// the LoRA update into the weight, W' = g⊙(W + s·B·A), an [N, K] temporary: the forward is one
// GEMM with the bias in MKL's beta = 1 epilogue, and dx = dy·W' one more. Otherwise the forward
// runs x·Wᵀ, the low-rank addmm_ and one pass that scales each column by g and adds b.
// For fp32 on AVX-512 CPUs the rank-r products go to skinny_gemm.h: W·Aᵀ for the norm, x·Aᵀ,
// the merge, and a backward that walks row blocks of dy once for dyB, dA, dB and the column sums
// behind dm and db.
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
#include "../hash_dropout.h"
#include "skinny_gemm.h"

namespace lowrank {
namespace {

using at::Tensor;

constexpr const char* kForwardOp = "dora_linear_forward_native";
constexpr const char* kBackwardOp = "dora_linear_backward_native";

// Smallest piece of elementwise work worth handing to another thread.
constexpr int64_t kParallelGrainElements = int64_t{1} << 15;
// Rows handed to one thread at a time by the skinny kernels (a multiple of their row blocks).
constexpr int64_t kSkinnyGrainRows = 48;
// Row block of the fused backward: its slice of dy stays in cache from dy·B to the column sums
// (lora_linear_cpu.cpp measured 24 rows best for the same walk).
constexpr int64_t kBackwardBlockRows = 24;

int64_t parallel_grain_rows(int64_t cols) {
  return std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(cols, 1));
}

bool has_values(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// The skinny kernels read fp32 matrices with unit column stride (any row stride).
bool skinny_kernels_fit(const Tensor& t) {
  return t.scalar_type() == at::kFloat && (t.size(1) <= 1 || t.stride(1) == 1) && cpu::skinny_kernels_available();
}

// As in lora_linear_cpu.cpp: merging costs N·K·r flops and an [N, K] write, and replaces a pass
// over the [rows, cols] output; reduced precision never merges (rounding W' would swallow the update).
bool merging_pays_off(at::ScalarType dtype, int64_t rows, int64_t weight_cols) {
  return (dtype == at::kFloat || dtype == at::kDouble) && rows > weight_cols;
}

// rows[M, L]·small[L, c] for a contiguous small: x·Aᵀ, and the norm's W·Aᵀ, A·Aᵀ and B·(A·Aᵀ).
Tensor rows_times_small(const Tensor& rows, const Tensor& small) {
  if (!skinny_kernels_fit(rows)) {
    return at::mm(rows, small);
  }
  const int64_t M = rows.size(0), L = rows.size(1), r = small.size(1), ld = rows.stride(0);
  Tensor out = at::empty({M, r}, rows.options());
  const float* rows_data = rows.const_data_ptr<float>();
  const float* a_data = small.const_data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, M, kSkinnyGrainRows, [&](int64_t begin, int64_t end) {
    cpu::rows_times_skinny(rows_data + begin * ld, ld, end - begin, L, a_data, r, out_data + begin * r, r);
  });
  return out;
}

// The norm n [N] (column_norm), its small products on the skinny kernels for fp32: through ATen,
// oneDNN took milliseconds for A·Aᵀ [r, r] and B·(A·Aᵀ) [N, r] here.
Tensor norm_of(const Tensor& weight_norm_sq, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_A_t,
               const Tensor& lora_B, double scaling) {
  const auto acc = weight_norm_sq.scalar_type();
  Tensor b_times_aat;
  if (skinny_kernels_fit(lora_A) && skinny_kernels_fit(lora_B)) {
    b_times_aat = rows_times_small(lora_B, rows_times_small(lora_A, lora_A_t));
  } else {
    const Tensor A = lora_A.to(acc);
    b_times_aat = at::mm(lora_B.to(acc), at::mm(A, A.t()));
  }
  return column_norm(weight_norm_sq, rows_times_small(weight, lora_A_t), lora_B, b_times_aat, scaling);
}

// W' = g⊙(W + s·B·A) [N, K], for fp32 or fp64 (g in the same dtype).
Tensor scaled_merged_weight(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scaling,
                            const Tensor& scale) {
  if (!skinny_kernels_fit(weight)) {
    return at::addmm(weight, lora_B, lora_A, 1.0, scaling).mul_(scale.unsqueeze(1));
  }
  const int64_t N = weight.size(0), K = weight.size(1), r = lora_A.size(0), ld = weight.stride(0);
  const Tensor A = lora_A.contiguous(), B = lora_B.contiguous(), g = scale.contiguous();
  Tensor merged = at::empty({N, K}, weight.options());
  const float* w_data = weight.const_data_ptr<float>();
  const float* a_data = A.const_data_ptr<float>();
  const float* b_data = B.const_data_ptr<float>();
  const float* g_data = g.const_data_ptr<float>();
  float* out_data = merged.data_ptr<float>();
  at::parallel_for(0, N, parallel_grain_rows(K), [&](int64_t begin, int64_t end) {
    cpu::add_skinny_times_rows(w_data + begin * ld, ld, b_data + begin * r, a_data, end - begin, K, r,
                               static_cast<float>(scaling), out_data + begin * K);
    for (int64_t row = begin; row < end; ++row) {  // scaled while the rows are still in cache
      float* out_row = out_data + row * K;
      const float g_row = g_data[row];
      for (int64_t k = 0; k < K; ++k) {
        out_row[k] *= g_row;
      }
    }
  });
  return merged;
}

// y[i, j] ← g[j]·y[i, j] + b[j] in place, in the op-math type; y is contiguous.
template <typename scalar_t>
void scale_columns_add_bias(Tensor& y, const Tensor& scale, const std::optional<Tensor>& bias) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t M = y.size(0), N = y.size(1);
  const Tensor g = scale.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
  const Tensor b = has_values(bias) ? bias->to(g.scalar_type()).contiguous() : at::zeros({N}, g.options());
  const opmath_t* g_data = g.const_data_ptr<opmath_t>();
  const opmath_t* b_data = b.const_data_ptr<opmath_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  at::parallel_for(0, M, parallel_grain_rows(N), [&](int64_t begin, int64_t end) {
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
  const Tensor b = has_values(bias) ? bias->to(acc).contiguous() : at::zeros({N}, partial.options());
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

// fp32, no dropout, unit column strides: (dyB, dA, dB, sums). Each thread walks its rows in
// blocks, reading dy, x and y from memory once, for dyB = dy·(g⊙B), dA = s·dyBᵀ·x,
// dBᵀ = s·xaᵀ·dy (rows scaled by g at the end) and sums [2, N] = Σ_rows dy⊙(y − b), Σ_rows dy;
// the per-thread partial sums are added at the end.
std::tuple<Tensor, Tensor, Tensor, Tensor> skinny_backward(const Tensor& grad_y, const Tensor& x, const Tensor& xa,
                                                           const Tensor& y, const std::optional<Tensor>& bias,
                                                           const Tensor& lora_B, const Tensor& scale, double scaling,
                                                           const LoraSizes& n) {
  const Tensor scaled_B = (lora_B * scale.unsqueeze(1)).contiguous(), xa_rows = xa.contiguous();
  const Tensor b = has_values(bias) ? bias->contiguous() : at::zeros({n.N}, x.options());
  const int64_t blocks = (n.M + kBackwardBlockRows - 1) / kBackwardBlockRows;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  Tensor dyB = at::empty({n.M, n.r}, x.options());
  Tensor dA_parts = at::zeros({parts, n.r, n.K}, x.options());
  Tensor dBt_parts = at::zeros({parts, n.r, n.N}, x.options());
  Tensor sum_parts = at::zeros({parts, 2, n.N}, x.options());
  const float* dy_data = grad_y.const_data_ptr<float>();
  const float* x_data = x.const_data_ptr<float>();
  const float* xa_data = xa_rows.const_data_ptr<float>();
  const float* y_data = y.const_data_ptr<float>();
  const float* b_data = b.const_data_ptr<float>();
  const float* gb_data = scaled_B.const_data_ptr<float>();
  float* dyB_data = dyB.data_ptr<float>();
  float* dA_data = dA_parts.data_ptr<float>();
  float* dBt_data = dBt_parts.data_ptr<float>();
  float* sum_data = sum_parts.data_ptr<float>();
  const int64_t ld_dy = grad_y.stride(0), ld_x = x.stride(0), ld_y = y.stride(0);
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t part = part_begin; part < part_end; ++part) {
      const int64_t row_end = n.M * (part + 1) / parts;
      float* sums = sum_data + part * 2 * n.N;
      for (int64_t row = n.M * part / parts; row < row_end; row += kBackwardBlockRows) {
        const int64_t rows = std::min(kBackwardBlockRows, row_end - row);
        const float* dy_rows = dy_data + row * ld_dy;
        float* dyB_rows = dyB_data + row * n.r;
        cpu::rows_times_skinny(dy_rows, ld_dy, rows, n.N, gb_data, n.r, dyB_rows, n.r);
        cpu::accumulate_skinny_t_times_rows(xa_data + row * n.r, n.r, dy_rows, ld_dy, rows, n.N, n.r,
                                            dBt_data + part * n.r * n.N);
        cpu::accumulate_skinny_t_times_rows(dyB_rows, n.r, x_data + row * ld_x, ld_x, rows, n.K, n.r,
                                            dA_data + part * n.r * n.K);
        accumulate_column_sums<float, float>(dy_rows, ld_dy, 1, y_data + row * ld_y, ld_y, 1, b_data, rows, n.N,
                                             sums, sums + n.N);
      }
    }
  });
  Tensor dA = dA_parts.sum(0).mul_(scaling);
  Tensor dB = dBt_parts.sum(0).t().contiguous().mul_(scale.unsqueeze(1)).mul_(scaling);
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
  z.addmm_(xa, lora_B.index_select(0, columns).t(), 1.0, scaling);
  const auto acc = dots.scalar_type();
  dots.index_copy_(0, columns, (grad_y.index_select(1, columns).to(acc) * z.to(acc)).sum(0));
}

// The CPU mask of hash_dropout.h: drop(t) = D⊙t for an [M, K] tensor, into a contiguous one.
struct HashDrop {
  int64_t seed;
  uint32_t threshold;
  double keep_scale;

  Tensor operator()(const Tensor& t) const {
    Tensor out = at::empty(t.sizes(), t.options());
    const int64_t K = t.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lowrank_dora_dropout", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const scalar_t* t_data = t.const_data_ptr<scalar_t>();
      scalar_t* out_data = out.data_ptr<scalar_t>();
      const int64_t row_stride = t.stride(0), col_stride = t.stride(1);
      const opmath_t kept_scale = static_cast<opmath_t>(keep_scale);
      at::parallel_for(0, t.size(0), parallel_grain_rows(K), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const uint32_t row_key = dropout_row_key(seed, i);
          for (int64_t k = 0; k < K; ++k) {
            const opmath_t kept = static_cast<opmath_t>(t_data[i * row_stride + k * col_stride]) * kept_scale;
            out_data[i * K + k] = dropout_keep(row_key, k, threshold) ? static_cast<scalar_t>(kept) : scalar_t(0);
          }
        }
      });
    });
    return out;
  }
};

HashDrop make_drop(const std::optional<Tensor>& seed, double dropout_p) {
  return {seed->item<int64_t>(), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dora_linear_forward_cpu(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& magnitude, const Tensor& weight_norm_sq, double scaling, double dropout_p,
    const std::optional<Tensor>& seed) {
  const LoraSizes n = check_dora_forward_inputs(kForwardOp, c10::DeviceType::CPU, x, weight, bias, lora_A, lora_B,
                                                magnitude, weight_norm_sq, dropout_p, seed);
  const Tensor lora_A_t = lora_A.t().contiguous();
  Tensor norm = norm_of(weight_norm_sq, weight, lora_A, lora_A_t, lora_B, scaling);
  const Tensor scale = column_scale(magnitude, norm);
  if (dropout_p > 0.0) {
    auto [y, xa, z] = dora_dropout_forward(x, weight, bias, lora_A, lora_B, scale, scaling, make_drop(seed, dropout_p));
    return {std::move(y), std::move(xa), std::move(norm), std::move(z)};
  }
  Tensor xa = rows_times_small(x, lora_A_t);
  Tensor y;
  if (merging_pays_off(x.scalar_type(), n.M, n.K)) {
    const Tensor merged_t = scaled_merged_weight(weight, lora_A, lora_B, scaling, scale.to(x.scalar_type())).t();
    y = has_values(bias) ? at::addmm(*bias, x, merged_t) : at::mm(x, merged_t);
  } else {
    y = at::mm(x, weight.t());
    y.addmm_(xa, lora_B.t(), 1.0, scaling);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_dora_epilogue",
                                    [&] { scale_columns_add_bias<scalar_t>(y, scale, bias); });
  }
  return {std::move(y), std::move(xa), std::move(norm), at::empty({0}, x.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dora_linear_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& y_or_z, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude,
    const Tensor& norm, double scaling, double dropout_p, const std::optional<Tensor>& seed, bool needs_dx,
    bool needs_dweight, bool needs_dbias) {
  const LoraSizes n = check_dora_backward_inputs(kBackwardOp, c10::DeviceType::CPU, grad_y, x, xa, y_or_z, weight,
                                                 bias, lora_A, lora_B, magnitude, norm, dropout_p, seed);
  const auto dtype = x.scalar_type();
  const auto not_needed = [&] { return at::empty({0}, x.options()); };
  const Tensor scale = column_scale(magnitude, norm);
  Tensor dx = not_needed(), dweight = not_needed(), dbias = not_needed();
  if (dropout_p > 0.0) {
    auto [dx_, dweight_, dA, dB] = dora_dropout_backward(grad_y, x, xa, weight, lora_A, lora_B, scale, scaling,
                                                         needs_dx, needs_dweight, make_drop(seed, dropout_p));
    const Tensor sums = column_sums(grad_y, y_or_z, std::nullopt, scale.scalar_type());  // Σ dy⊙z, Σ dy
    if (needs_dx) dx = std::move(dx_);
    if (needs_dweight) dweight = std::move(dweight_);
    if (needs_dbias) dbias = sums[1].to(dtype, /*non_blocking=*/false, /*copy=*/true);
    return {std::move(dx), std::move(dweight), std::move(dbias), std::move(dA), std::move(dB),
            magnitude_grad(sums[0], norm, dtype)};
  }

  const Tensor& y = y_or_z;
  const Tensor scale_x = scale.to(dtype);
  Tensor dyB, dA, dB, sums;
  if (skinny_kernels_fit(grad_y) && skinny_kernels_fit(x) && skinny_kernels_fit(y)) {
    std::tie(dyB, dA, dB, sums) = skinny_backward(grad_y, x, xa, y, bias, lora_B, scale, scaling, n);
  } else {
    dyB = at::mm(grad_y, lora_B * scale_x.unsqueeze(1));
    dA = at::mm(dyB.t(), x).mul_(scaling);
    dB = at::mm(grad_y.t(), xa).mul_(scale_x.unsqueeze(1)).mul_(scaling);
    sums = column_sums(grad_y, y, bias, scale.scalar_type());
  }
  Tensor dots = sums[0];
  recompute_zero_scale_columns(dots, grad_y, x, xa, weight, lora_B, scale, norm, scaling);

  if (needs_dx && merging_pays_off(dtype, n.M, n.N)) {
    dx = at::mm(grad_y, scaled_merged_weight(weight, lora_A, lora_B, scaling, scale_x));
  } else if (needs_dx) {
    dx = at::mm(grad_y * scale_x, weight);
    dx.addmm_(dyB, lora_A, 1.0, scaling);
  }
  if (needs_dweight) {
    dweight = at::mm(grad_y.t(), x).mul_(scale_x.unsqueeze(1));
  }
  if (needs_dbias) {
    dbias = sums[1].to(dtype, /*non_blocking=*/false, /*copy=*/true);  // not a view of sums
  }
  return {std::move(dx), std::move(dweight), std::move(dbias), std::move(dA), std::move(dB),
          magnitude_grad(unscale_recovered(dots, scale), norm, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("dora_linear_forward_native", &dora_linear_forward_cpu);
  m.impl("dora_linear_backward_native", &dora_linear_backward_cpu);
}

}  // namespace lowrank

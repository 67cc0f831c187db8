// CPU kernels of lowrank::lora_linear_forward_native and lowrank::lora_linear_backward_native.
//
// The GEMMs go to MKL through at::mm/addmm; this file decides their order and operand
// layouts, and does the dropout-masked elementwise work itself. Without dropout, when the
// batch is taller than the weight is wide, the LoRA update is merged into the weight
// (W + s·B·A, an [N, K] temporary) so the large activations take a single GEMM.
// With dropout, masked pieces are formed one row chunk at a time, so no [M, K]
// temporary exists besides dx.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../hash_dropout.h"
#include "../lora_linear_common.h"

namespace lowrank {
namespace {

using at::Tensor;

constexpr const char* kForwardOp = "lora_linear_forward_native";
constexpr const char* kBackwardOp = "lora_linear_backward_native";

// Masked work runs over row chunks of about this many elements (1 MiB of fp32: L2-sized).
constexpr int64_t kChunkElements = int64_t{1} << 18;
// Smallest piece of elementwise work worth handing to another thread.
constexpr int64_t kParallelGrainElements = int64_t{1} << 15;

struct HashMask {
  int64_t seed;
  uint32_t threshold;
  double keep_scale;  // 1 / (1 - p)
};

HashMask make_mask(const std::optional<Tensor>& seed, double dropout_p) {
  return {seed->item<int64_t>(), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)};
}

int64_t rows_per_chunk(int64_t K) {
  return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(K, 1));
}

int64_t parallel_grain_rows(int64_t K) {
  return std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(K, 1));
}

// Merging costs N·K·r flops plus an [N, K] write; the low-rank pass it replaces costs
// rows·cols·r flops plus a read-modify-write of the [rows, cols] output. Reduced-precision
// dtypes never merge: rounding W + s·B·A would swallow the small LoRA update.
bool merging_pays_off(at::ScalarType dtype, int64_t rows, int64_t weight_cols) {
  return (dtype == at::kFloat || dtype == at::kDouble) && rows > weight_cols;
}

Tensor merged_weight(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  return at::addmm(weight, lora_B, lora_A, 1.0, scaling);
}

// out[i, k] = D[row_begin + i, k] · x[row_begin + i, k]; out is a contiguous [rows, K] chunk.
template <typename scalar_t>
void write_dropped_rows(const Tensor& x, int64_t row_begin, Tensor& out, const HashMask& mask) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t K = out.size(1);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const int64_t x_row_stride = x.stride(0), x_col_stride = x.stride(1);
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const opmath_t keep_scale = static_cast<opmath_t>(mask.keep_scale);
  at::parallel_for(0, out.size(0), parallel_grain_rows(K), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t row_key = dropout_row_key(mask.seed, row_begin + i);
      const scalar_t* x_row = x_data + (row_begin + i) * x_row_stride;
      scalar_t* out_row = out_data + i * K;
      for (int64_t k = 0; k < K; ++k) {
        const opmath_t kept = static_cast<opmath_t>(x_row[k * x_col_stride]) * keep_scale;
        out_row[k] = dropout_keep(row_key, k, mask.threshold) ? static_cast<scalar_t>(kept) : scalar_t(0);
      }
    }
  });
}

// For one row chunk: dx_rows += s·D⊙work, then work = D⊙x_rows, so the hash is evaluated
// once for both uses and the chunk buffer is reused for dA. dx is contiguous [M, K].
template <typename scalar_t>
void add_masked_then_drop_rows(const Tensor& x, int64_t row_begin, Tensor& dx, Tensor& work, double scaling,
                               const HashMask& mask) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t K = work.size(1);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const int64_t x_row_stride = x.stride(0), x_col_stride = x.stride(1);
  scalar_t* dx_data = dx.data_ptr<scalar_t>();
  scalar_t* work_data = work.data_ptr<scalar_t>();
  const opmath_t keep_scale = static_cast<opmath_t>(mask.keep_scale);
  const opmath_t scaled_keep = static_cast<opmath_t>(scaling * mask.keep_scale);
  at::parallel_for(0, work.size(0), parallel_grain_rows(K), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = row_begin + i;
      const uint32_t row_key = dropout_row_key(mask.seed, row);
      const scalar_t* x_row = x_data + row * x_row_stride;
      scalar_t* dx_row = dx_data + row * K;
      scalar_t* work_row = work_data + i * K;
      for (int64_t k = 0; k < K; ++k) {
        if (dropout_keep(row_key, k, mask.threshold)) {
          dx_row[k] = static_cast<scalar_t>(static_cast<opmath_t>(dx_row[k]) +
                                            scaled_keep * static_cast<opmath_t>(work_row[k]));
          work_row[k] = static_cast<scalar_t>(static_cast<opmath_t>(x_row[k * x_col_stride]) * keep_scale);
        } else {
          work_row[k] = scalar_t(0);
        }
      }
    }
  });
}

// xa = dropout(x)·Aᵀ, with lora_A_t = Aᵀ as a contiguous [K, r] matrix (MKL runs x·Aᵀ
// faster with that operand layout than with a transposed view).
Tensor input_times_lora_a(const Tensor& x, const Tensor& lora_A_t, double dropout_p,
                          const std::optional<Tensor>& seed, const LoraSizes& n) {
  if (dropout_p == 0.0) {
    return at::mm(x, lora_A_t);
  }
  const HashMask mask = make_mask(seed, dropout_p);
  Tensor xa = at::empty({n.M, n.r}, x.options());
  const int64_t chunk = rows_per_chunk(n.K);
  Tensor buffer = at::empty({std::min(chunk, n.M), n.K}, x.options());
  for (int64_t row = 0; row < n.M; row += chunk) {
    const int64_t rows = std::min(chunk, n.M - row);
    Tensor dropped = buffer.narrow(0, 0, rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_dropout_rows",
                                    [&] { write_dropped_rows<scalar_t>(x, row, dropped, mask); });
    Tensor xa_rows = xa.narrow(0, row, rows);
    at::mm_out(xa_rows, dropped, lora_A_t);
  }
  return xa;
}

// With dropout, per row chunk:  dx_rows += s·D⊙(dyB_rows·A)  (when dx is given)
//                               dA      += s·dyB_rowsᵀ·(D⊙x_rows)
Tensor dropout_backward_by_chunks(const Tensor& x, const Tensor& dyB, const Tensor& lora_A, double scaling,
                                  const HashMask& mask, std::optional<Tensor> dx, const LoraSizes& n) {
  const auto dtype = x.scalar_type();
  Tensor dA = at::zeros({n.r, n.K}, x.options().dtype(chunk_accumulate_dtype(dtype)));
  const int64_t chunk = rows_per_chunk(n.K);
  Tensor buffer = at::empty({std::min(chunk, n.M), n.K}, x.options());
  for (int64_t row = 0; row < n.M; row += chunk) {
    const int64_t rows = std::min(chunk, n.M - row);
    Tensor work = buffer.narrow(0, 0, rows);
    const Tensor dyB_rows = dyB.narrow(0, row, rows);
    if (dx.has_value()) {
      at::mm_out(work, dyB_rows, lora_A);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowrank_dropout_dx_rows",
                                      [&] { add_masked_then_drop_rows<scalar_t>(x, row, *dx, work, scaling, mask); });
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowrank_dropout_rows",
                                      [&] { write_dropped_rows<scalar_t>(x, row, work, mask); });
    }
    accumulate_product(dA, dyB_rows.t(), work, scaling);
  }
  return dA.to(dtype);
}

std::tuple<Tensor, Tensor> lora_linear_forward_cpu(const Tensor& x, const Tensor& weight,
                                                   const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                   const Tensor& lora_B, double scaling, double dropout_p,
                                                   const std::optional<Tensor>& seed) {
  const LoraSizes n =
      check_forward_inputs(kForwardOp, c10::DeviceType::CPU, x, weight, bias, lora_A, lora_B, dropout_p, seed);
  const bool has_bias = bias.has_value() && bias->defined();
  Tensor xa = input_times_lora_a(x, lora_A.t().contiguous(), dropout_p, seed, n);
  if (dropout_p == 0.0 && merging_pays_off(x.scalar_type(), n.M, n.K)) {
    const Tensor merged_t = merged_weight(weight, lora_A, lora_B, scaling).t();
    Tensor y = has_bias ? at::addmm(*bias, x, merged_t) : at::mm(x, merged_t);
    return {std::move(y), std::move(xa)};
  }
  Tensor y = has_bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(xa, lora_B.t(), 1.0, scaling);
  return {std::move(y), std::move(xa)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_linear_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& weight, const Tensor& lora_A,
    const Tensor& lora_B, double scaling, double dropout_p, const std::optional<Tensor>& seed, bool needs_dx,
    bool needs_dweight, bool needs_dbias) {
  const LoraSizes n = check_backward_inputs(kBackwardOp, c10::DeviceType::CPU, grad_y, x, xa, weight, lora_A,
                                            lora_B, dropout_p, seed);
  const auto not_needed = [&] { return at::empty({0}, x.options()); };
  // Operand layouts below were picked by timing MKL: dy·B with Bᵀ contiguous, and the
  // reductions over M with the [*, r] factor as a contiguous (or transposed-view) left operand.
  const Tensor dyB = at::mm(grad_y, lora_B.t().contiguous().t());
  Tensor dB = at::mm(xa.t(), grad_y).mul_(scaling).t().contiguous();

  Tensor dx = not_needed(), dA;
  if (dropout_p == 0.0) {
    dA = at::mm(dyB.t().contiguous(), x).mul_(scaling);
    if (needs_dx && merging_pays_off(x.scalar_type(), n.M, n.N)) {
      dx = at::mm(grad_y, merged_weight(weight, lora_A, lora_B, scaling));
    } else if (needs_dx) {
      dx = at::mm(grad_y, weight);
      dx.addmm_(dyB, lora_A, 1.0, scaling);
    }
  } else {
    if (needs_dx) {
      dx = at::mm(grad_y, weight);
    }
    dA = dropout_backward_by_chunks(x, dyB, lora_A, scaling, make_mask(seed, dropout_p),
                                    needs_dx ? std::optional<Tensor>(dx) : std::nullopt, n);
  }
  Tensor dweight = needs_dweight ? at::mm(grad_y.t(), x) : not_needed();
  Tensor dbias = needs_dbias ? grad_y.sum(0) : not_needed();
  return {std::move(dx), std::move(dweight), std::move(dbias), std::move(dA), std::move(dB)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("lora_linear_forward_native", &lora_linear_forward_cpu);
  m.impl("lora_linear_backward_native", &lora_linear_backward_cpu);
}

}  // namespace lowrank

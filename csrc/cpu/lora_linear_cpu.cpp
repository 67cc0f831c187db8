// CPU kernels of lowrank::lora_linear_forward_native and lowrank::lora_linear_backward_native.
//
// The large GEMMs go to MKL through at::mm/addmm; this file decides their order and operand
// layouts, and does the dropout-masked elementwise work itself. The scaling s multiplies a small
// factor (B, A or dy·B), never a GEMM's alpha: BLAS skips the product at alpha=0, which would
// hide a NaN in A or B that the formula s·(x·Aᵀ)·Bᵀ propagates. Without dropout, when the
// batch is taller than the weight is wide, the LoRA update is merged into the weight
// (W + s·B·A, an [N, K] temporary) so the large activations take a single GEMM.
// With dropout, masked pieces are formed one row chunk at a time, so no [M, K]
// temporary exists besides dx.
// For fp32 without dropout on AVX-512 CPUs, the rank-r products, which MKL runs far below
// its large-GEMM speed, go to the micro-kernels of skinny_gemm.h instead: x·Aᵀ, the merge,
// and dy·B, dA and dB, which the backward computes in one pass over row blocks of dy and x.
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
#include "skinny_gemm.h"

namespace lowrank {
namespace {

using at::Tensor;

// Masked work runs over row chunks of about this many elements (1 MiB of fp32: L2-sized).
constexpr int64_t kChunkElements = int64_t{1} << 18;

struct HashMask {
  int64_t seed;
  uint32_t threshold;
  double keep_scale;  // 1 / (1 - p)
};

HashMask make_mask(const std::optional<Tensor>& seed, double dropout_p) {
  return {seed->item<int64_t>(), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)};
}

// Merging costs N·K·r flops plus an [N, K] write; the low-rank pass it replaces costs
// rows·cols·r flops plus a read-modify-write of the [rows, cols] output. Reduced-precision
// dtypes never merge: rounding W + s·B·A would swallow the small LoRA update.
bool merging_pays_off(at::ScalarType dtype, int64_t rows, int64_t weight_cols) {
  return (dtype == at::kFloat || dtype == at::kDouble) && rows > weight_cols;
}

// The skinny kernels read fp32 matrices with unit column stride (any row stride).
bool skinny_kernels_fit(const Tensor& t) {
  return t.scalar_type() == at::kFloat && (t.size(1) <= 1 || t.stride(1) == 1) && cpu::skinny_kernels_available();
}

// Rows handed to one thread at a time by the skinny kernels (a multiple of their row blocks).
constexpr int64_t kSkinnyGrainRows = 48;
// Row block of the fused backward: its slice of dy stays in cache between dy·B and dyᵀ·xa,
// and few enough rows stream from memory at once for the prefetchers (48 and more measured
// slower). A multiple of rows_times_skinny's 12-row blocks.
constexpr int64_t kBackwardBlockRows = 24;

// rows[M, L] · small[L, r] for contiguous small.
Tensor skinny_rows_times(const Tensor& rows, const Tensor& small) {
  const int64_t M = rows.size(0), L = rows.size(1), r = small.size(1), ld = rows.stride(0);
  Tensor out = at::empty({M, r}, rows.options());
  const float* rows_data = rows.const_data_ptr<float>();
  const float* small_data = small.const_data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, M, kSkinnyGrainRows, [&](int64_t begin, int64_t end) {
    cpu::rows_times_skinny(rows_data + begin * ld, ld, end - begin, L, small_data, r, out_data + begin * r, r);
  });
  return out;
}

Tensor merged_weight(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  if (!skinny_kernels_fit(weight)) {
    return at::addmm(weight, lora_B.mul(scaling), lora_A);
  }
  // One read of W and one write of the result; addmm would copy W first and then update it.
  const int64_t N = weight.size(0), K = weight.size(1), r = lora_A.size(0), ld = weight.stride(0);
  const Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
  Tensor merged = at::empty({N, K}, weight.options());
  const float* w_data = weight.const_data_ptr<float>();
  const float* a_data = A.const_data_ptr<float>();
  const float* b_data = B.const_data_ptr<float>();
  float* out_data = merged.data_ptr<float>();
  at::parallel_for(0, N, rows_in(kParallelGrainElements, K), [&](int64_t begin, int64_t end) {
    cpu::add_skinny_times_rows(w_data + begin * ld, ld, b_data + begin * r, a_data, end - begin, K, r,
                               static_cast<float>(scaling), out_data + begin * K);
  });
  return merged;
}

// Without dropout: dyB = dy·B, dA = s·dyBᵀ·x, dB = s·dyᵀ·xa. Each thread walks its rows in
// blocks, reading dy and x from memory once, and sums dA and dBᵀ privately; the per-thread
// partial sums are added at the end.
std::tuple<Tensor, Tensor, Tensor> skinny_backward(const Tensor& grad_y, const Tensor& x, const Tensor& xa,
                                                   const Tensor& lora_B, double scaling, const LoraSizes& n) {
  const Tensor B = lora_B.contiguous(), xa_rows = xa.contiguous();
  const int64_t blocks = (n.M + kBackwardBlockRows - 1) / kBackwardBlockRows;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  Tensor dyB = at::empty({n.M, n.r}, x.options());
  Tensor dA_parts = at::zeros({parts, n.r, n.K}, x.options());
  Tensor dBt_parts = at::zeros({parts, n.r, n.N}, x.options());
  const float* dy_data = grad_y.const_data_ptr<float>();
  const float* x_data = x.const_data_ptr<float>();
  const float* xa_data = xa_rows.const_data_ptr<float>();
  const float* b_data = B.const_data_ptr<float>();
  float* dyB_data = dyB.data_ptr<float>();
  float* dA_data = dA_parts.data_ptr<float>();
  float* dBt_data = dBt_parts.data_ptr<float>();
  const int64_t ld_dy = grad_y.stride(0), ld_x = x.stride(0);
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t part = part_begin; part < part_end; ++part) {
      const int64_t row_end = n.M * (part + 1) / parts;
      for (int64_t row = n.M * part / parts; row < row_end; row += kBackwardBlockRows) {
        const int64_t rows = std::min(kBackwardBlockRows, row_end - row);
        const float* dy_rows = dy_data + row * ld_dy;
        float* dyB_rows = dyB_data + row * n.r;
        cpu::rows_times_skinny(dy_rows, ld_dy, rows, n.N, b_data, n.r, dyB_rows, n.r);
        cpu::accumulate_skinny_t_times_rows(xa_data + row * n.r, n.r, dy_rows, ld_dy, rows, n.N, n.r,
                                            dBt_data + part * n.r * n.N);
        cpu::accumulate_skinny_t_times_rows(dyB_rows, n.r, x_data + row * ld_x, ld_x, rows, n.K, n.r,
                                            dA_data + part * n.r * n.K);
      }
    }
  });
  Tensor dA = dA_parts.sum(0).mul_(scaling);
  Tensor dB = dBt_parts.sum(0).mul_(scaling).t().contiguous();
  return {std::move(dyB), std::move(dA), std::move(dB)};
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
  at::parallel_for(0, out.size(0), rows_in(kParallelGrainElements, K), [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, work.size(0), rows_in(kParallelGrainElements, K), [&](int64_t begin, int64_t end) {
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
    return skinny_kernels_fit(x) ? skinny_rows_times(x, lora_A_t) : at::mm(x, lora_A_t);
  }
  const HashMask mask = make_mask(seed, dropout_p);
  Tensor xa = at::empty({n.M, n.r}, x.options());
  const int64_t chunk = rows_in(kChunkElements, n.K);
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
  const int64_t chunk = rows_in(kChunkElements, n.K);
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
  const LoraSizes n = check_forward_inputs(c10::DeviceType::CPU, x, weight, bias, lora_A, lora_B, dropout_p, seed);
  Tensor xa = input_times_lora_a(x, lora_A.t().contiguous(), dropout_p, seed, n);
  if (dropout_p == 0.0 && merging_pays_off(x.scalar_type(), n.M, n.K)) {
    return {linear_output(x, merged_weight(weight, lora_A, lora_B, scaling).t(), bias), std::move(xa)};
  }
  return {lora_output(x, weight, bias, xa, lora_B, scaling), std::move(xa)};
}

LoraGrads lora_linear_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& weight, const Tensor& lora_A,
    const Tensor& lora_B, double scaling, double dropout_p, const std::optional<Tensor>& seed, bool needs_dx,
    bool needs_dweight, bool needs_dbias) {
  const LoraSizes n =
      check_backward_inputs(c10::DeviceType::CPU, grad_y, x, xa, weight, lora_A, lora_B, dropout_p, seed);
  Tensor dyB, dA, dB;
  if (dropout_p == 0.0 && skinny_kernels_fit(grad_y) && skinny_kernels_fit(x)) {
    std::tie(dyB, dA, dB) = skinny_backward(grad_y, x, xa, lora_B, scaling, n);
  } else {
    // Operand layouts below were picked by timing MKL: dy·B with Bᵀ contiguous, and the
    // reductions over M with the [*, r] factor as a contiguous (or transposed-view) left operand.
    dyB = at::mm(grad_y, lora_B.t().contiguous().t());
    dB = at::mm(xa.t(), grad_y).mul_(scaling).t().contiguous();
    if (dropout_p == 0.0) {
      dA = at::mm(dyB.t().contiguous(), x).mul_(scaling);
    }
  }

  Tensor dx = skipped_grad(x);
  if (dropout_p == 0.0) {
    if (needs_dx && merging_pays_off(x.scalar_type(), n.M, n.N)) {
      dx = at::mm(grad_y, merged_weight(weight, lora_A, lora_B, scaling));
    } else if (needs_dx) {
      dx = at::mm(grad_y, weight);
      dx.addmm_(dyB, lora_A.mul(scaling));
    }
  } else {
    if (needs_dx) {
      dx = at::mm(grad_y, weight);
    }
    dA = dropout_backward_by_chunks(x, dyB, lora_A, scaling, make_mask(seed, dropout_p),
                                    needs_dx ? std::optional<Tensor>(dx) : std::nullopt, n);
  }
  return lora_grads(std::move(dx), std::move(dA), std::move(dB), grad_y, x, needs_dweight, needs_dbias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  impl_forward_backward(m, kLoraLinearOps, &lora_linear_forward_cpu, &lora_linear_backward_cpu);
}

}  // namespace lowrank

// The CPU pieces of lora_linear_cpu.cpp that the ops built on LoRA (dora_linear_cpu.cpp) use
// too: the choice to merge the update into the weight, the merge, the rank-r products on the
// skinny kernels of skinny_gemm.h (fp32 on AVX-512 CPUs; ATen otherwise), the backward's walk
// over row blocks of dy, and the hash dropout mask on row chunks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../hash_dropout.h"
#include "../lora_linear_common.h"
#include "skinny_gemm.h"

namespace lowrank::cpu {

// Merging costs N·K·r flops plus an [N, K] write; the low-rank pass it replaces costs
// rows·cols·r flops plus a read-modify-write of the [rows, cols] output. Reduced-precision
// dtypes never merge: rounding W + s·B·A would swallow the small LoRA update.
inline bool merging_pays_off(at::ScalarType dtype, int64_t rows, int64_t weight_cols) {
  return (dtype == at::kFloat || dtype == at::kDouble) && rows > weight_cols;
}

// The skinny kernels read fp32 matrices with unit column stride (any row stride).
inline bool skinny_kernels_fit(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && (t.size(1) <= 1 || t.stride(1) == 1) && skinny_kernels_available();
}

// Rows handed to one thread at a time by the skinny kernels (a multiple of their row blocks).
constexpr int64_t kSkinnyGrainRows = 48;
// Row block of the fused backward: its slice of dy stays in cache between dy·B and dyᵀ·xa,
// and few enough rows stream from memory at once for the prefetchers (48 and more measured
// slower). A multiple of rows_times_skinny's 12-row blocks.
constexpr int64_t kBackwardBlockRows = 24;

// rows[M, L] · small[L, r] for a contiguous small (x·Aᵀ with Aᵀ contiguous, and DoRA's small
// products for its norm): the skinny kernels where they fit, MKL otherwise.
inline at::Tensor rows_times_small(const at::Tensor& rows, const at::Tensor& small) {
  if (!skinny_kernels_fit(rows)) {
    return at::mm(rows, small);
  }
  const int64_t M = rows.size(0), L = rows.size(1), r = small.size(1), ld = rows.stride(0);
  at::Tensor out = at::empty({M, r}, rows.options());
  const float* rows_data = rows.const_data_ptr<float>();
  const float* small_data = small.const_data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, M, kSkinnyGrainRows, [&](int64_t begin, int64_t end) {
    rows_times_skinny({rows_data + begin * ld, ld}, end - begin, L, small_data, r, out_data + begin * r, r);
  });
  return out;
}

// W + s·B·A [N, K], each row times row_scale (DoRA's g, of W's dtype) when given.
inline at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                double scaling, const std::optional<at::Tensor>& row_scale = std::nullopt) {
  if (!skinny_kernels_fit(weight)) {
    at::Tensor merged = at::addmm(weight, lora_B.mul(scaling), lora_A);
    return row_scale.has_value() ? merged.mul_(row_scale->unsqueeze(1)) : merged;
  }
  // One read of W and one write of the result; addmm would copy W first and then update it.
  const int64_t N = weight.size(0), K = weight.size(1), r = lora_A.size(0), ld = weight.stride(0);
  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
  const at::Tensor g = row_scale.has_value() ? row_scale->contiguous() : at::Tensor();
  at::Tensor merged = at::empty({N, K}, weight.options());
  const float* w_data = weight.const_data_ptr<float>();
  const float* a_data = A.const_data_ptr<float>();
  const float* b_data = B.const_data_ptr<float>();
  const float* g_data = g.defined() ? g.const_data_ptr<float>() : nullptr;
  float* out_data = merged.data_ptr<float>();
  at::parallel_for(0, N, rows_in(kParallelGrainElements, K), [&](int64_t begin, int64_t end) {
    add_skinny_times_rows(w_data + begin * ld, ld, b_data + begin * r, a_data, end - begin, K, r,
                          static_cast<float>(scaling), {out_data + begin * K, K});
    if (g_data == nullptr) {
      return;
    }
    for (int64_t row = begin; row < end; ++row) {  // scaled while the rows are still in cache
      float* out_row = out_data + row * K;
      for (int64_t k = 0; k < K; ++k) {
        out_row[k] *= g_data[row];
      }
    }
  });
  return merged;
}

// How many threads' parts skinny_backward splits M rows into.
inline int64_t skinny_backward_parts(int64_t M) {
  const int64_t blocks = (M + kBackwardBlockRows - 1) / kBackwardBlockRows;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
}

// Without dropout, for fp32 tensors that skinny_kernels_fit: dyB = dy·B, dA = s·dyBᵀ·x and
// dB = s·dyᵀ·xa. Each thread walks its part of the rows (skinny_backward_parts) in blocks,
// reading dy and x from memory once, and sums dA and dBᵀ privately; the per-thread partial sums
// are added at the end. per_block(part, row, rows) does more work on each block while its rows
// of dy are in cache (DoRA's column sums).
template <typename PerBlock>
std::tuple<at::Tensor, at::Tensor, at::Tensor> skinny_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                               const at::Tensor& xa, const at::Tensor& lora_B,
                                                               double scaling, const LoraSizes& n,
                                                               const PerBlock& per_block) {
  const at::Tensor B = lora_B.contiguous(), xa_rows = xa.contiguous();
  const int64_t parts = skinny_backward_parts(n.M);
  at::Tensor dyB = at::empty({n.M, n.r}, x.options());
  at::Tensor dA_parts = at::zeros({parts, n.r, n.K}, x.options());
  at::Tensor dBt_parts = at::zeros({parts, n.r, n.N}, x.options());
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
        rows_times_skinny({dy_rows, ld_dy}, rows, n.N, b_data, n.r, dyB_rows, n.r);
        accumulate_skinny_t_times_rows({xa_data + row * n.r, n.r}, {dy_rows, ld_dy}, rows, n.N, n.r,
                                       dBt_data + part * n.r * n.N);
        accumulate_skinny_t_times_rows({dyB_rows, n.r}, {x_data + row * ld_x, ld_x}, rows, n.K, n.r,
                                       dA_data + part * n.r * n.K);
        per_block(part, row, rows);
      }
    }
  });
  at::Tensor dA = dA_parts.sum(0).mul_(scaling);
  at::Tensor dB = dBt_parts.sum(0).mul_(scaling).t().contiguous();
  return {std::move(dyB), std::move(dA), std::move(dB)};
}

// The hash dropout mask of hash_dropout.h for one call.
struct HashMask {
  int64_t seed;
  uint32_t threshold;
  double keep_scale;  // 1 / (1 - p)
};

inline HashMask make_mask(const std::optional<at::Tensor>& seed, double dropout_p) {
  return {seed->item<int64_t>(), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)};
}

// out[i, k] = D[row_begin + i, k] · x[row_begin + i, k]; out is a contiguous [rows, K] chunk. A
// dropped element is 0 whatever x holds there (a NaN too), as hash_dropout.apply_mask.
template <typename scalar_t>
void write_dropped_rows(const at::Tensor& x, int64_t row_begin, at::Tensor& out, const HashMask& mask) {
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

// D⊙x for all of an [M, K] x, as a new contiguous tensor.
inline at::Tensor dropped(const at::Tensor& x, const HashMask& mask) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_dropout_rows",
                                  [&] { write_dropped_rows<scalar_t>(x, 0, out, mask); });
  return out;
}

}  // namespace lowrank::cpu

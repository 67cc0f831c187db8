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
#include "lora_linear_cpu.h"

namespace lowrank {
namespace {

using at::Tensor;
using cpu::HashMask;

// Masked work runs over row chunks of about this many elements (1 MiB of fp32: L2-sized).
constexpr int64_t kChunkElements = int64_t{1} << 18;

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
    return cpu::rows_times_small(x, lora_A_t);
  }
  const HashMask mask = cpu::make_mask(seed, dropout_p);
  Tensor xa = at::empty({n.M, n.r}, x.options());
  const int64_t chunk = rows_in(kChunkElements, n.K);
  Tensor buffer = at::empty({std::min(chunk, n.M), n.K}, x.options());
  for (int64_t row = 0; row < n.M; row += chunk) {
    const int64_t rows = std::min(chunk, n.M - row);
    Tensor dropped = buffer.narrow(0, 0, rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_dropout_rows",
                                    [&] { cpu::write_dropped_rows<scalar_t>(x, row, dropped, mask); });
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
                                      [&] { cpu::write_dropped_rows<scalar_t>(x, row, work, mask); });
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
  if (dropout_p == 0.0 && cpu::merging_pays_off(x.scalar_type(), n.M, n.K)) {
    return {linear_output(x, cpu::merged_weight(weight, lora_A, lora_B, scaling).t(), bias), std::move(xa)};
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
  if (dropout_p == 0.0 && cpu::skinny_kernels_fit(grad_y) && cpu::skinny_kernels_fit(x)) {
    std::tie(dyB, dA, dB) = cpu::skinny_backward(grad_y, x, xa, lora_B, scaling, n, [](int64_t, int64_t, int64_t) {});
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
    if (needs_dx && cpu::merging_pays_off(x.scalar_type(), n.M, n.N)) {
      dx = at::mm(grad_y, cpu::merged_weight(weight, lora_A, lora_B, scaling));
    } else if (needs_dx) {
      dx = at::mm(grad_y, weight);
      dx.addmm_(dyB, lora_A.mul(scaling));
    }
  } else {
    if (needs_dx) {
      dx = at::mm(grad_y, weight);
    }
    dA = dropout_backward_by_chunks(x, dyB, lora_A, scaling, cpu::make_mask(seed, dropout_p),
                                    needs_dx ? std::optional<Tensor>(dx) : std::nullopt, n);
  }
  return lora_grads(std::move(dx), std::move(dA), std::move(dB), grad_y, x, needs_dweight, needs_dbias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  impl_forward_backward(m, kLoraLinearOps, &lora_linear_forward_cpu, &lora_linear_backward_cpu);
}

}  // namespace lowrank

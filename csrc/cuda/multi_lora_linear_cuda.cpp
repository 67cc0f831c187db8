// CUDA kernels of lowrank::multi_lora_linear_forward_native and lowrank::multi_lora_linear_backward_native.
//
// ATen/cuBLAS, with no custom GEMM kernel and no host sync: every rank-r product runs over all
// n·r ranks at once, each row's r values placed in its adapter's block of an [M, n·r] matrix
// (zeros elsewhere), so one cuBLAS GEMM serves every adapter and the per-adapter sums (dA, dB)
// need no segmentation: rows of other adapters hold zeros in adapter a's block. The price is
// about n times the low-rank flops of a single adapter, cheap beside the base GEMM while n·r is
// small against K and N; the Triton backend segments the rows instead. The per-row dropout mask
// (each row its adapter's rate) is the one custom kernel, in multi_lora_linear_kernels.cu.
// Index values: an asynchronous device assert; until it fires, rows out of range count as -1
// (gather slot 0, scale 0), so nothing is read out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream (at::cuda re-exports c10::cuda)
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../multi_lora_linear_common.h"
#include "aten_views.h"
#include "multi_lora_linear_kernels.cuh"

namespace lowrank {
namespace {

using at::Tensor;

constexpr const char* kForwardOp = "multi_lora_linear_forward_native";
constexpr const char* kBackwardOp = "multi_lora_linear_backward_native";

// Each row's adapter: slot (a safe gather index, 0 for rows without one) and has_adapter.
struct RowAdapters {
  Tensor slot;
  Tensor has_adapter;
  int64_t count;
};

RowAdapters row_adapters(const Tensor& adapter_index, int64_t count) {
  const Tensor index = adapter_index.to(at::kLong);
  const Tensor has_adapter = (index >= 0).logical_and_(index < count);
  at::_assert_async(has_adapter.logical_or(index == -1).all(),
                    "multi_lora_linear: adapter_index must hold -1 (no adapter) or an adapter in [0, n_adapters)");
  return {at::where(has_adapter, index, 0), has_adapter, count};
}

// values[adapter of row i] for each row, 0 for rows without one: [M] float64 on the device,
// staged through pinned memory so the copy does not block the host.
Tensor per_row(const std::vector<double>& values, const RowAdapters& rows) {
  Tensor host = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(at::kDouble).pinned_memory(true));
  std::copy(values.begin(), values.end(), host.data_ptr<double>());
  const Tensor table = host.to(rows.slot.device(), at::kDouble, /*non_blocking=*/true);
  return table.index_select(0, rows.slot).mul_(rows.has_adapter);
}

// [M, n·r]: row i holds row_scale[i]·values[i] in its adapter's block, zeros elsewhere (the
// product is taken in fp32 or wider and rounded once).
Tensor blocked(const Tensor& values, const Tensor& row_scale, const RowAdapters& rows) {
  const int64_t M = values.size(0), r = values.size(1);
  const auto wide = chunk_accumulate_dtype(values.scalar_type());
  const Tensor scaled = values.to(wide).mul_(row_scale.to(wide).unsqueeze(1)).to(values.scalar_type());
  Tensor out = at::zeros({M, rows.count, r}, values.options());
  out.scatter_(1, rows.slot.view({M, 1, 1}).expand({M, 1, r}), scaled.unsqueeze(1));
  return out.view({M, rows.count * r});
}

// all[i, block of row i's adapter] for all [M, n·r]: [M, r], 0 for rows without an adapter.
Tensor own_block(const Tensor& all, const RowAdapters& rows) {
  const int64_t M = all.size(0), r = all.size(1) / rows.count;
  return all.view({M, rows.count, r})
      .gather(1, rows.slot.view({M, 1, 1}).expand({M, 1, r}))
      .squeeze(1)
      .mul_(rows.has_adapter.unsqueeze(1));
}

// Each row's dropout (its adapter's rate; p = 0 keeps every element at scale 1).
struct RowDropoutTables {
  Tensor thresholds;   // [M] int64
  Tensor keep_scales;  // [M] float64, 0 for rows without an adapter
};

RowDropoutTables row_dropout_tables(at::ArrayRef<double> dropout_p, const RowAdapters& rows) {
  std::vector<double> thresholds, keep_scales;
  for (const AdapterDropout& dropout : adapter_dropouts(dropout_p)) {
    thresholds.push_back(static_cast<double>(dropout.threshold));  // < 2**32: exact in a double
    keep_scales.push_back(dropout.keep_scale);
  }
  return {per_row(thresholds, rows).to(at::kLong), per_row(keep_scales, rows)};
}

// out (+)= D⊙in with each row's dropout (accumulate: added into out).
void apply_row_dropout(const Tensor& in, Tensor& out, bool accumulate, const std::optional<Tensor>& seed,
                       const RowDropoutTables& tables) {
  const cuda::RowDropout dropout{seed->const_data_ptr<int64_t>(), tables.thresholds.const_data_ptr<int64_t>(),
                                 tables.keep_scales.const_data_ptr<double>()};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "lowrank_row_dropout", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    C10_CUDA_CHECK(cuda::launch_row_dropout<cuda_t>(in.size(0), in.size(1), read_only_matrix<scalar_t>(in),
                                                    writable_matrix<scalar_t>(out), accumulate, dropout, stream));
  });
}

// The low-rank path's input D⊙x ([M, K], a new tensor with dropout; x itself without).
Tensor lora_input(const Tensor& x, at::ArrayRef<double> dropout_p, const std::optional<Tensor>& seed,
                  const RowAdapters& rows) {
  if (!any_dropout(dropout_p)) {
    return x;
  }
  Tensor dropped = at::empty(x.sizes(), x.options());
  apply_row_dropout(x, dropped, false, seed, row_dropout_tables(dropout_p, rows));
  return dropped;
}

std::tuple<Tensor, Tensor> multi_lora_linear_forward_cuda(const Tensor& x, const Tensor& weight,
                                                          const std::optional<Tensor>& bias,
                                                          const Tensor& adapter_index, const Tensor& lora_A,
                                                          const Tensor& lora_B, at::ArrayRef<double> scaling,
                                                          at::ArrayRef<double> dropout_p,
                                                          const std::optional<Tensor>& seed) {
  const MultiLoraSizes n = check_multi_forward_inputs(kForwardOp, c10::DeviceType::CUDA, x, weight, bias,
                                                      adapter_index, lora_A, lora_B, scaling, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the custom op owns autograd
  const RowAdapters rows = row_adapters(adapter_index, n.n);
  const Tensor lora_A_all = lora_A.reshape({n.n * n.r, n.K});                   // [n·r, K]
  const Tensor lora_B_t_all = lora_B.permute({0, 2, 1}).reshape({n.n * n.r, n.N});  // [n·r, N]
  Tensor xa = own_block(at::mm(lora_input(x, dropout_p, seed, rows), lora_A_all.t()), rows);
  const bool has_bias = bias.has_value() && bias->defined();
  Tensor y = has_bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(blocked(xa, per_row({scaling.begin(), scaling.end()}, rows), rows), lora_B_t_all);
  return {std::move(y), std::move(xa)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> multi_lora_linear_backward_cuda(
    const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& weight, const Tensor& adapter_index,
    const Tensor& lora_A, const Tensor& lora_B, at::ArrayRef<double> scaling, at::ArrayRef<double> dropout_p,
    const std::optional<Tensor>& seed, bool needs_dx, bool needs_dweight, bool needs_dbias) {
  const MultiLoraSizes n = check_multi_backward_inputs(kBackwardOp, c10::DeviceType::CUDA, grad_y, x, xa, weight,
                                                       adapter_index, lora_A, lora_B, scaling, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto not_needed = [&] { return at::empty({0}, x.options()); };
  const RowAdapters rows = row_adapters(adapter_index, n.n);
  const Tensor row_scaling = per_row({scaling.begin(), scaling.end()}, rows);
  const Tensor lora_A_all = lora_A.reshape({n.n * n.r, n.K});                    // [n·r, K]
  const Tensor lora_B_all = lora_B.permute({1, 0, 2}).reshape({n.N, n.n * n.r});  // [N, n·r]
  const Tensor scaled_dyB = blocked(own_block(at::mm(grad_y, lora_B_all), rows), row_scaling, rows);

  Tensor dx = not_needed();
  if (needs_dx) {
    dx = at::mm(grad_y, weight);
    if (any_dropout(dropout_p)) {
      apply_row_dropout(at::mm(scaled_dyB, lora_A_all), dx, true, seed, row_dropout_tables(dropout_p, rows));
    } else {
      dx.addmm_(scaled_dyB, lora_A_all);
    }
  }
  Tensor dA = at::mm(scaled_dyB.t(), lora_input(x, dropout_p, seed, rows)).view({n.n, n.r, n.K});
  Tensor dB = at::mm(grad_y.t(), blocked(xa, row_scaling, rows)).view({n.N, n.n, n.r}).permute({1, 0, 2}).contiguous();
  Tensor dweight = needs_dweight ? at::mm(grad_y.t(), x) : not_needed();
  Tensor dbias = needs_dbias ? grad_y.sum(0) : not_needed();
  return {std::move(dx), std::move(dweight), std::move(dbias), std::move(dA), std::move(dB)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  m.impl("multi_lora_linear_forward_native", &multi_lora_linear_forward_cuda);
  m.impl("multi_lora_linear_backward_native", &multi_lora_linear_backward_cuda);
}

}  // namespace lowrank

// CUDA kernels of lowrank::multi_lora_linear_forward_native and lowrank::multi_lora_linear_backward_native.
//
// ATen/cuBLAS and the kernels of multi_lora_linear_kernels.cu, with no host sync. The rank-r
// reductions over K or N run over all n·r ranks at once: xa = (D⊙x)·[A_0; …; A_n-1]ᵀ and
// dyB = dy·[B_0 … B_n-1] each as one GEMM of which every row keeps its adapter's block, and dA,
// dB as one GEMM each from [M, n·r] matrices holding every row's values in its adapter's block
// (zeros elsewhere, which rows of other adapters add to a block). That costs about n times a
// single adapter's low-rank flops, cheap beside the base GEMM while n·r is small against K and
// N; the Triton backend segments the rows instead. The products that expand the rank-r values
// to [M, N] (y) and [M, K] (dx) run per row in a kernel that reads only the row's own adapter:
// a GEMM over the blocks would multiply the zeros by the other adapters' factors, and 0·NaN
// would carry a NaN in one adapter's A or B into every row. Each scaling multiplies the
// rank-r values, never a GEMM's alpha. Index values: an asynchronous device assert; until it
// fires, rows out of range count as -1, so nothing is read out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream (at::cuda re-exports c10::cuda)
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../multi_lora_linear_common.h"
#include "aten_views.h"
#include "multi_lora_linear_kernels.cuh"

namespace lowrank {
namespace {

using at::Tensor;

// values as a device tensor of `dtype`, staged through pinned memory so the copy does not block
// the host.
Tensor device_table(const std::vector<double>& values, at::ScalarType dtype, const at::Device& device) {
  const auto pinned = at::TensorOptions().dtype(at::kDouble).pinned_memory(true);
  Tensor host = at::empty({static_cast<int64_t>(values.size())}, pinned);
  std::copy(values.begin(), values.end(), host.data_ptr<double>());
  return host.to(device, /*non_blocking=*/true).to(dtype);
}

// Each row's adapter (adapter: -1 for none; slot: a safe gather index, 0 for none) and the
// adapters' constants on the device, owning what cuda::RowAdapters points to.
struct AdapterTables {
  Tensor adapter, slot, has_adapter, scaling, thresholds, keep_scales;
  std::optional<Tensor> seed;
  int64_t count;

  cuda::RowAdapters view() const {
    const bool dropout = seed.has_value();
    return {adapter.const_data_ptr<int64_t>(), scaling.const_data_ptr<double>(),
            dropout ? seed->const_data_ptr<int64_t>() : nullptr,
            dropout ? thresholds.const_data_ptr<int64_t>() : nullptr,
            dropout ? keep_scales.const_data_ptr<double>() : nullptr};
  }

  // values[adapter of row i] for each row, 0 for rows without one: [M] float64.
  Tensor per_row(const Tensor& values) const {
    return at::where(has_adapter, values.index_select(0, slot), 0.0);
  }
};

AdapterTables adapter_tables(const Tensor& adapter_index, int64_t count, at::ArrayRef<double> scaling,
                             at::ArrayRef<double> dropout_p, const std::optional<Tensor>& seed) {
  const Tensor index = adapter_index.to(at::kLong);
  const Tensor has_adapter = (index >= 0).logical_and_(index < count);
  at::_assert_async(has_adapter.logical_or(index == -1).all(),
                    "multi_lora_linear: adapter_index must hold -1 (no adapter) or an adapter in [0, n_adapters)");
  AdapterTables tables;
  tables.adapter = at::where(has_adapter, index, -1);
  tables.slot = at::where(has_adapter, index, 0);
  tables.has_adapter = has_adapter;
  tables.count = count;
  const at::Device device = index.device();
  tables.scaling = device_table({scaling.begin(), scaling.end()}, at::kDouble, device);
  if (any_dropout(dropout_p)) {
    std::vector<double> thresholds, keep_scales;
    for (const AdapterDropout& dropout : adapter_dropouts(dropout_p)) {
      thresholds.push_back(static_cast<double>(dropout.threshold));  // < 2**32: exact in a double
      keep_scales.push_back(dropout.keep_scale);
    }
    tables.thresholds = device_table(thresholds, at::kLong, device);
    tables.keep_scales = device_table(keep_scales, at::kDouble, device);
    tables.seed = *seed;
  }
  return tables;
}

// [M, n·r]: row i holds row_scale[i]·values[i] in its adapter's block, zeros elsewhere (the
// product taken in fp32 or wider and rounded once).
Tensor blocked(const Tensor& values, const Tensor& row_scale, const AdapterTables& tables) {
  const int64_t M = values.size(0), r = values.size(1);
  const auto wide = chunk_accumulate_dtype(values.scalar_type());
  const Tensor scaled = values.to(wide).mul_(row_scale.to(wide).unsqueeze(1)).to(values.scalar_type());
  Tensor out = at::zeros({M, tables.count, r}, values.options());
  out.scatter_(1, tables.slot.view({M, 1, 1}).expand({M, 1, r}), scaled.unsqueeze(1));
  return out.view({M, tables.count * r});
}

// all[i, block of row i's adapter] for all [M, n·r]: [M, r], 0 for rows without an adapter.
Tensor own_block(const Tensor& all, const AdapterTables& tables) {
  const int64_t M = all.size(0), r = all.size(1) / tables.count;
  const Tensor own = all.view({M, tables.count, r}).gather(1, tables.slot.view({M, 1, 1}).expand({M, 1, r})).squeeze(1);
  return at::where(tables.has_adapter.unsqueeze(1), own, at::zeros({}, own.options()));
}

// The low-rank path's input D⊙x ([M, K], a new tensor with dropout; x itself without).
Tensor lora_input(const Tensor& x, const AdapterTables& tables) {
  if (!tables.seed.has_value()) {
    return x;
  }
  Tensor dropped = at::empty(x.sizes(), x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_row_dropout", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    C10_CUDA_CHECK(cuda::launch_row_dropout<cuda_t>(x.size(0), x.size(1), read_only_matrix<scalar_t>(x),
                                                    writable_matrix<scalar_t>(dropped), tables.view(), stream));
  });
  return dropped;
}

// out[i] += D_i⊙(s[a]·left[i]·factors[a]) for row i's adapter a; factors [n, R, C] (any strides).
void add_adapter_products(Tensor& out, const Tensor& left, const Tensor& factors, const AdapterTables& tables,
                          bool dropout) {
  const Tensor factor_rows = factors.select(0, 0);  // the strides of every factors[a]
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lowrank_add_adapter_products", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    C10_CUDA_CHECK(cuda::launch_add_adapter_products<cuda_t>(
        out.size(0), out.size(1), left.size(1), read_only_matrix<scalar_t>(left),
        read_only_matrix<scalar_t>(factor_rows), factors.stride(0), writable_matrix<scalar_t>(out), tables.view(),
        dropout, stream));
  });
}

std::tuple<Tensor, Tensor> multi_lora_linear_forward_cuda(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& adapter_index,
    const Tensor& lora_A, const Tensor& lora_B, at::ArrayRef<double> scaling, at::ArrayRef<double> dropout_p,
    const std::optional<Tensor>& seed) {
  const MultiLoraSizes n = check_multi_forward_inputs(c10::DeviceType::CUDA, x, weight, bias, adapter_index, lora_A,
                                                      lora_B, scaling, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the custom op owns autograd
  const AdapterTables tables = adapter_tables(adapter_index, n.n, scaling, dropout_p, seed);
  const Tensor lora_A_all = lora_A.reshape({n.n * n.r, n.K});  // [n·r, K]
  Tensor xa = own_block(at::mm(lora_input(x, tables), lora_A_all.t()), tables);
  Tensor y = linear_output(x, weight.t(), bias);
  // Bᵀ [n, r, N] contiguous: the kernel's threads along N then read it coalesced.
  add_adapter_products(y, xa, lora_B.transpose(1, 2).contiguous(), tables, /*dropout=*/false);
  return {std::move(y), std::move(xa)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> multi_lora_linear_backward_cuda(
    const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& weight, const Tensor& adapter_index,
    const Tensor& lora_A, const Tensor& lora_B, at::ArrayRef<double> scaling, at::ArrayRef<double> dropout_p,
    const std::optional<Tensor>& seed, bool needs_dx, bool needs_dweight, bool needs_dbias) {
  const MultiLoraSizes n = check_multi_backward_inputs(c10::DeviceType::CUDA, grad_y, x, xa, weight, adapter_index,
                                                       lora_A, lora_B, scaling, dropout_p, seed);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const AdapterTables tables = adapter_tables(adapter_index, n.n, scaling, dropout_p, seed);
  const Tensor row_scaling = tables.per_row(tables.scaling);
  const Tensor lora_B_all = lora_B.permute({1, 0, 2}).reshape({n.N, n.n * n.r});  // [N, n·r]
  const Tensor dyB = own_block(at::mm(grad_y, lora_B_all), tables);

  Tensor dx = skipped_grad(x);
  if (needs_dx) {
    dx = at::mm(grad_y, weight);
    add_adapter_products(dx, dyB, lora_A, tables, tables.seed.has_value());
  }
  Tensor dA = at::mm(blocked(dyB, row_scaling, tables).t(), lora_input(x, tables)).view({n.n, n.r, n.K});
  Tensor dB = at::mm(grad_y.t(), blocked(xa, row_scaling, tables)).view({n.N, n.n, n.r}).permute({1, 0, 2});
  auto [dweight, dbias] = linear_weight_bias_grads(grad_y, x, needs_dweight, needs_dbias);
  return {std::move(dx), std::move(dweight), std::move(dbias), std::move(dA), dB.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) {
  impl_forward_backward(m, kMultiLoraLinearOps, &multi_lora_linear_forward_cuda, &multi_lora_linear_backward_cuda);
}

}  // namespace lowrank

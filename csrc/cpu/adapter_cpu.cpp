// CPU kernels of lowrank::adapter_forward_native and lowrank::adapter_backward_native.
//
// Every row of the adapter is independent except for the weight and bias gradients, so both
// directions run as one parallel region over row chunks small enough to stay in L2
// (kChunkElements), each chunk doing all of its GEMMs (single-threaded inside the
// region) and elementwise work back to back:
//   forward   z_c = b_d + h_c·W_dᵀ (the GEMM accumulates onto the broadcast bias), a_c = s·act(z_c)
//             over the [rows, Bn] tile, out_c = [h_c +] [s·b_u +] a_c·W_uᵀ (the GEMM accumulates
//             onto h_c + s·b_u written into out_c, so scaling never needs a pass of its own)
//   backward  dz_c = (g_c·W_u)⊙s·act'(z_c) in place, dh_c = [g_c +] dz_c·W_d (accumulated onto g_c),
//             and per-thread partial sums dW_d += dz_cᵀ·h_c, dW_uᵀ += a_cᵀ·g_c, db_d, db_u
// h_c and g_c are read from memory once per direction and out/dh written once; the only
// [M, ·] temporaries are the [rows, Bn] tiles. Compared with one whole-tensor op after the
// other, this saves the passes over [M, D] tensors and the thread synchronisation between ops.
//
// fp32 GEMMs go to oneDNN (at::native::mkldnn_matmul), which picks its kernels by instruction
// set: on AMD Zen CPUs it runs AVX-512 where MKL's sgemm (what at::mm and nn.Linear use)
// does not: 2-2.5x faster at adapter shapes on a Zen 5 EPYC. Other dtypes, or a torch without it,
// use MKL through at::mm.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowADInplaceOrView
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../adapter_common.h"

#if AT_MKLDNN_ENABLED()
namespace at::native {
// Exported by libtorch_cpu (ATen/native/mkldnn/Matmul.cpp), but its header is not installed:
// result = beta·result + alpha·mat1·mat2. Declared weak, so a torch without it (or with another
// signature, hence another mangled name) loads this extension and takes the MKL path.
__attribute__((weak)) void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta,
                                         float alpha);
}  // namespace at::native
#endif

namespace lowrank {
namespace {

using at::Tensor;

// Row chunks of about 512 KiB of fp32 [rows, D]: in L2 when the chunk's second GEMM reads them.
constexpr int64_t kChunkElements = int64_t{1} << 17;

// Calls body(first_row, rows) for each row chunk of [0, M), chunks spread over the threads.
template <typename Body>
void for_each_row_chunk(int64_t M, int64_t D, const Body& body) {
  const int64_t chunk = rows_in(kChunkElements, D);
  const int64_t chunks = (M + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: keep autograd out of the
    // per-chunk ATen calls (their inputs are detached as well).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t index = begin; index < end; ++index) {
      const int64_t row = index * chunk;
      body(row, std::min(chunk, M - row));
    }
  });
}

bool use_onednn(const Tensor& result) {
#if AT_MKLDNN_ENABLED()
  return &at::native::mkldnn_matmul != nullptr && result.scalar_type() == at::kFloat && result.is_contiguous() &&
         at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

// result = mat1·mat2, or result += mat1·mat2 when accumulate.
void gemm_into(Tensor& result, const Tensor& mat1, const Tensor& mat2, bool accumulate) {
#if AT_MKLDNN_ENABLED()
  if (use_onednn(result)) {
    at::native::mkldnn_matmul(mat1, mat2, result, accumulate ? 1.0f : 0.0f, 1.0f);
    return;
  }
#endif
  if (accumulate) {
    result.addmm_(mat1, mat2);
  } else {
    at::mm_out(result, mat1, mat2);
  }
}

// acc += mat1·mat2 where acc may be fp32 for half-type operands.
void accumulate_gemm(Tensor& acc, const Tensor& mat1, const Tensor& mat2) {
  if (acc.scalar_type() == mat1.scalar_type()) {
    gemm_into(acc, mat1, mat2, true);
  } else {
    accumulate_product(acc, mat1, mat2, 1.0);
  }
}

// a = s·act(z) over n contiguous elements.
template <typename scalar_t>
void scaled_activation(const scalar_t* z, scalar_t* a, int64_t n, Activation act, double scaling) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t s = static_cast<opmath_t>(scaling);
  for (int64_t i = 0; i < n; ++i) {
    a[i] = static_cast<scalar_t>(s * activate(act, static_cast<opmath_t>(z[i])));
  }
}

// dz ← dz ⊙ s·act'(z) in place (dz holds g·W_u on entry) and, if a != nullptr, a = s·act(z):
// one pass over z for both; n contiguous elements.
template <typename scalar_t>
void activation_backward(const scalar_t* z, scalar_t* dz, scalar_t* a, int64_t n, Activation act, double scaling) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t s = static_cast<opmath_t>(scaling);
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t zi = static_cast<opmath_t>(z[i]);
    dz[i] = static_cast<scalar_t>(static_cast<opmath_t>(dz[i]) * s * activate_grad(act, zi));
    if (a != nullptr) {
      a[i] = static_cast<scalar_t>(s * activate(act, zi));
    }
  }
}

std::tuple<Tensor, Tensor> adapter_forward_cpu(const Tensor& h_in, const Tensor& w_down_in,
                                               const std::optional<Tensor>& b_down_in, const Tensor& w_up_in,
                                               const std::optional<Tensor>& b_up_in, c10::string_view activation,
                                               double scaling, bool residual) {
  const AdapterSizes n =
      check_adapter_forward_inputs(c10::DeviceType::CPU, h_in, w_down_in, b_down_in, w_up_in, b_up_in);
  const Activation act = parse_activation(kAdapterOps.forward, activation);
  const Tensor h = h_in.detach(), w_down_t = w_down_in.detach().t(), w_up_t = w_up_in.detach().t();
  const std::optional<Tensor> b_down = is_given(b_down_in) ? std::optional<Tensor>(b_down_in->detach()) : std::nullopt;
  const std::optional<Tensor> b_up = is_given(b_up_in) ? std::optional<Tensor>(b_up_in->detach()) : std::nullopt;

  Tensor z = at::empty({n.M, n.Bn}, h.options());
  Tensor out = at::empty({n.M, n.D}, h.options());
  for_each_row_chunk(n.M, n.D, [&](int64_t row, int64_t rows) {
    const Tensor h_c = h.narrow(0, row, rows);
    Tensor z_c = z.narrow(0, row, rows), out_c = out.narrow(0, row, rows);
    if (b_down.has_value()) {
      z_c.copy_(*b_down);  // broadcast over the rows: the GEMM then accumulates onto it
    }
    gemm_into(z_c, h_c, w_down_t, b_down.has_value());
    Tensor a_c = at::empty_like(z_c);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "lowrank_adapter_activation", [&] {
      scaled_activation<scalar_t>(z_c.const_data_ptr<scalar_t>(), a_c.mutable_data_ptr<scalar_t>(), a_c.numel(),
                                  act, scaling);
    });
    if (residual && b_up.has_value()) {
      at::add_out(out_c, h_c, *b_up, scaling);
    } else if (residual) {
      out_c.copy_(h_c);
    } else if (b_up.has_value()) {
      out_c.copy_(*b_up).mul_(scaling);
    }
    gemm_into(out_c, a_c, w_up_t, residual || b_up.has_value());
  });
  return {std::move(out), std::move(z)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_backward_cpu(
    const Tensor& grad_out_in, const Tensor& h_in, const Tensor& z_in, const Tensor& w_down_in, const Tensor& w_up_in,
    c10::string_view activation, double scaling, bool residual, bool needs_dh, bool needs_dw_down,
    bool needs_db_down, bool needs_dw_up, bool needs_db_up) {
  const AdapterSizes n =
      check_adapter_backward_inputs(c10::DeviceType::CPU, grad_out_in, h_in, z_in, w_down_in, w_up_in);
  const Activation act = parse_activation(kAdapterOps.backward, activation);
  const Tensor g = grad_out_in.detach(), h = h_in.detach(), z = z_in.detach().contiguous();
  const Tensor w_down = w_down_in.detach(), w_up = w_up_in.detach();
  const auto dtype = h.scalar_type();

  // Reductions over rows go to one slot per thread, summed at the end in slot order (so the
  // result does not depend on which thread finishes first); fp32 slots for half types.
  const int64_t slots = at::get_num_threads();
  const auto partial_dtype = chunk_accumulate_dtype(dtype);
  const auto partial = h.options().dtype(partial_dtype);
  Tensor dw_down_parts = needs_dw_down ? at::zeros({slots, n.Bn, n.D}, partial) : Tensor();
  // dW_u accumulates transposed, as a_cᵀ·g_c: the faster operand order for both GEMM libraries.
  Tensor dw_up_t_parts = needs_dw_up ? at::zeros({slots, n.Bn, n.D}, partial) : Tensor();
  Tensor db_down_parts = needs_db_down ? at::zeros({slots, n.Bn}, partial) : Tensor();
  Tensor db_up_parts = needs_db_up ? at::zeros({slots, n.D}, partial) : Tensor();
  Tensor dh = needs_dh ? at::empty({n.M, n.D}, h.options()) : skipped_grad(h);

  for_each_row_chunk(n.M, n.D, [&](int64_t row, int64_t rows) {
    const int64_t slot = at::get_thread_num();
    const Tensor g_c = g.narrow(0, row, rows), z_c = z.narrow(0, row, rows);
    Tensor dz_c = at::empty({rows, n.Bn}, h.options());
    gemm_into(dz_c, g_c, w_up, false);
    Tensor a_c = needs_dw_up ? at::empty_like(dz_c) : Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowrank_adapter_activation_backward", [&] {
      activation_backward<scalar_t>(z_c.const_data_ptr<scalar_t>(), dz_c.mutable_data_ptr<scalar_t>(),
                                    needs_dw_up ? a_c.mutable_data_ptr<scalar_t>() : nullptr, dz_c.numel(), act,
                                    scaling);
    });
    if (needs_dh) {
      Tensor dh_c = dh.narrow(0, row, rows);
      if (residual) {
        dh_c.copy_(g_c);
      }
      gemm_into(dh_c, dz_c, w_down, residual);
    }
    if (needs_dw_down) {
      Tensor part = dw_down_parts.select(0, slot);
      accumulate_gemm(part, dz_c.t(), h.narrow(0, row, rows));
    }
    if (needs_dw_up) {
      Tensor part = dw_up_t_parts.select(0, slot);
      accumulate_gemm(part, a_c.t(), g_c);
    }
    if (needs_db_down) {
      db_down_parts.select(0, slot).add_(at::sum(dz_c, {0}, false, partial_dtype));
    }
    if (needs_db_up) {
      db_up_parts.select(0, slot).add_(at::sum(g_c, {0}, false, partial_dtype));
    }
  });

  const auto total = [&](const Tensor& parts) { return parts.sum(0).to(dtype); };
  Tensor dw_down = needs_dw_down ? total(dw_down_parts) : skipped_grad(h);
  Tensor dw_up = needs_dw_up ? total(dw_up_t_parts).t().contiguous() : skipped_grad(h);
  Tensor db_down = needs_db_down ? total(db_down_parts) : skipped_grad(h);
  Tensor db_up = needs_db_up ? total(db_up_parts).mul_(scaling) : skipped_grad(h);
  return {std::move(dh), std::move(dw_down), std::move(db_down), std::move(dw_up), std::move(db_up)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  impl_forward_backward(m, kAdapterOps, &adapter_forward_cpu, &adapter_backward_cpu);
}

}  // namespace lowrank

// CPU kernels of lowrank::multi_lora_linear_forward_native and lowrank::multi_lora_linear_backward_native.
//
// Rows are grouped by adapter with a counting sort (which also checks every index). The
// adapters' rows are cut into one run per thread, each run where the adapter changes into
// pieces, and each piece into blocks of rows. A block's rows of x (dropout applied), dy and xa
// are gathered into contiguous buffers that stay in cache while every rank-r product of the
// block reads them: the AVX-512 skinny kernels of skinny_gemm.h for fp32, ATen matmuls for the
// other dtypes. The low-rank term, with the bias, is written into y (and s·D⊙(dyB·A) into dx)
// first; the base GEMM (MKL through at::addmm_, beta = 1) then accumulates x·Wᵀ (dy·W) into it,
// so the low-rank term costs one write of the output rather than an extra read-modify-write.
// dA and dB are summed per piece (privately, no locks) and the pieces of each adapter added
// at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "../hash_dropout.h"
#include "../multi_lora_linear_common.h"
#include "skinny_gemm.h"

namespace lowrank {
namespace {

using at::Tensor;

constexpr const char* kForwardOp = "multi_lora_linear_forward_native";
constexpr const char* kBackwardOp = "multi_lora_linear_backward_native";

// Rows per block on the skinny path: a multiple of rows_times_skinny's 12-row blocks, few enough
// that the block's rows of x, dy and dx stay in L2 (lora_linear's backward measured 24 best).
constexpr int64_t kSkinnyBlockRows = 24;
// Rows per block on the ATen path: enough to amortise each matmul's overhead.
constexpr int64_t kAtenBlockRows = 256;
// Fewest rows worth a thread of their own.
constexpr int64_t kMinRowsPerPart = 96;

// Rows grouped by adapter: rows[begin(a) .. end(a)) are adapter a's rows in increasing order,
// rows[0 .. begin(0)) the rows without one (-1).
struct RowGroups {
  std::vector<int64_t> rows;
  std::vector<int64_t> starts;  // n + 2 entries: starts[a + 1] = begin(a), starts[n + 1] = M
  int64_t begin(int64_t adapter) const { return starts[adapter + 1]; }
  int64_t end(int64_t adapter) const { return starts[adapter + 2]; }
};

template <typename index_t>
RowGroups group_rows_of(const index_t* index, int64_t M, int64_t n, const char* op) {
  RowGroups groups;
  groups.starts.assign(n + 2, 0);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t adapter = index[i];
    TORCH_CHECK_VALUE(adapter >= -1 && adapter < n, op,
                      ": adapter_index must hold -1 (no adapter) or an adapter in [0, ", n, "); adapter_index[", i,
                      "] = ", adapter);
    ++groups.starts[adapter + 2];
  }
  for (int64_t bucket = 1; bucket < n + 2; ++bucket) {
    groups.starts[bucket] += groups.starts[bucket - 1];
  }
  std::vector<int64_t> next(groups.starts.begin(), groups.starts.end() - 1);
  groups.rows.resize(M);
  for (int64_t i = 0; i < M; ++i) {
    groups.rows[next[index[i] + 1]++] = i;
  }
  return groups;
}

RowGroups group_rows(const Tensor& adapter_index, int64_t n, const char* op) {
  const Tensor index = adapter_index.contiguous();
  return AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "lowrank_group_rows", [&] {
    return group_rows_of(index.const_data_ptr<index_t>(), index.numel(), n, op);
  });
}

// A run of one adapter's rows: groups.rows[begin .. end).
struct Piece {
  int64_t adapter, begin, end;
};

// The adapters' rows cut into one run per thread, each cut again where the adapter changes:
// part p owns pieces[part_starts[p] .. part_starts[p + 1]). Pieces come in row-group order, so
// the pieces of one adapter are consecutive.
struct Work {
  std::vector<Piece> pieces;
  std::vector<int64_t> part_starts;
};

Work split_work(const RowGroups& groups, int64_t n) {
  const int64_t first = groups.begin(0), total = groups.end(n - 1) - first;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / kMinRowsPerPart));
  Work work;
  int64_t adapter = 0;
  for (int64_t part = 0; part < parts; ++part) {
    work.part_starts.push_back(static_cast<int64_t>(work.pieces.size()));
    const int64_t part_end = first + total * (part + 1) / parts;
    for (int64_t position = first + total * part / parts; position < part_end;) {
      while (groups.end(adapter) <= position) {
        ++adapter;
      }
      const int64_t end = std::min(part_end, groups.end(adapter));
      work.pieces.push_back({adapter, position, end});
      position = end;
    }
  }
  work.part_starts.push_back(static_cast<int64_t>(work.pieces.size()));
  return work;
}

// Calls body(part, piece index, rows, row count) for every block of every piece, the parts in
// parallel (a part's blocks on one thread, in order).
template <typename Body>
void for_each_block(const Work& work, const RowGroups& groups, int64_t block_rows, const Body& body) {
  const int64_t parts = static_cast<int64_t>(work.part_starts.size()) - 1;
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: see the kernels' own guard
    for (int64_t part = part_begin; part < part_end; ++part) {
      for (int64_t index = work.part_starts[part]; index < work.part_starts[part + 1]; ++index) {
        const Piece& piece = work.pieces[index];
        for (int64_t position = piece.begin; position < piece.end; position += block_rows) {
          body(part, index, groups.rows.data() + position, std::min(block_rows, piece.end - position));
        }
      }
    }
  });
}

// The hash dropout of one adapter's rows (see lowrank/ops/hash_dropout.py).
struct RowDropout {
  int64_t seed;
  AdapterDropout dropout;
};

// out[i, :] = D⊙src[rows[i], :] (the plain row without dropout); out is contiguous [m, L].
template <typename scalar_t>
void gather_rows(const Tensor& src, const int64_t* rows, int64_t m, scalar_t* out,
                 const std::optional<RowDropout>& dropout) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t L = src.size(1), row_stride = src.stride(0), col_stride = src.stride(1);
  const scalar_t* data = src.const_data_ptr<scalar_t>();
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* in = data + rows[i] * row_stride;
    scalar_t* row_out = out + i * L;
    if (dropout.has_value()) {
      const uint32_t row_key = dropout_row_key(dropout->seed, rows[i]);
      const opmath_t keep_scale = static_cast<opmath_t>(dropout->dropout.keep_scale);
      for (int64_t k = 0; k < L; ++k) {
        row_out[k] = dropout_keep(row_key, k, dropout->dropout.threshold)
                         ? static_cast<scalar_t>(static_cast<opmath_t>(in[k * col_stride]) * keep_scale)
                         : scalar_t(0);
      }
    } else if (col_stride == 1) {
      std::memcpy(row_out, in, L * sizeof(scalar_t));
    } else {
      for (int64_t k = 0; k < L; ++k) {
        row_out[k] = in[k * col_stride];
      }
    }
  }
}

// values[i, :] = D[rows[i], :]⊙values[i, :] for contiguous values [m, L].
template <typename scalar_t>
void drop_in_place(scalar_t* values, int64_t m, int64_t L, const int64_t* rows, const RowDropout& dropout) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t keep_scale = static_cast<opmath_t>(dropout.dropout.keep_scale);
  for (int64_t i = 0; i < m; ++i) {
    const uint32_t row_key = dropout_row_key(dropout.seed, rows[i]);
    scalar_t* row = values + i * L;
    for (int64_t k = 0; k < L; ++k) {
      row[k] = dropout_keep(row_key, k, dropout.dropout.threshold)
                   ? static_cast<scalar_t>(static_cast<opmath_t>(row[k]) * keep_scale)
                   : scalar_t(0);
    }
  }
}

// dst[rows[i], :] = in[i, :] for contiguous in [m, L] and dst [M, L].
template <typename scalar_t>
void scatter_rows(const scalar_t* in, int64_t m, const int64_t* rows, Tensor& dst) {
  const int64_t L = dst.size(1);
  scalar_t* data = dst.data_ptr<scalar_t>();
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(data + rows[i] * L, in + i * L, L * sizeof(scalar_t));
  }
}

// dst[rows[i], :] = fill (a contiguous row) for the rows without an adapter.
template <typename scalar_t>
void fill_unadapted_rows(const RowGroups& groups, const Tensor& fill, Tensor& dst) {
  const int64_t L = dst.size(1);
  const scalar_t* fill_data = fill.const_data_ptr<scalar_t>();
  scalar_t* data = dst.data_ptr<scalar_t>();
  at::parallel_for(0, groups.begin(0), std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(L, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t position = begin; position < end; ++position) {
                       std::memcpy(data + groups.rows[position] * L, fill_data, L * sizeof(scalar_t));
                     }
                   });
}

std::optional<RowDropout> dropout_of(const std::vector<AdapterDropout>& dropouts, int64_t adapter, int64_t seed) {
  return dropouts[adapter].active ? std::optional<RowDropout>(RowDropout{seed, dropouts[adapter]}) : std::nullopt;
}

int64_t seed_value(at::ArrayRef<double> dropout_p, const std::optional<Tensor>& seed) {
  return any_dropout(dropout_p) ? seed->item<int64_t>() : 0;
}

bool skinny_path(const Tensor& x) { return x.scalar_type() == at::kFloat && cpu::skinny_kernels_available(); }

// The skinny kernels read rows in place when their columns are unit-stride.
bool unit_columns(const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

// The block's rows of src for the skinny kernels: read in place, or gathered into buffer (a
// [rows, cols] part buffer) where dropout applies or src's columns are strided.
cpu::RowSet<const float> skinny_operand(const Tensor& src, const int64_t* rows, int64_t m, Tensor& buffer,
                                        const std::optional<RowDropout>& dropout) {
  if (!dropout.has_value() && unit_columns(src)) {
    return {src.const_data_ptr<float>(), src.stride(0), rows};
  }
  gather_rows<float>(src, rows, m, buffer.data_ptr<float>(), dropout);
  return {buffer.const_data_ptr<float>(), src.size(1)};
}

// One [rows, cols] buffer per part: a part's blocks run in order on one thread and reuse it.
std::vector<Tensor> part_buffers(const Work& work, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  std::vector<Tensor> buffers;
  for (size_t part = 0; part + 1 < work.part_starts.size(); ++part) {
    buffers.push_back(at::empty({rows, cols}, options));
  }
  return buffers;
}

// fp32: x's rows are read in place (gathered only for dropout or strided columns), y's rows
// written in place; only xa goes through a block buffer.
void forward_blocks_skinny(const Tensor& x, const Tensor& bias_row, const Tensor& lora_A_t, const Tensor& lora_B_t,
                           at::ArrayRef<double> scaling, const std::vector<AdapterDropout>& dropouts, int64_t seed,
                           const RowGroups& groups, const Work& work, const MultiLoraSizes& n, Tensor& y,
                           Tensor& xa) {
  std::vector<Tensor> x_blocks = part_buffers(work, kSkinnyBlockRows, n.K, x.options());
  std::vector<Tensor> xa_blocks = part_buffers(work, kSkinnyBlockRows, n.r, x.options());
  const float* a_t = lora_A_t.const_data_ptr<float>();  // [n, K, r]
  const float* b_t = lora_B_t.const_data_ptr<float>();  // [n, r, N]
  float* y_data = y.data_ptr<float>();
  for_each_block(work, groups, kSkinnyBlockRows, [&](int64_t part, int64_t piece, const int64_t* rows, int64_t m) {
    const int64_t adapter = work.pieces[piece].adapter;
    const cpu::RowSet<const float> x_rows =
        skinny_operand(x, rows, m, x_blocks[part], dropout_of(dropouts, adapter, seed));
    float* xa_block = xa_blocks[part].data_ptr<float>();
    cpu::rows_times_skinny(x_rows, m, n.K, a_t + adapter * n.K * n.r, n.r, xa_block, n.r);
    cpu::add_skinny_times_rows(bias_row.const_data_ptr<float>(), 0, xa_block, b_t + adapter * n.r * n.N, m, n.N, n.r,
                               static_cast<float>(scaling[adapter]), {y_data, n.N, rows});
    scatter_rows<float>(xa_block, m, rows, xa);
  });
}

// Other dtypes (or no AVX-512): blocks gathered into buffers and multiplied by ATen.
template <typename scalar_t>
void forward_blocks_aten(const Tensor& x, const Tensor& bias_row, const Tensor& lora_A_t, const Tensor& lora_B_t,
                         at::ArrayRef<double> scaling, const std::vector<AdapterDropout>& dropouts, int64_t seed,
                         const RowGroups& groups, const Work& work, const MultiLoraSizes& n, Tensor& y, Tensor& xa) {
  std::vector<Tensor> x_blocks = part_buffers(work, kAtenBlockRows, n.K, x.options());
  std::vector<Tensor> xa_blocks = part_buffers(work, kAtenBlockRows, n.r, x.options());
  std::vector<Tensor> y_blocks = part_buffers(work, kAtenBlockRows, n.N, x.options());
  for_each_block(work, groups, kAtenBlockRows, [&](int64_t part, int64_t piece, const int64_t* rows, int64_t m) {
    const int64_t adapter = work.pieces[piece].adapter;
    Tensor x_block = x_blocks[part].narrow(0, 0, m), xa_block = xa_blocks[part].narrow(0, 0, m);
    Tensor y_block = y_blocks[part].narrow(0, 0, m);
    gather_rows<scalar_t>(x, rows, m, x_block.data_ptr<scalar_t>(), dropout_of(dropouts, adapter, seed));
    at::mm_out(xa_block, x_block, lora_A_t[adapter]);
    at::addmm_out(y_block, bias_row, xa_block, lora_B_t[adapter], 1.0, scaling[adapter]);
    scatter_rows<scalar_t>(xa_block.const_data_ptr<scalar_t>(), m, rows, xa);
    scatter_rows<scalar_t>(y_block.const_data_ptr<scalar_t>(), m, rows, y);
  });
}

std::tuple<Tensor, Tensor> multi_lora_linear_forward_cpu(const Tensor& x, const Tensor& weight,
                                                         const std::optional<Tensor>& bias,
                                                         const Tensor& adapter_index, const Tensor& lora_A,
                                                         const Tensor& lora_B, at::ArrayRef<double> scaling,
                                                         at::ArrayRef<double> dropout_p,
                                                         const std::optional<Tensor>& seed) {
  const MultiLoraSizes n = check_multi_forward_inputs(kForwardOp, c10::DeviceType::CPU, x, weight, bias,
                                                      adapter_index, lora_A, lora_B, scaling, dropout_p, seed);
  // The custom op owns autograd: no graph for the ATen calls here (out= calls refuse inputs that require grad).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const RowGroups groups = group_rows(adapter_index, n.n, kForwardOp);
  const Work work = split_work(groups, n.n);
  const Tensor bias_row = bias.has_value() && bias->defined() ? bias->contiguous() : at::zeros({n.N}, x.options());
  // Per adapter Aᵀ [K, r] and Bᵀ [r, N]: the skinny kernels' operand layouts (and fine for ATen).
  const Tensor lora_A_t = lora_A.transpose(1, 2).contiguous(), lora_B_t = lora_B.transpose(1, 2).contiguous();
  const std::vector<AdapterDropout> dropouts = adapter_dropouts(dropout_p);
  const int64_t seed_int = seed_value(dropout_p, seed);
  Tensor y = at::empty({n.M, n.N}, x.options());
  Tensor xa = at::zeros({n.M, n.r}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_multi_lora_forward", [&] {
    if (skinny_path(x)) {
      forward_blocks_skinny(x, bias_row, lora_A_t, lora_B_t, scaling, dropouts, seed_int, groups, work, n, y, xa);
    } else {
      forward_blocks_aten<scalar_t>(x, bias_row, lora_A_t, lora_B_t, scaling, dropouts, seed_int, groups, work, n, y,
                                    xa);
    }
    fill_unadapted_rows<scalar_t>(groups, bias_row, y);
  });
  y.addmm_(x, weight.t());
  return {std::move(y), std::move(xa)};
}

// Where each backward block puts its products: dA and dBᵀ of its piece, and dx (if needed).
struct BackwardTargets {
  Tensor& dA_pieces;   // [pieces, r, K]
  Tensor& dBt_pieces;  // [pieces, r, N]
  std::optional<Tensor>& dx;
};

// fp32: dy, x and xa rows read in place (x gathered for dropout), dx rows written in place
// without dropout; dyB goes through a block buffer.
void backward_blocks_skinny(const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& lora_A_rows,
                            const Tensor& lora_B_rows, at::ArrayRef<double> scaling,
                            const std::vector<AdapterDropout>& dropouts, int64_t seed, const RowGroups& groups,
                            const Work& work, const MultiLoraSizes& n, BackwardTargets targets) {
  std::vector<Tensor> dy_blocks = part_buffers(work, kSkinnyBlockRows, n.N, x.options());
  std::vector<Tensor> x_blocks = part_buffers(work, kSkinnyBlockRows, n.K, x.options());
  std::vector<Tensor> dyB_blocks = part_buffers(work, kSkinnyBlockRows, n.r, x.options());
  std::vector<Tensor> dx_blocks = part_buffers(work, kSkinnyBlockRows, n.K, x.options());
  const Tensor zero_row = at::zeros({n.K}, x.options());
  const float* a_rows = lora_A_rows.const_data_ptr<float>();  // [n, r, K]
  const float* b_rows = lora_B_rows.const_data_ptr<float>();  // [n, N, r]
  float* dA_data = targets.dA_pieces.data_ptr<float>();
  float* dBt_data = targets.dBt_pieces.data_ptr<float>();
  for_each_block(work, groups, kSkinnyBlockRows, [&](int64_t part, int64_t piece, const int64_t* rows, int64_t m) {
    const int64_t adapter = work.pieces[piece].adapter;
    const std::optional<RowDropout> dropout = dropout_of(dropouts, adapter, seed);
    const cpu::RowSet<const float> dy_rows = skinny_operand(grad_y, rows, m, dy_blocks[part], std::nullopt);
    const cpu::RowSet<const float> x_rows = skinny_operand(x, rows, m, x_blocks[part], dropout);
    float* dyB = dyB_blocks[part].data_ptr<float>();
    cpu::rows_times_skinny(dy_rows, m, n.N, b_rows + adapter * n.N * n.r, n.r, dyB, n.r);
    cpu::accumulate_skinny_t_times_rows({xa.const_data_ptr<float>(), n.r, rows}, dy_rows, m, n.N, n.r,
                                        dBt_data + piece * n.r * n.N);
    cpu::accumulate_skinny_t_times_rows({dyB, n.r}, x_rows, m, n.K, n.r, dA_data + piece * n.r * n.K);
    if (!targets.dx.has_value()) {
      return;
    }
    const float* a = a_rows + adapter * n.r * n.K;
    const float s = static_cast<float>(scaling[adapter]);
    if (dropout.has_value()) {
      float* buffer = dx_blocks[part].data_ptr<float>();
      cpu::add_skinny_times_rows(zero_row.const_data_ptr<float>(), 0, dyB, a, m, n.K, n.r, s, {buffer, n.K});
      drop_in_place<float>(buffer, m, n.K, rows, *dropout);
      scatter_rows<float>(buffer, m, rows, *targets.dx);
    } else {
      cpu::add_skinny_times_rows(zero_row.const_data_ptr<float>(), 0, dyB, a, m, n.K, n.r, s,
                                 {targets.dx->data_ptr<float>(), n.K, rows});
    }
  });
}

// Other dtypes (or no AVX-512): blocks gathered into buffers and multiplied by ATen.
template <typename scalar_t>
void backward_blocks_aten(const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& lora_A_rows,
                          const Tensor& lora_B_rows, at::ArrayRef<double> scaling,
                          const std::vector<AdapterDropout>& dropouts, int64_t seed, const RowGroups& groups,
                          const Work& work, const MultiLoraSizes& n, BackwardTargets targets) {
  std::vector<Tensor> dy_blocks = part_buffers(work, kAtenBlockRows, n.N, x.options());
  std::vector<Tensor> x_blocks = part_buffers(work, kAtenBlockRows, n.K, x.options());
  std::vector<Tensor> xa_blocks = part_buffers(work, kAtenBlockRows, n.r, x.options());
  std::vector<Tensor> dyB_blocks = part_buffers(work, kAtenBlockRows, n.r, x.options());
  std::vector<Tensor> dx_blocks = part_buffers(work, kAtenBlockRows, n.K, x.options());
  for_each_block(work, groups, kAtenBlockRows, [&](int64_t part, int64_t piece, const int64_t* rows, int64_t m) {
    const int64_t adapter = work.pieces[piece].adapter;
    const std::optional<RowDropout> dropout = dropout_of(dropouts, adapter, seed);
    Tensor dy_block = dy_blocks[part].narrow(0, 0, m), x_block = x_blocks[part].narrow(0, 0, m);
    Tensor xa_block = xa_blocks[part].narrow(0, 0, m), dyB_block = dyB_blocks[part].narrow(0, 0, m);
    gather_rows<scalar_t>(grad_y, rows, m, dy_block.data_ptr<scalar_t>(), std::nullopt);
    gather_rows<scalar_t>(x, rows, m, x_block.data_ptr<scalar_t>(), dropout);
    gather_rows<scalar_t>(xa, rows, m, xa_block.data_ptr<scalar_t>(), std::nullopt);
    at::mm_out(dyB_block, dy_block, lora_B_rows[adapter]);
    Tensor dBt_piece = targets.dBt_pieces[piece], dA_piece = targets.dA_pieces[piece];
    accumulate_product(dBt_piece, xa_block.t(), dy_block, 1.0);
    accumulate_product(dA_piece, dyB_block.t(), x_block, 1.0);
    if (targets.dx.has_value()) {
      Tensor dx_block = dx_blocks[part].narrow(0, 0, m);
      at::mm_out(dx_block, dyB_block, lora_A_rows[adapter]).mul_(scaling[adapter]);
      if (dropout.has_value()) {
        drop_in_place<scalar_t>(dx_block.data_ptr<scalar_t>(), m, n.K, rows, *dropout);
      }
      scatter_rows<scalar_t>(dx_block.const_data_ptr<scalar_t>(), m, rows, *targets.dx);
    }
  });
}

// grad[a] = scaling[a]·Σ pieces[p] over adapter a's pieces; adapters without rows get zero.
Tensor sum_pieces_per_adapter(const Tensor& pieces, const Work& work, at::ArrayRef<double> scaling) {
  std::vector<int64_t> adapters;
  for (const Piece& piece : work.pieces) {
    adapters.push_back(piece.adapter);
  }
  const int64_t n = static_cast<int64_t>(scaling.size());
  std::vector<int64_t> shape(pieces.sizes().begin(), pieces.sizes().end());
  shape[0] = n;
  Tensor sums = at::zeros(shape, pieces.options());
  sums.index_add_(0, at::tensor(adapters, at::kLong), pieces);
  const Tensor scale = at::tensor(std::vector<double>(scaling.begin(), scaling.end()), at::kDouble);
  return sums.mul_(scale.to(pieces.scalar_type()).view({n, 1, 1}));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> multi_lora_linear_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& weight, const Tensor& adapter_index,
    const Tensor& lora_A, const Tensor& lora_B, at::ArrayRef<double> scaling, at::ArrayRef<double> dropout_p,
    const std::optional<Tensor>& seed, bool needs_dx, bool needs_dweight, bool needs_dbias) {
  const MultiLoraSizes n = check_multi_backward_inputs(kBackwardOp, c10::DeviceType::CPU, grad_y, x, xa, weight,
                                                       adapter_index, lora_A, lora_B, scaling, dropout_p, seed);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto not_needed = [&] { return at::empty({0}, x.options()); };
  const RowGroups groups = group_rows(adapter_index, n.n, kBackwardOp);
  const Work work = split_work(groups, n.n);
  const int64_t pieces = static_cast<int64_t>(work.pieces.size());
  const auto accumulate = x.options().dtype(chunk_accumulate_dtype(x.scalar_type()));
  Tensor dA_pieces = at::zeros({pieces, n.r, n.K}, accumulate);
  Tensor dBt_pieces = at::zeros({pieces, n.r, n.N}, accumulate);
  std::optional<Tensor> dx;
  if (needs_dx) {
    dx = at::empty({n.M, n.K}, x.options());
  }
  // Per adapter A [r, K] and B [N, r]: the skinny kernels' operand layouts (and fine for ATen).
  const Tensor lora_A_rows = lora_A.contiguous(), lora_B_rows = lora_B.contiguous(), xa_rows = xa.contiguous();
  const std::vector<AdapterDropout> dropouts = adapter_dropouts(dropout_p);
  const int64_t seed_int = seed_value(dropout_p, seed);
  const BackwardTargets targets{dA_pieces, dBt_pieces, dx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_multi_lora_backward", [&] {
    if (skinny_path(x)) {
      backward_blocks_skinny(grad_y, x, xa_rows, lora_A_rows, lora_B_rows, scaling, dropouts, seed_int, groups, work,
                             n, targets);
    } else {
      backward_blocks_aten<scalar_t>(grad_y, x, xa_rows, lora_A_rows, lora_B_rows, scaling, dropouts, seed_int,
                                     groups, work, n, targets);
    }
    if (dx.has_value()) {
      fill_unadapted_rows<scalar_t>(groups, at::zeros({n.K}, x.options()), *dx);
    }
  });
  if (dx.has_value()) {
    dx->addmm_(grad_y, weight);
  }
  Tensor dA = sum_pieces_per_adapter(dA_pieces, work, scaling).to(x.scalar_type());
  Tensor dB = sum_pieces_per_adapter(dBt_pieces, work, scaling).transpose(1, 2).contiguous().to(x.scalar_type());
  Tensor dweight = needs_dweight ? at::mm(grad_y.t(), x) : not_needed();
  Tensor dbias = needs_dbias ? grad_y.sum(0) : not_needed();
  return {dx.has_value() ? std::move(*dx) : not_needed(), std::move(dweight), std::move(dbias), std::move(dA),
          std::move(dB)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("multi_lora_linear_forward_native", &multi_lora_linear_forward_cpu);
  m.impl("multi_lora_linear_backward_native", &multi_lora_linear_backward_cpu);
}

}  // namespace lowrank

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
// Each scaling multiplies a small factor (Bᵀ, or dy·B), never a GEMM's alpha, so a NaN in an
// adapter's A or B reaches its rows at scaling 0 too.
// dA and dB are summed per piece (privately, no locks) and the pieces of each adapter added
// at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#include "../hash_dropout.h"
#include "../multi_lora_linear_common.h"
#include "skinny_gemm.h"

namespace lowrank {
namespace {

using at::Tensor;

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
  at::parallel_for(0, groups.begin(0), rows_in(kParallelGrainElements, L), [&](int64_t begin, int64_t end) {
    for (int64_t position = begin; position < end; ++position) {
      std::memcpy(data + groups.rows[position] * L, fill_data, L * sizeof(scalar_t));
    }
  });
}

// values as an [n, 1, 1] float64 tensor: one factor per adapter for a stack of n matrices.
Tensor per_adapter_factors(at::ArrayRef<double> values) {
  return at::tensor(std::vector<double>(values.begin(), values.end()), at::kDouble)
      .view({static_cast<int64_t>(values.size()), 1, 1});
}

// One call's rows grouped by adapter and split into pieces, its sizes and each adapter's dropout:
// what all its blocks share.
struct Blocks {
  RowGroups groups;
  Work work;
  MultiLoraSizes n;
  std::vector<AdapterDropout> dropouts;
  int64_t seed;

  Blocks(const char* op, const Tensor& adapter_index, const MultiLoraSizes& sizes, at::ArrayRef<double> dropout_p,
         const std::optional<Tensor>& seed_tensor)
      : groups(group_rows(adapter_index, sizes.n, op)),
        work(split_work(groups, sizes.n)),
        n(sizes),
        dropouts(adapter_dropouts(dropout_p)),
        seed(any_dropout(dropout_p) ? seed_tensor->item<int64_t>() : 0) {}

  // The hash dropout of an adapter's rows; none at p = 0.
  std::optional<RowDropout> dropout_of(int64_t adapter) const {
    return dropouts[adapter].active ? std::optional<RowDropout>(RowDropout{seed, dropouts[adapter]}) : std::nullopt;
  }

  // Per part, a [rows, c] buffer for each c of cols: buffers[part][i] has cols[i] columns. A
  // part's blocks run in order on one thread and reuse its buffers.
  std::vector<std::vector<Tensor>> part_buffers(int64_t rows, std::initializer_list<int64_t> cols,
                                                const at::TensorOptions& options) const {
    std::vector<std::vector<Tensor>> buffers(work.part_starts.size() - 1);
    for (std::vector<Tensor>& part : buffers) {
      for (const int64_t width : cols) {
        part.push_back(at::empty({rows, width}, options));
      }
    }
    return buffers;
  }

  // Calls body(part, piece index, adapter, rows, row count) for every block of block_rows rows
  // of every piece, the parts in parallel (a part's blocks on one thread, in order).
  template <typename Body>
  void for_each(int64_t block_rows, const Body& body) const {
    const int64_t parts = static_cast<int64_t>(work.part_starts.size()) - 1;
    at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: see the kernels' own guard
      for (int64_t part = part_begin; part < part_end; ++part) {
        for (int64_t index = work.part_starts[part]; index < work.part_starts[part + 1]; ++index) {
          const Piece& piece = work.pieces[index];
          for (int64_t position = piece.begin; position < piece.end; position += block_rows) {
            body(part, index, piece.adapter, groups.rows.data() + position,
                 std::min(block_rows, piece.end - position));
          }
        }
      }
    });
  }
};

bool skinny_path(const Tensor& x) { return x.scalar_type() == at::kFloat && cpu::skinny_kernels_available(); }

// The skinny kernels read rows in place when their columns are unit-stride.
bool unit_columns(const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

// The block's rows of src for the skinny kernels: read in place, or gathered into buffer (a
// [rows, cols] part buffer) where dropout applies or src's columns are strided.
cpu::RowSet<const float> skinny_operand(const Tensor& src, const int64_t* rows, int64_t m, const Tensor& buffer,
                                        const std::optional<RowDropout>& dropout) {
  if (!dropout.has_value() && unit_columns(src)) {
    return {src.const_data_ptr<float>(), src.stride(0), rows};
  }
  gather_rows<float>(src, rows, m, buffer.data_ptr<float>(), dropout);
  return {buffer.const_data_ptr<float>(), src.size(1)};
}

// The forward's operands, per adapter Aᵀ [K, r] and s·Bᵀ [r, N] (the scaling on the small
// factor) in the skinny kernels' layouts (fine for ATen too), and its outputs.
struct ForwardOperands {
  const Tensor& x;
  const Tensor& bias_row;
  const Tensor& lora_A_t;
  const Tensor& scaled_lora_B_t;
  Tensor& y;
  Tensor& xa;
};

// fp32: x's rows are read in place (gathered only for dropout or strided columns), y's rows
// written in place; only xa goes through a block buffer.
void forward_blocks_skinny(const ForwardOperands& op, const Blocks& blocks) {
  const MultiLoraSizes& n = blocks.n;
  const float* a_t = op.lora_A_t.const_data_ptr<float>();         // [n, K, r]
  const float* b_t = op.scaled_lora_B_t.const_data_ptr<float>();  // [n, r, N]
  float* y_data = op.y.data_ptr<float>();
  const auto buffers = blocks.part_buffers(kSkinnyBlockRows, {n.K, n.r}, op.x.options());  // x, xa
  blocks.for_each(kSkinnyBlockRows, [&](int64_t part, int64_t, int64_t adapter, const int64_t* rows, int64_t m) {
    const cpu::RowSet<const float> x_rows =
        skinny_operand(op.x, rows, m, buffers[part][0], blocks.dropout_of(adapter));
    float* xa_block = buffers[part][1].data_ptr<float>();
    cpu::rows_times_skinny(x_rows, m, n.K, a_t + adapter * n.K * n.r, n.r, xa_block, n.r);
    cpu::add_skinny_times_rows(op.bias_row.const_data_ptr<float>(), 0, xa_block, b_t + adapter * n.r * n.N, m, n.N,
                               n.r, 1.0f, {y_data, n.N, rows});
    scatter_rows<float>(xa_block, m, rows, op.xa);
  });
}

// Other dtypes (or no AVX-512): blocks gathered into buffers and multiplied by ATen.
template <typename scalar_t>
void forward_blocks_aten(const ForwardOperands& op, const Blocks& blocks) {
  const MultiLoraSizes& n = blocks.n;
  const auto buffers = blocks.part_buffers(kAtenBlockRows, {n.K, n.r, n.N}, op.x.options());  // x, xa, y
  blocks.for_each(kAtenBlockRows, [&](int64_t part, int64_t, int64_t adapter, const int64_t* rows, int64_t m) {
    Tensor x_block = buffers[part][0].narrow(0, 0, m), xa_block = buffers[part][1].narrow(0, 0, m);
    Tensor y_block = buffers[part][2].narrow(0, 0, m);
    gather_rows<scalar_t>(op.x, rows, m, x_block.data_ptr<scalar_t>(), blocks.dropout_of(adapter));
    at::mm_out(xa_block, x_block, op.lora_A_t[adapter]);
    at::addmm_out(y_block, op.bias_row, xa_block, op.scaled_lora_B_t[adapter]);
    scatter_rows<scalar_t>(xa_block.const_data_ptr<scalar_t>(), m, rows, op.xa);
    scatter_rows<scalar_t>(y_block.const_data_ptr<scalar_t>(), m, rows, op.y);
  });
}

std::tuple<Tensor, Tensor> multi_lora_linear_forward_cpu(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& adapter_index,
    const Tensor& lora_A, const Tensor& lora_B, at::ArrayRef<double> scaling, at::ArrayRef<double> dropout_p,
    const std::optional<Tensor>& seed) {
  // The custom op owns autograd: no graph for the ATen calls here (out= calls refuse inputs that require grad).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const MultiLoraSizes n = check_multi_forward_inputs(c10::DeviceType::CPU, x, weight, bias, adapter_index, lora_A,
                                                      lora_B, scaling, dropout_p, seed);
  const Blocks blocks(kMultiLoraLinearOps.forward, adapter_index, n, dropout_p, seed);
  const Tensor bias_row = is_given(bias) ? bias->contiguous() : at::zeros({n.N}, x.options());
  const Tensor lora_A_t = lora_A.transpose(1, 2).contiguous();
  Tensor scaled_lora_B_t = at::empty({n.n, n.r, n.N}, x.options());
  at::mul_out(scaled_lora_B_t, lora_B.transpose(1, 2), per_adapter_factors(scaling));
  Tensor y = at::empty({n.M, n.N}, x.options());
  Tensor xa = at::zeros({n.M, n.r}, x.options());
  const ForwardOperands operands{x, bias_row, lora_A_t, scaled_lora_B_t, y, xa};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_multi_lora_forward", [&] {
    if (skinny_path(x)) {
      forward_blocks_skinny(operands, blocks);
    } else {
      forward_blocks_aten<scalar_t>(operands, blocks);
    }
    fill_unadapted_rows<scalar_t>(blocks.groups, bias_row, y);
  });
  y.addmm_(x, weight.t());
  return {std::move(y), std::move(xa)};
}

// The backward's operands, per adapter A [r, K] and B [N, r] in the skinny kernels' layouts
// (fine for ATen too), and where its blocks put their products: dA and dBᵀ of each piece, and dx
// if it is needed.
struct BackwardOperands {
  const Tensor& grad_y;
  const Tensor& x;
  const Tensor& xa;
  const Tensor& lora_A_rows;
  const Tensor& lora_B_rows;
  at::ArrayRef<double> scaling;
  Tensor& dA_pieces;   // [pieces, r, K]
  Tensor& dBt_pieces;  // [pieces, r, N]
  std::optional<Tensor>& dx;
};

// fp32: dy, x and xa rows read in place (x gathered for dropout), dx rows written in place
// without dropout; dyB goes through a block buffer.
void backward_blocks_skinny(const BackwardOperands& op, const Blocks& blocks) {
  const MultiLoraSizes& n = blocks.n;
  const Tensor zero_row = at::zeros({n.K}, op.x.options());
  const float* a_rows = op.lora_A_rows.const_data_ptr<float>();  // [n, r, K]
  const float* b_rows = op.lora_B_rows.const_data_ptr<float>();  // [n, N, r]
  float* dA_data = op.dA_pieces.data_ptr<float>();
  float* dBt_data = op.dBt_pieces.data_ptr<float>();
  // dy, x, dyB, dx
  const auto buffers = blocks.part_buffers(kSkinnyBlockRows, {n.N, n.K, n.r, n.K}, op.x.options());
  blocks.for_each(kSkinnyBlockRows, [&](int64_t part, int64_t piece, int64_t adapter, const int64_t* rows, int64_t m) {
    const std::optional<RowDropout> dropout = blocks.dropout_of(adapter);
    const cpu::RowSet<const float> dy_rows = skinny_operand(op.grad_y, rows, m, buffers[part][0], std::nullopt);
    const cpu::RowSet<const float> x_rows = skinny_operand(op.x, rows, m, buffers[part][1], dropout);
    float* dyB = buffers[part][2].data_ptr<float>();
    cpu::rows_times_skinny(dy_rows, m, n.N, b_rows + adapter * n.N * n.r, n.r, dyB, n.r);
    cpu::accumulate_skinny_t_times_rows({op.xa.const_data_ptr<float>(), n.r, rows}, dy_rows, m, n.N, n.r,
                                        dBt_data + piece * n.r * n.N);
    cpu::accumulate_skinny_t_times_rows({dyB, n.r}, x_rows, m, n.K, n.r, dA_data + piece * n.r * n.K);
    if (!op.dx.has_value()) {
      return;
    }
    const float* a = a_rows + adapter * n.r * n.K;
    const float s = static_cast<float>(op.scaling[adapter]);
    if (dropout.has_value()) {
      float* buffer = buffers[part][3].data_ptr<float>();
      cpu::add_skinny_times_rows(zero_row.const_data_ptr<float>(), 0, dyB, a, m, n.K, n.r, s, {buffer, n.K});
      drop_in_place<float>(buffer, m, n.K, rows, *dropout);
      scatter_rows<float>(buffer, m, rows, *op.dx);
    } else {
      cpu::add_skinny_times_rows(zero_row.const_data_ptr<float>(), 0, dyB, a, m, n.K, n.r, s,
                                 {op.dx->data_ptr<float>(), n.K, rows});
    }
  });
}

// Other dtypes (or no AVX-512): blocks gathered into buffers and multiplied by ATen.
template <typename scalar_t>
void backward_blocks_aten(const BackwardOperands& op, const Blocks& blocks) {
  const MultiLoraSizes& n = blocks.n;
  // dy, x, xa, dyB, dx
  const auto buffers = blocks.part_buffers(kAtenBlockRows, {n.N, n.K, n.r, n.r, n.K}, op.x.options());
  blocks.for_each(kAtenBlockRows, [&](int64_t part, int64_t piece, int64_t adapter, const int64_t* rows, int64_t m) {
    const std::optional<RowDropout> dropout = blocks.dropout_of(adapter);
    Tensor dy_block = buffers[part][0].narrow(0, 0, m), x_block = buffers[part][1].narrow(0, 0, m);
    Tensor xa_block = buffers[part][2].narrow(0, 0, m), dyB_block = buffers[part][3].narrow(0, 0, m);
    gather_rows<scalar_t>(op.grad_y, rows, m, dy_block.data_ptr<scalar_t>(), std::nullopt);
    gather_rows<scalar_t>(op.x, rows, m, x_block.data_ptr<scalar_t>(), dropout);
    gather_rows<scalar_t>(op.xa, rows, m, xa_block.data_ptr<scalar_t>(), std::nullopt);
    at::mm_out(dyB_block, dy_block, op.lora_B_rows[adapter]);
    Tensor dBt_piece = op.dBt_pieces[piece], dA_piece = op.dA_pieces[piece];
    accumulate_product(dBt_piece, xa_block.t(), dy_block, 1.0);
    accumulate_product(dA_piece, dyB_block.t(), x_block, 1.0);
    if (op.dx.has_value()) {
      Tensor dx_block = buffers[part][4].narrow(0, 0, m);
      at::mm_out(dx_block, dyB_block, op.lora_A_rows[adapter]).mul_(op.scaling[adapter]);
      if (dropout.has_value()) {
        drop_in_place<scalar_t>(dx_block.data_ptr<scalar_t>(), m, n.K, rows, *dropout);
      }
      scatter_rows<scalar_t>(dx_block.const_data_ptr<scalar_t>(), m, rows, *op.dx);
    }
  });
}

// grad[a] = scaling[a]·Σ pieces[p] over adapter a's pieces; adapters without rows get zero.
Tensor sum_pieces_per_adapter(const Tensor& pieces, const Work& work, at::ArrayRef<double> scaling) {
  std::vector<int64_t> adapters;
  for (const Piece& piece : work.pieces) {
    adapters.push_back(piece.adapter);
  }
  std::vector<int64_t> shape(pieces.sizes().begin(), pieces.sizes().end());
  shape[0] = static_cast<int64_t>(scaling.size());
  Tensor sums = at::zeros(shape, pieces.options());
  sums.index_add_(0, at::tensor(adapters, at::kLong), pieces);
  return sums.mul_(per_adapter_factors(scaling));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> multi_lora_linear_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& xa, const Tensor& weight, const Tensor& adapter_index,
    const Tensor& lora_A, const Tensor& lora_B, at::ArrayRef<double> scaling, at::ArrayRef<double> dropout_p,
    const std::optional<Tensor>& seed, bool needs_dx, bool needs_dweight, bool needs_dbias) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const MultiLoraSizes n = check_multi_backward_inputs(c10::DeviceType::CPU, grad_y, x, xa, weight, adapter_index,
                                                       lora_A, lora_B, scaling, dropout_p, seed);
  const Blocks blocks(kMultiLoraLinearOps.backward, adapter_index, n, dropout_p, seed);
  const int64_t pieces = static_cast<int64_t>(blocks.work.pieces.size());
  const auto accumulate = x.options().dtype(chunk_accumulate_dtype(x.scalar_type()));
  Tensor dA_pieces = at::zeros({pieces, n.r, n.K}, accumulate);
  Tensor dBt_pieces = at::zeros({pieces, n.r, n.N}, accumulate);
  std::optional<Tensor> dx;
  if (needs_dx) {
    dx = at::empty({n.M, n.K}, x.options());
  }
  const Tensor lora_A_rows = lora_A.contiguous(), lora_B_rows = lora_B.contiguous(), xa_rows = xa.contiguous();
  const BackwardOperands operands{grad_y, x, xa_rows, lora_A_rows, lora_B_rows, scaling, dA_pieces, dBt_pieces, dx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_multi_lora_backward", [&] {
    if (skinny_path(x)) {
      backward_blocks_skinny(operands, blocks);
    } else {
      backward_blocks_aten<scalar_t>(operands, blocks);
    }
    if (dx.has_value()) {
      fill_unadapted_rows<scalar_t>(blocks.groups, at::zeros({n.K}, x.options()), *dx);
    }
  });
  if (dx.has_value()) {
    dx->addmm_(grad_y, weight);
  }
  Tensor dA = sum_pieces_per_adapter(dA_pieces, blocks.work, scaling).to(x.scalar_type());
  Tensor dB = sum_pieces_per_adapter(dBt_pieces, blocks.work, scaling).transpose(1, 2).contiguous().to(x.scalar_type());
  auto [dweight, dbias] = linear_weight_bias_grads(grad_y, x, needs_dweight, needs_dbias);
  return {dx.has_value() ? std::move(*dx) : skipped_grad(x), std::move(dweight), std::move(dbias), std::move(dA),
          std::move(dB)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  impl_forward_backward(m, kMultiLoraLinearOps, &multi_lora_linear_forward_cpu, &multi_lora_linear_backward_cpu);
}

}  // namespace lowrank

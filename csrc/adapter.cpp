// Schemas of the native adapter-bottleneck ops (kernels: csrc/cpu/adapter_cpu.cpp,
// csrc/cuda/adapter_cuda.cpp; contract: lowrank/ops/adapter.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  // out = [h +] scaling·(act(h·W_dᵀ + b_d)·W_uᵀ + b_u); also returns z = h·W_dᵀ + b_d for backward.
  m.def(
      "adapter_forward_native(Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "str activation, float scaling, bool residual) -> (Tensor, Tensor)");
  // Returns (dh, dw_down, db_down, dw_up, db_up); a gradient that is not needed is an empty tensor.
  m.def(
      "adapter_backward_native(Tensor grad_out, Tensor h, Tensor z, Tensor w_down, Tensor w_up, "
      "str activation, float scaling, bool residual, bool needs_dh, bool needs_dw_down, bool needs_db_down, "
      "bool needs_dw_up, bool needs_db_up) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

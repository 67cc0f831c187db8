// Schemas of the native LoRA linear ops (kernels: csrc/cpu/lora_linear_cpu.cpp,
// csrc/cuda/lora_linear_cuda.cpp; contract: lowrank/ops/lora_linear.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  // y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ; also returns xa = dropout(x)·Aᵀ for backward.
  m.def(
      "lora_linear_forward_native(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  // Returns (dx, dweight, dbias, dA, dB); a gradient that is not needed is an empty tensor.
  m.def(
      "lora_linear_backward_native(Tensor grad_y, Tensor x, Tensor xa, Tensor weight, Tensor lora_A, "
      "Tensor lora_B, float scaling, float dropout_p, Tensor? seed, bool needs_dx, bool needs_dweight, "
      "bool needs_dbias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

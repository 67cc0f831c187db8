// Schemas of the native multi-adapter LoRA linear ops (kernels: csrc/cpu/multi_lora_linear_cpu.cpp,
// csrc/cuda/multi_lora_linear_cuda.cpp; contract: lowrank/ops/multi_lora_linear.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  // y[i] = x[i]·Wᵀ + b + scaling[a]·(D_i⊙x[i])·lora_A[a]ᵀ·lora_B[a]ᵀ with a = adapter_index[i] (-1: no
  // adapter); also returns xa[i] = (D_i⊙x[i])·lora_A[a]ᵀ for backward.
  m.def(
      "multi_lora_linear_forward_native(Tensor x, Tensor weight, Tensor? bias, Tensor adapter_index, "
      "Tensor lora_A, Tensor lora_B, float[] scaling, float[] dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  // Returns (dx, dweight, dbias, dA, dB); a gradient that is not needed is an empty tensor.
  m.def(
      "multi_lora_linear_backward_native(Tensor grad_y, Tensor x, Tensor xa, Tensor weight, Tensor adapter_index, "
      "Tensor lora_A, Tensor lora_B, float[] scaling, float[] dropout_p, Tensor? seed, bool needs_dx, "
      "bool needs_dweight, bool needs_dbias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

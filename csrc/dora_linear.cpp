// Schemas of the native DoRA linear ops (kernels: csrc/cpu/dora_linear_cpu.cpp,
// csrc/cuda/dora_linear_cuda.cpp; contract: lowrank/ops/dora_linear.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  // y = g⊙(x·Wᵀ + s·xa·Bᵀ) + b, g = m / ‖W + s·B·A‖_row (PEFT's DoRA; with dropout, its training
  // forward). Returns (y, xa, norm, z): norm [N] in fp32 (fp64 for fp64 inputs), and z = D⊙x·Wᵀ +
  // s·xa·Bᵀ for dm when dropout_p > 0 (an empty tensor otherwise).
  m.def(
      "dora_linear_forward_native(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, Tensor weight_norm_sq, float scaling, float dropout_p, Tensor? seed) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // y_or_z: the forward's y when dropout_p == 0, its z otherwise. Returns (dx, dweight, dbias, dA,
  // dB, dmagnitude); a gradient that is not needed is an empty tensor.
  m.def(
      "dora_linear_backward_native(Tensor grad_y, Tensor x, Tensor xa, Tensor y_or_z, Tensor weight, "
      "Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude, Tensor norm, float scaling, "
      "float dropout_p, Tensor? seed, bool needs_dx, bool needs_dweight, bool needs_dbias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

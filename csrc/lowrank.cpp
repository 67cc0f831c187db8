// Op schemas of the lowrank namespace and build information.
// Kernels register per device: csrc/cpu/ (CPU) and csrc/cuda/ (CUDA).
#include <torch/extension.h>
#include <torch/library.h>

#ifdef LOWRANK_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION: the toolkit this extension was compiled with
#endif

#ifndef LOWRANK_TORCH_VERSION
#error "LOWRANK_TORCH_VERSION must be defined by setup.py"
#endif

TORCH_LIBRARY(lowrank, m) {
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = LOWRANK_TORCH_VERSION;
#ifdef LOWRANK_WITH_CUDA
    info["with_cuda"] = true;
    info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#else
    info["with_cuda"] = false;
    info["cuda_version"] = pybind11::none();
#endif
    return info;
  });
}

// The lowrank op namespace and the extension's build information. Op schemas: csrc/<op>.cpp;
// kernels register per device in csrc/cpu/ (CPU) and csrc/cuda/ (CUDA).
#include <torch/extension.h>
#include <torch/library.h>

#ifdef LOWRANK_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION: the toolkit this extension was compiled with
#endif

#ifndef LOWRANK_TORCH_VERSION
#error "LOWRANK_TORCH_VERSION must be defined by setup.py"
#endif

// The namespace is created here; each op's schemas are a fragment in its own file (csrc/<op>.cpp).
TORCH_LIBRARY(lowrank, m) {}

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

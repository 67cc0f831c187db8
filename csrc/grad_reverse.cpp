// Op schemas of gradient reversal's backward (lowrank/ops/grad_reverse.py); kernels register
// per device in csrc/cpu/grad_reverse_cpu.cpp and csrc/cuda/grad_reverse_cuda.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lowrank, m) {
  // −λ·grad into a new tensor laid out as at::empty_like(grad); lambda_ is a 0-dim float64
  // tensor on the CPU or on grad's device.
  m.def("grad_reverse_backward_native(Tensor grad, Tensor lambda_) -> Tensor");
  // grad ← −λ·grad; grad must be dense (non-overlapping, no stride 0).
  m.def("grad_reverse_backward_native_(Tensor(a!) grad, Tensor lambda_) -> ()");
}

// A strided 2-D view over raw memory: how the framework-free kernels of csrc/cuda/*.cu take
// their matrix arguments, so transposed views and stride-0 (expanded) tensors need no copy.
#pragma once

#include <cstdint>

#include "../host_device.h"

namespace lowrank::cuda {

// Element (i, j) lives at data[i * row_stride + j * col_stride].
template <typename T>
struct StridedMatrix {
  T* data;
  int64_t row_stride;
  int64_t col_stride;
};

// m by reference: taken by value, a kernel's StridedMatrix argument is copied into registers
// (18 more in dropout_times_lora_a_kernel<float, 128> on sm_90).
template <typename T>
LOWRANK_HOST_DEVICE T* element(const StridedMatrix<T>& m, int64_t i, int64_t j) {
  return m.data + i * m.row_stride + j * m.col_stride;
}

}  // namespace lowrank::cuda

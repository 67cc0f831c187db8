// A strided 2-D view over raw memory: how the framework-free kernels of csrc/cuda/*.cu take
// their matrix arguments, so transposed views and stride-0 (expanded) tensors need no copy.
#pragma once

#include <cstdint>

namespace lowrank::cuda {

// Element (i, j) lives at data[i * row_stride + j * col_stride].
template <typename T>
struct StridedMatrix {
  T* data;
  int64_t row_stride;
  int64_t col_stride;
};

}  // namespace lowrank::cuda

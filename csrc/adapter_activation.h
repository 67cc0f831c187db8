// Adapter activations and their derivatives, shared by the CPU code and the CUDA kernels so
// every native backend computes the same function. Framework-free (nvcc compiles it alone).
#pragma once

#include <cmath>

#include "host_device.h"

namespace lowrank {

// Codes of the `activation` argument ("relu", "gelu", "silu"); gelu is the exact erf form.
enum class Activation : int { Relu = 0, Gelu = 1, Silu = 2 };

template <typename A>
LOWRANK_HOST_DEVICE A activate(Activation act, A z) {
  using std::erf;
  using std::exp;
  switch (act) {
    case Activation::Relu:
      return z > A(0) ? z : A(0);
    case Activation::Gelu:
      return A(0.5) * z * (A(1) + erf(z * A(0.70710678118654752440)));
    default:
      return z / (A(1) + exp(-z));
  }
}

// d act / dz at z.
template <typename A>
LOWRANK_HOST_DEVICE A activate_grad(Activation act, A z) {
  using std::erf;
  using std::exp;
  switch (act) {
    case Activation::Relu:
      return z > A(0) ? A(1) : A(0);
    case Activation::Gelu: {
      const A cdf = A(0.5) * (A(1) + erf(z * A(0.70710678118654752440)));
      const A pdf = exp(A(-0.5) * z * z) * A(0.39894228040143267794);
      return cdf + z * pdf;
    }
    default: {
      const A sigmoid = A(1) / (A(1) + exp(-z));
      return sigmoid * (A(1) + z * (A(1) - sigmoid));
    }
  }
}

}  // namespace lowrank

// Counter-based dropout mask (see lowrank/ops/hash_dropout.py), shared by the CPU
// code and the CUDA kernels so that every backend draws the same bits.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace lowrank {

// lowbias32 (Wellons); all arithmetic is mod 2**32.
LOWRANK_HOST_DEVICE uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x21f0aaadu;
  h ^= h >> 15;
  h *= 0x735a2d97u;
  h ^= h >> 15;
  return h;
}

// Per-row key: mix32(row ^ mix32(seed)); rows and seeds are taken mod 2**32 like the reference.
LOWRANK_HOST_DEVICE uint32_t dropout_row_key(int64_t seed, int64_t row) {
  return mix32(static_cast<uint32_t>(row) ^ mix32(static_cast<uint32_t>(seed)));
}

LOWRANK_HOST_DEVICE bool dropout_keep(uint32_t row_key, int64_t col, uint32_t threshold) {
  return mix32(static_cast<uint32_t>(col) ^ row_key) >= threshold;
}

// Elements whose hash is below min(floor(p * 2**32), 2**32 - 1) are dropped.
inline uint32_t dropout_threshold(double p) {
  const double scaled = p * 4294967296.0;
  return scaled >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(scaled);
}

}  // namespace lowrank

// LOWRANK_HOST_DEVICE: a function the CPU code and the CUDA kernels both call, so that every
// native backend computes the same thing. Framework-free (nvcc compiles it alone).
#pragma once

#if defined(__CUDACC__)
#define LOWRANK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LOWRANK_HOST_DEVICE inline
#endif

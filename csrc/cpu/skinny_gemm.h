// fp32 GEMMs with one side of small width r (the LoRA rank), as AVX-512 micro-kernels.
//
// MKL runs these shapes at well under half the speed of a square GEMM; here each is a
// single register-blocked pass over the large operand. Framework-free: raw pointers,
// row strides (columns are unit-stride), no threading; callers split the rows.
// Call only when skinny_kernels_available().
#pragma once

#include <cstdint>

namespace lowrank {
namespace cpu {

// Whether this CPU runs the kernels below (AVX-512F and FMA).
bool skinny_kernels_available();

// c[m, r] = x[m, L] · p[L, r]; p is contiguous, c has row stride ldc.
void rows_times_skinny(const float* x, int64_t ldx, int64_t m, int64_t L, const float* p, int64_t r, float* c,
                       int64_t ldc);

// c[r, L] += s[m, r]ᵀ · x[m, L]; s has row stride lds, c is contiguous.
void accumulate_skinny_t_times_rows(const float* s, int64_t lds, const float* x, int64_t ldx, int64_t m,
                                    int64_t L, int64_t r, float* c);

// c[n, L] = w[n, L] + alpha · s[n, r] · a[r, L]; s and a are contiguous, c has row stride L.
void add_skinny_times_rows(const float* w, int64_t ldw, const float* s, const float* a, int64_t n, int64_t L,
                           int64_t r, float alpha, float* c);

}  // namespace cpu
}  // namespace lowrank

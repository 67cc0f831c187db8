// fp32 GEMMs with one side of small width r (the LoRA rank), as AVX-512 micro-kernels.
//
// MKL runs these shapes at well under half the speed of a square GEMM; here each is a
// single register-blocked pass over the large operand. Framework-free: raw pointers,
// row sets (columns are unit-stride), no threading; callers split the rows.
// Call only when skinny_kernels_available().
#pragma once

#include <cstdint>

namespace lowrank {
namespace cpu {

// m rows of a row-major matrix with unit column stride: row i starts at data + i·stride, or,
// with an index (gathered rows, e.g. one adapter's rows of a mixed batch), at
// data + index[i]·stride. A stride of 0 repeats one row.
template <typename T>
struct RowSet {
  T* data;
  int64_t stride;
  const int64_t* index = nullptr;
};

// Whether this CPU runs the kernels below (AVX-512F and FMA).
bool skinny_kernels_available();

// c[m, r] = x[m, L] · p[L, r]; p is contiguous, c has row stride ldc.
void rows_times_skinny(RowSet<const float> x, int64_t m, int64_t L, const float* p, int64_t r, float* c,
                       int64_t ldc);

// c[r, L] += s[m, r]ᵀ · x[m, L]; c is contiguous.
void accumulate_skinny_t_times_rows(RowSet<const float> s, RowSet<const float> x, int64_t m, int64_t L, int64_t r,
                                    float* c);

// c[n, L] = w[n, L] + alpha · s[n, r] · a[r, L]; w has row stride ldw (0: one row for all),
// s and a are contiguous.
void add_skinny_times_rows(const float* w, int64_t ldw, const float* s, const float* a, int64_t n, int64_t L,
                           int64_t r, float alpha, RowSet<float> c);

}  // namespace cpu
}  // namespace lowrank

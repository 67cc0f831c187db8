// AVX-512 micro-kernels of skinny_gemm.h. Every kernel keeps a register tile of
// accumulators across its whole reduction and streams the large operand once through it;
// the small operand (width r) is re-read from cache. The target attribute compiles just
// these functions for AVX-512, so the rest of the extension still runs on any x86-64.
#include "skinny_gemm.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)

#include <immintrin.h>

#include <algorithm>

#define LOWRANK_AVX512 __attribute__((target("avx512f,fma")))
#define LOWRANK_AVX512_INLINE LOWRANK_AVX512 __attribute__((always_inline)) inline

namespace lowrank {
namespace cpu {
namespace {

constexpr int kLanes = 16;
constexpr __mmask16 kAllLanes = 0xffff;

__mmask16 lanes_mask(int64_t n) {
  return n >= kLanes ? kAllLanes : static_cast<__mmask16>((1u << n) - 1);
}

// An R x V tile of c in registers: R rows, each V vectors of 16 lanes, the last vector of a row
// limited to the lanes in `last`. The kernels below differ only in how they start the tile, what
// they stream through it and where it goes at the end.
template <int R, int V>
struct RegisterTile {
  __m512 acc[R][V];
  __mmask16 last;

  explicit RegisterTile(__mmask16 last_lanes) : last(last_lanes) {}

  LOWRANK_AVX512_INLINE __mmask16 lanes(int v) const { return v + 1 < V ? kAllLanes : last; }

  LOWRANK_AVX512_INLINE void zero() {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
    }
  }

  // Row i from src + i·ld.
  LOWRANK_AVX512_INLINE void load(const float* src, int64_t ld) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_maskz_loadu_ps(lanes(v), src + i * ld + v * kLanes);
    }
  }

  // Row i += scale(i) · the row at `row`, for every i: one rank-1 update.
  template <typename Scale>
  LOWRANK_AVX512_INLINE void add_scaled_row(const float* row, const Scale& scale) {
    __m512 row_vectors[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) row_vectors[v] = _mm512_maskz_loadu_ps(lanes(v), row + v * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512 scale_i = _mm512_set1_ps(scale(i));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_fmadd_ps(scale_i, row_vectors[v], acc[i][v]);
    }
  }

  // dst + i·ld = row i, or += row i when accumulate.
  LOWRANK_AVX512_INLINE void store(float* dst, int64_t ld, bool accumulate) const {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        float* out = dst + i * ld + v * kLanes;
        const __m512 value = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(lanes(v), out), acc[i][v]) : acc[i][v];
        _mm512_mask_storeu_ps(out, lanes(v), value);
      }
    }
  }
};

// ---- c[m, r] = x · p: rows of c on registers, r on the lanes.

// RB rows of c, JV vectors wide (lanes of the last vector past `last` unused), over all of L.
template <int RB, int JV>
LOWRANK_AVX512 void rows_times_skinny_block(const float* x, int64_t ldx, int64_t L, const float* p, int64_t ldp,
                                            __mmask16 last, float* c, int64_t ldc) {
  RegisterTile<RB, JV> tile(last);
  tile.zero();
  for (int64_t k = 0; k < L; ++k) {
    tile.add_scaled_row(p + k * ldp, [&](int i) { return x[i * ldx + k]; });
  }
  tile.store(c, ldc, /*accumulate=*/false);
}

// All m rows: blocks of RB, then the remainder with halved blocks.
template <int RB, int JV>
LOWRANK_AVX512 void rows_times_skinny_rows(const float* x, int64_t ldx, int64_t m, int64_t L, const float* p,
                                           int64_t ldp, __mmask16 last, float* c, int64_t ldc) {
  for (; m >= RB; m -= RB, x += RB * ldx, c += RB * ldc) {
    rows_times_skinny_block<RB, JV>(x, ldx, L, p, ldp, last, c, ldc);
  }
  if constexpr (RB > 1) {
    rows_times_skinny_rows<RB / 2, JV>(x, ldx, m, L, p, ldp, last, c, ldc);
  }
}

// ---- c[r, L] += sᵀ · x: a JR x (16·CV) tile of c on registers, reduced over the m rows.

template <int JR, int CV>
LOWRANK_AVX512 void skinny_t_times_rows_tile(const float* s, int64_t lds, const float* x, int64_t ldx, int64_t m,
                                             __mmask16 last, float* c, int64_t ldc) {
  RegisterTile<JR, CV> tile(last);
  tile.zero();
  for (int64_t i = 0; i < m; ++i) {
    tile.add_scaled_row(x + i * ldx, [&](int j) { return s[i * lds + j]; });
  }
  tile.store(c, ldc, /*accumulate=*/true);
}

// JR rows of c across all L columns: full tiles, then single masked vectors.
template <int JR, int CV>
LOWRANK_AVX512 void skinny_t_times_rows_strip(const float* s, int64_t lds, const float* x, int64_t ldx, int64_t m,
                                              int64_t L, float* c) {
  int64_t col = 0;
  for (; col + CV * kLanes <= L; col += CV * kLanes) {
    skinny_t_times_rows_tile<JR, CV>(s, lds, x + col, ldx, m, kAllLanes, c + col, L);
  }
  for (; col < L; col += kLanes) {
    skinny_t_times_rows_tile<JR, 1>(s, lds, x + col, ldx, m, lanes_mask(L - col), c + col, L);
  }
}

// All r rows of c: strips of JR, then the remainder with halved strips. Narrow strips get
// wider tiles so that every tile keeps 16 accumulators in flight.
template <int JR>
LOWRANK_AVX512 void skinny_t_times_rows_all(const float* s, int64_t lds, const float* x, int64_t ldx, int64_t m,
                                            int64_t L, int64_t r, float* c) {
  constexpr int CV = JR >= 16 ? 1 : JR >= 8 ? 2 : 4;
  for (; r >= JR; r -= JR, s += JR, c += JR * L) {
    skinny_t_times_rows_strip<JR, CV>(s, lds, x, ldx, m, L, c);
  }
  if constexpr (JR > 1) {
    skinny_t_times_rows_all<JR / 2>(s, lds, x, ldx, m, L, r, c);
  }
}

// ---- c[n, L] = w + alpha · s · a: an RB x (16·CV) tile of c on registers, reduced over r.

template <int RB, int CV>
LOWRANK_AVX512 void add_skinny_times_rows_tile(const float* w, int64_t ldw, const float* s, const float* a, int64_t L,
                                               int64_t r, float alpha, __mmask16 last, float* c) {
  RegisterTile<RB, CV> tile(last);
  tile.load(w, ldw);
  for (int64_t j = 0; j < r; ++j) {
    tile.add_scaled_row(a + j * L, [&](int i) { return alpha * s[i * r + j]; });
  }
  tile.store(c, L, /*accumulate=*/false);
}

template <int RB>
LOWRANK_AVX512 void add_skinny_times_rows_all(const float* w, int64_t ldw, const float* s, const float* a, int64_t n,
                                              int64_t L, int64_t r, float alpha, float* c) {
  constexpr int CV = 4;
  for (; n >= RB; n -= RB, w += RB * ldw, s += RB * r, c += RB * L) {
    int64_t col = 0;
    for (; col + CV * kLanes <= L; col += CV * kLanes) {
      add_skinny_times_rows_tile<RB, CV>(w + col, ldw, s, a + col, L, r, alpha, kAllLanes, c + col);
    }
    for (; col < L; col += kLanes) {
      add_skinny_times_rows_tile<RB, 1>(w + col, ldw, s, a + col, L, r, alpha, lanes_mask(L - col), c + col);
    }
  }
  if constexpr (RB > 1) {
    add_skinny_times_rows_all<RB / 2>(w, ldw, s, a, n, L, r, alpha, c);
  }
}

}  // namespace

bool skinny_kernels_available() {
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return available;
}

LOWRANK_AVX512 void rows_times_skinny(const float* x, int64_t ldx, int64_t m, int64_t L, const float* p, int64_t r,
                                      float* c, int64_t ldc) {
  // Up to 64 columns of c per pass; fewer rows per block as the pass widens, to stay in registers.
  constexpr int64_t kMaxWidth = 4 * kLanes;
  for (int64_t j0 = 0; j0 < r; j0 += kMaxWidth) {
    const int64_t width = std::min(kMaxWidth, r - j0);
    const int64_t vectors = (width + kLanes - 1) / kLanes;
    const __mmask16 last = lanes_mask(width - (vectors - 1) * kLanes);
    switch (vectors) {
      case 1: rows_times_skinny_rows<12, 1>(x, ldx, m, L, p + j0, r, last, c + j0, ldc); break;
      case 2: rows_times_skinny_rows<12, 2>(x, ldx, m, L, p + j0, r, last, c + j0, ldc); break;
      case 3: rows_times_skinny_rows<6, 3>(x, ldx, m, L, p + j0, r, last, c + j0, ldc); break;
      default: rows_times_skinny_rows<6, 4>(x, ldx, m, L, p + j0, r, last, c + j0, ldc); break;
    }
  }
}

LOWRANK_AVX512 void accumulate_skinny_t_times_rows(const float* s, int64_t lds, const float* x, int64_t ldx,
                                                   int64_t m, int64_t L, int64_t r, float* c) {
  skinny_t_times_rows_all<16>(s, lds, x, ldx, m, L, r, c);
}

LOWRANK_AVX512 void add_skinny_times_rows(const float* w, int64_t ldw, const float* s, const float* a, int64_t n,
                                          int64_t L, int64_t r, float alpha, float* c) {
  add_skinny_times_rows_all<4>(w, ldw, s, a, n, L, r, alpha, c);
}

}  // namespace cpu
}  // namespace lowrank

#else  // not x86-64 GCC/Clang: never available, so callers keep to their fallback.

#include <cstdlib>

namespace lowrank {
namespace cpu {

bool skinny_kernels_available() { return false; }

void rows_times_skinny(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t) {
  std::abort();
}

void accumulate_skinny_t_times_rows(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
                                    float*) {
  std::abort();
}

void add_skinny_times_rows(const float*, int64_t, const float*, const float*, int64_t, int64_t, int64_t, float,
                           float*) {
  std::abort();
}

}  // namespace cpu
}  // namespace lowrank

#endif

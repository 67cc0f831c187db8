// AVX-512 micro-kernels of skinny_gemm.h. Every kernel keeps a register tile of
// accumulators across its whole reduction and streams the large operand once through it;
// the small operand (width r) is re-read from cache. The target attribute compiles just
// these functions for AVX-512, so the rest of the extension still runs on any x86-64.
// Row sets are instantiated twice, strided and gathered (Strided / Gathered below): the
// kernels take a row's address once per row and tile, so gathering costs one index load.
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

// Row i at data + i·stride.
template <typename T>
struct Strided {
  T* data;
  int64_t stride;
  T* row(int64_t i) const { return data + i * stride; }
  Strided after(int64_t rows) const { return {data + rows * stride, stride}; }
  Strided shifted(int64_t columns) const { return {data + columns, stride}; }
};

// Row i at data + index[i]·stride.
template <typename T>
struct Gathered {
  T* data;
  int64_t stride;
  const int64_t* index;
  T* row(int64_t i) const { return data + index[i] * stride; }
  Gathered after(int64_t rows) const { return {data, stride, index + rows}; }
  Gathered shifted(int64_t columns) const { return {data + columns, stride, index}; }
};

// Rows i < R of a row set with their addresses fixed for a block: gathered ones looked up once
// (the compiler keeps the index loads inside a kernel's loop), strided ones left as they are.
template <int R, typename T>
struct RowPointers {
  T* rows[R];
  T* row(int64_t i) const { return rows[i]; }
};

template <int R, typename T>
Strided<T> block_rows(const Strided<T>& rows) {
  return rows;
}

template <int R, typename T>
RowPointers<R, T> block_rows(const Gathered<T>& rows) {
  RowPointers<R, T> pointers;
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) pointers.rows[i] = rows.row(i);
  return pointers;
}

// Calls body(rows) with the row set as a Strided or a Gathered accessor.
template <typename T, typename Body>
void with_rows(RowSet<T> rows, const Body& body) {
  if (rows.index == nullptr) {
    body(Strided<T>{rows.data, rows.stride});
  } else {
    body(Gathered<T>{rows.data, rows.stride, rows.index});
  }
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

  // Row i from src.row(i).
  template <typename Rows>
  LOWRANK_AVX512_INLINE void load(const Rows& src) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_maskz_loadu_ps(lanes(v), src.row(i) + v * kLanes);
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

  // dst.row(i) = row i, or += row i when accumulate.
  template <typename Rows>
  LOWRANK_AVX512_INLINE void store(const Rows& dst, bool accumulate) const {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        float* out = dst.row(i) + v * kLanes;
        const __m512 value = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(lanes(v), out), acc[i][v]) : acc[i][v];
        _mm512_mask_storeu_ps(out, lanes(v), value);
      }
    }
  }
};

// ---- c[m, r] = x · p: rows of c on registers, r on the lanes.

// RB rows of c, JV vectors wide (lanes of the last vector past `last` unused), over all of L.
template <int RB, int JV, typename Rows>
LOWRANK_AVX512 void rows_times_skinny_block(Rows x, int64_t L, const float* p, int64_t ldp, __mmask16 last, float* c,
                                            int64_t ldc) {
  const auto x_rows = block_rows<RB>(x);
  RegisterTile<RB, JV> tile(last);
  tile.zero();
  for (int64_t k = 0; k < L; ++k) {
    tile.add_scaled_row(p + k * ldp, [&](int i) { return x_rows.row(i)[k]; });
  }
  tile.store(Strided<float>{c, ldc}, /*accumulate=*/false);
}

// All m rows: blocks of RB, then the remainder with halved blocks.
template <int RB, int JV, typename Rows>
LOWRANK_AVX512 void rows_times_skinny_rows(Rows x, int64_t m, int64_t L, const float* p, int64_t ldp, __mmask16 last,
                                           float* c, int64_t ldc) {
  for (; m >= RB; m -= RB, x = x.after(RB), c += RB * ldc) {
    rows_times_skinny_block<RB, JV>(x, L, p, ldp, last, c, ldc);
  }
  if constexpr (RB > 1) {
    rows_times_skinny_rows<RB / 2, JV>(x, m, L, p, ldp, last, c, ldc);
  }
}

template <typename Rows>
LOWRANK_AVX512 void rows_times_skinny_all(Rows x, int64_t m, int64_t L, const float* p, int64_t r, float* c,
                                          int64_t ldc) {
  // Up to 64 columns of c per pass; fewer rows per block as the pass widens, to stay in registers.
  constexpr int64_t kMaxWidth = 4 * kLanes;
  for (int64_t j0 = 0; j0 < r; j0 += kMaxWidth) {
    const int64_t width = std::min(kMaxWidth, r - j0);
    const int64_t vectors = (width + kLanes - 1) / kLanes;
    const __mmask16 last = lanes_mask(width - (vectors - 1) * kLanes);
    switch (vectors) {
      case 1: rows_times_skinny_rows<12, 1>(x, m, L, p + j0, r, last, c + j0, ldc); break;
      case 2: rows_times_skinny_rows<12, 2>(x, m, L, p + j0, r, last, c + j0, ldc); break;
      case 3: rows_times_skinny_rows<6, 3>(x, m, L, p + j0, r, last, c + j0, ldc); break;
      default: rows_times_skinny_rows<6, 4>(x, m, L, p + j0, r, last, c + j0, ldc); break;
    }
  }
}

// ---- c[r, L] += sᵀ · x: a JR x (16·CV) tile of c on registers, reduced over the m rows.

template <int JR, int CV, typename SRows, typename XRows>
LOWRANK_AVX512 void skinny_t_times_rows_tile(SRows s, XRows x, int64_t m, __mmask16 last, float* c, int64_t ldc) {
  RegisterTile<JR, CV> tile(last);
  tile.zero();
  for (int64_t i = 0; i < m; ++i) {
    const float* s_row = s.row(i);
    tile.add_scaled_row(x.row(i), [&](int j) { return s_row[j]; });
  }
  tile.store(Strided<float>{c, ldc}, /*accumulate=*/true);
}

// JR rows of c across all L columns: full tiles, then single masked vectors.
template <int JR, int CV, typename SRows, typename XRows>
LOWRANK_AVX512 void skinny_t_times_rows_strip(SRows s, XRows x, int64_t m, int64_t L, float* c) {
  int64_t col = 0;
  for (; col + CV * kLanes <= L; col += CV * kLanes) {
    skinny_t_times_rows_tile<JR, CV>(s, x.shifted(col), m, kAllLanes, c + col, L);
  }
  for (; col < L; col += kLanes) {
    skinny_t_times_rows_tile<JR, 1>(s, x.shifted(col), m, lanes_mask(L - col), c + col, L);
  }
}

// All r rows of c: strips of JR, then the remainder with halved strips. Narrow strips get
// wider tiles so that every tile keeps 16 accumulators in flight.
template <int JR, typename SRows, typename XRows>
LOWRANK_AVX512 void skinny_t_times_rows_all(SRows s, XRows x, int64_t m, int64_t L, int64_t r, float* c) {
  constexpr int CV = JR >= 16 ? 1 : JR >= 8 ? 2 : 4;
  for (; r >= JR; r -= JR, s = s.shifted(JR), c += JR * L) {
    skinny_t_times_rows_strip<JR, CV>(s, x, m, L, c);
  }
  if constexpr (JR > 1) {
    skinny_t_times_rows_all<JR / 2>(s, x, m, L, r, c);
  }
}

// ---- c[n, L] = w + alpha · s · a: an RB x (16·CV) tile of c on registers, reduced over r.

template <int RB, int CV, typename CRows>
LOWRANK_AVX512 void add_skinny_times_rows_tile(const float* w, int64_t ldw, const float* s, const float* a, int64_t L,
                                               int64_t r, float alpha, __mmask16 last, CRows c) {
  RegisterTile<RB, CV> tile(last);
  tile.load(Strided<const float>{w, ldw});
  for (int64_t j = 0; j < r; ++j) {
    tile.add_scaled_row(a + j * L, [&](int i) { return alpha * s[i * r + j]; });
  }
  tile.store(c, /*accumulate=*/false);
}

template <int RB, typename CRows>
LOWRANK_AVX512 void add_skinny_times_rows_all(const float* w, int64_t ldw, const float* s, const float* a, int64_t n,
                                              int64_t L, int64_t r, float alpha, CRows c) {
  constexpr int CV = 4;
  for (; n >= RB; n -= RB, w += RB * ldw, s += RB * r, c = c.after(RB)) {
    int64_t col = 0;
    for (; col + CV * kLanes <= L; col += CV * kLanes) {
      add_skinny_times_rows_tile<RB, CV>(w + col, ldw, s, a + col, L, r, alpha, kAllLanes, c.shifted(col));
    }
    for (; col < L; col += kLanes) {
      add_skinny_times_rows_tile<RB, 1>(w + col, ldw, s, a + col, L, r, alpha, lanes_mask(L - col), c.shifted(col));
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

void rows_times_skinny(RowSet<const float> x, int64_t m, int64_t L, const float* p, int64_t r, float* c,
                       int64_t ldc) {
  with_rows(x, [&](auto x_rows) { rows_times_skinny_all(x_rows, m, L, p, r, c, ldc); });
}

void accumulate_skinny_t_times_rows(RowSet<const float> s, RowSet<const float> x, int64_t m, int64_t L, int64_t r,
                                    float* c) {
  with_rows(s, [&](auto s_rows) {
    with_rows(x, [&](auto x_rows) { skinny_t_times_rows_all<16>(s_rows, x_rows, m, L, r, c); });
  });
}

void add_skinny_times_rows(const float* w, int64_t ldw, const float* s, const float* a, int64_t n, int64_t L,
                           int64_t r, float alpha, RowSet<float> c) {
  with_rows(c, [&](auto c_rows) { add_skinny_times_rows_all<4>(w, ldw, s, a, n, L, r, alpha, c_rows); });
}

}  // namespace cpu
}  // namespace lowrank

#else  // not x86-64 GCC/Clang: never available, so callers keep to their fallback.

#include <cstdlib>

namespace lowrank {
namespace cpu {

bool skinny_kernels_available() { return false; }

void rows_times_skinny(RowSet<const float>, int64_t, int64_t, const float*, int64_t, float*, int64_t) { std::abort(); }

void accumulate_skinny_t_times_rows(RowSet<const float>, RowSet<const float>, int64_t, int64_t, int64_t, float*) {
  std::abort();
}

void add_skinny_times_rows(const float*, int64_t, const float*, const float*, int64_t, int64_t, int64_t, float,
                           RowSet<float>) {
  std::abort();
}

}  // namespace cpu
}  // namespace lowrank

#endif

// Internal to the CPU kNN: what the driver (knn_cpu.cpp) needs from its fp32 kernels (knn_cpu_kernels.cpp) and its
// screening kernels (knn_screen.cpp).
// Not part of the kernel interface (knn.h); nothing here is seen by the bindings.
#pragma once

#include <cstdint>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "knn/knn.h"

namespace ifseg {
namespace knn_detail {

constexpr int kTile = 96;  // rows/cols per similarity tile; a multiple of every micro-kernel's MR and NR (fp32, int8)

// ---- fp32 kernels (knn_cpu_kernels.cpp) ----

using Kernel = void (*)(int kc, const float* a, const float* b, float* s, int64_t lds, bool first);
// Feed one computed kTile x kTile tile (rows i0.., columns j0..; i_end x j_end valid) into a thread's running lists
// (len entries per row, best first; tw: each row's current worst, N_pad entries).
using Update = void (*)(const float* s, int32_t i0, int32_t j0, int i_end, int j_end, bool diagonal, int len,
                        float* tv, int32_t* ti, float* tw);
// One 16-column block of one averaging step: y[i] = (1/K) * sum_r x[nb[i * k + r]] (16 floats per row, 64-byte
// aligned), summed in neighbour order, for all n rows.
using AverageBlock = void (*)(const float* x, float* y, const int32_t* nb, int k, int64_t n, float inv_k);
// dst = row / max(||row||, 1e-12), the norm accumulated in float64 in 8 interleaved partial sums.
using Normalize = void (*)(const float* row, int64_t c, float* dst);
// Pack 16 normalised rows (rows, c apart; row r0 first, r0 a multiple of 16) into the A panels (MR rows) and the
// B panels (NR rows), k-major.
using Pack16 = void (*)(const float* rows, int64_t c, int64_t r0, int mr, int nr, float* ap, float* bp);

struct Isa {
  const char* name;
  int mr, nr;
  Kernel kernel;
  Update update;
  AverageBlock average;
  Normalize normalize;
  Pack16 pack;
};

// (value, index) total order: larger similarity first, then lower index.
inline bool better(float v, int32_t j, float w, int32_t i) { return v > w || (v == w && j < i); }

// Insert (v, j) into a list sorted best-first whose last entry it beats.
inline void insert(float* vals, int32_t* idx, int len, float v, int32_t j) {
  int p = len - 1;
  while (p > 0 && better(v, j, vals[p - 1], idx[p - 1])) {
    vals[p] = vals[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  vals[p] = v;
  idx[p] = j;
}

// The fp32 kernels for this CPU and IFSEG_KNN_CPU_ISA=`want` (a ceiling; "" = the best there is).
Isa pick_isa(const std::string& want);

// One feature row (float32, float16 or bfloat16) -> n floats (f16c: the CPU has F16C).
void row_to_float(const void* src, FeatDtype dtype, int64_t n, float* dst, bool f16c);

// ---- screening kernels (knn_screen.cpp) ----

// One CPU kind's screening kernels. Each row of Fn is quantised to 16 bits, q = round(Fn_i * kQ / max|Fn_i|) in
// [-kQ, kQ], and split into two signed bytes, q = 256 hi + lo (hi, lo in [-128, 127]). The screening similarity of
// rows i and j is then 65536 hi_i.hi_j + 256 (hi_i.lo_j + lo_i.hi_j) scaled back (the lo_i.lo_j term, at most
// 2^-16 of the rest, is left out): two int8 GEMM passes of lengths C and 2C, exact in int32 for C <= 32768, and the
// same integers on every kernel, so every CPU kind screens the same candidates.
//
// Packed operands: A (the GEMM's rows, u8 = byte + 128) holds [hi | lo] per row, row-major (2 * c4 bytes per row);
// B (its columns, s8) holds [hi | lo | hi] per row (3 * c4 bytes), 4-k interleaved in panels of `b_cols` columns,
// B[c / b_cols][k / 4][c % b_cols][k % 4]. C is padded with zeros to c4, a multiple of 64. Pass 1 pairs A[0, c4) with
// B[0, c4) (hi.hi); pass 2 pairs A[0, 2 c4) with B[c4, 3 c4) (hi.lo + lo.hi); the +128 of A is taken off with the
// per-column sums of B.
constexpr int kQ = 32639;  // 127 * 256 + 127: the largest |q| whose hi byte still fits in [-128, 127]

struct ScreenIsa {
  const char* name = nullptr;  // "amx" or "avx512vnni"; nullptr: no screening kernels on this CPU
  int b_cols = 0;
  // s[ii][jj] (kTile x kTile, row stride kTile) = sum over `len` bytes of A row ii times B column jj, for the kTile A
  // rows from a (a_row bytes apart) and the kTile B columns whose panels start at b (b_row bytes per column); a and b
  // may point k bytes into the rows (pass a + k and b + k * b_cols).
  void (*tile)(int64_t len, const uint8_t* a, int64_t a_row, const int8_t* b, int64_t b_row, int32_t* s) = nullptr;
};

// The best screening kernels this CPU (and IFSEG_KNN_CPU_ISA=`want`, a ceiling: "amx" allows everything,
// "avx512vnni" everything but AMX, anything lower none) allows; name == nullptr when there are none.
ScreenIsa pick_screen(const std::string& want);

// Quantise the normalised row fn[0:c] (fn == nullptr: a padding row, all zero) into its A row a (2 * c4 bytes) and
// its s8 bytes q ([hi | lo], 2 * c4, for pack_b16); inv = max|fn| / kQ (0 for a zero row), the B column sums the two
// passes take off, corr_hh = 128 * sum(hi) and corr_x = 128 * (sum(lo) + sum(hi)), and, in Fn units and rounded up,
// err >= ||q * inv - fn|| and lo_norm >= ||lo * inv||.
void quantize_row(const float* fn, int64_t c, int64_t c4, uint8_t* a, int8_t* q, float* inv, int32_t* corr_hh,
                  int32_t* corr_x, float* err, float* lo_norm);
// Pack the quantised bytes of rows r..r+15 (q: 16 rows of 2 * c4 bytes, r a multiple of 16) into their B columns.
void pack_b16(const ScreenIsa& isa, const int8_t* q, int64_t c4, int64_t r, int8_t* b);

// approx[ii][jj] = (65536 (s_hh - corr_hh_j) + 256 (s_x - corr_x_j)) * (inv_i * inv_j) over rows x cols of the two
// passes' kTile-strided tiles: the screening similarity, bitwise symmetric in (i, j).
void approx_tile(const int32_t* s_hh, const int32_t* s_x, float* approx, int rows, int cols, const float* inv_i,
                 const float* inv_j, const int32_t* corr_hh_j, const int32_t* corr_x_j);

// exact[i * R + r] = Fn_i . Fn_cand[i * R + r] for r < count[i], rows i in [lo, hi), computed as the fp32 AVX-512
// micro-kernel does (one fma chain over k ascending, from 0): the value the fp32 path compares for that pair.
// fn: N x C row-major.
void exact_dots(const float* fn, int64_t c, const int32_t* cand, const int32_t* count, int R, int64_t lo, int64_t hi,
                float* exact);

#if defined(__x86_64__) || defined(_M_X64)
// v[0..15] (16 rows of 16 floats) -> v[k] = (row 0 [k], ..., row 15 [k]).
__attribute__((target("avx512f"))) inline void transpose16(__m512* v) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    v[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    v[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    v[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // v[4q + r] now holds, in each 128-bit lane L, columns 4L + (r's column) of rows 4q..4q+3
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(v[i], v[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(v[i], v[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(v[i + 8], v[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(v[i + 8], v[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    v[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    v[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}
#endif

}  // namespace knn_detail
}  // namespace ifseg

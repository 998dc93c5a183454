// Integer screening for the CPU kNN (knn_cpu.cpp drives it; layout and contract in knn_cpu_internal.h).
//
// The similarity tiles are computed from per-row 16-bit quantisations of Fn, as int8 GEMM passes over their hi and lo
// bytes (AMX-INT8 tdpbusd where the CPU has it, else AVX512-VNNI vpdpbusd: 64 multiply-adds per instruction against 16
// for an fp32 FMA), and only serve to keep each row's best K - 1 + margin candidates; exact_dots then re-computes
// those candidates in fp32 exactly as the fp32 path does, and the neighbours are ranked by the exact values.
//
// Why 16 bits and not int8 alone: on real features (uniform image regions give many near-duplicate rows, similarities
// within 1e-4 of each other) an int8 screen (error ~1e-3) misses the true neighbours of most rows even with a margin
// of 32, and the averaged labels then differ in several % of the pixels; at 16 bits a margin of 8 reproduced the fp32
// neighbours exactly on the nano model's scenes (benchmarks/knn.py --agreement).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define IFSEG_X86 1
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define IFSEG_AMX 1
#endif
#endif

#include "knn/knn_cpu_internal.h"

namespace ifseg {
namespace knn_detail {
namespace {

#ifdef IFSEG_X86
// B micro-panel bytes per reduction chunk (32 columns x 1024 k for the VNNI kernel: C = 1024 in one pass).
constexpr int64_t kInt8PanelBytes = 32768;

// S[12 x 32] (+)= A B over kc4 groups of 4 k: a = 12 row-major u8 A rows (lda bytes apart), b = 32-column B panel
// [k4][32][4] s8 (64-byte aligned).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void vnni_kernel(int64_t kc4, const uint8_t* a, int64_t lda,
                                                                      const int8_t* b, int32_t* s, int64_t lds,
                                                                      bool first) {
  constexpr int MR = 12;
  __m512i c[MR][2];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    c[r][0] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(s + r * lds);
    c[r][1] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(s + r * lds + 16);
  }
  for (int64_t k4 = 0; k4 < kc4; ++k4) {
    const __m512i b0 = _mm512_load_si512(b + k4 * 128), b1 = _mm512_load_si512(b + k4 * 128 + 64);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + k4 * 4, 4);
      const __m512i av = _mm512_set1_epi32(a4);
      c[r][0] = _mm512_dpbusd_epi32(c[r][0], av, b0);
      c[r][1] = _mm512_dpbusd_epi32(c[r][1], av, b1);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_si512(s + r * lds, c[r][0]);
    _mm512_storeu_si512(s + r * lds + 16, c[r][1]);
  }
}

void vnni_tile(int64_t len, const uint8_t* a, int64_t a_row, const int8_t* b, int64_t b_row, int32_t* s) {
  constexpr int MR = 12, NR = 32;
  const int64_t k4s = len / 4, chunk = kInt8PanelBytes / (NR * 4);
  for (int64_t k0 = 0; k0 < k4s; k0 += chunk) {
    const int64_t kc = std::min(chunk, k4s - k0);
    for (int jr = 0; jr < kTile; jr += NR) {
      const int8_t* bp = b + (jr / NR) * NR * b_row + k0 * NR * 4;
      for (int ir = 0; ir < kTile; ir += MR)
        vnni_kernel(kc, a + ir * a_row + k0 * 4, a_row, bp, s + ir * kTile + jr, kTile, k0 == 0);
    }
  }
}
#endif

#ifdef IFSEG_AMX
// AMX-INT8: tiles of 16 rows x 64 bytes. A is row-major u8, B is 16-column panels [k4][16][4] s8 (b_cols = 16), so a
// B tile is 16 consecutive k4 groups of one panel (stride 64 bytes).
constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // <asm/prctl.h>, the kernel's xstate number

bool amx_permitted() {
  // Linux hands out the AMX tile state only on request, once per process (the request then covers every thread).
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile,amx-int8"))) void amx_tile(int64_t len, const uint8_t* a, int64_t a_row,
                                                         const int8_t* b, int64_t b_row, int32_t* s) {
  // tmm0-3: the 2 x 2 int32 accumulators of a 32 x 32 block; tmm4-5: A (16 rows x 64 k); tmm6-7: B (16 k4 x 16 cols).
  // The configuration is loaded and the tile state released on every call: other code on this thread (oneDNN in
  // torch, say) may use AMX with its own configuration in between.
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  const int64_t lda = a_row, ldb = 64, lds = int64_t(kTile) * 4;
  for (int ir = 0; ir < kTile; ir += 32)
    for (int jr = 0; jr < kTile; jr += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint8_t* a0 = a + ir * lda;
      const int8_t* b0 = b + (jr / 16) * 16 * b_row;
      for (int64_t k = 0; k < len; k += 64) {
        _tile_loadd(4, a0 + k, lda);
        _tile_loadd(5, a0 + 16 * lda + k, lda);
        _tile_loadd(6, b0 + k * 16, ldb);
        _tile_loadd(7, b0 + 16 * b_row + k * 16, ldb);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
      }
      int32_t* out = s + ir * kTile + jr;
      _tile_stored(0, out, lds);
      _tile_stored(1, out + 16, lds);
      _tile_stored(2, out + 16 * kTile, lds);
      _tile_stored(3, out + 16 * kTile + 16, lds);
    }
  _tile_release();
}
#endif

#ifdef IFSEG_X86
// Lane l: Fn_a . Fn_{rows[l]} (Two: lanes 8-15 Fn_b . Fn_{rows[l]}), each one fma chain over k ascending from 0
// (the fp32 kernel's). The rows' 16-k blocks are transposed in registers so that lane l reads its own row: no gathers
// (slow on some CPUs: 20+ cycles each on the Xeon this was tuned on).
template <bool Two>
__attribute__((target("avx512f"))) __m512 dots16(const float* fa, const float* fb, const float* const* rows,
                                                int64_t c) {
  __m512 acc_a = _mm512_setzero_ps(), acc_b = _mm512_setzero_ps();
  __m512 v[16];
  for (int64_t k0 = 0; k0 < c; k0 += 16) {
    const int64_t kn = std::min<int64_t>(16, c - k0);
    const __mmask16 m = __mmask16((1u << kn) - 1);
#pragma GCC unroll 16
    for (int l = 0; l < 16; ++l) v[l] = _mm512_maskz_loadu_ps(m, rows[l] + k0);
    transpose16(v);
    for (int64_t kk = 0; kk < kn; ++kk) {
      acc_a = _mm512_fmadd_ps(_mm512_set1_ps(fa[k0 + kk]), v[kk], acc_a);
      if (Two) acc_b = _mm512_fmadd_ps(_mm512_set1_ps(fb[k0 + kk]), v[kk], acc_b);
    }
  }
  return Two ? _mm512_mask_mov_ps(acc_a, __mmask16(0xff00), acc_b) : acc_a;
}

__attribute__((target("avx512f"))) void exact_dots_avx512(const float* fn, int64_t c, const int32_t* cand,
                                                         const int32_t* count, int R, int64_t lo, int64_t hi,
                                                         float* exact) {
  const float* rows[16];
  alignas(64) float res[16];
  for (int64_t i = lo; i < hi; ++i) {
    const int32_t* ci = cand + i * R;
    const int ni = count[i];
    if (ni <= 8 && i + 1 < hi && count[i + 1] <= 8) {  // two rows in one vector
      const int32_t* cj = cand + (i + 1) * R;
      const int nj = count[i + 1];
      for (int l = 0; l < 8; ++l) {
        rows[l] = fn + int64_t(ci[std::min(l, ni - 1)]) * c;
        rows[8 + l] = fn + int64_t(cj[std::min(l, nj - 1)]) * c;
      }
      _mm512_store_ps(res, dots16<true>(fn + i * c, fn + (i + 1) * c, rows, c));
      std::copy(res, res + ni, exact + i * R);
      std::copy(res + 8, res + 8 + nj, exact + (i + 1) * R);
      ++i;
      continue;
    }
    for (int r0 = 0; r0 < ni; r0 += 16) {
      const int T = std::min(16, ni - r0);
      for (int l = 0; l < 16; ++l) rows[l] = fn + int64_t(ci[r0 + std::min(l, T - 1)]) * c;
      _mm512_store_ps(res, dots16<false>(fn + i * c, nullptr, rows, c));
      std::copy(res, res + T, exact + i * R + r0);
    }
  }
}

// One row's quantisation (see knn_cpu_internal.h), 16 k at a time: q = round(fn * kQ / max|fn|), hi = (q + 128) >> 8,
// lo = q - 256 hi, written as the A row [hi + 128 | lo + 128] (u8) and the row's [hi | lo] s8 bytes (for pack_b16).
__attribute__((target("avx512f,avx512bw"))) void quantize_avx512(const float* fn, int64_t c, int64_t c4, uint8_t* ar,
                                                                int8_t* qr, float* inv, int32_t* corr_hh,
                                                                int32_t* corr_x, float* err, float* lo_norm) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t q = 0; q < c; q += 16) {
    const __mmask16 m = c - q >= 16 ? __mmask16(0xffff) : __mmask16((1u << (c - q)) - 1);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, fn + q)));
  }
  const float top = _mm512_reduce_max_ps(mx);
  const __m512 scale = _mm512_set1_ps(top > 0.f ? float(kQ) / top : 0.f);
  const __m512 lim = _mm512_set1_ps(float(kQ)), nlim = _mm512_set1_ps(-float(kQ));
  const __m128i flip = _mm_set1_epi8(char(0x80));
  __m512i sum_hi = _mm512_setzero_si512(), sum_lo = _mm512_setzero_si512();
  __m512 err2 = _mm512_setzero_ps(), lo2 = _mm512_setzero_ps();  // sum (q - fn * scale)^2, sum lo^2
  for (int64_t q = 0; q < c4; q += 16) {
    const __mmask16 m = c - q >= 16 ? __mmask16(0xffff) : c > q ? __mmask16((1u << (c - q)) - 1) : __mmask16(0);
    const __m512 v = _mm512_min_ps(lim, _mm512_max_ps(nlim, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, fn + q), scale)));
    const __m512i iv = _mm512_cvtps_epi32(v);  // round to nearest even
    const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(iv, _mm512_set1_epi32(128)), 8);
    const __m512i lo = _mm512_sub_epi32(iv, _mm512_slli_epi32(hi, 8));
    const __m512 d = _mm512_sub_ps(_mm512_cvtepi32_ps(iv), v), lf = _mm512_cvtepi32_ps(lo);  // both exact
    err2 = _mm512_fmadd_ps(d, d, err2);
    lo2 = _mm512_fmadd_ps(lf, lf, lo2);
    sum_hi = _mm512_add_epi32(sum_hi, hi);
    sum_lo = _mm512_add_epi32(sum_lo, lo);
    const __m128i hb = _mm512_cvtepi32_epi8(hi), lb = _mm512_cvtepi32_epi8(lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + q), hb);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + c4 + q), lb);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(ar + q), _mm_xor_si128(hb, flip));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(ar + c4 + q), _mm_xor_si128(lb, flip));
  }
  const int32_t shi = _mm512_reduce_add_epi32(sum_hi), slo = _mm512_reduce_add_epi32(sum_lo);
  *inv = top / float(kQ);
  // Norms of the rounding error and of the lo bytes in Fn units (q / scale), rounded up: inputs of the bound that
  // prunes the exact re-rank (knn_cpu.cpp). The 3e-7 covers fn * scale's own rounding (<= 2^-24 |fn| per element).
  const float to_fn = top > 0.f ? top / float(kQ) : 0.f;
  *err = std::sqrt(_mm512_reduce_add_ps(err2)) * to_fn * 1.0001f + (top > 0.f ? 3e-7f : 0.f);
  *lo_norm = std::sqrt(_mm512_reduce_add_ps(lo2)) * to_fn * 1.0001f;
  *corr_hh = 128 * shi;
  *corr_x = 128 * (shi + slo);
}

// 16 rows' [hi | lo] s8 bytes (q, 2 * c4 apart) -> their B columns [hi | lo | hi]: per 64 k, a 16 x 16 transpose of
// 4-byte groups gives the 16 k4 groups of the 16 columns, 64 bytes each (b: the first column's slot in its panel).
__attribute__((target("avx512f"))) void pack_b16_avx512(const int8_t* q, int64_t c4, int8_t* b, int64_t b_cols) {
  __m512 v[16];
  const int64_t seg = c4 * b_cols;  // bytes between the B segments of a panel
  for (int s = 0; s < 3; ++s) {
    const int8_t* src = q + (s == 1 ? c4 : 0);
    for (int64_t k = 0; k < c4; k += 64) {
      for (int l = 0; l < 16; ++l) v[l] = _mm512_loadu_ps(src + l * 2 * c4 + k);
      transpose16(v);
      for (int g = 0; g < 16; ++g) _mm512_storeu_ps(b + s * seg + (k / 4 + g) * b_cols * 4, v[g]);
    }
  }
}

__attribute__((target("avx512f"))) void approx_tile_avx512(const int32_t* s_hh, const int32_t* s_x, float* approx,
                                                          int rows, int cols, const float* inv_i, const float* inv_j,
                                                          const int32_t* corr_hh_j, const int32_t* corr_x_j) {
  // hi.hi * 65536 and (hi.lo + lo.hi) * 256 are exact in float up to 2^24 ulps of their ints, their sum is rounded
  // once, then scaled by inv_i * inv_j (a commutative product): the same float for (i, j) and (j, i).
  for (int ii = 0; ii < rows; ++ii) {
    const float wi = inv_i[ii];
    for (int jj = 0; jj < cols; ++jj) {
      const int64_t o = int64_t(ii) * kTile + jj;
      const float hh = float(s_hh[o] - corr_hh_j[jj]) * 65536.f, x = float(s_x[o] - corr_x_j[jj]) * 256.f;
      approx[o] = (hh + x) * (wi * inv_j[jj]);
    }
  }
}
#endif

}  // namespace

ScreenIsa pick_screen(const std::string& want) {
  ScreenIsa isa;
#ifdef IFSEG_X86
  __builtin_cpu_init();
  const bool vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vnni");
#ifdef IFSEG_AMX
  // AMX is not among __builtin_cpu_supports' names in every compiler: CPUID leaf 7 EDX bits 24 (tile), 25 (int8).
  unsigned eax, ebx, ecx, edx;
  __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  const bool amx = vnni && (edx >> 24 & 1) && (edx >> 25 & 1);
  if ((want.empty() || want == "amx") && amx && amx_permitted()) return {"amx", 16, amx_tile};
#endif
  if ((want.empty() || want == "amx" || want == "avx512vnni") && vnni) return {"avx512vnni", 32, vnni_tile};
#else
  (void)want;
#endif
  return isa;
}

void quantize_row(const float* fn, int64_t c, int64_t c4, uint8_t* a, int8_t* q, float* inv, int32_t* corr_hh,
                  int32_t* corr_x, float* err, float* lo_norm) {
#ifdef IFSEG_X86
  static const float kZero = 0.f;  // padding rows: nothing is read (c = 0 masks every load)
  quantize_avx512(fn ? fn : &kZero, fn ? c : 0, c4, a, q, inv, corr_hh, corr_x, err, lo_norm);
#else
  (void)fn, (void)c, (void)c4, (void)a, (void)q, (void)inv, (void)corr_hh, (void)corr_x, (void)err, (void)lo_norm;
#endif
}

void pack_b16(const ScreenIsa& isa, const int8_t* q, int64_t c4, int64_t r, int8_t* b) {
#ifdef IFSEG_X86
  pack_b16_avx512(q, c4, b + (r / isa.b_cols) * isa.b_cols * 3 * c4 + (r % isa.b_cols) * 4, isa.b_cols);
#else
  (void)isa, (void)q, (void)c4, (void)r, (void)b;
#endif
}

void approx_tile(const int32_t* s_hh, const int32_t* s_x, float* approx, int rows, int cols, const float* inv_i,
                 const float* inv_j, const int32_t* corr_hh_j, const int32_t* corr_x_j) {
#ifdef IFSEG_X86
  approx_tile_avx512(s_hh, s_x, approx, rows, cols, inv_i, inv_j, corr_hh_j, corr_x_j);
#else
  (void)s_hh, (void)s_x, (void)approx, (void)rows, (void)cols, (void)inv_i, (void)inv_j, (void)corr_hh_j,
      (void)corr_x_j;
#endif
}

void exact_dots(const float* fn, int64_t c, const int32_t* cand, const int32_t* count, int R, int64_t lo, int64_t hi,
                float* exact) {
#ifdef IFSEG_X86
  exact_dots_avx512(fn, c, cand, count, R, lo, hi, exact);
#else
  (void)fn, (void)c, (void)cand, (void)count, (void)R, (void)lo, (void)hi, (void)exact;
#endif
}

}  // namespace knn_detail
}  // namespace ifseg

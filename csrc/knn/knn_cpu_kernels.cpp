// fp32 kernels of the CPU kNN (knn_cpu.cpp drives them; interface in knn_cpu_internal.h): the GEMM micro-kernels,
// the running-list update, the averaging step, row normalisation, panel packing and the float16/bfloat16 widening,
// each for AVX-512, AVX2+FMA (where it pays) and plain C++, compiled through target attributes and picked at run time
// by pick_isa (override with IFSEG_KNN_CPU_ISA), so the library never needs -march=native.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define IFSEG_X86 1
#endif

#include "knn/knn_cpu_internal.h"

namespace ifseg {
namespace knn_detail {
namespace {

// ---- micro-kernels: S[mr x nr] (+)= Apanel[kc x mr]^T * Bpanel[kc x nr]; both panels packed k-major ----

template <int MR, int NR>
void kernel_generic(int kc, const float* a, const float* b, float* s, int64_t lds, bool first) {
  float acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = first ? 0.f : s[r * lds + j];
  for (int k = 0; k < kc; ++k)
    for (int r = 0; r < MR; ++r) {
      const float av = a[k * MR + r];
      for (int j = 0; j < NR; ++j) acc[r][j] += av * b[k * NR + j];
    }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) s[r * lds + j] = acc[r][j];
}

void update_generic(const float* S, int32_t i0, int32_t j0, int i_end, int j_end, bool diagonal, int len, float* tv,
                    int32_t* ti, float* tw) {
  for (int ii = 0; ii < i_end; ++ii) {  // rows of I, candidates from J
    const int32_t gi = i0 + ii;
    float* v = tv + int64_t(gi) * len;
    int32_t* id = ti + int64_t(gi) * len;
    const float* srow = S + ii * kTile;
    for (int jj = 0; jj < j_end; ++jj) {
      const float s = srow[jj];
      const int32_t gj = j0 + jj;
      if (s >= v[len - 1] && gj != gi && better(s, gj, v[len - 1], id[len - 1])) insert(v, id, len, s, gj);
    }
    tw[gi] = v[len - 1];
  }
  if (diagonal) return;
  float* w = tw + j0;  // symmetric half: columns of J, candidates from I
  for (int ii = 0; ii < i_end; ++ii) {
    const int32_t gi = i0 + ii;
    const float* srow = S + ii * kTile;
    for (int jj = 0; jj < j_end; ++jj) {
      const float s = srow[jj];
      if (s >= w[jj]) {
        float* v = tv + int64_t(j0 + jj) * len;
        int32_t* id = ti + int64_t(j0 + jj) * len;
        if (better(s, gi, v[len - 1], id[len - 1])) {
          insert(v, id, len, s, gi);
          w[jj] = v[len - 1];
        }
      }
    }
  }
}

void average_generic(const float* x, float* y, const int32_t* nb, int k, int64_t n, float inv_k) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* nbi = nb + i * k;
    float acc[16];
    for (int q = 0; q < 16; ++q) acc[q] = x[int64_t(nbi[0]) * 16 + q];
    for (int r = 1; r < k; ++r)
      for (int q = 0; q < 16; ++q) acc[q] += x[int64_t(nbi[r]) * 16 + q];
    for (int q = 0; q < 16; ++q) y[i * 16 + q] = acc[q] * inv_k;
  }
}

void pack_generic(const float* rows, int64_t c, int64_t r0, int mr, int nr, float* ap, float* bp) {
  for (int64_t r = r0; r < r0 + 16; ++r) {
    const float* src = rows + (r - r0) * c;
    float* apanel = ap + (r / mr) * c * mr + (r % mr);
    for (int64_t q = 0; q < c; ++q) apanel[q * mr] = src[q];
    float* bpanel = bp + (r / nr) * c * nr + (r % nr);
    for (int64_t q = 0; q < c; ++q) bpanel[q * nr] = src[q];
  }
}

void normalize_generic(const float* row, int64_t c, float* dst) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent partial sums: vectorisable, still float64
  for (int64_t q = 0; q < c; ++q) part[q % 8] += double(row[q]) * double(row[q]);
  double ss = 0.0;
  for (double v : part) ss += v;
  const float denom = std::max(static_cast<float>(std::sqrt(ss)), 1e-12f);
  for (int64_t q = 0; q < c; ++q) dst[q] = row[q] / denom;
}

#ifdef IFSEG_X86
__attribute__((target("avx2,fma"))) void kernel_avx2(int kc, const float* a, const float* b, float* s, int64_t lds,
                                                     bool first) {
  constexpr int MR = 6;
  __m256 c[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    c[r][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(s + r * lds);
    c[r][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(s + r * lds + 8);
  }
  for (int k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * 16), b1 = _mm256_load_ps(b + k * 16 + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + k * MR + r);
      c[r][0] = _mm256_fmadd_ps(av, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(av, b1, c[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(s + r * lds, c[r][0]);
    _mm256_storeu_ps(s + r * lds + 8, c[r][1]);
  }
}

__attribute__((target("avx512f"))) void kernel_avx512(int kc, const float* a, const float* b, float* s,
                                                      int64_t lds, bool first) {
  constexpr int MR = 12;
  __m512 c[MR][2];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    c[r][0] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(s + r * lds);
    c[r][1] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(s + r * lds + 16);
  }
  for (int k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(b + k * 32), b1 = _mm512_load_ps(b + k * 32 + 16);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[k * MR + r]);
      c[r][0] = _mm512_fmadd_ps(av, b0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(av, b1, c[r][1]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(s + r * lds, c[r][0]);
    _mm512_storeu_ps(s + r * lds + 16, c[r][1]);
  }
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << std::max<int64_t>(count, 0)) - 1);
}

// insert() for lists of len <= 16 in registers: the position is the count of entries (v, j) beats, the entries from
// there move up one lane; no data-dependent branches.
__attribute__((target("avx512f"))) inline void insert16(float* vals, int32_t* idx, int len, float v, int32_t j) {
  const __mmask16 lanes = first_lanes(len);
  const __m512 vv = _mm512_maskz_loadu_ps(lanes, vals);
  const __m512i ii = _mm512_maskz_loadu_epi32(lanes, idx);
  const __m512 nv = _mm512_set1_ps(v);
  const __m512i nj = _mm512_set1_epi32(j);
  // entries (v, j) beats: better(v, j, w, i); a suffix of the sorted list
  const __mmask16 beaten = lanes & (_mm512_cmp_ps_mask(nv, vv, _CMP_GT_OQ) |
                                    (_mm512_cmp_ps_mask(nv, vv, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(nj, ii)));
  const __mmask16 moved = __mmask16(beaten << 1) & lanes, at = beaten & __mmask16(~(beaten << 1));
  const __m512i up = _mm512_set_epi32(14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0);  // lane l <- l - 1
  const __m512 rv = _mm512_mask_mov_ps(_mm512_mask_permutexvar_ps(vv, moved, up, vv), at, nv);
  const __m512i ri = _mm512_mask_mov_epi32(_mm512_mask_permutexvar_epi32(ii, moved, up, ii), at, nj);
  _mm512_mask_storeu_ps(vals, lanes, rv);
  _mm512_mask_storeu_epi32(idx, lanes, ri);
}

__attribute__((target("avx512f"))) inline void insert_any(float* vals, int32_t* idx, int len, float v, int32_t j) {
  if (len <= 16)
    insert16(vals, idx, len, v, j);
  else
    insert(vals, idx, len, v, j);
}

// update_generic with the threshold tests 16 lanes at a time; the same inserts in the same order.
__attribute__((target("avx512f"))) void update_avx512(const float* S, int32_t i0, int32_t j0, int i_end, int j_end,
                                                      bool diagonal, int len, float* tv, int32_t* ti, float* tw) {
  for (int ii = 0; ii < i_end; ++ii) {
    const int32_t gi = i0 + ii;
    float* v = tv + int64_t(gi) * len;
    int32_t* id = ti + int64_t(gi) * len;
    const float* srow = S + ii * kTile;
    for (int jj0 = 0; jj0 < j_end; jj0 += 16) {
      __mmask16 hit = first_lanes(j_end - jj0) &
                      _mm512_cmp_ps_mask(_mm512_loadu_ps(srow + jj0), _mm512_set1_ps(v[len - 1]), _CMP_GE_OQ);
      while (hit) {
        const int jj = jj0 + __builtin_ctz(hit);
        hit &= hit - 1;
        const float s = srow[jj];
        const int32_t gj = j0 + jj;
        if (gj != gi && better(s, gj, v[len - 1], id[len - 1])) insert_any(v, id, len, s, gj);
      }
    }
    tw[gi] = v[len - 1];
  }
  if (diagonal) return;
  float* w = tw + j0;
  for (int ii = 0; ii < i_end; ++ii) {
    const int32_t gi = i0 + ii;
    const float* srow = S + ii * kTile;
    for (int jj0 = 0; jj0 < j_end; jj0 += 16) {
      __mmask16 hit = first_lanes(j_end - jj0) &
                      _mm512_cmp_ps_mask(_mm512_loadu_ps(srow + jj0), _mm512_loadu_ps(w + jj0), _CMP_GE_OQ);
      while (hit) {
        const int jj = jj0 + __builtin_ctz(hit);
        hit &= hit - 1;
        const float s = srow[jj];
        float* v = tv + int64_t(j0 + jj) * len;
        int32_t* id = ti + int64_t(j0 + jj) * len;
        if (better(s, gi, v[len - 1], id[len - 1])) {
          insert_any(v, id, len, s, gi);
          w[jj] = v[len - 1];
        }
      }
    }
  }
}

// average_generic in one register (the same additions in the same order).
__attribute__((target("avx512f"))) void average_avx512(const float* x, float* y, const int32_t* nb, int k, int64_t n,
                                                       float inv_k) {
  const __m512 scale = _mm512_set1_ps(inv_k);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* nbi = nb + i * k;
    __m512 acc = _mm512_load_ps(x + int64_t(nbi[0]) * 16);
    for (int r = 1; r < k; ++r) acc = _mm512_add_ps(acc, _mm512_load_ps(x + int64_t(nbi[r]) * 16));
    _mm512_store_ps(y + i * 16, _mm512_mul_ps(acc, scale));
  }
}

// normalize_generic, bitwise: lane j of the float64 accumulator is part[j]. The explicitly rounded intrinsics keep
// the compiler from contracting the square and the sum into an fma, which the generic build cannot do.
__attribute__((target("avx512f"))) void normalize_avx512(const float* row, int64_t c, float* dst) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m512d acc = _mm512_setzero_pd();
  for (int64_t q = 0; q < c; q += 8) {
    const __mmask16 lanes = first_lanes(std::min<int64_t>(c - q, 8));  // absent lanes add +0
    const __m512d v = _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_maskz_loadu_ps(lanes, row + q)));
    acc = _mm512_add_round_pd(acc, _mm512_mul_round_pd(v, v, kRound), kRound);
  }
  alignas(64) double part[8];
  _mm512_store_pd(part, acc);
  double ss = 0.0;
  for (double v : part) ss += v;
  const __m512 denom = _mm512_set1_ps(std::max(static_cast<float>(std::sqrt(ss)), 1e-12f));
  for (int64_t q = 0; q < c; q += 16) {
    const __mmask16 lanes = first_lanes(c - q);
    _mm512_mask_storeu_ps(dst + q, lanes, _mm512_div_ps(_mm512_maskz_loadu_ps(lanes, row + q), denom));
  }
}

// pack_generic through 16 x 16 transposes: per k, the 16 rows' values are one vector, stored whole into the B panel
// (NR = 32: half of a panel row) and in up to three masked runs into the A panels (MR = 12).
__attribute__((target("avx512f"))) void pack_avx512(const float* rows, int64_t c, int64_t r0, int mr, int nr,
                                                    float* ap, float* bp) {
  __m512 v[16];
  for (int64_t k0 = 0; k0 < c; k0 += 16) {
    const int64_t kn = std::min<int64_t>(16, c - k0);
    const __mmask16 m = first_lanes(kn);
    for (int l = 0; l < 16; ++l) v[l] = _mm512_maskz_loadu_ps(m, rows + l * c + k0);
    transpose16(v);
    for (int64_t kk = 0; kk < kn; ++kk) {
      const int64_t k = k0 + kk;
      _mm512_storeu_ps(bp + (r0 / nr) * c * nr + k * nr + r0 % nr, v[kk]);
      for (int64_t r = r0; r < r0 + 16; r = (r / mr + 1) * mr) {
        const int first = int(r - r0), last = int(std::min<int64_t>(r0 + 16, (r / mr + 1) * mr) - r0);
        const __mmask16 run = __mmask16(first_lanes(last) & ~first_lanes(first));
        _mm512_mask_storeu_ps(ap + (r / mr) * c * mr + k * mr + (r % mr) - first, run, v[kk]);
      }
    }
  }
}

__attribute__((target("f16c"))) void half_row_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}
#endif

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else {  // zero or subnormal: value = man * 2^-24
    const float v = std::ldexp(static_cast<float>(man), -24);
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

Isa pick_isa(const std::string& want) {
#ifdef IFSEG_X86
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool up_to_512 = want.empty() || want == "amx" || want == "avx512vnni" || want == "avx512";
  if (up_to_512 && has512)
    return {"avx512", 12, 32, kernel_avx512, update_avx512, average_avx512, normalize_avx512, pack_avx512};
  if ((up_to_512 || want == "avx2") && has2)
    return {"avx2", 6, 16, kernel_avx2, update_generic, average_generic, normalize_generic, pack_generic};
#endif
  return {"generic", 4, 16, kernel_generic<4, 16>, update_generic, average_generic, normalize_generic, pack_generic};
}

void row_to_float(const void* src, FeatDtype dtype, int64_t n, float* dst, bool f16c) {
  if (dtype == FeatDtype::kFloat32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dtype == FeatDtype::kFloat16) {
    const auto* h = static_cast<const uint16_t*>(src);
#ifdef IFSEG_X86
    if (f16c) return half_row_f16c(h, dst, n);
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(h[i]);
  } else {  // bfloat16: the upper half of a float32
    const auto* h = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(h[i]) << 16;
      std::memcpy(dst + i, &bits, 4);
    }
  }
}

}  // namespace knn_detail
}  // namespace ifseg

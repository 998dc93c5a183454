// CPU kNN post-processing (spec section 12): fused, tiled cosine-similarity GEMM with a running top-K per row, then
// the averaging iterations. Never holds the NxN similarity matrix: only one TxT tile per thread.
//
// Layout per image: the normalised rows Fn (N_pad x C, zero rows past N) are packed twice, k-major, into panels of MR
// rows (the GEMM's A, Ap[panel][c][MR]) and of NR rows (its B, Bp[panel][c][NR]). S = Fn Fn^T is symmetric, so only tiles (I, J) with I <= J are computed;
// an off-diagonal tile feeds row i's top-K (candidate j) and row j's top-K (candidate i). Each thread keeps its own
// top-K for all N rows (no locks); the per-thread lists are merged at the end. Every S[i, j] is the same fma chain
// (k ascending, KC chunks) wherever it sits in a tile, so S is exactly symmetric and ties break the same way
// (lower index first) for any thread count.
//
// The fp32 micro-kernels are compiled for AVX-512, AVX2+FMA and plain C++ through target attributes and chosen at
// run time (override with IFSEG_KNN_CPU_ISA=avx512|avx2|generic), so the library never needs -march=native.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define IFSEG_X86 1
#endif

#include "knn/knn.h"

namespace ifseg {
namespace {

constexpr int kTile = 96;  // rows/cols per similarity tile; a multiple of every micro-kernel's MR and NR
// Reduction chunk KC = kPanelFloats / NR (a B micro-panel of 128 KiB, L2-resident): measured on Zen 4, fewer S
// reload passes beat an L1-sized panel (C = 1024 runs in one or two chunks).
constexpr int kPanelFloats = 32768;

using Kernel = void (*)(int kc, const float* a, const float* b, float* s, int64_t lds, bool first);

struct Isa {
  const char* name;
  int mr, nr;
  Kernel kernel;
};

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

__attribute__((target("f16c"))) void half_row_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}
#endif

Isa pick_isa() {
  std::string want;
  if (const char* env = std::getenv("IFSEG_KNN_CPU_ISA")) want = env;
#ifdef IFSEG_X86
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if ((want.empty() || want == "avx512") && has512) return {"avx512", 12, 32, kernel_avx512};
  if ((want.empty() || want == "avx512" || want == "avx2") && has2) return {"avx2", 6, 16, kernel_avx2};
#endif
  return {"generic", 4, 16, kernel_generic<4, 16>};
}

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

int64_t feat_itemsize(FeatDtype d) { return d == FeatDtype::kFloat32 ? 4 : 2; }

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

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using AlignedBuf = std::unique_ptr<float[], AlignedFree>;
AlignedBuf aligned_floats(int64_t n) {
  const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64) * 64;
  auto* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  return AlignedBuf(p);
}

// Generation-counting barrier: spins briefly (phases are short), then yields.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    if (n_ == 1) return;
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spin = 0; gen_.load(std::memory_order_acquire) == gen; ++spin)
      if (spin > 2000) std::this_thread::yield();
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
};

std::pair<int64_t, int64_t> split(int64_t total, int parts, int id) {
  const int64_t chunk = (total + parts - 1) / parts;
  const int64_t lo = std::min<int64_t>(total, chunk * id);
  return {lo, std::min<int64_t>(total, lo + chunk)};
}

}  // namespace

const char* knn_cpu_isa() { return pick_isa().name; }

void knn_cpu(const KnnParams& p) {
  const Isa isa = pick_isa();
#ifdef IFSEG_X86
  const bool f16c = __builtin_cpu_supports("f16c");
#else
  const bool f16c = false;
#endif
  const int64_t n = p.n, c = p.c, m = p.m;
  const int k = p.k, L = p.k - 1;  // L: neighbours other than the row itself
  const int64_t tiles = (n + kTile - 1) / kTile, n_pad = tiles * kTile;
  const int nthreads = std::max(1, std::min<int>(p.num_threads, static_cast<int>(std::max<int64_t>(n, 1))));
  const bool need_sim = L > 0;

  AlignedBuf ap = aligned_floats(need_sim ? n_pad * c : 1);
  AlignedBuf bp = aligned_floats(need_sim ? n_pad * c : 1);
  AlignedBuf tile_buf = aligned_floats(need_sim ? int64_t(nthreads) * kTile * kTile : 1);
  std::vector<float> topv(need_sim ? size_t(nthreads) * n * L : 0), worst(need_sim ? size_t(nthreads) * n : 0);
  std::vector<int32_t> topi(topv.size());
  std::vector<int32_t> nb(size_t(n) * k);
  std::vector<float> tmp(p.probs && p.iters > 1 ? size_t(n) * m : 0);
  std::vector<std::pair<int32_t, int32_t>> tile_list;
  for (int64_t i = 0; i < tiles; ++i)
    for (int64_t j = i; j < tiles; ++j) tile_list.emplace_back(int32_t(i), int32_t(j));

  Barrier barrier(nthreads);
  std::atomic<int64_t> next_tile{0};
  const float inf = std::numeric_limits<float>::infinity();
  const float inv_k = 1.0f / static_cast<float>(k);

  auto worker = [&](int tid) {
    std::vector<float> row(c), nrm(c);
    float* S = tile_buf.get() + int64_t(tid) * kTile * kTile;
    float* tv = need_sim ? topv.data() + size_t(tid) * n * L : nullptr;
    int32_t* ti = need_sim ? topi.data() + size_t(tid) * n * L : nullptr;
    float* tw = need_sim ? worst.data() + size_t(tid) * n : nullptr;

    for (int64_t b = 0; b < p.batch; ++b) {
      // Phase 1: normalise rows into Fn and the packed panels; reset this thread's top-K lists.
      if (need_sim) {
        const auto* feat = static_cast<const char*>(p.features) + b * p.feat_batch_stride * feat_itemsize(p.feat_dtype);
        auto [lo, hi] = split(n_pad, nthreads, tid);
        for (int64_t r = lo; r < hi; ++r) {
          float* dst = nrm.data();
          if (r < n) {
            row_to_float(feat + r * c * feat_itemsize(p.feat_dtype), p.feat_dtype, c, row.data(), f16c);
            double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent partial sums: vectorisable, still float64
            for (int64_t q = 0; q < c; ++q) part[q % 8] += double(row[q]) * double(row[q]);
            double ss = 0.0;
            for (double v : part) ss += v;
            const float denom = std::max(static_cast<float>(std::sqrt(ss)), 1e-12f);
            for (int64_t q = 0; q < c; ++q) dst[q] = row[q] / denom;
          } else {
            std::fill(dst, dst + c, 0.f);
          }
          float* apanel = ap.get() + (r / isa.mr) * c * isa.mr + (r % isa.mr);
          for (int64_t q = 0; q < c; ++q) apanel[q * isa.mr] = dst[q];
          float* bpanel = bp.get() + (r / isa.nr) * c * isa.nr + (r % isa.nr);
          for (int64_t q = 0; q < c; ++q) bpanel[q * isa.nr] = dst[q];
        }
        std::fill(tv, tv + n * L, -inf);
        std::fill(ti, ti + n * L, std::numeric_limits<int32_t>::max());
        std::fill(tw, tw + n, -inf);
        if (tid == 0) next_tile.store(0);
        barrier.wait();

        // Phase 2: similarity tiles (upper triangle) -> running top-K per row.
        for (int64_t t = next_tile.fetch_add(1); t < int64_t(tile_list.size()); t = next_tile.fetch_add(1)) {
          const int64_t I = tile_list[t].first, J = tile_list[t].second;
          const int64_t kc_max = kPanelFloats / isa.nr;
          for (int64_t k0 = 0; k0 < c; k0 += kc_max) {
            const int kc = static_cast<int>(std::min<int64_t>(kc_max, c - k0));
            for (int jr = 0; jr < kTile; jr += isa.nr) {
              const float* bpanel = bp.get() + ((J * kTile + jr) / isa.nr) * c * isa.nr + k0 * isa.nr;
              for (int ir = 0; ir < kTile; ir += isa.mr)
                isa.kernel(kc, ap.get() + ((I * kTile + ir) / isa.mr) * c * isa.mr + k0 * isa.mr, bpanel,
                           S + ir * kTile + jr, kTile, k0 == 0);
            }
          }
          const int64_t i_end = std::min<int64_t>(kTile, n - I * kTile), j_end = std::min<int64_t>(kTile, n - J * kTile);
          for (int64_t ii = 0; ii < i_end; ++ii) {  // rows of I, candidates from J
            const int32_t gi = int32_t(I * kTile + ii);
            float* v = tv + int64_t(gi) * L;
            int32_t* id = ti + int64_t(gi) * L;
            const float* srow = S + ii * kTile;
            for (int64_t jj = 0; jj < j_end; ++jj) {
              const float s = srow[jj];
              const int32_t gj = int32_t(J * kTile + jj);
              if (s >= v[L - 1] && gj != gi && better(s, gj, v[L - 1], id[L - 1])) insert(v, id, L, s, gj);
            }
            tw[gi] = v[L - 1];
          }
          if (I != J) {  // symmetric half: columns of J, candidates from I
            for (int64_t ii = 0; ii < i_end; ++ii) {
              const int32_t gi = int32_t(I * kTile + ii);
              const float* srow = S + ii * kTile;
              float* w = tw + J * kTile;
              for (int64_t jj = 0; jj < j_end; ++jj) {
                const float s = srow[jj];
                if (s >= w[jj]) {
                  const int64_t gj = J * kTile + jj;
                  float* v = tv + gj * L;
                  int32_t* id = ti + gj * L;
                  if (better(s, gi, v[L - 1], id[L - 1])) {
                    insert(v, id, L, s, gi);
                    w[jj] = v[L - 1];
                  }
                }
              }
            }
          }
        }
        barrier.wait();
      }

      // Phase 3: merge the per-thread lists; row i's neighbours are i, then the best L others.
      {
        auto [lo, hi] = split(n, nthreads, tid);
        std::vector<float> mv(std::max(L, 1));
        std::vector<int32_t> mi(std::max(L, 1));
        int64_t* out_idx = p.indices + b * n * k;
        for (int64_t i = lo; i < hi; ++i) {
          if (need_sim) {
            std::copy(topv.begin() + i * L, topv.begin() + (i + 1) * L, mv.begin());
            std::copy(topi.begin() + i * L, topi.begin() + (i + 1) * L, mi.begin());
            for (int t = 1; t < nthreads; ++t) {
              const size_t base = (size_t(t) * n + i) * L;
              for (int q = 0; q < L; ++q)
                if (better(topv[base + q], topi[base + q], mv[L - 1], mi[L - 1]))
                  insert(mv.data(), mi.data(), L, topv[base + q], topi[base + q]);
            }
          }
          nb[i * k] = int32_t(i);
          out_idx[i * k] = i;
          for (int q = 0; q < L; ++q) {
            nb[i * k + 1 + q] = mi[q];
            out_idx[i * k + 1 + q] = mi[q];
          }
        }
      }
      barrier.wait();

      // Phase 4: iterations, ping-ponging so that the last one lands in `out`.
      if (p.probs) {
        const float* src0 = p.probs + b * p.probs_batch_stride;
        float* out = p.out + b * p.probs_batch_stride;
        auto [lo, hi] = split(n, nthreads, tid);
        if (p.iters == 0) std::memcpy(out + lo * m, src0 + lo * m, (hi - lo) * m * sizeof(float));
        const float* src = src0;
        for (int it = 0; it < p.iters; ++it) {
          float* dst = ((p.iters - 1 - it) % 2 == 0) ? out : tmp.data();
          for (int64_t i = lo; i < hi; ++i) {
            const int32_t* nbi = nb.data() + i * k;
            float* d = dst + i * m;
            const float* s0 = src + int64_t(nbi[0]) * m;
            for (int64_t q = 0; q < m; ++q) d[q] = s0[q];
            for (int r = 1; r < k; ++r) {
              const float* sr = src + int64_t(nbi[r]) * m;
              for (int64_t q = 0; q < m; ++q) d[q] += sr[q];
            }
            for (int64_t q = 0; q < m; ++q) d[q] *= inv_k;
          }
          src = dst;
          barrier.wait();
        }
      }
    }
  };

  std::vector<std::thread> pool;
  pool.reserve(nthreads - 1);
  for (int t = 1; t < nthreads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
}

}  // namespace ifseg

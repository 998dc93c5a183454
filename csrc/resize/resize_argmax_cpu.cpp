// CPU fused bilinear resize + arg-max (maths in resize_argmax.h). Never holds the H0 x W0 x M resized maps.
//
// The output is cut into column blocks of XB pixels (a multiple of the vector tile, sized so that two M x XB slabs
// stay in L2) and each thread owns a contiguous range of output rows. For one block, a "slab" is one source row
// resized along x only, E_r[m][x] = lerp(tx, S[r, x0, m], S[r, x1, m]), class-major with the pixels contiguous. An
// output row needs the slabs of its two source rows y0, y1; a thread keeps two and rebuilds one only when the pair
// moves on (once per source row when up-sampling). Then, a tile of pixels at a time in vector registers:
//   best = lerp(ty, E_y0[0], E_y1[0]), arg = 0;  for m >= 1: v = lerp(ty, E_y0[m], E_y1[m]); v > best -> (v, m)
// Strict ">" over ascending m keeps the lowest class among ties. A pixel's value is the same expression whatever the
// block or thread split, so the labels do not depend on the thread count.
//
// Slab rows are built from a class-major copy of the block's source columns: a group of 16 (8) output pixels reads
// its taps from 32 (16) consecutive columns with one in-register permute per tap (vpermt2ps / vpermps), no gathers;
// groups spanning more columns (strong down-sampling) take a scalar loop.
//
// The AVX-512 and AVX2+FMA loops are compiled through target attributes and chosen at run time like knn_cpu.cpp
// (override with IFSEG_RESIZE_CPU_ISA=avx512|avx2|generic), so the library never needs -march=native.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>


#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define IFSEG_X86 1
#endif

#include "common/cpu.h"
#include "resize/resize_argmax.h"

namespace ifseg {
namespace {

// Output pixels x classes below which one more thread costs more (start-up, slab rebuilds) than it saves.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 20;
// Two slabs of M x XB floats: keep them around 256 KiB (L2) -> M * XB <= kSlabFloats.
constexpr int64_t kSlabFloats = 32768;
constexpr int kMaxBlock = 1024;

// ---- the loops: plain C++ (the baseline build), AVX2+FMA and AVX-512 intrinsics ----
// The vector paths compute every blend as fma(w1, b, w0 * a); the baseline as resize_lerp compiles (w0 * a + w1 * b,
// contracted or not), so labels may differ between paths only where two classes tie to within rounding.

// Slab of one source row for one block: st is the row's class-major copy (M rows of ws floats, padded by
// kStPad floats), j0/j1 the block pixels' column taps relative to the copy, w0/w1 their weights; e is M x n.
void slab_generic(const float* __restrict st, int ws, const int32_t* __restrict j0, const int32_t* __restrict j1,
                  const float* __restrict w0, const float* __restrict w1, const int32_t* /*group_base*/, int m,
                  int n, float* __restrict e) {
  for (int c = 0; c < m; ++c) {
    const float* s = st + int64_t(c) * ws;
    float* d = e + int64_t(c) * n;
    for (int x = 0; x < n; ++x) d[x] = resize_lerp(w0[x], s[j0[x]], w1[x], s[j1[x]]);
  }
}

// Labels of one block row: e0/e1 the slabs of source rows y0/y1 (M x n), n <= kMaxBlock. Whole-row passes over
// classes (a fixed-size pixel tile would be fully unrolled to scalar code before the vectoriser sees it).
void argmax_generic(const float* __restrict e0, const float* __restrict e1, float wy0, float wy1, int m, int n,
                    int32_t* __restrict labels) {
  float best[kMaxBlock];
  for (int x = 0; x < n; ++x) {
    best[x] = resize_lerp(wy0, e0[x], wy1, e1[x]);
    labels[x] = 0;
  }
  for (int c = 1; c < m; ++c) {
    const float* a = e0 + int64_t(c) * n;
    const float* b = e1 + int64_t(c) * n;
    for (int x = 0; x < n; ++x) {
      const float v = resize_lerp(wy0, a[x], wy1, b[x]);
      const int32_t gt = -int32_t(v > best[x]);  // all ones or zero: a select GCC will not turn into a branch
      best[x] = best[x] < v ? v : best[x];
      labels[x] = (c & gt) | (labels[x] & ~gt);
    }
  }
}

#ifdef IFSEG_X86
// One group of G pixels whose taps span more columns than a permute covers (strong down-sampling): scalar.
template <int G>
__attribute__((always_inline)) inline void slab_group_scalar(const float* st, int ws, const int32_t* j0,
                                                             const int32_t* j1, const float* w0, const float* w1,
                                                             int m, int n, float* e) {
  for (int c = 0; c < m; ++c) {
    const float* s = st + int64_t(c) * ws;
    float* d = e + int64_t(c) * n;
    for (int x = 0; x < G; ++x) d[x] = __builtin_fmaf(w1[x], s[j1[x]], w0[x] * s[j0[x]]);
  }
}

__attribute__((target("avx2,fma"))) void slab_avx2(const float* __restrict st, int ws, const int32_t* __restrict j0,
                                                   const int32_t* __restrict j1, const float* __restrict w0,
                                                   const float* __restrict w1, const int32_t* group_base, int m,
                                                   int n, float* __restrict e) {
  const __m256i seven = _mm256_set1_epi32(7);
  for (int x = 0, g = 0; x < n; x += 8, ++g) {
    const int base = group_base[g];
    if (base < 0) {
      slab_group_scalar<8>(st, ws, j0 + x, j1 + x, w0 + x, w1 + x, m, n, e + x);
      continue;
    }
    const __m256i bv = _mm256_set1_epi32(base);
    const __m256i i0 = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(j0 + x)), bv);
    const __m256i i1 = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(j1 + x)), bv);
    const __m256 hi0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i0, seven));
    const __m256 hi1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i1, seven));
    const __m256 a0 = _mm256_loadu_ps(w0 + x), a1 = _mm256_loadu_ps(w1 + x);
    const float* s = st + base;
    float* d = e + x;
    for (int c = 0; c < m; ++c, s += ws, d += n) {  // columns base .. base + 15 of class c
      const __m256 lo = _mm256_loadu_ps(s), hi = _mm256_loadu_ps(s + 8);
      const __m256 g0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i0), _mm256_permutevar8x32_ps(hi, i0), hi0);
      const __m256 g1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i1), _mm256_permutevar8x32_ps(hi, i1), hi1);
      _mm256_store_ps(d, _mm256_fmadd_ps(a1, g1, _mm256_mul_ps(a0, g0)));
    }
  }
}

__attribute__((target("avx2,fma"))) void argmax_avx2(const float* __restrict e0, const float* __restrict e1,
                                                     float wy0, float wy1, int m, int n, int32_t* __restrict labels) {
  constexpr int U = 4;  // 4 x 8 pixels per tile
  const __m256 a0 = _mm256_set1_ps(wy0), a1 = _mm256_set1_ps(wy1);
  for (int t0 = 0; t0 < n; t0 += 8 * U) {
    __m256 best[U];
    __m256i arg[U];
    const float* p = e0 + t0;
    const float* q = e1 + t0;
    for (int u = 0; u < U; ++u) {
      best[u] = _mm256_fmadd_ps(a1, _mm256_load_ps(q + 8 * u), _mm256_mul_ps(a0, _mm256_load_ps(p + 8 * u)));
      arg[u] = _mm256_setzero_si256();
    }
    for (int c = 1; c < m; ++c) {
      p += n;
      q += n;
      const __m256 cv = _mm256_castsi256_ps(_mm256_set1_epi32(c));
      for (int u = 0; u < U; ++u) {
        const __m256 v = _mm256_fmadd_ps(a1, _mm256_load_ps(q + 8 * u), _mm256_mul_ps(a0, _mm256_load_ps(p + 8 * u)));
        const __m256 gt = _mm256_cmp_ps(v, best[u], _CMP_GT_OQ);
        best[u] = _mm256_blendv_ps(best[u], v, gt);
        arg[u] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(arg[u]), cv, gt));
      }
    }
    for (int u = 0; u < U; ++u) _mm256_storeu_si256(reinterpret_cast<__m256i*>(labels + t0 + 8 * u), arg[u]);
  }
}

__attribute__((target("avx512f,fma"))) void slab_avx512(const float* __restrict st, int ws,
                                                        const int32_t* __restrict j0, const int32_t* __restrict j1,
                                                        const float* __restrict w0, const float* __restrict w1,
                                                        const int32_t* group_base, int m, int n,
                                                        float* __restrict e) {
  for (int x = 0, g = 0; x < n; x += 16, ++g) {
    const int base = group_base[g];
    if (base < 0) {
      slab_group_scalar<16>(st, ws, j0 + x, j1 + x, w0 + x, w1 + x, m, n, e + x);
      continue;
    }
    const __m512i bv = _mm512_set1_epi32(base);
    const __m512i i0 = _mm512_sub_epi32(_mm512_loadu_si512(j0 + x), bv);
    const __m512i i1 = _mm512_sub_epi32(_mm512_loadu_si512(j1 + x), bv);
    const __m512 a0 = _mm512_loadu_ps(w0 + x), a1 = _mm512_loadu_ps(w1 + x);
    const float* s = st + base;
    float* d = e + x;
    for (int c = 0; c < m; ++c, s += ws, d += n) {  // columns base .. base + 31 of class c
      const __m512 lo = _mm512_loadu_ps(s), hi = _mm512_loadu_ps(s + 16);
      const __m512 g0 = _mm512_permutex2var_ps(lo, i0, hi), g1 = _mm512_permutex2var_ps(lo, i1, hi);
      _mm512_store_ps(d, _mm512_fmadd_ps(a1, g1, _mm512_mul_ps(a0, g0)));
    }
  }
}

__attribute__((target("avx512f,fma"))) void argmax_avx512(const float* __restrict e0, const float* __restrict e1,
                                                          float wy0, float wy1, int m, int n,
                                                          int32_t* __restrict labels) {
  constexpr int U = 4;  // 4 x 16 pixels per tile
  const __m512 a0 = _mm512_set1_ps(wy0), a1 = _mm512_set1_ps(wy1);
  for (int t0 = 0; t0 < n; t0 += 16 * U) {
    __m512 best[U];
    __m512i arg[U];
    const float* p = e0 + t0;
    const float* q = e1 + t0;
    for (int u = 0; u < U; ++u) {
      best[u] = _mm512_fmadd_ps(a1, _mm512_load_ps(q + 16 * u), _mm512_mul_ps(a0, _mm512_load_ps(p + 16 * u)));
      arg[u] = _mm512_setzero_si512();
    }
    for (int c = 1; c < m; ++c) {
      p += n;
      q += n;
      const __m512i cv = _mm512_set1_epi32(c);
      for (int u = 0; u < U; ++u) {
        const __m512 v = _mm512_fmadd_ps(a1, _mm512_load_ps(q + 16 * u), _mm512_mul_ps(a0, _mm512_load_ps(p + 16 * u)));
        const __mmask16 gt = _mm512_cmp_ps_mask(v, best[u], _CMP_GT_OQ);
        best[u] = _mm512_mask_mov_ps(best[u], gt, v);
        arg[u] = _mm512_mask_mov_epi32(arg[u], gt, cv);
      }
    }
    for (int u = 0; u < U; ++u) _mm512_storeu_si512(labels + t0 + 16 * u, arg[u]);
  }
}
#endif

using SlabFn = void (*)(const float*, int, const int32_t*, const int32_t*, const float*, const float*, const int32_t*,
                        int, int, float*);
using ArgmaxFn = void (*)(const float*, const float*, float, float, int, int, int32_t*);

struct Isa {
  const char* name;
  int tile;   // pixels per argmax tile (block widths are multiples of it)
  int group;  // pixels per slab permute group (0: no groups)
  int span;   // source columns one permute group may cover
  SlabFn slab;
  ArgmaxFn argmax;
};

Isa pick_isa() {
  std::string want;
  if (const char* env = std::getenv("IFSEG_RESIZE_CPU_ISA")) want = env;
#ifdef IFSEG_X86
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if ((want.empty() || want == "avx512") && has512) return {"avx512", 64, 16, 32, slab_avx512, argmax_avx512};
  if ((want.empty() || want == "avx512" || want == "avx2") && has2) return {"avx2", 32, 8, 16, slab_avx2, argmax_avx2};
#endif
  return {"generic", 16, 0, 0, slab_generic, argmax_generic};
}

constexpr int kStPad = 32;  // floats past a source-row copy that the permute loads may touch

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

struct BlockTaps {
  int x_lo = 0, n = 0;          // output columns [x_lo, x_lo + n) (padding past W included)
  int lo = 0, ws = 1;           // source columns [lo, lo + ws) feed this block
  std::vector<int32_t> j0, j1;  // per pixel, relative to lo
  std::vector<float> w0, w1;
  std::vector<int32_t> group_base;  // per permute group: first source column (relative to lo), -1: too wide
};

}  // namespace

int resize_available_cores() {
  return available_cores();  // common/cpu.h
}

int resize_argmax_threads(const ResizeArgmaxParams& p) {
  const int64_t rows = p.batch * p.out_h;
  const int64_t work = rows * p.out_w * std::max(p.m, 1);
  const int64_t want = p.num_threads > 0 ? p.num_threads : resize_available_cores();
  return static_cast<int>(std::max<int64_t>(1, std::min({want, rows, work / kMinWorkPerThread})));
}

const char* resize_argmax_cpu_isa() { return pick_isa().name; }

void resize_argmax_cpu(const ResizeArgmaxParams& p) {
  const int h = p.grid_h, w = p.grid_w, m = p.m, H = p.out_h, W = p.out_w;
  const int64_t rows = p.batch * H;
  if (rows == 0 || W == 0) return;
  const Isa isa = pick_isa();
  const int T = isa.tile;
  const int w_pad = (W + T - 1) / T * T;
  const int64_t fit = std::min<int64_t>(kMaxBlock, kSlabFloats / m) / T * T;
  const int xb = std::min<int>(w_pad, std::max<int>(T, int(fit)));
  const int nthreads = resize_argmax_threads(p);

  std::vector<ResizeTap> ty(H);
  for (int y = 0; y < H; ++y) ty[y] = resize_tap(y, h, H);
  // Column taps per block; the padding pixels past W repeat the last column (computed, never written).
  std::vector<BlockTaps> blocks((w_pad + xb - 1) / xb);
  int max_ws = 1;
  for (size_t k = 0; k < blocks.size(); ++k) {
    BlockTaps& bt = blocks[k];
    bt.x_lo = int(k) * xb;
    bt.n = std::min(xb, w_pad - bt.x_lo);
    std::vector<ResizeTap> tx(bt.n);
    for (int i = 0; i < bt.n; ++i) tx[i] = resize_tap(std::min(bt.x_lo + i, W - 1), w, W);
    bt.lo = tx.front().i0;  // taps are non-decreasing in x
    bt.ws = tx.back().i1 - bt.lo + 1;
    max_ws = std::max(max_ws, bt.ws);
    for (const ResizeTap& t : tx) {
      bt.j0.push_back(t.i0 - bt.lo);
      bt.j1.push_back(t.i1 - bt.lo);
      bt.w0.push_back(t.w0);
      bt.w1.push_back(t.w1);
    }
    for (int g = 0; isa.group > 0 && g < bt.n; g += isa.group) {
      const int base = bt.j0[g], top = bt.j1[g + isa.group - 1];
      bt.group_base.push_back(top - base < isa.span ? base : -1);
    }
  }

  const int64_t cell_bytes = p.score_dtype == ScoreDtype::kFloat32 ? 4 : 2;
  const auto* scores = static_cast<const char*>(p.scores);

  // Per-thread scratch, allocated here so that running out of memory throws in the calling thread.
  struct Scratch {
    AlignedBuf slab[2], st;
    std::vector<int32_t> labels;
  };
  std::vector<Scratch> scratch(nthreads);
  for (Scratch& sc : scratch) {
    sc.slab[0] = aligned_floats(int64_t(m) * xb);
    sc.slab[1] = aligned_floats(int64_t(m) * xb);
    sc.st = aligned_floats(int64_t(m) * max_ws + kStPad);
    std::fill(sc.st.get(), sc.st.get() + int64_t(m) * max_ws + kStPad, 0.0f);
    sc.labels.resize(xb);
  }

  auto worker = [&](int tid) {
    const int64_t chunk = (rows + nthreads - 1) / nthreads;
    const int64_t lo = std::min<int64_t>(rows, chunk * tid), hi = std::min<int64_t>(rows, lo + chunk);
    if (lo >= hi) return;
    AlignedBuf* slab = scratch[tid].slab;
    const AlignedBuf& st = scratch[tid].st;
    std::vector<int32_t>& labels = scratch[tid].labels;

    for (const BlockTaps& bt : blocks) {
      int64_t key[2] = {-1, -1};  // (image, source row) whose slab each slot holds

      // The slot holding source row r of image b, rebuilt on a miss into the slot that does not hold `keep`.
      auto slot_for = [&](int64_t b, int r, int64_t keep) -> const float* {
        const int64_t k = b * h + r;
        for (int s = 0; s < 2; ++s)
          if (key[s] == k) return slab[s].get();
        const int s = key[0] == keep ? 1 : 0;
        const char* row = scores + (k * w + bt.lo) * int64_t(m) * cell_bytes;
        float* dst = st.get();
        for (int j = 0; j < bt.ws; ++j) {  // the block's source columns, class-major
          if (p.score_dtype == ScoreDtype::kFloat32) {
            const auto* cell = reinterpret_cast<const float*>(row) + int64_t(j) * m;
            for (int c = 0; c < m; ++c) dst[int64_t(c) * bt.ws + j] = resize_load(cell, c);
          } else {
            const auto* cell = reinterpret_cast<const uint16_t*>(row) + int64_t(j) * m;
            for (int c = 0; c < m; ++c) dst[int64_t(c) * bt.ws + j] = resize_load(cell, c);
          }
        }
        isa.slab(dst, bt.ws, bt.j0.data(), bt.j1.data(), bt.w0.data(), bt.w1.data(), bt.group_base.data(), m, bt.n,
                 slab[s].get());
        key[s] = k;
        return slab[s].get();
      };

      for (int64_t row = lo; row < hi; ++row) {
        const int64_t b = row / H;
        const ResizeTap& t = ty[row % H];
        const float* e0 = slot_for(b, t.i0, b * h + t.i1);
        const float* e1 = t.i1 == t.i0 ? e0 : slot_for(b, t.i1, b * h + t.i0);
        isa.argmax(e0, e1, t.w0, t.w1, m, bt.n, labels.data());
        const int valid = std::min(bt.n, W - bt.x_lo);
        std::memcpy(p.out + row * W + bt.x_lo, labels.data(), size_t(valid) * sizeof(int32_t));
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

// CPU kNN post-processing (spec section 12): fused, tiled cosine-similarity GEMM with a running top-K per row, then
// the averaging iterations. Never holds the NxN similarity matrix: only one TxT tile per thread.
//
// Layout per image: the normalised rows Fn (N_pad x C, zero rows past N) are packed twice, k-major, into panels of MR
// rows (the GEMM's A, Ap[panel][c][MR]) and of NR rows (its B, Bp[panel][c][NR]). S = Fn Fn^T is symmetric, so only
// tiles (I, J) with I <= J are computed; an off-diagonal tile feeds row i's top-K (candidate j) and row j's top-K
// (candidate i). Each thread keeps its own top-K for all N rows (no locks); the per-thread lists are merged at the
// end. Every S[i, j] is the same fma chain (k ascending, KC chunks) wherever it sits in a tile, so S is exactly
// symmetric and ties break the same way (lower index first) for any thread count.
//
// Screening (knn_screen.cpp; screen "auto" where the CPU has AMX-INT8, "int16" also with AVX512-VNNI): the tiles are
// computed from per-row 16-bit integer quantisations of Fn instead (int8 GEMM passes over their hi and lo bytes), and
// the running lists keep each row's best L + kKnnScreenMargin candidates by that approximate similarity (L = K - 1).
// Those candidates are then re-computed in fp32 exactly as the fp32 path computes them (the same single fma chain per
// pair), and row i's neighbours are the best L of them by the exact values, ties to the lower index: identical to the
// fp32 path whenever its L neighbours are among the candidates (rows with near-duplicates within the 16-bit error may
// pick other, equally similar ones; see ifseg_rt/knn/__init__.py).
//
// The kernels (fp32: knn_cpu_kernels.cpp, screening: knn_screen.cpp) are compiled for AMX-INT8, AVX512-VNNI,
// AVX-512, AVX2+FMA and plain C++ through target attributes and chosen at run time (override with
// IFSEG_KNN_CPU_ISA=amx|avx512vnni|avx512|avx2|generic, a ceiling: avx512 and below search in fp32), so the library
// never needs -march=native.
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

#include "common/cpu.h"
#include "knn/knn.h"
#include "knn/knn_cpu_internal.h"

namespace ifseg {
namespace {

using knn_detail::better;
using knn_detail::insert;
using knn_detail::Isa;
using knn_detail::kTile;
using knn_detail::ScreenIsa;

// Reduction chunk KC = kPanelFloats / NR (a B micro-panel of 128 KiB, L2-resident): measured on Zen 4, fewer S
// reload passes beat an L1-sized panel (C = 1024 runs in one or two chunks).
constexpr int kPanelFloats = 32768;
// Work (fp32 multiply-adds; a screening pass's int8 ones count 1/4) that pays for a second thread: starting it, waking
// an idle core and the barriers cost ~0.1-0.3 ms (measured: N = C = 256 ran faster on 1 thread than on 2, N = 1024,
// C = 256 faster on 2). The default thread count is capped at work / this.
constexpr int64_t kMinWorkPerThread = int64_t(16) << 20;
constexpr int64_t kChunk = 32;  // rows per dynamically scheduled chunk (a multiple of the 16-row packing groups)

std::string isa_override() {
  const char* env = std::getenv("IFSEG_KNN_CPU_ISA");
  return env ? std::string(env) : std::string();
}

int64_t feat_itemsize(FeatDtype d) { return d == FeatDtype::kFloat32 ? 4 : 2; }

template <typename T>
struct AlignedFree {
  void operator()(T* p) const { std::free(p); }
};
template <typename T>
using AlignedBuf = std::unique_ptr<T[], AlignedFree<T>>;
template <typename T>
AlignedBuf<T> aligned(int64_t n) {
  const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64) * 64;
  auto* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  return AlignedBuf<T>(p);
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

// How one call runs: the search precision, the list length, the threads.
struct Plan {
  ScreenIsa screen;  // name == nullptr: fp32 search
  int len = 0;       // running-list entries per row: L, or L + kKnnScreenMargin when screening
  int threads = 1;
};

Plan make_plan(const KnnParams& p) {
  Plan plan;
  const int L = p.k - 1;
  const int64_t n = p.n, c = p.c;
  plan.len = L;
  const bool want_screen = p.screen != KnnScreen::kFp32 && L > 0 && L + kKnnScreenMargin < n - 1 &&
                           n * c < (int64_t(1) << 31) && c <= 32768;  // int32 offsets; int32 dot products
  if (want_screen) {
    plan.screen = knn_detail::pick_screen(isa_override());
    // Three int8 VNNI passes cost about as much as the fp32 GEMM they replace: only AMX makes screening pay.
    if (p.screen == KnnScreen::kAuto && plan.screen.name && std::string(plan.screen.name) != "amx")
      plan.screen = ScreenIsa();
    if (plan.screen.name) plan.len = L + kKnnScreenMargin;
  }
  // fp32-equivalent multiply-adds: the upper-triangle tiles (int8 ones at a quarter), the re-rank, the averaging
  const int64_t tiles = (n + kTile - 1) / kTile;
  int64_t search = L > 0 ? tiles * (tiles + 1) / 2 * kTile * kTile * c : 0;
  if (plan.screen.name) search = search * 3 / 4 + 2 * n * plan.len * c;  // 3 int8 passes of C; the re-rank
  const int64_t average = p.probs ? n * p.k * p.m * p.iters : 0;
  const int64_t rows = std::max<int64_t>(n, 1);
  if (p.num_threads > 0) {  // asked for: exactly that many (no more than the rows)
    plan.threads = int(std::min<int64_t>(p.num_threads, rows));
  } else {
    const int64_t cores = knn_cpu_available_cores();
    plan.threads = int(std::max<int64_t>(1, std::min({cores, rows, p.batch * (search + average) / kMinWorkPerThread})));
  }
  return plan;
}

}  // namespace

int knn_cpu_available_cores() {
  return available_cores();  // common/cpu.h
}

int knn_cpu_threads(const KnnParams& params) { return make_plan(params).threads; }

const char* knn_cpu_isa() { return knn_detail::pick_isa(isa_override()).name; }

const char* knn_cpu_screen_isa() {
  const char* name = knn_detail::pick_screen(isa_override()).name;
  return name ? name : "";
}

void knn_cpu(const KnnParams& p) {
  const Isa isa = knn_detail::pick_isa(isa_override());
  const Plan plan = make_plan(p);
  const ScreenIsa& scr = plan.screen;
  const bool screened = scr.name != nullptr;
#ifdef IFSEG_X86
  const bool f16c = __builtin_cpu_supports("f16c");
#else
  const bool f16c = false;
#endif
  const int64_t n = p.n, c = p.c, m = p.m;
  const int k = p.k, L = p.k - 1, len = plan.len;  // L: neighbours other than the row itself
  const int64_t tiles = (n + kTile - 1) / kTile, n_pad = tiles * kTile;
  const int nthreads = plan.threads;
  const bool need_sim = L > 0;
  const int64_t c4 = screened ? (c + 63) / 64 * 64 : 0;

  // fp32 search: the packed panels. Screening: Fn row-major (for the re-rank), the int8 operands, per-row scales.
  AlignedBuf<float> ap = aligned<float>(need_sim && !screened ? n_pad * c : 1);
  AlignedBuf<float> bp = aligned<float>(need_sim && !screened ? n_pad * c : 1);
  AlignedBuf<float> fn = aligned<float>(screened ? n * c : 1);
  const int64_t a_row = 2 * c4, b_row = 3 * c4;  // packed bytes per row: A [hi | lo], B [hi | lo | hi]
  AlignedBuf<uint8_t> a8 = aligned<uint8_t>(screened ? n_pad * a_row : 1);
  AlignedBuf<int8_t> b8 = aligned<int8_t>(screened ? n_pad * b_row : 1);
  std::vector<float> inv(screened ? n_pad : 0);
  std::vector<int32_t> corr_hh(screened ? n_pad : 0), corr_x(screened ? n_pad : 0);
  std::vector<float> err(screened ? n_pad : 0), lo_norm(screened ? n_pad : 0);  // per-row screening error terms
  AlignedBuf<float> tile_buf = aligned<float>(need_sim ? int64_t(nthreads) * kTile * kTile : 1);
  std::fill(tile_buf.get(), tile_buf.get() + (need_sim ? int64_t(nthreads) * kTile * kTile : 1), 0.f);
  AlignedBuf<int32_t> tile_i32 = aligned<int32_t>(screened ? int64_t(nthreads) * 2 * kTile * kTile : 1);
  std::vector<float> topv(need_sim ? size_t(nthreads) * n * len : 0), worst(need_sim ? size_t(nthreads) * n_pad : 0);
  std::vector<int32_t> topi(topv.size());
  std::vector<int32_t> cand(screened ? size_t(n) * len : 0);
  std::vector<float> exact(cand.size());
  std::vector<int32_t> count(screened ? n : 0);  // candidates left to re-rank per row
  // |screening similarity - fp32 similarity| <= err_i + err_j + err_i err_j + lo_i lo_j + slack for every pair:
  // the quantisation (Cauchy-Schwarz on the rounding errors, ||Fn|| <= 1), the dropped lo.lo term, and the fp32
  // chain's own rounding (C u sum |x y| <= 1.01 C 2^-24) plus the float rounding of the screening value and of this
  // test. A candidate whose screening value plus its bound stays below the L-th best screening value minus the best
  // L's bounds cannot rank among the best L exactly: it is not re-computed.
  const float slack = float(1.01 * double(c) * 0x1p-24 + 2e-6);
  std::vector<int32_t> nb(size_t(n) * k);
  std::vector<std::pair<int32_t, int32_t>> tile_list;
  for (int64_t i = 0; i < tiles; ++i)
    for (int64_t j = i; j < tiles; ++j) tile_list.emplace_back(int32_t(i), int32_t(j));

  Barrier barrier(nthreads);
  // Work counters per image: phase-1 rows, phase-2 tiles, phase-3 rows, phase-4 column blocks.
  std::unique_ptr<std::atomic<int64_t>[]> work(new std::atomic<int64_t>[4 * p.batch]);
  for (int64_t q = 0; q < 4 * p.batch; ++q) work[q].store(0);
  const float inf = std::numeric_limits<float>::infinity();
  const float inv_k = 1.0f / static_cast<float>(k);
  // A slot no candidate filled (only NaN similarities, from non-finite features passed with check_finite=False) holds
  // the fill index; it becomes the row itself, so that the averaging never reads outside the N rows.
  auto valid = [n](int32_t j, int64_t i) { return j >= 0 && j < n ? j : int32_t(i); };

  auto worker = [&](int tid) {
    std::vector<float> row(c), grp(screened ? 0 : 16 * c);  // grp: 16 normalised rows until they are packed
    std::vector<int8_t> q16(screened ? 16 * 2 * c4 : 0);  // 16 rows' quantised bytes, until they are packed
    AlignedBuf<float> xbuf = aligned<float>(p.probs ? n * 16 : 1);
    AlignedBuf<float> ybuf = aligned<float>(p.probs ? n * 16 : 1);
    std::vector<float> mv(std::max(len, 1));  // one row's merged list
    std::vector<int32_t> mi(std::max(len, 1));
    float* S = tile_buf.get() + int64_t(tid) * kTile * kTile;
    int32_t* S_hh = screened ? tile_i32.get() + int64_t(tid) * 2 * kTile * kTile : nullptr;
    int32_t* S_x = screened ? S_hh + kTile * kTile : nullptr;
    float* tv = need_sim ? topv.data() + size_t(tid) * n * len : nullptr;
    int32_t* ti = need_sim ? topi.data() + size_t(tid) * n * len : nullptr;
    float* tw = need_sim ? worst.data() + size_t(tid) * n_pad : nullptr;

    for (int64_t b = 0; b < p.batch; ++b) {
      // Phase 1: normalise rows into Fn and the packed panels; reset this thread's running lists.
      if (need_sim) {
        const auto* feat = static_cast<const char*>(p.features) + b * p.feat_batch_stride * feat_itemsize(p.feat_dtype);
        // rows in chunks of kChunk (whole 16-row packing groups), taken dynamically: a thread that starts late or
        // is slowed down (a busy core) just takes fewer
        for (int64_t lo = work[b * 4 + 0].fetch_add(kChunk); lo < n_pad; lo = work[b * 4 + 0].fetch_add(kChunk))
        for (int64_t r = lo; r < std::min(lo + kChunk, n_pad); ++r) {
          float* dst = screened && r < n ? fn.get() + r * c : grp.data() + (r % 16) * c;
          if (r < n) {
            const char* src = feat + r * c * feat_itemsize(p.feat_dtype);
            if (p.feat_dtype != FeatDtype::kFloat32) knn_detail::row_to_float(src, p.feat_dtype, c, row.data(), f16c);
            isa.normalize(p.feat_dtype == FeatDtype::kFloat32 ? reinterpret_cast<const float*>(src) : row.data(), c,
                          dst);
          } else if (!screened) {
            std::fill(dst, dst + c, 0.f);
          }
          if (screened)
            knn_detail::quantize_row(r < n ? dst : nullptr, c, c4, a8.get() + r * a_row, q16.data() + (r % 16) * a_row,
                                     inv.data() + r, corr_hh.data() + r, corr_x.data() + r, err.data() + r,
                                     lo_norm.data() + r);
          if (r % 16 != 15) continue;
          if (screened)
            knn_detail::pack_b16(scr, q16.data(), c4, r - 15, b8.get());
          else
            isa.pack(grp.data(), c, r - 15, isa.mr, isa.nr, ap.get(), bp.get());
        }
        std::fill(tv, tv + n * len, -inf);
        std::fill(ti, ti + n * len, std::numeric_limits<int32_t>::max());
        std::fill(tw, tw + n, -inf);
        std::fill(tw + n, tw + n_pad, inf);  // padding rows: never a candidate's home
        barrier.wait();

        // Phase 2: similarity tiles (upper triangle) -> running lists per row.
        std::atomic<int64_t>& next_tile = work[b * 4 + 1];
        for (int64_t t = next_tile.fetch_add(1); t < int64_t(tile_list.size()); t = next_tile.fetch_add(1)) {
          const int64_t I = tile_list[t].first, J = tile_list[t].second;
          const int i_end = int(std::min<int64_t>(kTile, n - I * kTile));
          const int j_end = int(std::min<int64_t>(kTile, n - J * kTile));
          if (screened) {
            const uint8_t* a = a8.get() + I * kTile * a_row;
            const int8_t* bb = b8.get() + J * kTile * b_row;
            scr.tile(c4, a, a_row, bb, b_row, S_hh);                             // hi.hi
            scr.tile(2 * c4, a, a_row, bb + c4 * scr.b_cols, b_row, S_x);       // [hi | lo] . [lo | hi]
            knn_detail::approx_tile(S_hh, S_x, S, i_end, j_end, inv.data() + I * kTile, inv.data() + J * kTile,
                                    corr_hh.data() + J * kTile, corr_x.data() + J * kTile);
          } else {
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
          }
          isa.update(S, int32_t(I * kTile), int32_t(J * kTile), i_end, j_end, I == J, len, tv, ti, tw);
        }
        barrier.wait();
      }

      // Phase 3: merge the per-thread lists (screening: re-rank the candidates exactly); row i's neighbours are i,
      // then the best L others.
      if (!need_sim && b > 0) barrier.wait();  // the averaging of the previous image may still read nb
      for (int64_t lo = work[b * 4 + 2].fetch_add(kChunk); lo < n; lo = work[b * 4 + 2].fetch_add(kChunk)) {
        const int64_t hi = std::min(lo + kChunk, n);
        int64_t* out_idx = p.indices + b * n * k;
        for (int64_t i = lo; i < hi; ++i) {
          if (need_sim) {
            std::copy(topv.begin() + i * len, topv.begin() + (i + 1) * len, mv.begin());
            std::copy(topi.begin() + i * len, topi.begin() + (i + 1) * len, mi.begin());
            for (int t = 1; t < nthreads; ++t) {
              const size_t base = (size_t(t) * n + i) * len;
              for (int q = 0; q < len; ++q)
                if (better(topv[base + q], topi[base + q], mv[len - 1], mi[len - 1]))
                  insert(mv.data(), mi.data(), len, topv[base + q], topi[base + q]);
            }
            if (screened) {
              auto bound = [&](int32_t j) {
                return err[i] + err[j] + err[i] * err[j] + lo_norm[i] * lo_norm[j] + slack;
              };
              auto in_range = [n](int32_t j) { return j >= 0 && j < n; };  // unfilled slots: see valid()
              float top_bound = 0.f;
              for (int q = 0; q < L; ++q)
                if (in_range(mi[q])) top_bound = std::max(top_bound, bound(mi[q]));
              const float floor = mv[L - 1] - top_bound;
              int kept = 0;
              for (int q = 0; q < len; ++q)
                if (in_range(mi[q]) && (q < L || mv[q] + bound(mi[q]) >= floor)) cand[i * len + kept++] = mi[q];
              count[i] = kept;
              continue;
            }
          }
          nb[i * k] = int32_t(i);
          for (int q = 0; q < L; ++q) nb[i * k + 1 + q] = valid(mi[q], i);
        }
        if (screened) {
          knn_detail::exact_dots(fn.get(), c, cand.data(), count.data(), len, lo, hi, exact.data());
          for (int64_t i = lo; i < hi; ++i) {
            for (int q = 0; q < L; ++q) mv[q] = -inf, mi[q] = std::numeric_limits<int32_t>::max();
            for (int q = 0; q < count[i]; ++q) {
              const float v = exact[i * len + q];
              const int32_t j = cand[i * len + q];
              if (better(v, j, mv[L - 1], mi[L - 1])) insert(mv.data(), mi.data(), L, v, j);
            }
            nb[i * k] = int32_t(i);
            for (int q = 0; q < L; ++q) nb[i * k + 1 + q] = valid(mi[q], i);
          }
        }
        for (int64_t i = lo; i < hi; ++i)
          for (int q = 0; q < k; ++q) out_idx[i * k + q] = nb[i * k + q];
      }
      barrier.wait();

      // Phase 4: the iterations, one 16-column block of the probabilities at a time, blocks taken dynamically (a
      // block's steps need no other block, so there are no barriers; the block stays in L1/L2 for all of them).
      // Threads with no block left go on to the next image: they only touch nb again after the barrier that ends
      // its search.
      if (p.probs) {
        const float* src0 = p.probs + b * p.probs_batch_stride;
        float* out = p.out + b * p.probs_batch_stride;
        const int64_t blocks = (m + 15) / 16;
        for (int64_t blk = work[b * 4 + 3].fetch_add(1); blk < blocks; blk = work[b * 4 + 3].fetch_add(1)) {
          const int64_t q0 = blk * 16, w = std::min<int64_t>(16, m - q0);
          float *x = xbuf.get(), *y = ybuf.get();
          for (int64_t i = 0; i < n; ++i) {
            std::memcpy(x + i * 16, src0 + i * m + q0, w * sizeof(float));
            std::fill(x + i * 16 + w, x + i * 16 + 16, 0.f);
          }
          for (int it = 0; it < p.iters; ++it) {
            isa.average(x, y, nb.data(), k, n, inv_k);
            std::swap(x, y);
          }
          for (int64_t i = 0; i < n; ++i) std::memcpy(out + i * m + q0, x + i * 16, w * sizeof(float));
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

// The kNN CUDA kernels (device code only). ONE source for two build paths:
//   * csrc/knn/knn_cuda.cu includes it and launches the kernels (compiled into ifseg_rt._C when nvcc is found);
//   * ifseg_rt/knn/_cuda.py reads this text and compiles it at run time with NVRTC (cupy.RawModule).
// So: no #include, no host code, no C++ standard library; every kernel is extern "C" with a stable name.
//
// Pipeline per call (B images, N rows, C channels, M classes, K neighbours, L = K - 1):
//   1. ifseg_knn_normalize_{f32,f16,bf16}: Fn = F / max(||F||, 1e-12), float32, one block per row.
//   2. ifseg_knn_topk_partial: a 64x64 tile of S = Fn Fn^T per step, fused with a running top-L per row; a block owns
//      64 rows and a contiguous range of column tiles (the "split"), 4 threads per row each keep a list. S is never
//      written to global memory. Output: candidates [B, N, splits, 4, L] (value, index).
//   3. ifseg_knn_merge: per row, the row itself then the best L candidates -> int64 indices [B, N, K].
//   4. ifseg_knn_average_step (iters times, ping-pong): P_i <- (1/K) sum_{j in Nb(i)} P_j.
// Order and ties as in the CPU backend: larger similarity first, then lower index; the row itself always first.
// Every S[i, j] is one fmaf chain over ascending k, so S is exactly symmetric and position independent.

#define IFSEG_KNN_TILE 64          // rows and columns per similarity tile
#define IFSEG_KNN_TK 16            // reduction step staged in shared memory
#define IFSEG_KNN_THREADS 256      // threads of ifseg_knn_topk_partial (16 x 16, 4 x 4 outputs each)
#define IFSEG_KNN_LANES 4          // threads per row during the top-L scan
#define IFSEG_KNN_MAX_L 32         // largest L = K - 1 supported
#define IFSEG_KNN_TARGET_BLOCKS 256  // aim for this many topk blocks (fills an H100's 132 SMs twice)

// Number of column splits for B images of N rows; the host launcher and the NVRTC glue use the same rule.
inline __host__ __device__ int ifseg_knn_splits(long long batch, int n) {
  const long long tiles = (n + IFSEG_KNN_TILE - 1) / IFSEG_KNN_TILE;
  long long s = (IFSEG_KNN_TARGET_BLOCKS + tiles * batch - 1) / (tiles * batch);
  if (s > tiles) s = tiles;
  return s < 1 ? 1 : (int)s;
}

static __device__ __forceinline__ float ifseg_half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

static __device__ __forceinline__ float ifseg_bf16_to_float(unsigned short h) {
  return __int_as_float(((unsigned int)h) << 16);
}

static __device__ __forceinline__ bool ifseg_better(float v, int j, float w, int i) {
  return v > w || (v == w && j < i);
}

// Insert (v, j) into vals/idx (length len, best first) when it beats the last entry.
static __device__ __forceinline__ void ifseg_insert(float* vals, int* idx, int len, float v, int j) {
  if (!ifseg_better(v, j, vals[len - 1], idx[len - 1])) return;
  int p = len - 1;
  while (p > 0 && ifseg_better(v, j, vals[p - 1], idx[p - 1])) {
    vals[p] = vals[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  vals[p] = v;
  idx[p] = j;
}

// ---- 1. normalisation: one block per row (blockDim.x a multiple of 32, <= 1024) ----
template <typename Load>
static __device__ void ifseg_normalize_row(Load load, float* __restrict__ fn, int c) {
  const long long row = blockIdx.x;
  __shared__ float warp_sums[32];
  float ss = 0.f;
  for (int q = threadIdx.x; q < c; q += blockDim.x) {
    const float x = load(row * c + q);
    ss = fmaf(x, x, ss);
  }
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    ss = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : 0.f;
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (threadIdx.x == 0) warp_sums[0] = ss;
  }
  __syncthreads();
  const float denom = fmaxf(sqrtf(warp_sums[0]), 1e-12f);
  for (int q = threadIdx.x; q < c; q += blockDim.x) fn[row * c + q] = load(row * c + q) / denom;
}

struct IfsegLoadF32 {
  const float* p;
  __device__ float operator()(long long i) const { return p[i]; }
};
struct IfsegLoadF16 {
  const unsigned short* p;
  __device__ float operator()(long long i) const { return ifseg_half_to_float(p[i]); }
};
struct IfsegLoadBF16 {
  const unsigned short* p;
  __device__ float operator()(long long i) const { return ifseg_bf16_to_float(p[i]); }
};

// grid: (B*N rows); features contiguous BxNxC.
extern "C" __global__ void ifseg_knn_normalize_f32(const float* __restrict__ feat, float* __restrict__ fn, int c) {
  ifseg_normalize_row(IfsegLoadF32{feat}, fn, c);
}
extern "C" __global__ void ifseg_knn_normalize_f16(const unsigned short* __restrict__ feat, float* __restrict__ fn,
                                                   int c) {
  ifseg_normalize_row(IfsegLoadF16{feat}, fn, c);
}
extern "C" __global__ void ifseg_knn_normalize_bf16(const unsigned short* __restrict__ feat, float* __restrict__ fn,
                                                    int c) {
  ifseg_normalize_row(IfsegLoadBF16{feat}, fn, c);
}

// ---- 2. fused similarity tiles + running top-L ----
// grid: (row tiles, splits, B), block: IFSEG_KNN_THREADS. part_v/part_i: [B, N, splits, LANES, L].
extern "C" __global__ void __launch_bounds__(IFSEG_KNN_THREADS)
    ifseg_knn_topk_partial(const float* __restrict__ fn, float* __restrict__ part_v, int* __restrict__ part_i, int n,
                           int c, int L) {
  const int T = IFSEG_KNN_TILE, TK = IFSEG_KNN_TK;
  __shared__ float As[IFSEG_KNN_TK][IFSEG_KNN_TILE + 4];
  __shared__ float Bs[IFSEG_KNN_TK][IFSEG_KNN_TILE + 4];
  __shared__ float Ss[IFSEG_KNN_TILE][IFSEG_KNN_TILE + 1];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int b = blockIdx.z, splits = gridDim.y, row0 = blockIdx.x * T;
  const float* F = fn + (long long)b * n * c;
  const int col_tiles = (n + T - 1) / T, per = (col_tiles + splits - 1) / splits;
  const int ct0 = blockIdx.y * per, ct1 = min(col_tiles, ct0 + per);

  // scan role: row r of the tile, lane q covers columns q*16 .. q*16+15
  const int r = tid / IFSEG_KNN_LANES, q = tid % IFSEG_KNN_LANES, gi = row0 + r;
  float tv[IFSEG_KNN_MAX_L];
  int ti[IFSEG_KNN_MAX_L];
  for (int u = 0; u < L; ++u) {
    tv[u] = __int_as_float(0xff800000);  // -inf
    ti[u] = 0x7fffffff;
  }

  for (int ct = ct0; ct < ct1; ++ct) {
    const int col0 = ct * T;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    for (int k0 = 0; k0 < c; k0 += TK) {
#pragma unroll
      for (int u = 0; u < (IFSEG_KNN_TILE * IFSEG_KNN_TK) / IFSEG_KNN_THREADS; ++u) {
        const int e = tid + u * IFSEG_KNN_THREADS, rr = e / TK, kk = e % TK, gk = k0 + kk;
        const int ga = row0 + rr, gb = col0 + rr;
        As[kk][rr] = (ga < n && gk < c) ? F[(long long)ga * c + gk] : 0.f;
        Bs[kk][rr] = (gb < n && gk < c) ? F[(long long)gb * c + gk] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < IFSEG_KNN_TK; ++kk) {
        float a[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx * 4 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Ss[ty * 4 + i][tx * 4 + j] = acc[i][j];
    __syncthreads();
    if (gi < n) {
      for (int jj = 0; jj < T / IFSEG_KNN_LANES; ++jj) {
        const int j = q * (T / IFSEG_KNN_LANES) + jj, gj = col0 + j;
        if (gj < n && gj != gi) ifseg_insert(tv, ti, L, Ss[r][j], gj);
      }
    }
    __syncthreads();
  }
  if (gi < n) {
    const long long base = ((((long long)b * n + gi) * splits + blockIdx.y) * IFSEG_KNN_LANES + q) * L;
    for (int u = 0; u < L; ++u) {
      part_v[base + u] = tv[u];
      part_i[base + u] = ti[u];
    }
  }
}

// ---- 3. merge: one thread per (image, row) ----
// cands = splits * LANES candidates lists of length L per row; indices: [B, N, K] int64 (K = L + 1).
extern "C" __global__ void ifseg_knn_merge(const float* __restrict__ part_v, const int* __restrict__ part_i,
                                           long long* __restrict__ indices, long long rows, int n, int L,
                                           int cands) {
  const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  float tv[IFSEG_KNN_MAX_L];
  int ti[IFSEG_KNN_MAX_L];
  for (int u = 0; u < L; ++u) {
    tv[u] = __int_as_float(0xff800000);
    ti[u] = 0x7fffffff;
  }
  const long long base = row * cands * L;
  for (int e = 0; e < cands * L; ++e) ifseg_insert(tv, ti, L, part_v[base + e], part_i[base + e]);
  long long* out = indices + row * (L + 1);
  out[0] = row % n;
  for (int u = 0; u < L; ++u) out[1 + u] = ti[u];
}

// ---- 4. one averaging step over all B*N*M entries (grid-stride) ----
extern "C" __global__ void ifseg_knn_average_step(const float* __restrict__ src, float* __restrict__ dst,
                                                  const long long* __restrict__ indices, long long total, int n,
                                                  int m, int k) {
  const float inv_k = 1.0f / (float)k;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const long long row = e / m, img = row / n;
    const int cls = (int)(e % m);
    const long long* nb = indices + row * k;
    const float* s = src + img * n * (long long)m + cls;
    float acc = s[nb[0] * m];
    for (int u = 1; u < k; ++u) acc += s[nb[u] * m];
    dst[e] = acc * inv_k;
  }
}

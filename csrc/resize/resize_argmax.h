// Fused bilinear resize + arg-max: shared declarations, the parameter struct, and the per-pixel maths as inline
// functions that both the C++ CPU loop (resize_argmax_cpu.cpp) and the CUDA kernel (resize_argmax_cuda.cu) call, so
// the two agree on every coordinate, weight and blend. No pybind11 and no CUDA headers here: under nvcc the helpers are
// __host__ __device__, for the C++ compiler plain inline functions.
//
// For every image b (scores S[b], N = h*w cells in row-major order, M classes per cell) and output pixel (y, x) of
// H0 x W0:
//   ty = tap(y, h, H0), tx = tap(x, w, W0)    torch F.interpolate(mode="bilinear", align_corners=False, no antialias):
//     src = max((dst + 0.5) * in / out - 0.5, 0); i0 = min(floor(src), in - 1); i1 = min(i0 + 1, in - 1);
//     lambda = src - i0; weights (1 - lambda, lambda), computed in float64 and rounded to float32 (as
//     ifseg_rt.runtime.postprocess.interp_matrix does); a tap with i0 == i1 has weights exactly (1, 0).
//   v_m = lerp(ty, lerp(tx, S[y0, x0, m], S[y0, x1, m]), lerp(tx, S[y1, x0, m], S[y1, x1, m]))   (columns, then rows)
//   label[b, y, x] = the lowest m with the largest v_m (numpy argmax).
// The H0 x W0 x M resized maps are never materialised.
#pragma once

#if defined(__CUDACC__)
#define IFSEG_HD __host__ __device__ __forceinline__
#else
#define IFSEG_HD inline
#endif

#include <cstdint>

namespace ifseg {

enum class ScoreDtype : int { kFloat32 = 0, kFloat16 = 1 };

struct ResizeArgmaxParams {
  const void* scores = nullptr;  // B x (h*w) x M, dtype score_dtype, contiguous
  ScoreDtype score_dtype = ScoreDtype::kFloat32;
  int32_t* out = nullptr;        // B x H0 x W0 int32, contiguous

  int64_t batch = 1;
  int grid_h = 0, grid_w = 0;    // h, w (>= 1)
  int m = 0;                     // classes (>= 1)
  int out_h = 0, out_w = 0;      // H0, W0 (>= 1)
  int num_threads = 0;           // CPU worker threads, 0: the cores this process may run on (ignored by CUDA)
};

// One output coordinate's two source taps and their weights.
struct ResizeTap {
  int i0, i1;
  float w0, w1;
};

IFSEG_HD ResizeTap resize_tap(int dst, int in, int out) {
  const double scale = static_cast<double>(in) / static_cast<double>(out);
  double src = (static_cast<double>(dst) + 0.5) * scale - 0.5;
  if (src < 0.0) src = 0.0;
  int i0 = static_cast<int>(src);  // src >= 0: truncation is floor
  if (i0 > in - 1) i0 = in - 1;
  const int i1 = i0 + 1 < in ? i0 + 1 : in - 1;
  if (i0 == i1) return ResizeTap{i0, i1, 1.0f, 0.0f};
  const double lam = src - static_cast<double>(i0);
  return ResizeTap{i0, i1, static_cast<float>(1.0 - lam), static_cast<float>(lam)};
}

// The one blend of the bilinear resize (columns first, then rows, each through this function).
IFSEG_HD float resize_lerp(float w0, float a, float w1, float b) { return w0 * a + w1 * b; }

// IEEE half bits -> float (no CUDA headers needed on either side).
IFSEG_HD float resize_half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    uint32_t e = 113, mm = man;
    while (!(mm & 0x400u)) {
      mm <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mm & 0x3ffu) << 13);
  }
  union {
    uint32_t u;
    float f;
  } cvt{bits};
  return cvt.f;
#endif
}

// Class c's score in a cell's M scores, as float32.
IFSEG_HD float resize_load(const float* p, int c) { return p[c]; }
IFSEG_HD float resize_load(const uint16_t* p, int c) { return resize_half_to_float(p[c]); }

// Arg-max over the M classes of one output pixel, straight from the scores (the CUDA kernel's per-thread work; the
// CPU loop computes the same blends through resize_lerp, vectorised over pixels).
template <typename T>
IFSEG_HD int resize_argmax_pixel(const T* c00, const T* c01, const T* c10, const T* c11, ResizeTap ty,
                                 ResizeTap tx, int m) {
  float best = 0.0f;
  int arg = 0;
  for (int c = 0; c < m; ++c) {
    const float top = resize_lerp(tx.w0, resize_load(c00, c), tx.w1, resize_load(c01, c));
    const float bot = resize_lerp(tx.w0, resize_load(c10, c), tx.w1, resize_load(c11, c));
    const float v = resize_lerp(ty.w0, top, ty.w1, bot);
    if (c == 0 || v > best) {
      best = v;
      arg = c;
    }
  }
  return arg;
}

// CPU: resize_argmax_cpu.cpp. Blocking; splits the B*H0 output rows over resize_argmax_threads(params) threads.
void resize_argmax_cpu(const ResizeArgmaxParams& params);
// The threads resize_argmax_cpu would use for these sizes (params.num_threads capped by rows and work).
int resize_argmax_threads(const ResizeArgmaxParams& params);
// Cores this process may run on (sched_getaffinity), the default for num_threads = 0.
int resize_available_cores();
// Which vector kernel the CPU path dispatches to here ("avx512", "avx2" or "generic").
const char* resize_argmax_cpu_isa();

// CUDA: resize_argmax_cuda.cu (only when built with nvcc). Asynchronous on `stream` (a cudaStream_t); scores and out
// are device pointers on the current device.
void resize_argmax_cuda(const ResizeArgmaxParams& params, void* stream);

}  // namespace ifseg

// CUDA fused bilinear resize + arg-max: one thread per output pixel, the maths of resize_argmax.h (resize_tap,
// resize_argmax_pixel), so labels agree with the CPU loop up to floating-point contraction. The scores (N x M per
// image, a few hundred KiB) stay in L1/L2: neighbouring pixels read the same or adjacent cells.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "resize/resize_argmax.h"

namespace ifseg {
namespace {

constexpr int kThreads = 256;
constexpr long long kMaxBlocks = 1 << 20;  // grid-stride beyond this

template <typename T>
__global__ void __launch_bounds__(kThreads)
    resize_argmax_kernel(const T* __restrict__ scores, int* __restrict__ out, long long total, int h, int w, int m,
                         int out_h, int out_w) {
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const int x = int(e % out_w);
    const long long row = e / out_w;
    const int y = int(row % out_h);
    const long long b = row / out_h;
    const ResizeTap ty = resize_tap(y, h, out_h), tx = resize_tap(x, w, out_w);
    const T* img = scores + b * h * (long long)w * m;
    const T* r0 = img + (long long)ty.i0 * w * m;
    const T* r1 = img + (long long)ty.i1 * w * m;
    out[e] = resize_argmax_pixel(r0 + (long long)tx.i0 * m, r0 + (long long)tx.i1 * m, r1 + (long long)tx.i0 * m,
                                 r1 + (long long)tx.i1 * m, ty, tx, m);
  }
}

}  // namespace

void resize_argmax_cuda(const ResizeArgmaxParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const long long total = (long long)p.batch * p.out_h * p.out_w;
  if (total == 0) return;
  long long blocks = (total + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  auto* out = reinterpret_cast<int*>(p.out);  // int32_t is int on every CUDA host ABI
  if (p.score_dtype == ScoreDtype::kFloat32)
    resize_argmax_kernel<float><<<unsigned(blocks), kThreads, 0, stream>>>(
        static_cast<const float*>(p.scores), out, total, p.grid_h, p.grid_w, p.m, p.out_h, p.out_w);
  else
    resize_argmax_kernel<uint16_t><<<unsigned(blocks), kThreads, 0, stream>>>(
        static_cast<const uint16_t*>(p.scores), out, total, p.grid_h, p.grid_w, p.m, p.out_h, p.out_w);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("ifseg_rt resize_argmax CUDA launch: ") + cudaGetErrorString(err));
}

}  // namespace ifseg

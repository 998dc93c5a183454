// Host launchers for the kNN CUDA kernels (knn_kernel.cuh, shared with the NVRTC path in ifseg_rt/knn/_cuda.py,
// which mirrors the workspace layout and launch shapes below -- keep the two in step).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "knn/knn.h"
#include "knn/knn_kernel.cuh"

static_assert(IFSEG_KNN_MAX_L + 1 == ifseg::kKnnCudaMaxK, "knn.h kKnnCudaMaxK must be knn_kernel.cuh IFSEG_KNN_MAX_L + 1");

namespace ifseg {
namespace {

constexpr int64_t kAlign = 256;
int64_t align_up(int64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

struct Workspace {
  int64_t fn, part_v, part_i, tmp, total;  // byte offsets
};

Workspace layout(const KnnParams& p) {
  const int64_t rows = p.batch * p.n, L = p.k - 1;
  const int64_t cand = L > 0 ? rows * ifseg_knn_splits(p.batch, int(p.n)) * IFSEG_KNN_LANES * L : 0;
  Workspace w{};
  w.fn = 0;
  w.part_v = w.fn + align_up(L > 0 ? rows * p.c * 4 : 0);
  w.part_i = w.part_v + align_up(cand * 4);
  w.tmp = w.part_i + align_up(cand * 4);
  w.total = w.tmp + align_up(p.probs && p.iters > 1 ? rows * p.m * 4 : 0);
  return w;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("ifseg_rt kNN CUDA: ") + what + ": " +
                                                   cudaGetErrorString(err));
}

}  // namespace

int64_t knn_cuda_workspace_bytes(const KnnParams& p) { return layout(p).total; }

void knn_cuda(const KnnParams& p, void* workspace, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const Workspace w = layout(p);
  auto* ws = static_cast<char*>(workspace);
  const long long rows = p.batch * p.n;
  const int n = int(p.n), c = int(p.c), L = p.k - 1;
  if (rows == 0) return;
  auto* indices = reinterpret_cast<long long*>(p.indices);  // int64_t is long on LP64, the kernels say long long

  if (L > 0) {
    float* fn = reinterpret_cast<float*>(ws + w.fn);
    const int nthreads = c >= 256 ? 256 : 32 * ((c + 31) / 32);
    switch (p.feat_dtype) {
      case FeatDtype::kFloat32:
        ifseg_knn_normalize_f32<<<unsigned(rows), nthreads, 0, stream>>>(static_cast<const float*>(p.features), fn, c);
        break;
      case FeatDtype::kFloat16:
        ifseg_knn_normalize_f16<<<unsigned(rows), nthreads, 0, stream>>>(
            static_cast<const unsigned short*>(p.features), fn, c);
        break;
      case FeatDtype::kBFloat16:
        ifseg_knn_normalize_bf16<<<unsigned(rows), nthreads, 0, stream>>>(
            static_cast<const unsigned short*>(p.features), fn, c);
        break;
    }
    const int splits = ifseg_knn_splits(p.batch, n);
    const dim3 grid((n + IFSEG_KNN_TILE - 1) / IFSEG_KNN_TILE, splits, unsigned(p.batch));
    auto* part_v = reinterpret_cast<float*>(ws + w.part_v);
    auto* part_i = reinterpret_cast<int*>(ws + w.part_i);
    ifseg_knn_topk_partial<<<grid, IFSEG_KNN_THREADS, 0, stream>>>(fn, part_v, part_i, n, c, L);
    ifseg_knn_merge<<<unsigned((rows + 127) / 128), 128, 0, stream>>>(part_v, part_i, indices, rows, n, L,
                                                                      splits * IFSEG_KNN_LANES);
  } else {
    ifseg_knn_merge<<<unsigned((rows + 127) / 128), 128, 0, stream>>>(nullptr, nullptr, indices, rows, n, 0, 0);
  }
  check(cudaGetLastError(), "neighbour search launch");

  if (!p.probs) return;
  const long long total = rows * p.m;
  if (p.iters == 0 || total == 0) {
    check(cudaMemcpyAsync(p.out, p.probs, size_t(total) * 4, cudaMemcpyDeviceToDevice, stream), "copy");
    return;
  }
  float* tmp = reinterpret_cast<float*>(ws + w.tmp);
  const unsigned blocks = unsigned(total < 256LL * 4096 ? (total + 255) / 256 : 4096);
  const float* src = p.probs;
  for (int it = 0; it < p.iters; ++it) {
    float* dst = ((p.iters - 1 - it) % 2 == 0) ? p.out : tmp;  // the last step lands in out
    ifseg_knn_average_step<<<blocks, 256, 0, stream>>>(src, dst, indices, total, n, int(p.m), p.k);
    src = dst;
  }
  check(cudaGetLastError(), "averaging launch");
}

}  // namespace ifseg

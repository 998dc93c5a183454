// Plain parameter structs shared by the kNN bindings, the CPU kernel and the CUDA launchers (no pybind11, no CUDA
// headers here). Spec: /work/shared/spec/ifseg.md section 12.
//
// For every image b (features F[b] NxC, probabilities P[b] NxM):
//   Fn = F / max(||F||_2, 1e-12) per row;  S = Fn Fn^T (never materialised as NxN);
//   Nb(i) = i itself, then the K-1 other rows j != i with the largest S[i, j], ties -> lower j first;
//   repeat iters times: P_i <- (1/K) * sum_{j in Nb(i)} P_j   (all rows at once, Nb fixed).
#pragma once

#include <cstdint>

namespace ifseg {

enum class FeatDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How the CPU path finds the neighbours. kInt16: screen the candidates with 16-bit integer similarities (int8 AMX or
// AVX512-VNNI passes over the hi and lo bytes), keeping each row's best K - 1 + kKnnScreenMargin, then rank those by
// their exact fp32 similarities; the fp32 search where the CPU has neither, or where every row would keep all rows
// anyway. kAuto: kInt16 where the CPU has AMX-INT8 (elsewhere the fp32 search is as fast). kFp32: the exact search.
enum class KnnScreen : int { kAuto = 0, kInt16 = 1, kFp32 = 2 };
constexpr int kKnnScreenMargin = 8;  // extra candidates per row kept by the screening
// Largest k of the CUDA kernels: IFSEG_KNN_MAX_L + 1 of knn_kernel.cuh (static_assert in knn_cuda.cu); Python reads
// it as _C.knn_cuda_max_k and ifseg_rt.knn checks its own limit against the kernel source.
constexpr int kKnnCudaMaxK = 33;

struct KnnParams {
  const void* features = nullptr;  // BxNxC, dtype feat_dtype, rows contiguous (stride C)
  FeatDtype feat_dtype = FeatDtype::kFloat32;
  const float* probs = nullptr;    // BxNxM float32, or nullptr for the neighbour search alone
  float* out = nullptr;            // BxNxM float32 (may not alias probs), nullptr iff probs is nullptr
  int64_t* indices = nullptr;      // BxNxK int64, row i's neighbours: i first, then by descending similarity

  int64_t batch = 1, n = 0, c = 0, m = 0;
  int64_t feat_batch_stride = 0;   // elements between images in `features` (N*C when contiguous)
  int64_t probs_batch_stride = 0;  // elements between images in `probs` and `out` (N*M when contiguous)
  int k = 3;                       // neighbours per row, 1 <= k <= n
  int iters = 25;                  // averaging steps, >= 0
  int num_threads = 0;             // CPU worker threads (ignored by CUDA); 0: knn_cpu_available_cores(), fewer for
                                   // small problems; > 0: exactly that many (at most N)
  KnnScreen screen = KnnScreen::kAuto;  // CPU only
};

// CPU: knn_cpu.cpp. Blocking; uses knn_cpu_threads(params) std::threads.
void knn_cpu(const KnnParams& params);
// Which fp32 micro-kernel the CPU path dispatches to on this machine ("avx512", "avx2" or "generic").
const char* knn_cpu_isa();
// Which screening kernel KnnScreen::kInt16 uses here ("amx", "avx512vnni"), "" when none (fp32 search).
const char* knn_cpu_screen_isa();
// Cores this process may run on (sched_getaffinity).
int knn_cpu_available_cores();
// Threads knn_cpu uses for these parameters.
int knn_cpu_threads(const KnnParams& params);

// CUDA: knn_cuda.cu (only when built with nvcc). Asynchronous on `stream` (a cudaStream_t); the caller provides
// `workspace` of at least knn_cuda_workspace_bytes(params) bytes on the same device.
int64_t knn_cuda_workspace_bytes(const KnnParams& params);
void knn_cuda(const KnnParams& params, void* workspace, void* stream);

}  // namespace ifseg

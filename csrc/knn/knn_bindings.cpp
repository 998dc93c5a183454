// kNN bindings: validate every input (dtype, ndim, contiguity, shape; errors name the argument and its shape), fill
// KnnParams (knn.h), release the GIL and dispatch. Outputs are allocated by the caller (ifseg_rt/knn/__init__.py).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>

#include "common/bindings_util.h"
#include "knn/knn.h"

namespace py = pybind11;

namespace ifseg {
namespace {

void check_contiguous(const std::string& name, const py::array& a) {
  if (!(a.flags() & py::array::c_style)) fail(name, a, "must be C-contiguous");
}

void check_dtype(const std::string& name, const py::array& a, char kind, int itemsize, const char* what) {
  if (a.dtype().kind() != kind || a.itemsize() != itemsize)
    throw py::type_error(name + " must be " + what + ", got dtype " + std::string(py::str(a.dtype())) + " shape " +
                         shape_str(a));
}

// features BxNxC (float32/float16) -> params; returns B, N.
void fill_features(KnnParams& p, const py::array& features) {
  if (features.ndim() != 3) fail("features", features, "must be BxNxC (3-D)");
  if (features.dtype().kind() != 'f' || (features.itemsize() != 4 && features.itemsize() != 2))
    throw py::type_error("features must be float32 or float16, got dtype " + std::string(py::str(features.dtype())) +
                         " shape " + shape_str(features));
  check_contiguous("features", features);
  p.features = features.data();
  p.feat_dtype = features.itemsize() == 4 ? FeatDtype::kFloat32 : FeatDtype::kFloat16;
  p.batch = features.shape(0);
  p.n = features.shape(1);
  p.c = features.shape(2);
  p.feat_batch_stride = p.n * p.c;
  if (p.n < 1) fail("features", features, "must have N >= 1 rows");
  if (p.c < 1) fail("features", features, "must have C >= 1 channels");
}

void check_k(const KnnParams& p, int k, int iters) {
  if (k < 1 || k > p.n)
    throw py::value_error("k must be in [1, N=" + std::to_string(p.n) + "], got " + std::to_string(k));
  if (iters < 0) throw py::value_error("iters must be >= 0, got " + std::to_string(iters));
}

void check_indices(const KnnParams& p, const py::array& indices) {
  check_dtype("indices", indices, 'i', 8, "int64");
  check_contiguous("indices", indices);
  if (indices.ndim() != 3 || indices.shape(0) != p.batch || indices.shape(1) != p.n || indices.shape(2) != p.k)
    fail("indices", indices, "must be BxNxK = (" + std::to_string(p.batch) + ", " + std::to_string(p.n) + ", " +
                                 std::to_string(p.k) + ")");
  if (!indices.writeable()) fail("indices", indices, "must be writeable");
}

KnnScreen parse_screen(const std::string& screen) {
  if (screen == "auto") return KnnScreen::kAuto;
  if (screen == "int16") return KnnScreen::kInt16;
  if (screen == "fp32") return KnnScreen::kFp32;
  throw py::value_error("screen must be 'auto', 'int16' or 'fp32', got '" + screen + "'");
}

void knn_cpu_py(const py::array& features, const py::array& indices, const py::object& probs_obj,
                const py::object& out_obj, int k, int iters, int num_threads, const std::string& screen) {
  KnnParams p;
  fill_features(p, features);
  check_k(p, k, iters);
  p.k = k;
  p.iters = iters;
  if (num_threads < 0)
    throw py::value_error("num_threads must be >= 0 (0: automatic), got " + std::to_string(num_threads));
  p.num_threads = num_threads;
  p.screen = parse_screen(screen);
  check_indices(p, indices);
  p.indices = static_cast<int64_t*>(const_cast<void*>(indices.data()));
  if (probs_obj.is_none() != out_obj.is_none()) throw py::value_error("probs and out must be given together");
  if (!probs_obj.is_none()) {
    const auto probs = py::reinterpret_borrow<py::array>(probs_obj);
    const auto out = py::reinterpret_borrow<py::array>(out_obj);
    for (const auto& [name, a] : {std::pair<const char*, const py::array&>{"probs", probs}, {"out", out}}) {
      check_dtype(name, a, 'f', 4, "float32");
      check_contiguous(name, a);
      if (a.ndim() != 3 || a.shape(0) != p.batch || a.shape(1) != p.n)
        fail(name, a, "must be BxNxM with B=" + std::to_string(p.batch) + ", N=" + std::to_string(p.n) +
                          " (features " + shape_str(features) + ")");
    }
    if (out.shape(2) != probs.shape(2)) fail("out", out, "must have the shape of probs " + shape_str(probs));
    if (!out.writeable()) fail("out", out, "must be writeable");
    if (py::detail::array_proxy(out.ptr())->data == py::detail::array_proxy(probs.ptr())->data)
      throw py::value_error("out must not alias probs");
    p.m = probs.shape(2);
    p.probs = static_cast<const float*>(probs.data());
    p.out = static_cast<float*>(const_cast<void*>(out.data()));
    p.probs_batch_stride = p.n * p.m;
  }
  py::gil_scoped_release release;
  knn_cpu(p);
}

#ifdef IFSEG_WITH_CUDA
KnnParams cuda_params(uintptr_t features, const std::string& dtype, uintptr_t indices, uintptr_t probs, uintptr_t out,
                      int64_t batch, int64_t n, int64_t c, int64_t m, int k, int iters) {
  KnnParams p;
  if (dtype == "float32") p.feat_dtype = FeatDtype::kFloat32;
  else if (dtype == "float16") p.feat_dtype = FeatDtype::kFloat16;
  else if (dtype == "bfloat16") p.feat_dtype = FeatDtype::kBFloat16;
  else throw py::type_error("features dtype must be float32, float16 or bfloat16, got " + dtype);
  if (batch < 0 || n < 1 || c < 1 || m < 0)
    throw py::value_error("bad sizes: B=" + std::to_string(batch) + " N=" + std::to_string(n) + " C=" +
                          std::to_string(c) + " M=" + std::to_string(m));
  p.batch = batch;
  p.n = n;
  p.c = c;
  p.m = m;
  check_k(p, k, iters);
  if (k > kKnnCudaMaxK)
    throw py::value_error("the CUDA backend supports k <= " + std::to_string(kKnnCudaMaxK) + ", got " +
                          std::to_string(k));
  p.k = k;
  p.iters = iters;
  if (!features || !indices) throw py::value_error("features and indices must be device pointers, got 0");
  if ((probs == 0) != (out == 0)) throw py::value_error("probs and out must be given together");
  p.features = reinterpret_cast<const void*>(features);
  p.indices = reinterpret_cast<int64_t*>(indices);
  p.probs = reinterpret_cast<const float*>(probs);
  p.out = reinterpret_cast<float*>(out);
  p.feat_batch_stride = n * c;
  p.probs_batch_stride = n * m;
  return p;
}
#endif

}  // namespace

void register_knn(py::module_& m) {
  m.def("num_threads", &knn_cpu_available_cores,
        "Cores this process may run on (sched_getaffinity): the most threads the kNN kernel uses by default.");
  m.def(
      "knn_threads",
      [](int64_t batch, int64_t n, int64_t c, int64_t m, int k, int iters, int num_threads, const std::string& screen) {
        KnnParams p;
        p.batch = batch, p.n = n, p.c = c, p.m = m, p.k = k, p.iters = iters, p.num_threads = num_threads;
        p.screen = parse_screen(screen);
        p.probs = m > 0 ? reinterpret_cast<const float*>(1) : nullptr;  // only tested against null
        return knn_cpu_threads(p);
      },
      py::arg("batch"), py::arg("n"), py::arg("c"), py::arg("m"), py::arg("k"), py::arg("iters"),
      py::arg("num_threads") = 0, py::arg("screen") = "auto",
      "Threads knn_cpu uses for these sizes (num_threads 0: the available cores, fewer for small problems).");
  m.def("screen_isa", []() { return std::string(knn_cpu_screen_isa()); },
        "The screening kernel screen='int16' uses here ('amx', 'avx512vnni'; screen='auto': 'amx' only), '' when "
        "none (fp32 search).");
  m.attr("knn_screen_margin") = kKnnScreenMargin;
  m.attr("knn_cuda_max_k") = kKnnCudaMaxK;
  m.def("cpu_isa", []() { return std::string(knn_cpu_isa()); },
        "The fp32 micro-kernel the CPU kNN dispatches to here: 'avx512', 'avx2' or 'generic'.");
  m.def("knn_cpu", &knn_cpu_py, py::arg("features"), py::arg("indices"), py::arg("probs") = py::none(),
        py::arg("out") = py::none(), py::kw_only(), py::arg("k"), py::arg("iters"), py::arg("num_threads") = 0,
        py::arg("screen") = "auto",
        "kNN search (and averaging when probs/out are given) on the CPU; fills indices (and out) in place.");
#ifdef IFSEG_WITH_CUDA
  m.def(
      "knn_cuda_workspace",
      [](int64_t batch, int64_t n, int64_t c, int64_t m, int k, int iters) {
        KnnParams p = cuda_params(1, "float32", 1, m ? 1 : 0, m ? 1 : 0, batch, n, c, m, k, iters);
        return knn_cuda_workspace_bytes(p);
      },
      py::arg("batch"), py::arg("n"), py::arg("c"), py::arg("m"), py::arg("k"), py::arg("iters"),
      "Bytes of device workspace knn_cuda needs for these sizes.");
  m.def(
      "knn_cuda",
      [](uintptr_t features, const std::string& dtype, uintptr_t indices, uintptr_t probs, uintptr_t out,
         uintptr_t workspace, int64_t batch, int64_t n, int64_t c, int64_t m, int k, int iters, uintptr_t stream) {
        KnnParams p = cuda_params(features, dtype, indices, probs, out, batch, n, c, m, k, iters);
        // the averaging reads probs while writing out: overlapping buffers would give garbage, silently
        const uintptr_t prob_bytes = static_cast<uintptr_t>(batch * n * m) * sizeof(float);
        if (probs && prob_bytes && probs < out + prob_bytes && out < probs + prob_bytes)
          throw py::value_error("out must not alias probs (their device buffers overlap)");
        if (!workspace && knn_cuda_workspace_bytes(p) > 0) throw py::value_error("workspace must be a device pointer");
        py::gil_scoped_release release;
        knn_cuda(p, reinterpret_cast<void*>(workspace), reinterpret_cast<void*>(stream));
      },
      py::arg("features"), py::arg("dtype"), py::arg("indices"), py::arg("probs"), py::arg("out"),
      py::arg("workspace"), py::arg("batch"), py::arg("n"), py::arg("c"), py::arg("m"), py::arg("k"),
      py::arg("iters"), py::arg("stream"),
      "Launch the kNN kernels on raw device pointers (contiguous BxNxC features, BxNxK int64 indices, BxNxM "
      "float32 probs/out or 0) on `stream`; asynchronous.");
#endif
}

}  // namespace ifseg

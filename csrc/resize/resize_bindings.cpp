// Resize + arg-max bindings: validate every input (dtype, ndim, contiguity, shape; errors name the argument and its
// shape), fill ResizeArgmaxParams (resize_argmax.h), release the GIL and dispatch. Python-side dispatch:
// ifseg_rt/runtime/resize_argmax.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "common/bindings_util.h"
#include "resize/resize_argmax.h"

namespace py = pybind11;

namespace ifseg {
namespace {

void check_sizes(int64_t batch, int64_t grid_h, int64_t grid_w, int64_t n, int64_t m, int64_t out_h, int64_t out_w) {
  if (grid_h < 1 || grid_w < 1)
    throw py::value_error("grid must be (h, w) with h, w >= 1, got (" + std::to_string(grid_h) + ", " +
                          std::to_string(grid_w) + ")");
  if (out_h < 1 || out_w < 1)
    throw py::value_error("size must be (H0, W0) with H0, W0 >= 1, got (" + std::to_string(out_h) + ", " +
                          std::to_string(out_w) + ")");
  if (batch < 0) throw py::value_error("batch must be >= 0, got " + std::to_string(batch));
  if (n != grid_h * grid_w)
    throw py::value_error("scores have N=" + std::to_string(n) + " cells but the grid is " + std::to_string(grid_h) +
                          "x" + std::to_string(grid_w) + " = " + std::to_string(grid_h * grid_w));
  if (m < 1) throw py::value_error("scores must have M >= 1 classes, got " + std::to_string(m));
  if (m > INT32_MAX || n > INT32_MAX || out_h > INT32_MAX || out_w > INT32_MAX)
    throw py::value_error("sizes must fit in int32");
}

ResizeArgmaxParams params_from(const py::array& scores, int64_t grid_h, int64_t grid_w, int64_t out_h,
                               int64_t out_w) {
  if (scores.ndim() != 2 && scores.ndim() != 3) fail("scores", scores, "must be NxM or BxNxM");
  if (scores.dtype().kind() != 'f' || (scores.itemsize() != 4 && scores.itemsize() != 2))
    throw py::type_error("scores must be float32 or float16, got dtype " + std::string(py::str(scores.dtype())) +
                         " shape " + shape_str(scores));
  if (!(scores.flags() & py::array::c_style)) fail("scores", scores, "must be C-contiguous");
  const bool batched = scores.ndim() == 3;
  const int64_t batch = batched ? scores.shape(0) : 1, n = scores.shape(batched ? 1 : 0),
                m = scores.shape(batched ? 2 : 1);
  try {
    check_sizes(batch, grid_h, grid_w, n, m, out_h, out_w);
  } catch (const py::value_error& e) {
    throw py::value_error(std::string(e.what()) + " (scores shape " + shape_str(scores) + ")");
  }
  ResizeArgmaxParams p;
  p.scores = scores.data();
  p.score_dtype = scores.itemsize() == 4 ? ScoreDtype::kFloat32 : ScoreDtype::kFloat16;
  p.batch = batch;
  p.grid_h = int(grid_h);
  p.grid_w = int(grid_w);
  p.m = int(m);
  p.out_h = int(out_h);
  p.out_w = int(out_w);
  return p;
}

py::array resize_argmax_cpu_py(const py::array& scores, int64_t grid_h, int64_t grid_w, int64_t out_h, int64_t out_w,
                               int threads, const py::object& out_obj) {
  ResizeArgmaxParams p = params_from(scores, grid_h, grid_w, out_h, out_w);
  if (threads < 0)
    throw py::value_error("threads must be >= 0 (0: all available cores), got " + std::to_string(threads));
  p.num_threads = threads;
  std::vector<py::ssize_t> shape;
  if (scores.ndim() == 3) shape.push_back(p.batch);
  shape.push_back(p.out_h);
  shape.push_back(p.out_w);
  py::array out;
  if (out_obj.is_none()) {
    out = py::array_t<int32_t>(shape);
  } else {
    out = py::reinterpret_borrow<py::array>(out_obj);
    if (out.dtype().kind() != 'i' || out.itemsize() != 4)
      throw py::type_error("out must be int32, got dtype " + std::string(py::str(out.dtype())) + " shape " +
                           shape_str(out));
    if (!(out.flags() & py::array::c_style)) fail("out", out, "must be C-contiguous");
    bool ok = out.ndim() == py::ssize_t(shape.size());
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = out.shape(i) == shape[i];
    if (!ok) {
      std::string want = scores.ndim() == 3 ? "BxH0xW0 = (" + std::to_string(p.batch) + ", " : "H0xW0 = (";
      fail("out", out, "must be " + want + std::to_string(p.out_h) + ", " + std::to_string(p.out_w) + ")");
    }
    if (!out.writeable()) fail("out", out, "must be writeable");
  }
  p.out = static_cast<int32_t*>(out.mutable_data());
  {
    py::gil_scoped_release release;
    resize_argmax_cpu(p);
  }
  return out;
}

}  // namespace

void register_resize(py::module_& m) {
  m.def("resize_argmax_cpu", &resize_argmax_cpu_py, py::arg("scores"), py::arg("grid_h"), py::arg("grid_w"),
        py::arg("out_h"), py::arg("out_w"), py::arg("threads") = 0, py::kw_only(), py::arg("out") = py::none(),
        "Fused bilinear resize (align_corners=False) + arg-max of NxM (or BxNxM) float32/float16 cell scores on a "
        "grid_h x grid_w grid to out_h x out_w int32 labels (ties: lowest class); fills `out` when given, returns it. "
        "threads=0: the cores this process may run on.");
  m.def(
      "resize_argmax_threads",
      [](int64_t batch, int64_t out_h, int64_t out_w, int64_t m, int threads) {
        if (threads < 0) throw py::value_error("threads must be >= 0, got " + std::to_string(threads));
        check_sizes(batch, 1, 1, 1, m, out_h, out_w);
        ResizeArgmaxParams p;
        p.batch = batch;
        p.out_h = int(out_h);
        p.out_w = int(out_w);
        p.m = int(m);
        p.num_threads = threads;
        return resize_argmax_threads(p);
      },
      py::arg("batch"), py::arg("out_h"), py::arg("out_w"), py::arg("m"), py::arg("threads") = 0,
      "Threads resize_argmax_cpu uses for these sizes: `threads` (0: available cores) capped by the output rows and "
      "a minimum amount of work per thread.");
  m.def("resize_available_cores", &resize_available_cores,
        "Cores this process may run on (sched_getaffinity): resize_argmax_cpu's default thread count.");
  m.def("resize_argmax_cpu_isa", []() { return std::string(resize_argmax_cpu_isa()); },
        "The vector loop resize_argmax_cpu dispatches to here: 'avx512', 'avx2' or 'generic'.");
#ifdef IFSEG_WITH_CUDA
  m.def(
      "resize_argmax_cuda",
      [](uintptr_t scores, const std::string& dtype, uintptr_t out, int64_t batch, int64_t grid_h, int64_t grid_w,
         int64_t m, int64_t out_h, int64_t out_w, uintptr_t stream) {
        check_sizes(batch, grid_h, grid_w, grid_h * grid_w, m, out_h, out_w);
        ResizeArgmaxParams p;
        if (dtype == "float32") p.score_dtype = ScoreDtype::kFloat32;
        else if (dtype == "float16") p.score_dtype = ScoreDtype::kFloat16;
        else throw py::type_error("scores dtype must be float32 or float16, got " + dtype);
        if (!scores || !out) throw py::value_error("scores and out must be device pointers, got 0");
        p.scores = reinterpret_cast<const void*>(scores);
        p.out = reinterpret_cast<int32_t*>(out);
        p.batch = batch;
        p.grid_h = int(grid_h);
        p.grid_w = int(grid_w);
        p.m = int(m);
        p.out_h = int(out_h);
        p.out_w = int(out_w);
        py::gil_scoped_release release;
        resize_argmax_cuda(p, reinterpret_cast<void*>(stream));
      },
      py::arg("scores"), py::arg("dtype"), py::arg("out"), py::arg("batch"), py::arg("grid_h"), py::arg("grid_w"),
      py::arg("m"), py::arg("out_h"), py::arg("out_w"), py::arg("stream"),
      "Launch the fused resize + arg-max kernel on raw device pointers (contiguous BxNxM 'float32'/'float16' scores, "
      "BxH0xW0 int32 out) on the current device and `stream`; asynchronous.");
#endif
}

}  // namespace ifseg

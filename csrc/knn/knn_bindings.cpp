// Placeholder until the kNN kernels land (issue 3): a tiny CPU function so the build and import are testable.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace ifseg {
void register_knn(py::module_& m) {
  m.def("num_threads", []() { return 1; }, "Number of CPU threads the kernels use.");
}
}  // namespace ifseg

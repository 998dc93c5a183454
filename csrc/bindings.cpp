// The one binding file of ifseg_rt._C: validate inputs, call the kernels in csrc/*/, export short verbs.
#include <pybind11/pybind11.h>

#define IFSEG_STRINGIFY(x) #x
#define IFSEG_MACRO_STRINGIFY(x) IFSEG_STRINGIFY(x)

namespace py = pybind11;

namespace ifseg {
void register_knn(py::module_& m);  // csrc/knn/knn_bindings.cpp
void register_resize(py::module_& m);  // csrc/resize/resize_bindings.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ifseg_rt compiled kernels (CPU, and CUDA when built with nvcc)";
#ifdef IFSEG_VERSION_INFO
  m.attr("__version__") = IFSEG_MACRO_STRINGIFY(IFSEG_VERSION_INFO);
#else
  m.attr("__version__") = "dev";
#endif
#ifdef IFSEG_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  ifseg::register_knn(m);
  ifseg::register_resize(m);
}

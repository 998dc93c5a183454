// Argument checks shared by the pybind11 bindings: errors name the argument, its shape and dtype.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sstream>
#include <string>

namespace ifseg {

inline std::string shape_str(const pybind11::array& a) {
  std::ostringstream os;
  os << "(";
  for (pybind11::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  os << (a.ndim() == 1 ? ",)" : ")");
  return os.str();
}

[[noreturn]] inline void fail(const std::string& name, const pybind11::array& a, const std::string& what) {
  throw pybind11::value_error(name + " " + what + ", got shape " + shape_str(a) + " dtype " +
                              std::string(pybind11::str(a.dtype())));
}

}  // namespace ifseg

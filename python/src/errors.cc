#include "errors.h"

#include <nanobind/stl/string.h>

namespace kvrt_py {
namespace {
nb::object& Factory() {
  static nb::object* factory = new nb::object();  // leaked: outlives interpreter teardown
  return *factory;
}
}  // namespace

void SetErrorFactory(nb::object factory) { Factory() = std::move(factory); }

void Raise(kvrt_status status, const char* call, const std::string& message) {
  nb::object& factory = Factory();
  if (!factory.is_valid() || factory.is_none()) {
    throw std::runtime_error(std::string(call) + ": " + kvrt_status_string(status) + ": " +
                             message);
  }
  nb::object exc = factory(static_cast<int>(status), call, message);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw nb::python_error();
}

}  // namespace kvrt_py

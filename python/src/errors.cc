#include "errors.h"

#include <nanobind/stl/string.h>

namespace kvrt_py {

void Raise(kvrt_status status, const char* call, const std::string& message) {
  // kvrt._errors.make_error builds the exception (looked up per error: no Python object is held
  // by the extension, so nothing outlives the interpreter).
  nb::object exc = nb::module_::import_("kvrt._errors")
                       .attr("make_error")(static_cast<int>(status), call, message);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw nb::python_error();
}

}  // namespace kvrt_py

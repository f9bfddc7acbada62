#include "errors.h"

#include <nanobind/stl/string.h>

#include <limits>

namespace kvrt_py {

void Raise(kvrt_status status, const char* call, const std::string& message) {
  // kvrt._errors.make_error builds the exception (looked up per error: no Python object is held
  // by the extension, so nothing outlives the interpreter).
  nb::object exc = nb::module_::import_("kvrt._errors")
                       .attr("make_error")(static_cast<int>(status), call, message);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw nb::python_error();
}

void CheckI32(const char* call, std::initializer_list<std::pair<const char*, int64_t>> args) {
  for (const auto& [name, v] : args)
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
      Raise(KVRT_ERR_INVALID_ARGUMENT, call,
            std::string(name) + " = " + std::to_string(v) + " is out of range");
}

}  // namespace kvrt_py

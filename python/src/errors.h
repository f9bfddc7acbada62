// Raising kvrt statuses as Python exceptions: the classes live in kvrt/_errors.py; each status
// becomes its subclass of kvrt.KvrtError carrying the status, its name and the message.
#pragma once

#include <kvrt.h>
#include <nanobind/nanobind.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

namespace kvrt_py {

namespace nb = nanobind;

// Raises the exception for `status` (never KVRT_OK) from the binding of `call`. Needs the GIL.
[[noreturn]] void Raise(kvrt_status status, const char* call, const std::string& message);

// Raises InvalidArgumentError naming the first argument past int32 (the binding takes int64 so
// that such a Python int is not nanobind's TypeError "incompatible function arguments", which
// names no argument); after it the values narrow to the C API's int32_t unchanged.
void CheckI32(const char* call, std::initializer_list<std::pair<const char*, int64_t>> args);

// Raises status with kvrt_last_error() (read by the caller right after the failed call).
inline void Check(kvrt_status status, const char* call, const std::string& last_error) {
  if (status != KVRT_OK) Raise(status, call, last_error);
}

}  // namespace kvrt_py

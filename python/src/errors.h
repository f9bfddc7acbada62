// Raising kvrt statuses as Python exceptions: the classes live in kvrt/_errors.py; each status
// becomes its subclass of kvrt.KvrtError carrying the status, its name and the message.
#pragma once

#include <kvrt.h>
#include <nanobind/nanobind.h>

#include <string>

namespace kvrt_py {

namespace nb = nanobind;

// Raises the exception for `status` (never KVRT_OK) from the binding of `call`. Needs the GIL.
[[noreturn]] void Raise(kvrt_status status, const char* call, const std::string& message);

// Raises status with kvrt_last_error() (read by the caller right after the failed call).
inline void Check(kvrt_status status, const char* call, const std::string& last_error) {
  if (status != KVRT_OK) Raise(status, call, last_error);
}

}  // namespace kvrt_py

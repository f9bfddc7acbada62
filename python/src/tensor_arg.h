// Tensors from Python (anything DLPack: NumPy, PyTorch, CuPy) checked against what a C call
// expects: dtype, shape, row-major contiguity, device. Nothing is copied: the C call gets the
// tensor's own data pointer.
#pragma once

#include <kvrt.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <initializer_list>

namespace kvrt_py {

namespace nb = nanobind;
using InArray = nb::ndarray<nb::ro>;  // read-only view: q, k, v
using OutArray = nb::ndarray<>;       // writable: out

struct TensorArg {
  void* data = nullptr;
  kvrt_memory memory = KVRT_MEMORY_HOST;
  int device_id = 0;
  int64_t rows = 0;  // the first dimension
};

// Raises kvrt.InvalidArgumentError unless `a` (argument `name` of `call`) has dtype `dtype`.
void CheckDtype(const char* call, const char* name, const InArray& a, kvrt_dtype dtype);

// Checks `a` (argument `name` of `call`): dtype, shape (-1 = any extent), C-contiguous, and a
// host or CUDA device. Raises kvrt.InvalidArgumentError naming what is wrong.
TensorArg CheckTensor(const char* call, const char* name, const InArray& a,
                      kvrt_dtype dtype, std::initializer_list<int64_t> shape);

// Raises unless every tensor of one call lives in the same kind of memory on the same device.
void CheckSameDevice(const char* call, std::initializer_list<const TensorArg*> tensors);

const char* DtypeName(kvrt_dtype dtype);

}  // namespace kvrt_py

#include "tensor_arg.h"

#include <cstring>
#include <string>

#include "errors.h"

namespace kvrt_py {
namespace {

constexpr int kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13;

nb::dlpack::dtype ToDl(kvrt_dtype d) {
  switch (d) {
    case KVRT_DTYPE_F16: return {uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
    case KVRT_DTYPE_BF16: return {uint8_t(nb::dlpack::dtype_code::Bfloat), 16, 1};
    default: return {uint8_t(nb::dlpack::dtype_code::Float), 32, 1};
  }
}

std::string DescribeDtype(nb::dlpack::dtype d) {
  const char* code = "?";
  switch (nb::dlpack::dtype_code(d.code)) {
    case nb::dlpack::dtype_code::Int: code = "int"; break;
    case nb::dlpack::dtype_code::UInt: code = "uint"; break;
    case nb::dlpack::dtype_code::Float: code = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: code = "bfloat"; break;
    case nb::dlpack::dtype_code::Complex: code = "complex"; break;
    case nb::dlpack::dtype_code::Bool: return "bool";
    default: return "dtype code " + std::to_string(d.code);
  }
  return code + std::to_string(d.bits);
}

std::string DescribeShape(const InArray& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string DescribeExpected(std::initializer_list<int64_t> shape) {
  std::string s = "(";
  size_t i = 0;
  for (int64_t e : shape) s += (i++ ? ", " : "") + (e < 0 ? std::string("n") : std::to_string(e));
  return s + ")";
}

[[noreturn]] void Bad(const char* call, const char* name, const std::string& what) {
  Raise(KVRT_ERR_INVALID_ARGUMENT, call, std::string(name) + " " + what);
}

}  // namespace

const char* DtypeName(kvrt_dtype dtype) {
  switch (dtype) {
    case KVRT_DTYPE_F32: return "f32";
    case KVRT_DTYPE_F16: return "f16";
    case KVRT_DTYPE_BF16: return "bf16";
  }
  return "?";
}

void CheckDtype(const char* call, const char* name, const InArray& a, kvrt_dtype dtype) {
  if (a.dtype() == ToDl(dtype)) return;
  const bool output = std::strcmp(name, "out") == 0 || std::strcmp(name, "lse") == 0;
  Bad(call, name,
      "has dtype " + DescribeDtype(a.dtype()) + "; expected " + DtypeName(dtype) +
          (output ? " (outputs are f32)" : " (the runtime's dtype)"));
}

TensorArg CheckTensor(const char* call, const char* name, const InArray& a,
                      kvrt_dtype dtype, std::initializer_list<int64_t> shape) {
  CheckDtype(call, name, a, dtype);
  bool shape_ok = a.ndim() == shape.size();
  size_t i = 0;
  for (int64_t e : shape) {
    if (shape_ok && e >= 0 && int64_t(a.shape(i)) != e) shape_ok = false;
    ++i;
  }
  if (!shape_ok) {
    Bad(call, name, "has shape " + DescribeShape(a) + "; expected " + DescribeExpected(shape));
  }
  // An empty tensor may carry no data pointer (torch's), which the C call would report as NULL.
  if (a.size() == 0) Bad(call, name, "has shape " + DescribeShape(a) + ": no tokens (n >= 1)");
  // Row-major contiguity (dimensions of extent 1 may have any stride).
  int64_t expect = 1;
  for (size_t d = a.size() == 0 ? 0 : a.ndim(); d-- > 0;) {  // an empty tensor has no layout
    if (a.shape(d) != 1 && a.stride_ptr() != nullptr && a.stride(d) != expect) {
      Bad(call, name, "is not contiguous (row-major); pass a contiguous tensor "
                      "(e.g. .contiguous() or numpy.ascontiguousarray)");
    }
    expect *= int64_t(a.shape(d));
  }
  TensorArg t;
  t.data = const_cast<void*>(static_cast<const void*>(a.data()));
  t.device_id = a.device_id();
  t.rows = a.ndim() > 0 ? int64_t(a.shape(0)) : 0;
  switch (a.device_type()) {
    case kDLCPU:
    case kDLCUDAHost: t.memory = KVRT_MEMORY_HOST; break;
    case kDLCUDA:
    case kDLCUDAManaged: t.memory = KVRT_MEMORY_DEVICE; break;
    default:
      Bad(call, name, "is on DLPack device type " + std::to_string(a.device_type()) +
                          "; kvrt takes host (CPU) or CUDA tensors");
  }
  return t;
}

void CheckSameDevice(const char* call, std::initializer_list<const TensorArg*> tensors) {
  const TensorArg* first = nullptr;
  for (const TensorArg* t : tensors) {
    if (t == nullptr || t->data == nullptr) continue;
    if (first == nullptr) {
      first = t;
    } else if (t->memory != first->memory ||
               (t->memory == KVRT_MEMORY_DEVICE && t->device_id != first->device_id)) {
      Raise(KVRT_ERR_INVALID_ARGUMENT, call,
            "tensors are on different devices (all of one call must be host, or all on one "
            "CUDA device)");
    }
  }
}

}  // namespace kvrt_py

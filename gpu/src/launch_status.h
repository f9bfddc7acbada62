#pragma once
// The launchers' statuses (C++ side only: nvcc compiles launch.h without Abseil): a dispatch
// message or CUDA error from the .cu side as an absl::Status, and the error of a build without
// CUDA. One definition for every launcher file.
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "launch.h"

namespace kvrt::gpu::detail {

[[maybe_unused]] inline absl::Status ToStatus(const Err& e, const char* what) {
  if (e.msg != nullptr) return absl::InvalidArgumentError(absl::StrCat(what, ": ", e.msg));
  if (e.cuda != 0) {
    return absl::InternalError(
        absl::StrCat(what, ": CUDA error ", e.cuda, " (", CudaErrorName(e.cuda), ")"));
  }
  return absl::OkStatus();
}

[[maybe_unused]] inline absl::Status NoCuda(const char* what) {
  return absl::FailedPreconditionError(absl::StrCat(what, ": kvrt was built without CUDA"));
}

}  // namespace kvrt::gpu::detail

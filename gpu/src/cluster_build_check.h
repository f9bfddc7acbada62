#pragma once
// Argument checks shared by the k-means build launchers (cluster_build.cc) and their host
// references (cluster_build_ref.cc): both answer InvalidArgument for the same inputs.
#include <initializer_list>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvrt_gpu/cluster_build.h"

namespace kvrt::gpu::detail {

inline absl::Status CheckKMeansShape(const KMeansShape& s, const char* fn) {
  if (s.head_dim != 64 && s.head_dim != 128 && s.head_dim != 256) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": unsupported head_dim ", s.head_dim, " (64, 128, 256)"));
  }
  if (s.kv_heads <= 0 || s.segments <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": need kv_heads > 0 and segments > 0 (got ",
                                                   s.kv_heads, ", ", s.segments, ")"));
  }
  if (s.segment_rows <= 0 || s.segment_rows % 64 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": segment_rows ", s.segment_rows, " is not a positive multiple of 64"));
  }
  if (s.clusters < 1 || s.clusters > s.segment_rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        fn, ": clusters ", s.clusters, " outside [1, segment_rows = ", s.segment_rows, "]"));
  }
  return absl::OkStatus();
}

inline absl::Status CheckDType(DType t, const char* fn) {
  if (t != DType::kF32 && t != DType::kF16 && t != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": unsupported dtype"));
  }
  return absl::OkStatus();
}

inline absl::Status CheckNotNull(std::initializer_list<const void*> ptrs, const char* fn) {
  for (const void* p : ptrs) {
    if (p == nullptr)
      return absl::InvalidArgumentError(absl::StrCat(fn, ": null pointer argument"));
  }
  return absl::OkStatus();
}

// SummarizeClusters' shape, dtype and pointers (the launcher adds its alignment rule).
inline absl::Status CheckSummarize(const KMeansShape& s, const void* keys, const void* values,
                                   DType dtype, const float* x, const float* xn2,
                                   const int32_t* assign, const float* metric_trace,
                                   const ClusterStats& out, const char* fn) {
  if (auto st = CheckKMeansShape(s, fn); !st.ok()) return st;
  if (auto st = CheckDType(dtype, fn); !st.ok()) return st;
  return CheckNotNull({keys, values, x, xn2, assign, metric_trace, out.count, out.key_mean,
                       out.value_mean, out.spread},
                      fn);
}

}  // namespace kvrt::gpu::detail

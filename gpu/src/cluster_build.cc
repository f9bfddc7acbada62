// Launchers of the k-means build (cluster_build.h): argument checks, then cluster_build.cu
// through cluster_build_launch.h.
#include "kvrt_gpu/cluster_build.h"

#include <cstdint>
#include <initializer_list>

#include "absl/strings/str_cat.h"
#include "cluster_build_check.h"
#include "cluster_build_launch.h"

#include "launch_status.h"

namespace kvrt::gpu {
using detail::NoCuda;
using detail::ToStatus;

namespace {

// NOTE: the kernels read rows with 16-byte vector loads (and assign 4 entries at a time), so the
// row arrays must be 16-byte aligned, as cudaMalloc's are; a misaligned view is refused here
// rather than faulting on the device.
absl::Status CheckAligned(std::initializer_list<const void*> ptrs, const char* fn) {
  for (const void* p : ptrs) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) {
      return absl::InvalidArgumentError(absl::StrCat(fn, ": row arrays must be 16-byte aligned"));
    }
  }
  return absl::OkStatus();
}


}  // namespace

absl::Status MapToMetric(const KMeansShape& s, const void* keys, DType dtype, const float* metric_l,
                         float* x, float* xn2, void* stream) {
  constexpr const char* kFn = "MapToMetric";
  if (auto st = detail::CheckKMeansShape(s, kFn); !st.ok()) return st;
  if (auto st = detail::CheckDType(dtype, kFn); !st.ok()) return st;
  if (auto st = detail::CheckNotNull({keys, metric_l, x, xn2}, kFn); !st.ok()) return st;
  if (auto st = CheckAligned({keys, metric_l, x}, kFn); !st.ok()) return st;
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchMapToMetric(s, keys, dtype, metric_l, x, xn2, stream), kFn);
#else
  (void)stream;
  return NoCuda(kFn);
#endif
}

absl::Status SeedCentroids(const KMeansShape& s, const float* x, const int32_t* seed,
                           float* centroid, void* stream) {
  constexpr const char* kFn = "SeedCentroids";
  if (auto st = detail::CheckKMeansShape(s, kFn); !st.ok()) return st;
  if (auto st = detail::CheckNotNull({x, seed, centroid}, kFn); !st.ok()) return st;
  if (auto st = CheckAligned({x, centroid}, kFn); !st.ok()) return st;
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchSeedCentroids(s, x, seed, centroid, stream), kFn);
#else
  (void)stream;
  return NoCuda(kFn);
#endif
}

absl::Status AssignClusters(const KMeansShape& s, const float* x, const float* xn2,
                            const float* centroid, int32_t* assign, float* dist, void* stream) {
  constexpr const char* kFn = "AssignClusters";
  if (auto st = detail::CheckKMeansShape(s, kFn); !st.ok()) return st;
  if (auto st = detail::CheckNotNull({x, xn2, centroid, assign, dist}, kFn); !st.ok()) return st;
  if (auto st = CheckAligned({x, centroid}, kFn); !st.ok()) return st;
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchAssignClusters(s, x, xn2, centroid, assign, dist, stream), kFn);
#else
  (void)stream;
  return NoCuda(kFn);
#endif
}

absl::Status UpdateCentroids(const KMeansShape& s, const float* x, const int32_t* assign,
                             float* centroid, void* stream) {
  constexpr const char* kFn = "UpdateCentroids";
  if (auto st = detail::CheckKMeansShape(s, kFn); !st.ok()) return st;
  if (auto st = detail::CheckNotNull({x, assign, centroid}, kFn); !st.ok()) return st;
  if (auto st = CheckAligned({x, assign, centroid}, kFn); !st.ok()) return st;
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchUpdateCentroids(s, x, assign, centroid, stream), kFn);
#else
  (void)stream;
  return NoCuda(kFn);
#endif
}

absl::Status SummarizeClusters(const KMeansShape& s, const void* keys, const void* values,
                               DType dtype, const float* x, const float* xn2, const int32_t* assign,
                               const float* metric_trace, const ClusterStats& out, void* stream) {
  constexpr const char* kFn = "SummarizeClusters";
  if (auto st =
          detail::CheckSummarize(s, keys, values, dtype, x, xn2, assign, metric_trace, out, kFn);
      !st.ok())
    return st;
  if (auto st = CheckAligned({keys, values, x, assign, out.key_mean, out.value_mean}, kFn);
      !st.ok()) {
    return st;
  }
#if KVRT_WITH_CUDA
  return ToStatus(detail::LaunchSummarizeClusters(s, keys, values, dtype, x, xn2, assign,
                                                  metric_trace, out, stream),
                  kFn);
#else
  (void)stream;
  return NoCuda(kFn);
#endif
}

}  // namespace kvrt::gpu

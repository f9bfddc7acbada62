#pragma once
// Internal interface between the k-means build launchers (cluster_build.cc) and cluster_build.cu
// (nvcc, C++17, no Abseil of its own). Arguments are validated by the launchers; these functions
// only dispatch on dtype / head_dim and enqueue kernels.
#include <cstddef>
#include <cstdint>

#include "kvrt_gpu/cluster_build.h"
#include "launch.h"

namespace kvrt::gpu::detail {

// AssignClusters' scratch (stream-ordered, taken and given back inside the call): a bf16 copy of
// the centroids padded to a multiple of kAssignPad per segment (padding rows zero) and half
// their squared norms (f32, +inf for padding rows, so that a padding centroid never wins).
inline constexpr int kAssignPad = 64;
inline int AssignPaddedClusters(int c) { return (c + kAssignPad - 1) / kAssignPad * kAssignPad; }

Err LaunchMapToMetric(const KMeansShape& s, const void* keys, DType dtype, const float* metric_l,
                      float* x, float* xn2, void* stream);
Err LaunchSeedCentroids(const KMeansShape& s, const float* x, const int32_t* seed, float* centroid,
                        void* stream);
Err LaunchAssignClusters(const KMeansShape& s, const float* x, const float* xn2,
                         const float* centroid, int32_t* assign, float* dist, void* stream);
Err LaunchUpdateCentroids(const KMeansShape& s, const float* x, const int32_t* assign,
                          float* centroid, void* stream);
Err LaunchSummarizeClusters(const KMeansShape& s, const void* keys, const void* values, DType dtype,
                            const float* x, const float* xn2, const int32_t* assign,
                            const float* metric_trace, const ClusterStats& out, void* stream);

}  // namespace kvrt::gpu::detail

#pragma once
// GPU build of the cluster kind's segments (cpu_index/include/kvrt_cpu_index/cluster.h): Lloyd's
// k-means of every fixed token segment of every kv head, in the query metric (x = k L), run where
// a prompt's keys already are. The CPU build (cpu_index::ClusterSegment) is the path without a
// GPU; these are the device half of it, each launcher beside a host reference of the same math
// (the reference is what the kernels are tested against, not a path of the runtime).
//
// Flow for one (sequence, layer) (runtime/src/device_cluster_build.cc drives it):
//   MapToMetric:   x[g, r] = k[r, g] L_g (f32), xn2[g, r] = |x[g, r]|^2
//   SeedCentroids: centroid[g, s, j] = x[g, s * S + seed[g, s, j]]
//   iterations x (AssignClusters, UpdateCentroids), then AssignClusters once more
//   (the caller picks outliers from dist on the host and marks them assign = -1)
//   SummarizeClusters: per cluster, count, mean key, mean value and spread over its members.
// Rows: r in [0, segments * S) per kv head; segment s holds rows [s * S, (s + 1) * S), and its
// clusters are numbered 0..C-1 within it (assign holds these local numbers).
//
// Conventions of kernels.h: launchers validate (InvalidArgument), FailedPrecondition without
// CUDA, Internal for a CUDA error; they only enqueue work on `stream`. Device pointers for the
// launchers, host pointers for the references. The launchers read rows with 16-byte vector loads:
// keys, values, metric_l, x, centroid, assign (Update / Summarize) and the key / value means
// must be 16-byte aligned, as cudaMalloc's are (InvalidArgument otherwise).
// Kernel design, tile sizes and expected times: gpu/src/cluster_build.cu.
#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kvrt_common/dtype.h"

namespace kvrt::gpu {

struct KMeansShape {
  int kv_heads = 0;
  int head_dim = 0;          // 64, 128, 256
  int segments = 0;          // per kv head
  int segment_rows = 0;      // S, a multiple of 64
  int clusters = 0;          // C per segment, 1..S
  int64_t rows() const { return static_cast<int64_t>(segments) * segment_rows; }
};

// keys: [rows, kv_heads, head_dim] of `dtype` (a prompt's layout; row r of kv head g at
// (r * kv_heads + g) * head_dim). metric_l: f32 [kv_heads, d, d], row-major, x = k L.
// x: f32 [kv_heads, rows, d]; xn2: f32 [kv_heads, rows].
absl::Status MapToMetric(const KMeansShape& s, const void* keys, DType dtype,
                         const float* metric_l, float* x, float* xn2, void* stream);
absl::Status MapToMetricHost(const KMeansShape& s, const void* keys, DType dtype,
                             const float* metric_l, float* x, float* xn2);

// seed: int32 [kv_heads, segments, C] segment-local rows; centroid: f32 [kv_heads, segments, C, d].
// A seed outside [0, S) is the caller's bug: the reference returns InvalidArgument, the kernel
// (which cannot report it) writes NaN to that centroid instead of reading out of bounds.
absl::Status SeedCentroids(const KMeansShape& s, const float* x, const int32_t* seed,
                           float* centroid, void* stream);
absl::Status SeedCentroidsHost(const KMeansShape& s, const float* x, const int32_t* seed,
                               float* centroid);

// assign[g, r] = argmax_j (x[g, r] . centroid[g, s(r), j] - |centroid[g, s(r), j]|^2 / 2), the
// lowest j among equal scores; dist[g, r] = max(0, xn2[g, r] - 2 * best) (the squared distance).
// NOTE: the kernel may score in bf16 on tensor cores (f32 accumulation): its choice is then the
// best within bf16 rounding, not always the reference's argmax, and dist is computed from that
// bf16 score (off by at most ~2^-7 |x| |c|); tests allow that. It takes scratch (a bf16 copy of
// the centroids and their norms, about kv_heads * segments * C * (2 d + 4) bytes) from the
// stream-ordered allocator and gives it back in stream order.
absl::Status AssignClusters(const KMeansShape& s, const float* x, const float* xn2,
                            const float* centroid, int32_t* assign, float* dist, void* stream);
absl::Status AssignClustersHost(const KMeansShape& s, const float* x, const float* xn2,
                                const float* centroid, int32_t* assign, float* dist);

// centroid[g, s, j] = mean of x over the rows assigned j (left as it is when none; rows whose
// assign is outside [0, C) belong to no cluster). Deterministic (members summed in f32 in row
// order, no atomics; the reference sums in the same order).
absl::Status UpdateCentroids(const KMeansShape& s, const float* x, const int32_t* assign,
                             float* centroid, void* stream);
absl::Status UpdateCentroidsHost(const KMeansShape& s, const float* x, const int32_t* assign,
                                 float* centroid);

// Per cluster (g, s, j) over the rows with assign == j (rows with assign < 0 are outliers and
// belong to none): count; key_mean and value_mean (f32 [kv_heads, segments, C, d], the means of
// the raw keys / values, 0 when empty); spread = max(0, mean xn2 - |mean x|^2) / metric_trace
// (0 when empty). values: same layout and dtype as keys.
struct ClusterStats {
  int32_t* count = nullptr;     // [kv_heads, segments, C]
  float* key_mean = nullptr;    // [kv_heads, segments, C, d]
  float* value_mean = nullptr;  // [kv_heads, segments, C, d]
  float* spread = nullptr;      // [kv_heads, segments, C]
};
absl::Status SummarizeClusters(const KMeansShape& s, const void* keys, const void* values,
                               DType dtype, const float* x, const float* xn2,
                               const int32_t* assign, const float* metric_trace,
                               const ClusterStats& out, void* stream);
absl::Status SummarizeClustersHost(const KMeansShape& s, const void* keys, const void* values,
                                   DType dtype, const float* x, const float* xn2,
                                   const int32_t* assign, const float* metric_trace,
                                   const ClusterStats& out);
// metric_trace: f32 [kv_heads], tr(L L^T) of each head (the spread's normaliser), device memory
// for the launcher, host for the reference.

}  // namespace kvrt::gpu

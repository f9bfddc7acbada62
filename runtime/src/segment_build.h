#pragma once
// The GPU build of the cluster kind at prefill (issue: "build at prefill speed"): the prompt's
// cold keys clustered where they are, per kv head and fixed token segment, by the k-means kernels
// of gpu/include/kvrt_gpu/cluster_build.h, then laid out by the same code as the CPU build
// (cpu_index::MarkOutliers, AssembleSegment) into the parts that cpu_index::PresetSegments hands
// the index. The CPU then only permutes the store and keeps the summary.
//
// It differs from the CPU build in the algorithm: flat Lloyd (kmeans_iters + refine_iters
// iterations over all C clusters of a segment, scored in bf16 on tensor cores) where the CPU runs
// two levels (sqrt(C) coarse clusters, fine ones inside, then refine_iters global iterations) to
// save arithmetic; the same seeds, metric, outlier rule and layout.
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_runtime/runtime.h"
#include "kvrt_transfer/pinned_pool.h"

namespace kvrt::runtime {

struct SegmentBuildInput {
  // [rows, kv_heads, head_dim] of config.dtype: the cold rows from store row 0 on.
  const void* k = nullptr;
  const void* v = nullptr;
  bool k_on_device = false;  // device memory (else host; copied up a chunk at a time)
  int64_t rows = 0;          // only whole segments are built: rows / segment_tokens of them
  // Per kv head, the metric factor L [d * d] the index will be built with (ColdTier::MetricFactor).
  const std::vector<std::vector<float>>* metric_l = nullptr;
  // Pinned host blocks for the results that come back (optional: pageable memory without).
  transfer::PinnedPool* pinned = nullptr;
};

// parts[g][s]: segment s of kv head g. on_gpu: the kernels on `stream` (device memory is borrowed
// for the build and given back before it returns: at most kSegmentBuildChunkBytes plus the inputs'
// copies); else their host references on host pointers (tests without a GPU). Errors (no memory,
// a CUDA error) leave nothing behind: the caller then builds on the CPU.
absl::StatusOr<std::vector<std::vector<cpu_index::SegmentClustering>>> BuildSegments(
    const RuntimeConfig& config, const SegmentBuildInput& in, bool on_gpu, void* stream);

// Whether BuildSegments supports this configuration (cluster kind, head_dim 64/128/256).
bool SegmentBuildSupported(const RuntimeConfig& config);

// Bytes of f32 work arrays a chunk of segments may take (x, centroids, means): the chunk size.
inline constexpr int64_t kSegmentBuildChunkBytes = int64_t{768} << 20;

}  // namespace kvrt::runtime

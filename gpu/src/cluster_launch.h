#pragma once
// Internal interface between the cluster launchers (cluster_kernels.cc) and cluster_score.cu
// (nvcc, C++17, no Abseil). Arguments are validated by the launcher.
#include <cstddef>

#include "cluster_threshold.h"
#include "kvrt_gpu/cluster_kernels.h"
#include "launch.h"

namespace kvrt::gpu::detail {

// The score kernel's cluster CTAs per kv head are at most ClusterTiles(C) (fewer when one wave
// holds fewer: each then takes more clusters); the workspace holds a partial state per CTA.
inline constexpr int kClusterTile = 128;

inline int ClusterTiles(int n) { return (n + kClusterTile - 1) / kClusterTile; }
// Tile partial states: [q_heads, cluster tiles, head_dim + 2] (max, sum, sum w * vbar).
inline std::size_t ClusterTileFloats(const ClusterSummaryView& s, int q_heads) {
  return static_cast<std::size_t>(q_heads) * ClusterTiles(s.num_clusters) * (s.head_dim + 2);
}
// Where the group selection's threshold section starts (16-byte aligned).
inline std::size_t ClusterThresholdAt(const ClusterSummaryView& s, int q_heads) {
  return (ClusterTileFloats(s, q_heads) + 3) / 4 * 4;
}
// The tile states, then (more than one q head per kv head: group selection is possible) the
// threshold section (cluster_threshold.h).
inline std::size_t ClusterWorkspaceFloats(const ClusterSummaryView& s, int q_heads) {
  if (q_heads <= s.kv_heads || s.num_clusters == 0) return ClusterTileFloats(s, q_heads);
  return ClusterThresholdAt(s, q_heads) +
         static_cast<std::size_t>(s.kv_heads) * ThresholdRowFloats(s.num_clusters);
}

// One member of a batched cluster step (ClusterStepBatch), as its kernels read it: the caller's
// item, and what the launcher derives from it: the CTA counts, the group key (null: no group
// selection for it) and the threshold section (row null: the select kernel searches itself).
struct ClusterBatchMember {
  ClusterStepItem it;
  float* gkey = nullptr;
  ThresholdWs thr;
  int cctas = 0;   // cluster CTAs per kv head of the score kernel
  int otiles = 0;  // outlier CTAs per kv head
};
// Members per launch: the launch's argument (a __grid_constant__ kernel parameter, CUDA >= 12.1's
// 32 KiB limit) holds them all.
inline constexpr int kClusterBatchMax = 32;
struct ClusterBatchLaunch {
  int n = 0;
  ClusterBatchMember m[kClusterBatchMax];
};
static_assert(sizeof(ClusterBatchLaunch) <= 32000, "a kernel parameter of at most 32 KiB");

// Loads the cluster step's kernels for this shape (LoadKernel); kv_heads > 0.
Err PreloadClusterStep(int head_dim, int q_heads, int kv_heads);
// The group selection's threshold for every kv head (cluster_threshold.cu): after GroupKeyKernel
// (which fills w's partial ranges and clears its histograms), before SelectKernel.
Err PreloadGroupThreshold();
Err LaunchGroupThreshold(const ClusterSummaryView& s, const float* group_key, int64_t budget,
                         float top_p, const ThresholdWs& w, void* stream);
Err LaunchClusterStep(const ClusterSummaryView& s, const float* q, const ClusterStepParams& p,
                      float scale, const ClusterStepOutputs& out, float* workspace, void* stream);
// The threshold kernels for a batch's members with a threshold section (thr.row set).
Err LaunchGroupThresholdBatch(const ClusterBatchLaunch& a, int kv_heads, float top_p, void* stream);
// At most kClusterBatchMax members (s, q, budget, key_offset, out, ws set; the rest is filled
// here), the same kv_heads and head_dim, each workspace required; p's budget, key_offset and
// scored_event are not read.
Err LaunchClusterStepBatch(ClusterBatchLaunch* a, const ClusterStepParams& p, float scale,
                           void* stream);

}  // namespace kvrt::gpu::detail

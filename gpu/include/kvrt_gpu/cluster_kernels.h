#pragma once
// GPU side of the cluster cold tier (cpu_index/include/kvrt_cpu_index/cluster.h has the
// formulas): for one (sequence, layer), score every cluster summary of every kv head for all q
// heads of its group (each bf16 centroid and value mean read once per kv head), select clusters
// per q head by token budget / top-p, and estimate the partial state of the unselected clusters.
// Compiles without CUDA (streams are void*); ClusterStepHost is the reference and the path
// without a GPU; launchers follow kernels.h's conventions (InvalidArgument for bad shapes,
// FailedPrecondition without CUDA, Internal for a CUDA error; they only enqueue work).
//
// Two kernels (three with group selection): (1) grid (cluster tiles + outlier tiles, kv heads):
// densities [q_heads, C], outlier scores [q_heads, O] and per tile a partial softmax state (max,
// sum, sum w * vbar) of ALL clusters' estimated masses; (2) one CTA per q head: merges the tile
// states, finds the selection by a weighted radix select on the densities (4 passes of 8 bits,
// histograms of tokens and mass), compacts the selected clusters (ascending index), and subtracts
// their share from the total to leave the unselected clusters' estimate.
//
// Selection (same as cpu_index::SelectClusters, but returned in ascending cluster index): order
// clusters by (density desc, index asc); take the shortest prefix whose tokens reach
// budget_tokens or (top_p > 0) whose estimated mass reaches top_p of the total. Padding clusters
// (size 0) are never selected and carry no mass.
// Group selection (params.group_select with more than one q head per kv head): one selection per
// kv head, shared by its q heads, by the group key of cluster.h (key_c = log sum_h
// exp(density_{h,c} - lse_h), lse_h each head's log total estimated mass): the selection rule
// above on the keys (top_p of their total sum n_c exp(key_c)), the budget counted once per kv
// head. A third kernel between the two computes the keys (outputs.group_key), and two more find
// each kv head's threshold key over chunks of its clusters (the select kernel then only compacts;
// one CTA per q head walking every cluster to find it took 200 us of a 1M step). Every q head of
// the group then gets the same selected list and tokens, and its own estimate over the rest.
// Estimate: as cluster.h; NOTE: when the unselected clusters hold less than kEstMassFloor of the
// estimated mass, the estimate is empty (o = 0, lse = -inf): the kernel computes it as total
// minus selected, which loses precision below that share (the host reference applies the same
// rule, so both agree).
#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace kvrt::gpu {

inline constexpr float kEstMassFloor = 1e-4f;
inline constexpr int kClusterMaxGroup = 16;  // q heads per kv head

// Device pointers for the kernels, host pointers for the reference. C and O are per kv head,
// padded to the same count for every head (padding clusters: size 0; padding outliers: any key,
// their scores are just not read).
struct ClusterSummaryView {
  int kv_heads = 0;
  int head_dim = 0;                       // 64, 128, 256
  int num_clusters = 0;                   // C
  int num_outliers = 0;                   // O (may be 0)
  const uint16_t* centroid = nullptr;     // bf16 [kv_heads, C, d]
  const uint16_t* value_mean = nullptr;   // bf16 [kv_heads, C, d]
  const int32_t* size = nullptr;          // [kv_heads, C]
  const float* spread = nullptr;          // [kv_heads, C]
  const uint16_t* outlier_key = nullptr;  // bf16 [kv_heads, O, d]
};

struct ClusterStepParams {
  int q_heads = 0;    // multiple of kv_heads, at most kClusterMaxGroup per kv head
  float scale = 0.f;  // 0 = 1/sqrt(head_dim)
  float spread_weight = 1.f;
  int64_t budget_tokens = 0;  // per q head; <= 0 selects nothing
  float top_p = 0.f;
  bool estimate = true;
  bool group_select = false;  // one selection per kv head (see above); budget_tokens per kv head
  // Group selection only: null, or [kv_heads, C] (device for the kernels, host for the
  // reference) subtracted from each group key before the selection ranks by it (top_p then
  // counts the lowered keys' masses); the estimate is unchanged. The direct step's
  // residency-aware selection (MissPenaltyOffsets in direct_attend.h) fills it.
  const float* key_offset = nullptr;
  // Null, or [q_heads, C] (device for the kernels, host for the reference): each cluster's log
  // mass given, log sum over its rows of exp(scale x score) (CodeClusterLse in code_scan.h: the
  // rows' scores from their codes), in place of the centroid's estimate density + log n: the
  // density written is cluster_lse - log n, and selection, group keys and estimate follow from
  // it as above (spread_weight is not read). Empty clusters stay padding whatever it holds.
  const float* cluster_lse = nullptr;
  // Null, or a cudaEvent_t that ClusterStep records on its stream right after the scoring kernel
  // (the selection's kernels that follow occupy a few dozen CTAs): other work that waits for it
  // runs beside the selection. Recorded whenever ClusterStep returns OK; ignored by the host
  // reference.
  void* scored_event = nullptr;
};

// Outputs (device memory for the kernels, host for the reference); q: f32 [q_heads, d].
struct ClusterStepOutputs {
  float* density = nullptr;            // [q_heads, C] (padding: -inf)
  float* outlier_score = nullptr;      // [q_heads, O] unscaled q.k (null allowed when O == 0)
  int32_t* selected = nullptr;         // [q_heads, C] selected clusters, ascending, first count[h]
  int32_t* selected_count = nullptr;   // [q_heads]
  int64_t* selected_tokens = nullptr;  // [q_heads]
  float* est_o = nullptr;              // [q_heads, d]
  float* est_lse = nullptr;            // [q_heads]
  // [kv_heads, C] the group keys (padding: -inf); required with group_select and more than one
  // q head per kv head, not written otherwise.
  float* group_key = nullptr;
  // Null, or [kv_heads, C]: where group selection is in effect (group_select, more than one q head
  // per kv head, C > 0), the selection as one mask word per cluster, every word written: the
  // group's g low bits where the cluster is selected, 0 elsewhere (what MarkSelected in
  // direct_attend.h makes of `selected`, without its clear and launch). Not written otherwise.
  uint32_t* group_mask = nullptr;
};

// Floats of device scratch ClusterStep needs.
std::size_t ClusterStepWorkspaceFloats(const ClusterSummaryView& s, int q_heads);

// workspace: device f32 [ClusterStepWorkspaceFloats], 16-byte aligned, any contents; or null
// (then cudaMallocAsync on stream).
absl::Status ClusterStep(const ClusterSummaryView& s, const float* q, const ClusterStepParams& p,
                         const ClusterStepOutputs& out, float* workspace, void* stream);
// Host reference: same outputs (double accumulation).
absl::Status ClusterStepHost(const ClusterSummaryView& s, const float* q,
                             const ClusterStepParams& p, const ClusterStepOutputs& out);

// One member of ClusterStepBatch: a (sequence, layer)'s summary, q, budget, key offsets (null:
// none), outputs and workspace (ClusterStepWorkspaceFloats(summary, q_heads) floats; required
// where that is > 0).
struct ClusterStepItem {
  ClusterSummaryView summary;
  const float* q = nullptr;
  int64_t budget_tokens = 0;
  const float* key_offset = nullptr;
  const float* cluster_lse = nullptr;  // ClusterStepParams::cluster_lse, the member's
  ClusterStepOutputs out;
  float* workspace = nullptr;
};

// ClusterStep for n members in one launch per kernel (per 32 members): a batch step's selections
// without n launches of each. p's q_heads, scale, spread_weight, top_p, estimate and group_select
// hold for every member; its budget_tokens, key_offset and cluster_lse are the items' (where
// members with and without cluster_lse need different score kernels: InvalidArgument, as for
// members laid out differently); scored_event must be
// null. The members share kv_heads and head_dim and take the same score kernel (summaries laid out
// alike; InvalidArgument otherwise). Each member's results are ClusterStep's up to the rounding of
// its total state: the score kernel splits a member's clusters over fewer CTAs when the members
// share the GPU. The host reference runs ClusterStepHost per member.
absl::Status ClusterStepBatch(const ClusterStepItem* items, int n, const ClusterStepParams& p,
                              void* stream);
absl::Status ClusterStepBatchHost(const ClusterStepItem* items, int n, const ClusterStepParams& p);

}  // namespace kvrt::gpu

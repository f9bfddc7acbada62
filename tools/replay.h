#pragma once
// Replays a trace through libkvrt (public C API only) and measures every decode output against
// exact f32 attention over all tokens (docs/architecture.md; metrics in README).
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvrt.h"
#include "tools/cluster_options.h"
#include "tools/trace/trace.h"

namespace kvrt::cli {

// Exact attention of every (layer, step, q head) of a trace: computed once, reused by every
// configuration a benchmark sweeps.
struct ExactReference {
  int top_k = 0;  // ids kept per (layer, step, head)
  int layers = 0, steps = 0, heads = 0, head_dim = 0;
  std::vector<float> o;          // [layers, steps, heads, d]
  std::vector<float> lse;        // [layers, steps, heads]
  std::vector<int32_t> top_ids;  // [layers, steps, heads, top_k], best first
  std::size_t at(int layer, int step, int head) const {
    return (static_cast<std::size_t>(layer) * steps + step) * heads + head;
  }
};

struct ReplayOptions {
  kvrt_index_kind index = KVRT_INDEX_FLAT;
  int sinks = 4;
  int window = 512;
  int top_k = 100;
  int effort = 0;
  int threads = 0;
  int max_steps = 0;  // 0 = all decode steps of the trace
  bool progress = true;
  // > 0: heads whose calibrated GPU-tier mass share (sinks + window, measured on the prompt's
  // last calibration_queries queries) reaches this are served as streaming heads.
  double streaming_threshold = 0;
  int calibration_queries = 16;
  bool group_search = false;  // kvrt_config.group_search
  ClusterOptions cluster;     // cluster_keys, cluster_rescore(_bits), cluster_group_select
};

// Per (layer, q head) figures of one replay.
struct HeadReport {
  int layer = 0, head = 0;
  bool streaming = false;
  double tier_mass_calibration = 0;  // share of exact mass in sinks + window, prompt calibration
  double recall = 0, mass = 0, error_mean = 0;
};

struct ReplayReport {
  // The search settings the kind resolved for top_k and effort (kvrt_index_describe_search): what
  // effort = 0 means at this k.
  std::string search;
  std::string trace, index;
  int layers = 0, q_heads = 0, kv_heads = 0, head_dim = 0, sinks = 0, window = 0, top_k = 0,
      effort = 0, steps = 0;
  bool group_search = false;
  int64_t prompt_tokens = 0;
  double recall_at_k = 0, mass_recall = 0, output_rel_error_mean = 0, output_rel_error_p99 = 0,
         output_rel_error_max = 0, scanned_fraction = 0;
  // Keys read / cold keys per q head: scanned_fraction, divided by the q heads that share a group
  // search's reads (kvrt_stats.keys_read).
  double read_fraction = 0;
  // Cold tokens attended / cold keys the retrieval q heads could search (kvrt_stats
  // cold_tokens_attended / cold_keys_searchable): the share of the cold tier each step attends
  // exactly (1 for exact; for cluster, the selected clusters, outliers and unclustered rows).
  double retrieved_fraction = 0;
  // Kinds that estimate what they leave out (cluster), over the head-steps with an estimate
  // (kvrt_get_estimate_lse): the mean share of the exact attention mass the estimate claims, the
  // mean share the attended tokens missed on the same head-steps, and the mean log of their
  // ratio (0 = unbiased; below 0 = the estimate claims too little). All 0 without estimates.
  int64_t estimate_samples = 0;
  double estimated_mass = 0, estimate_missed_mass = 0, estimate_log_ratio = 0;
  // Reuse of the cold selection (tools/reuse.h): the share of a step's cold positions that the
  // same q head (kv head: the GQA group's union) chose at the previous step, and that the
  // previous layer chose at the same step.
  double head_step_reuse = 0, kv_step_reuse = 0, layer_reuse = 0;
  double latency_us_p50 = 0, latency_us_p99 = 0, append_us_p50 = 0, prefill_ms_per_layer = 0;
  double cold_tokens_attended_per_head = 0;
  int64_t gpu_bytes = 0, host_bytes = 0, index_bytes = 0, cold_tokens = 0;
  std::vector<double> layer_recall, layer_mass, layer_error_mean;  // per layer
  int streaming_heads = 0;
  std::vector<HeadReport> heads;  // [layers * q_heads]
};

// Computes the exact reference (top_k >= every k later asked for), in parallel.
absl::StatusOr<ExactReference> ComputeExactReference(const trace::TraceReader& trace, int top_k,
                                                     int max_steps, bool progress);

absl::StatusOr<ReplayReport> RunReplay(const trace::TraceReader& trace, const ExactReference& ref,
                                       const ReplayOptions& options);

// One build of the index, then every decode step attended once per effort (kvrt_set_search_effort)
// on the same state: a report per effort, in order. options.effort is ignored.
absl::StatusOr<std::vector<ReplayReport>> RunReplaySweep(const trace::TraceReader& trace,
                                                         const ExactReference& ref,
                                                         const ReplayOptions& options,
                                                         const std::vector<int>& efforts);

absl::StatusOr<kvrt_index_kind> ParseIndexKindOption(const std::string& name);
const char* IndexKindOptionName(kvrt_index_kind kind);

}  // namespace kvrt::cli

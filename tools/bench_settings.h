#pragma once
// The decode settings `bench decode` and `bench serve` share: their options, checks, and the
// runtime configuration of one measured run (tools/decode_harness.h).
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "kvrt.h"
#include "tools/bench_data.h"
#include "tools/cluster_options.h"
#include "tools/decode_harness.h"

namespace kvrt::cli {

struct DecodeSettings {
  int layers = 2, steps = 30, warmup = 3, sinks = 4, window = 2048, top_k = 100, threads = 0;
  int effort = 0, use_gpu = 1, group_search = 0;
  double max_seconds = 20;    // measured time per run, at least 5 steps
  double hot_cache = -1;      // config.hot_cache_fraction; < 0: the library's default
  double cluster_budget = 0;  // config.cluster_budget_fraction; 0: the library's default
  int direct_step = -1;       // config.cluster_direct_step; < 0: the library's default
  double top_p = -1;          // config.cluster_top_p; < 0: the library's default
  double miss_penalty = -1;   // config.cluster_miss_penalty; < 0: the library's default
  ClusterOptions cluster;     // --cluster-keys --cluster-rescore --group-select
  bool pipeline = false;      // HarnessOptions::pipeline
  std::string memory = "device";
  bool device() const { return memory == "device" && use_gpu != 0; }
};

// --layers --steps --warmup --max-seconds --sinks --window --top-k --effort --threads --gpu
// --memory --group-search --hot-cache --cluster-budget --group-select --top-p --miss-penalty
// --cluster-keys --direct-step --pipeline, with the settings'
// current values as defaults.
void AddDecodeSettingsOptions(CLI::App* cmd, DecodeSettings* settings);
absl::Status CheckDecodeSettings(const DecodeSettings& settings);
// --gpu against this machine: -1 becomes 0 where no GPU backend can run; 1 there is an error.
absl::Status ResolveGpu(DecodeSettings* settings);

// cpu | fetch | auto (the error names --cold-attention).
absl::StatusOr<kvrt_cold_attention> ParseColdAttention(const std::string& name);

// One run: the settings, the data's shape and scale, bf16, no finiteness checks.
HarnessOptions MakeHarnessOptions(const DecodeSettings& settings, const BenchData& data,
                                  kvrt_index_kind kind, kvrt_cold_attention mode, int batch,
                                  bool batched);

}  // namespace kvrt::cli

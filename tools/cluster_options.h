#pragma once
// The cluster kind's options that `replay` and the bench commands share: one help text each, and
// one place that copies them into a kvrt_config.
#include "CLI/CLI.hpp"
#include "kvrt.h"

namespace kvrt::cli {

// Each value left at its default leaves the library's default in place.
struct ClusterOptions {
  int keys = 0;           // config.cluster_keys; 0: the library's
  double rescore = -1;    // config.cluster_rescore; < 0: the library's
  int rescore_bits = -1;  // config.cluster_rescore_bits; < 0: the library's
  int group_select = -1;  // config.cluster_group_select; < 0: the library's
  int value_bits = -1;    // config.cluster_value_bits; < 0: the library's
};

// --cluster-keys, --cluster-rescore, --cluster-rescore-bits, --cluster-value-bits,
// --group-select.
void AddClusterOptions(CLI::App* cmd, ClusterOptions* options);
void ApplyClusterOptions(const ClusterOptions& options, kvrt_config* config);

}  // namespace kvrt::cli

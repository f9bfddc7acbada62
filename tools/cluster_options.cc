#include "tools/cluster_options.h"

namespace kvrt::cli {

void AddClusterOptions(CLI::App* cmd, int* cluster_keys, double* cluster_rescore) {
  cmd->add_option("--cluster-keys", *cluster_keys,
                  "config.cluster_keys: the cluster kind's target keys per cluster; fewer rank the "
                  "cold tokens better at more summary memory (8 doubles 16's); in [2, 256] "
                  "(default: the library's, 16)")
      ->check(CLI::Range(2, 256));
  cmd->add_option("--cluster-rescore", *cluster_rescore,
                  "config.cluster_rescore: > 1 selects the cluster kind's rows in two stages "
                  "(candidate clusters up to this multiple of the token budget, their keys scored "
                  "exactly, the budget's best rows attended: the same rows attended, more keys "
                  "read); the CPU selects then (no direct step); 0 or 1 = off, in [0, 64] "
                  "(default: the library's, 0)")
      ->check(CLI::Range(0.0, 64.0));
}

}  // namespace kvrt::cli

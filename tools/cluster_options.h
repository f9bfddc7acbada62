#pragma once
// The cluster kind's options that `replay` and the bench commands share, with one help text each.
#include "CLI/CLI.hpp"

namespace kvrt::cli {

// --cluster-keys (0 left: the library's default) and --cluster-rescore (< 0 left: the default).
void AddClusterOptions(CLI::App* cmd, int* cluster_keys, double* cluster_rescore);

}  // namespace kvrt::cli

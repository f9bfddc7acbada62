#include "tools/cluster_options.h"

#include "tools/cli_checks.h"

namespace kvrt::cli {

void AddClusterOptions(CLI::App* cmd, ClusterOptions* o) {
  cmd->add_option("--cluster-keys", o->keys,
                  "config.cluster_keys: the cluster kind's target keys per cluster; fewer rank the "
                  "cold tokens better at more summary memory (8 doubles 16's); in [2, 256] "
                  "(default: the library's, 16)")
      ->check(kvrt::cli::IntIn(2, 256));
  cmd->add_option("--cluster-rescore", o->rescore,
                  "config.cluster_rescore: > 1 selects the cluster kind's rows in two stages "
                  "(candidate clusters up to this multiple of the token budget, their keys scored "
                  "exactly, the budget's best rows attended: the same rows attended, more keys "
                  "read); the CPU selects then (no direct step); 0 or 1 = off, in [0, 64] "
                  "(default: the library's, 0)")
      ->check(kvrt::cli::NumberIn(0.0, 64.0));
  cmd->add_option("--cluster-rescore-bits", o->rescore_bits,
                  "config.cluster_rescore_bits: with --cluster-rescore > 1, 0 scores the "
                  "candidates on their keys; 1, 2, 4 or 8 on codes of them (that many bits per "
                  "channel of each key's residual from its cluster's centroid, in host memory): "
                  "the candidates' keys are not read; without --cluster-rescore, 1-8 rank whole "
                  "clusters by their rows' codes in one stage (on the GPU backend the codes are "
                  "held and scanned in GPU memory) (default: the library's, 0)")
      ->check(CLI::IsMember({0, 1, 2, 4, 8}));
  cmd->add_option(
         "--cluster-value-bits", o->value_bits,
         "config.cluster_value_bits: with --cluster-rescore-bits 1-8 and no "
         "--cluster-rescore, 1, 2, 4 or 8 estimate the clusters not attended from codes "
         "of their rows' values (that many bits per channel, in host memory) weighted by "
         "their key codes' scores, instead of each cluster's value mean; on the GPU "
         "backend 2 bits (head_dim 64, 128 or 256, at most 8 q heads per kv head) run on the "
         "GPU beside the key codes, other values make the CPU select (no direct step); "
         "0 = value means (default: the library's, 0)")
      ->check(CLI::IsMember({0, 1, 2, 4, 8}));
  cmd->add_option("--group-select", o->group_select,
                  "config.cluster_group_select: 1 = one cluster selection per kv head shared by "
                  "its q heads, 0 = one per q head (default: the library's, 1)")
      ->check(kvrt::cli::IntIn(0, 1));
}

void ApplyClusterOptions(const ClusterOptions& o, kvrt_config* c) {
  if (o.keys > 0) c->cluster_keys = o.keys;
  if (o.rescore >= 0) c->cluster_rescore = static_cast<float>(o.rescore);
  if (o.rescore_bits >= 0) c->cluster_rescore_bits = o.rescore_bits;
  if (o.group_select >= 0) c->cluster_group_select = o.group_select;
  if (o.value_bits >= 0) c->cluster_value_bits = o.value_bits;
}

}  // namespace kvrt::cli

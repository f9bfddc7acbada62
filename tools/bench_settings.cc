#include "tools/bench_settings.h"

#include "absl/strings/str_cat.h"
#include "tools/cli_checks.h"
#include "tools/cluster_options.h"

namespace kvrt::cli {

void AddDecodeSettingsOptions(CLI::App* cmd, DecodeSettings* s) {
  cmd->add_option("--layers", s->layers, "layers measured (each with its own KV)")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(1, 64));
  cmd->add_option("--steps", s->steps, "measured decode steps")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(1, 100000));
  cmd->add_option("--warmup", s->warmup, "unmeasured steps first")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(0, 1000));
  cmd->add_option("--max-seconds", s->max_seconds, "measured time per run (>= 5 steps)")
      ->capture_default_str()
      ->check(kvrt::cli::NumberIn(0.001, 86400.0));
  cmd->add_flag("--pipeline", s->pipeline,
                "a step's layer-steps back to back with one wait per step, as a decoder runs "
                "them (the host's calls overlap the device's work for the layers before): "
                "p50/p99 are of a step's wall time over its layers; use several --layers");
  cmd->add_option("--sinks", s->sinks, "sink tokens")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(0, 1 << 20));
  cmd->add_option("--window", s->window, "window tokens")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(1, 1 << 24));
  cmd->add_option("--top-k", s->top_k, "top-k (and the k of recall@k)")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(1, 1 << 20));
  cmd->add_option("--effort", s->effort, "search effort (0 = the kind's default)")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option("--threads", s->threads, "CPU worker threads (0 = all)")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option("--gpu", s->use_gpu, "config.use_gpu (1, 0 or -1)")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(-1, 1));
  cmd->add_option("--memory", s->memory, "device or host pointers for q, k, v, out")
      ->capture_default_str();
  cmd->add_option(
         "--group-search", s->group_search,
         "config.group_search: 1 = one index search per kv head for its q heads, 0 = per q head")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(0, 1));
  cmd->add_option("--hot-cache", s->hot_cache,
                  "config.hot_cache_fraction: the cluster kind's GPU hot cache, as a fraction of "
                  "the cold tokens (0 = off; default: the library's)")
      ->check(kvrt::cli::NumberIn(0.0, 1.0));
  cmd->add_option("--cluster-budget", s->cluster_budget,
                  "config.cluster_budget_fraction: cold tokens the cluster kind selects per step "
                  "(per kv head with group selection, else per q head), as a fraction of the "
                  "clustered ones (default: the library's)")
      ->check(kvrt::cli::NumberIn(0.0, 1.0, /*min_excluded=*/true));
  cmd->add_option("--top-p", s->top_p,
                  "config.cluster_top_p: > 0 also ends the cluster selection at this share of "
                  "the estimated mass (default: the library's)")
      ->check(kvrt::cli::NumberIn(0.0, 1.0));
  cmd->add_option("--miss-penalty", s->miss_penalty,
                  "config.cluster_miss_penalty: GPU backend, direct step with group selection: "
                  "each cluster's selection key is lowered by this times the share of its rows "
                  "not in the GPU page pool, so that rows read over PCIe must carry more "
                  "estimated mass; 0 = off, in [0, 64] (default: the library's)")
      ->check(kvrt::cli::NumberIn(0.0, 64.0));
  AddClusterOptions(cmd, &s->cluster);
  cmd->add_option("--direct-step", s->direct_step,
                  "config.cluster_direct_step: 1 = the cluster kind's selection is attended on "
                  "the GPU (hot cache, else the host store over PCIe), 0 = the CPU orders the "
                  "step (default: the library's)")
      ->check(kvrt::cli::IntIn(0, 1));
}

absl::Status CheckDecodeSettings(const DecodeSettings& s) {
  if (s.memory != "device" && s.memory != "host")
    return absl::InvalidArgumentError(
        absl::StrCat("--memory: '", s.memory, "' is not device or host"));
  return absl::OkStatus();
}

namespace {

// Whether a runtime can take the GPU backend here, asked through the public API (a tiny config).
bool GpuBackendAvailable() {
  kvrt_config c = kvrt_config_default();
  c.num_layers = 1;
  c.num_q_heads = 1;
  c.num_kv_heads = 1;
  c.head_dim = 64;
  c.use_gpu = 1;
  kvrt_runtime* rt = nullptr;
  const kvrt_status st = kvrt_runtime_create(&c, &rt);
  kvrt_runtime_destroy(rt);
  return st != KVRT_ERR_UNIMPLEMENTED;
}

}  // namespace

absl::Status ResolveGpu(DecodeSettings* s) {
  if (s->use_gpu == 0 || GpuBackendAvailable()) return absl::OkStatus();
  if (s->use_gpu == -1) {  // "the GPU when available": the host backend, its data in host memory
    s->use_gpu = 0;
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      "no CUDA device is available (or kvrt was built without CUDA); this benchmark runs the GPU "
      "backend unless given --gpu 0 (the host backend) or --gpu -1 (the GPU when available)");
}

absl::StatusOr<kvrt_cold_attention> ParseColdAttention(const std::string& name) {
  if (name == "cpu") return KVRT_COLD_CPU;
  if (name == "fetch") return KVRT_COLD_FETCH;
  if (name == "auto") return KVRT_COLD_AUTO;
  return absl::InvalidArgumentError(
      absl::StrCat("--cold-attention: '", name, "' is not cpu, fetch or auto"));
}

HarnessOptions MakeHarnessOptions(const DecodeSettings& s, const BenchData& data,
                                  kvrt_index_kind kind, kvrt_cold_attention mode, int batch,
                                  bool batched) {
  HarnessOptions o;
  kvrt_config& c = o.config;
  c.num_layers = s.layers;
  c.num_q_heads = data.q_heads;
  c.num_kv_heads = data.kv_heads;
  c.head_dim = data.head_dim;
  c.scale = data.scale;
  c.dtype = KVRT_DTYPE_BF16;
  c.sink_tokens = s.sinks;
  c.window_tokens = s.window;
  c.top_k = s.top_k;
  c.index_kind = kind;
  c.search_effort = s.effort;
  c.worker_threads = s.threads;
  c.use_gpu = s.use_gpu;
  c.check_finite = 0;
  c.group_search = s.group_search;
  c.cold_attention = mode;
  if (s.hot_cache >= 0) c.hot_cache_fraction = static_cast<float>(s.hot_cache);
  if (s.cluster_budget > 0) c.cluster_budget_fraction = static_cast<float>(s.cluster_budget);
  if (s.direct_step >= 0) c.cluster_direct_step = s.direct_step;
  if (s.top_p >= 0) c.cluster_top_p = static_cast<float>(s.top_p);
  if (s.miss_penalty >= 0) c.cluster_miss_penalty = static_cast<float>(s.miss_penalty);
  ApplyClusterOptions(s.cluster, &c);
  o.batch = batch;
  o.device = s.device();
  o.batched = batched;
  o.pipeline = s.pipeline;
  o.warmup = s.warmup;
  o.steps = s.steps;
  o.max_seconds = s.max_seconds;
  return o;
}

}  // namespace kvrt::cli

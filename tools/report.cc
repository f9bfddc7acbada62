#include "tools/report.h"

#include <cmath>
#include <string>

#include "absl/strings/str_format.h"

namespace kvrt::cli {

std::string HumanBytes(double b) {
  const char* unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int i = 0;
  while (b >= 1024 && i < 4) {
    b /= 1024;
    ++i;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", b, unit[i]);
  return buf;
}

nlohmann::json ReportJson(const ReplayReport& r) {
  // Without decode steps nothing was measured: null, where 0 would read as a total miss.
  auto measured = [&r](double v) { return r.steps > 0 ? nlohmann::json(v) : nlohmann::json(); };
  nlohmann::json j;
  j["trace"] = r.trace;
  j["index"] = r.index;
  j["layers"] = r.layers;
  j["q_heads"] = r.q_heads;
  j["kv_heads"] = r.kv_heads;
  j["head_dim"] = r.head_dim;
  j["prompt_tokens"] = r.prompt_tokens;
  j["steps"] = r.steps;
  j["sinks"] = r.sinks;
  j["window"] = r.window;
  j["top_k"] = r.top_k;
  j["effort"] = r.effort;
  j["search"] = r.search;
  j["group_search"] = r.group_search;
  j["recall_at_k"] = measured(r.recall_at_k);
  j["mass_recall"] = measured(r.mass_recall);
  j["output_rel_error_mean"] = measured(r.output_rel_error_mean);
  j["output_rel_error_p99"] = measured(r.output_rel_error_p99);
  j["output_rel_error_max"] = measured(r.output_rel_error_max);
  j["scanned_fraction"] = r.scanned_fraction;
  j["read_fraction"] = r.read_fraction;
  j["retrieved_fraction"] = r.retrieved_fraction;
  j["estimate_samples"] = r.estimate_samples;
  j["estimated_mass"] = r.estimated_mass;
  j["estimate_missed_mass"] = r.estimate_missed_mass;
  j["estimate_log_ratio"] = r.estimate_log_ratio;
  j["head_step_reuse"] = r.head_step_reuse;
  j["kv_step_reuse"] = r.kv_step_reuse;
  j["layer_reuse"] = r.layer_reuse;
  j["latency_us_p50"] = r.latency_us_p50;
  j["latency_us_p99"] = r.latency_us_p99;
  j["append_us_p50"] = r.append_us_p50;
  j["prefill_ms_per_layer"] = r.prefill_ms_per_layer;
  j["cold_tokens_per_layer"] = r.cold_tokens;
  j["cold_tokens_attended_per_head"] = r.cold_tokens_attended_per_head;
  j["gpu_tier_bytes"] = r.gpu_bytes;
  j["host_bytes"] = r.host_bytes;
  j["index_bytes"] = r.index_bytes;
  j["streaming_heads"] = r.streaming_heads;
  j["per_head"] = nlohmann::json::array();
  for (const auto& h : r.heads)
    j["per_head"].push_back(
        {{"layer", h.layer},
         {"head", h.head},
         {"streaming", h.streaming},
         {"tier_mass_calibration", std::isnan(h.tier_mass_calibration)
                                       ? nlohmann::json()
                                       : nlohmann::json(h.tier_mass_calibration)},
         {"recall_at_k", measured(h.recall)},
         {"mass_recall", measured(h.mass)},
         {"output_rel_error_mean", measured(h.error_mean)}});
  j["per_layer"] = nlohmann::json::array();
  for (std::size_t l = 0; l < r.layer_recall.size(); ++l)
    j["per_layer"].push_back({{"layer", l},
                              {"recall_at_k", measured(r.layer_recall[l])},
                              {"mass_recall", measured(r.layer_mass[l])},
                              {"output_rel_error_mean", measured(r.layer_error_mean[l])}});
  return j;
}

namespace {

// n/a for a share with no samples (NaN).
std::string Share(double v) { return std::isnan(v) ? "n/a" : absl::StrFormat("%.3f", v); }

}  // namespace

void PrintHeads(const ReplayReport& r, std::FILE* out) {
  std::fprintf(
      out, "  per head (tier mass = share of exact mass in sinks + window, prompt calibration)\n");
  std::fprintf(out, "    %5s %4s %9s %10s %8s %8s %10s\n", "layer", "head", "policy", "tier_mass",
               "recall", "mass", "err_mean");
  for (const auto& h : r.heads)
    std::fprintf(out, "    %5d %4d %9s %10s %8.3f %8.3f %10.3g\n", h.layer, h.head,
                 h.streaming ? "streaming" : "retrieval", Share(h.tier_mass_calibration).c_str(),
                 h.recall, h.mass, h.error_mean);
}

namespace {

void PrintMemory(const ReplayReport& r, std::FILE* out) {
  std::fprintf(out,
               "  memory      GPU tier %s, host store %s, indexes %s (all layers, one sequence)\n",
               HumanBytes(r.gpu_bytes).c_str(), HumanBytes(r.host_bytes).c_str(),
               HumanBytes(r.index_bytes).c_str());
}

}  // namespace

void PrintReport(const ReplayReport& r, std::FILE* out) {
  std::fprintf(out, "kvrt replay  %s\n", r.trace.c_str());
  std::fprintf(
      out,
      "  shape       %d layers, %d q / %d kv heads, d=%d; %lld prompt tokens, %d decode steps\n",
      r.layers, r.q_heads, r.kv_heads, r.head_dim, static_cast<long long>(r.prompt_tokens),
      r.steps);
  std::fprintf(out,
               "  policy      index=%s top_k=%d effort=%d group_search=%d sinks=%d window=%d\n",
               r.index.c_str(), r.top_k, r.effort, r.group_search ? 1 : 0, r.sinks, r.window);
  std::fprintf(out, "  search      %s\n", r.search.c_str());
  if (r.streaming_heads > 0)
    std::fprintf(out, "  heads       %d of %d served as streaming heads (GPU tier only)\n",
                 r.streaming_heads, static_cast<int>(r.heads.size()));
  if (r.steps == 0) {  // zeros below would read as a total miss
    std::fprintf(out,
                 "  accuracy    none: the trace has no decode steps (its prompt was prefilled; "
                 "prefill %.1f ms/layer)\n",
                 r.prefill_ms_per_layer);
    PrintMemory(r, out);
    return;
  }
  std::fprintf(out,
               "  accuracy vs exact f32 attention over all tokens (per layer, step, q head):\n");
  // A step scores recall@min(k, its tokens) (DESIGN.md, "Metrics"); say so where that is not k.
  const bool k_past_tokens = r.top_k > r.prompt_tokens + 1;
  std::fprintf(out, "    recall@%-4d           %.4f%s\n", r.top_k, r.recall_at_k,
               k_past_tokens ? "  (k = the step's token count where it has fewer)" : "");
  std::fprintf(out, "    attention-mass recall %.4f\n", r.mass_recall);
  std::fprintf(out, "    output rel. error     mean %.3g  p99 %.3g  max %.3g\n",
               r.output_rel_error_mean, r.output_rel_error_p99, r.output_rel_error_max);
  if (r.estimate_samples > 0)
    std::fprintf(out,
                 "    estimate              claims %.4f of the mass, the attended tokens missed "
                 "%.4f (mean log ratio %.2f, %lld head-steps)\n",
                 r.estimated_mass, r.estimate_missed_mass, r.estimate_log_ratio,
                 static_cast<long long>(r.estimate_samples));
  std::fprintf(out,
               "  retrieval   scanned fraction %.4f of cold keys (read %.4f; dot products per "
               "cold key, centroids and landmark bounds included); %.0f cold tokens attended per "
               "head-step (retrieved fraction %.4f); %lld cold tokens per layer\n",
               r.scanned_fraction, r.read_fraction, r.cold_tokens_attended_per_head,
               r.retrieved_fraction, static_cast<long long>(r.cold_tokens));
  std::fprintf(out,
               "  reuse       of a step's cold positions, chosen at the previous step: %s per q "
               "head, %s per kv head (its group's union); by the previous layer at this step: "
               "%s\n",
               Share(r.head_step_reuse).c_str(), Share(r.kv_step_reuse).c_str(),
               Share(r.layer_reuse).c_str());
  std::fprintf(out,
               "  latency     attend per layer-step p50 %.1f us  p99 %.1f us (host backend); "
               "append p50 %.1f us; prefill %.1f ms/layer\n",
               r.latency_us_p50, r.latency_us_p99, r.append_us_p50, r.prefill_ms_per_layer);
  PrintMemory(r, out);
  if (r.layer_recall.size() > 1) {
    std::fprintf(out, "  per layer   ");
    for (std::size_t l = 0; l < r.layer_recall.size(); ++l)
      std::fprintf(out, "L%zu: recall %.3f mass %.3f err %.3g%s", l, r.layer_recall[l],
                   r.layer_mass[l], r.layer_error_mean[l],
                   l + 1 < r.layer_recall.size() ? " | " : "\n");
  }
}

}  // namespace kvrt::cli

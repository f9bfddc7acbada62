// `kvrt inspect`: validates a trace and prints its metadata, tensors and per-layer statistics.
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "tools/cli_checks.h"
#include "tools/command.h"
#include "tools/trace/trace.h"

namespace {

struct InspectArgs {
  std::string path;
  bool attention = false;
  int top_k = 100;
  int sinks = 4;
  int window = 512;
  int steps = 16;
  int layers = 1;
  double ivf = 0.0;
};

struct RowStats {
  double mean_norm = 0;
  int64_t rows = 0;
  int64_t non_finite = 0;
};

// Mean L2 norm of (at most 4096, evenly spaced) rows of a [tokens, heads, d] tensor.
RowStats Norms(const kvrt::trace::TensorView& v) {
  RowStats s;
  const int64_t tokens = v.shape[0], heads = v.shape[1], d = v.shape[2];
  const int64_t rows = tokens * heads;
  const int64_t take = std::min<int64_t>(rows, 4096);
  std::vector<float> row(d);
  const std::size_t row_bytes = static_cast<std::size_t>(d) * kvrt::DTypeSize(v.dtype);
  for (int64_t i = 0; i < take; ++i) {
    const int64_t r = take == rows ? i : i * rows / take;
    kvrt::ConvertToF32(static_cast<const uint8_t*>(v.data) + r * row_bytes, v.dtype, d, row.data());
    double n2 = 0;
    for (float x : row) {
      if (!std::isfinite(x)) ++s.non_finite;
      n2 += double(x) * x;
    }
    s.mean_norm += std::sqrt(n2);
  }
  s.rows = take;
  if (take > 0) s.mean_norm /= take;
  return s;
}

int Run(const InspectArgs& a) {
  auto opened = kvrt::trace::TraceReader::Open(a.path);
  if (!opened.ok()) {
    std::fprintf(stderr, "kvrt inspect: %s\n", std::string(opened.status().message()).c_str());
    return 1;
  }
  const kvrt::trace::TraceReader& r = **opened;
  const kvrt::trace::TraceMeta& m = r.meta();
  std::printf("trace %s: valid kvrt trace (format %s v%d)\n", a.path.c_str(),
              kvrt::trace::kFormatName, kvrt::trace::kFormatVersion);
  std::printf("metadata:\n");
  std::printf("  model          %s\n", m.model.c_str());
  std::printf("  num_layers     %d\n", m.num_layers);
  std::printf("  num_q_heads    %d\n", m.num_q_heads);
  std::printf("  num_kv_heads   %d\n", m.num_kv_heads);
  std::printf("  head_dim       %d\n", m.head_dim);
  std::printf("  dtype          %s\n", std::string(kvrt::DTypeName(m.dtype)).c_str());
  std::printf("  prompt_tokens  %lld\n", static_cast<long long>(m.prompt_tokens));
  std::printf("  decode_steps   %lld\n", static_cast<long long>(m.decode_steps));
  std::printf("  scale          %.9g%s\n", m.scale, m.scale == 0 ? " (1/sqrt(head_dim))" : "");
  std::printf("  post_rotary    %s\n", m.post_rotary ? "true" : "false");
  for (const auto& [k, v] : m.extra) std::printf("  %-14s %s\n", k.c_str(), v.c_str());

  std::printf("tensors:\n");
  std::size_t total = 0;
  int64_t non_finite = 0;
  for (int layer = 0; layer < m.num_layers; ++layer) {
    for (const std::string& part : kvrt::trace::TensorParts()) {
      auto t = r.Tensor(layer, part);
      if (!t.ok()) {
        std::fprintf(stderr, "kvrt inspect: %s\n", std::string(t.status().message()).c_str());
        return 1;
      }
      total += t->bytes;
      std::printf("  %d.%-10s %-5s [%s]  %zu bytes\n", layer, part.c_str(),
                  std::string(kvrt::DTypeName(t->dtype)).c_str(),
                  absl::StrJoin(t->shape, ", ").c_str(), t->bytes);
    }
  }
  std::printf("  total %zu bytes (%.2f MiB)\n", total, total / 1048576.0);

  std::printf("per layer (mean L2 norms over up to 4096 sampled rows per tensor):\n");
  std::printf(
      "  layer  |q| prefill  |k| prefill  |v| prefill  |q| decode  |k| decode  |v| decode\n");
  for (int layer = 0; layer < m.num_layers; ++layer) {
    std::printf("  %5d", layer);
    for (const std::string& part : kvrt::trace::TensorParts()) {
      const RowStats s = Norms(*r.Tensor(layer, part));
      non_finite += s.non_finite;
      std::printf("  %11.3f", s.mean_norm);
    }
    std::printf("\n");
  }
  if (non_finite > 0)
    std::printf("warning: %lld non-finite values in the sampled rows\n",
                static_cast<long long>(non_finite));

  if (a.attention) {
    kvrt::trace::AttentionStatsOptions o;
    o.top_k = a.top_k;
    o.sink_tokens = a.sinks;
    o.window_tokens = a.window;
    o.max_steps = a.steps;
    o.max_layers = a.layers;
    o.ivf_probe_fraction = a.ivf;
    auto st = kvrt::trace::ComputeAttentionStats(r, o);
    if (!st.ok()) {
      std::fprintf(stderr, "kvrt inspect: %s\n", std::string(st.status().message()).c_str());
      return 1;
    }
    std::printf("attention of decode queries (exact softmax, %lld queries):\n",
                static_cast<long long>(st->queries));
    std::printf("  top-%d mass            %.3f\n", a.top_k, st->top_k_mass);
    std::printf("  sink mass (first %d)    %.3f\n", a.sinks, st->sink_mass);
    std::printf("  window mass (last %d) %.3f\n", a.window, st->window_mass);
    std::printf("  top-%d in cold region  %.3f (span %.2f of the prompt)\n", a.top_k,
                st->top_k_cold_share, st->top_k_span);
    std::printf("  max weight (mean)      %.3f; queries with max >= 0.3: %.3f\n", st->max_weight,
                st->sharp_share);
    if (st->ivf_recall >= 0)
      std::printf("  key-only IVF recall@%d %.3f at %.3f of keys scanned\n", a.top_k,
                  st->ivf_recall, st->ivf_scanned);
  }
  return 0;
}

}  // namespace

KVRT_REGISTER_COMMAND("inspect", [](CLI::App& app, int* exit_code) {
  auto args = std::make_shared<InspectArgs>();
  CLI::App* cmd = app.add_subcommand(
      "inspect",
      "Validate a trace file and print its metadata, tensors (shapes, dtypes, bytes) and mean\n"
      "q/k/v norms per layer. With --attention, also measure exact attention of the decode\n"
      "queries: top-k mass, sink and window shares, and how a key-only IVF index fares.");
  cmd->add_option("file", args->path, "trace file (safetensors)")->required();
  cmd->add_flag("--attention", args->attention, "measure exact attention statistics");
  cmd->add_option("--top-k", args->top_k, "k of the top-k statistics")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(1));
  cmd->add_option("--sinks", args->sinks, "sink tokens")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option("--window", args->window, "window tokens")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option("--steps", args->steps, "decode steps measured per layer (0 = all)")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option("--layers", args->layers, "layers measured (0 = all)")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option("--ivf", args->ivf,
                  "share of keys a key-only IVF probe may scan (0 = skip; e.g. 0.05)")
      ->capture_default_str()
      ->check(kvrt::cli::NumberIn(0.0, 1.0));
  cmd->callback([args, exit_code] { *exit_code = Run(*args); });
});

// kvrt bench serve: serving capacity at a fixed memory budget. For each context: the largest
// batch dense attention fits (the whole KV resident), the largest batch kvrt fits (its measured GPU
// bytes per (sequence, layer), and its host store against the machine's RAM), and kvrt's tokens per
// second per layer-step at that batch (kvrt_attend_batch_ex steps, tools/decode_harness.h). The
// dense peer's timing comes from `tools/gpu_bench/sdpa_peer.py --serve` (--dense-json).
// Arithmetic: tools/serve_fit.h; formulas in docs/benchmarks.md, "Serving capacity".
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "tools/accuracy.h"
#include "tools/bench_data.h"
#include "tools/bench_settings.h"
#include "tools/cli_checks.h"
#include "tools/command.h"
#include "tools/decode_harness.h"
#include "tools/options.h"
#include "tools/output_files.h"
#include "tools/replay.h"
#include "tools/report.h"
#include "tools/serve_fit.h"
#include "tools/svg_plot.h"

namespace kvrt::cli {
namespace {

struct BenchServeArgs {
  std::string context = "32768,131072,1048576", gpu_memory = "100GiB", host_memory;
  std::string index = "cluster", cold_attention = "cpu", csv, plot, dense_json;
  int layers_model = 32, max_batch = 64;
  DecodeSettings run;  // shared with bench decode
  BenchDataOptions data;
};

int Usage(const std::string& message) {
  std::fprintf(stderr, "kvrt bench serve: %s\n", message.c_str());
  return 2;
}

// MemTotal of /proc/meminfo in bytes, 0 when unreadable.
int64_t MachineMemory() {
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  int64_t kib = 0;
  while (f >> key >> kib >> unit)
    if (key == "MemTotal:") return kib * 1024;
  return 0;
}

// The dense peer's lines (sdpa_peer.py --serve), by context.
absl::StatusOr<std::map<int64_t, nlohmann::json>> ReadDense(const std::string& path) {
  std::map<int64_t, nlohmann::json> out;
  if (path.empty()) return out;
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat("--dense-json: cannot open ", path));
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] != '{') continue;  // the peer's other output
    auto j = nlohmann::json::parse(line, nullptr, false);
    // Every field read below with its type: a line that lies about one is refused here, not
    // met as an exception after the measurement.
    if (j.is_discarded() || !j.is_object() || !j.contains("context") ||
        !j["context"].is_number_integer() || !j.contains("tokens_per_s") ||
        !j["tokens_per_s"].is_number() || (j.contains("batch") && !j["batch"].is_number_integer()))
      return absl::InvalidArgumentError(
          absl::StrCat("--dense-json ", path, ": not a sdpa_peer.py --serve line: ", line));
    out[j["context"].get<int64_t>()] = j;
  }
  return out;
}

struct ServeRow {
  int64_t context = 0, dense_per_seq = 0, dense_batch = 0;
  double gpu_per_seq_layer = 0, host_per_seq_layer = 0;
  KvrtFit fit;
  int measured_batch = 0;
  double p50 = 0, p99 = 0, tokens_per_s = 0;
  double dense_tokens_per_s = -1;  // -1: not given
  int64_t dense_peer_batch = -1;
};

void Measure(const HarnessResult& r, int batch, ServeRow* row) {
  row->measured_batch = batch;
  row->p50 = Percentile(r.latency_us, 0.5);
  row->p99 = Percentile(r.latency_us, 0.99);
  row->tokens_per_s = row->p50 > 0 ? batch / (row->p50 * 1e-6) : 0;
}

int Run(BenchServeArgs a) {
  auto contexts = ParseIntList("--context", a.context, 1, int64_t{1} << 36);
  if (!contexts.ok()) return Usage(std::string(contexts.status().message()));
  auto gpu_budget = ParseBytes("--gpu-memory", a.gpu_memory);
  if (!gpu_budget.ok()) return Usage(std::string(gpu_budget.status().message()));
  int64_t host_budget = MachineMemory();
  if (!a.host_memory.empty()) {
    auto h = ParseBytes("--host-memory", a.host_memory);
    if (!h.ok()) return Usage(std::string(h.status().message()));
    if (*h <= 0) return Usage("--host-memory: " + a.host_memory + " is no memory; give a size > 0");
    host_budget = *h;
  }
  if (host_budget <= 0) return Usage("--host-memory: /proc/meminfo is unreadable; give a size");
  auto kind = ParseIndexKindOption(a.index);
  if (!kind.ok()) return Usage("--index: " + std::string(kind.status().message()));
  auto mode = ParseColdAttention(a.cold_attention);
  if (!mode.ok()) return Usage(std::string(mode.status().message()));
  if (auto st = CheckDecodeSettings(a.run); !st.ok()) return Usage(std::string(st.message()));
  if (auto st = ResolveGpu(&a.run); !st.ok()) return Usage(std::string(st.message()));
  if (auto st = CheckBenchDataOptions(a.data); !st.ok()) return Usage(std::string(st.message()));
  for (int64_t c : *contexts)
    if (c <= a.run.sinks + a.run.window)
      return Usage(absl::StrCat("--context: ", c, " leaves no cold tokens (sinks ", a.run.sinks,
                                " + window ", a.run.window, ")"));
  if (auto st = CheckOutputsApart({{"--trace", a.data.trace}, {"--dense-json", a.dense_json}},
                                  {{"--csv", a.csv}, {"--plot", a.plot}});
      !st.ok())
    return Usage(std::string(st.message()));
  auto dense = ReadDense(a.dense_json);
  if (!dense.ok()) return Usage(std::string(dense.status().message()));

  std::printf(
      "kvrt bench serve: GPU memory for KV %s, host memory %s, model %d layers (%d measured), "
      "index %s, cold_attention %s, window %d, sinks %d, top-k %d, batch <= %d\n",
      HumanBytes(static_cast<double>(*gpu_budget)).c_str(),
      HumanBytes(static_cast<double>(host_budget)).c_str(), a.layers_model, a.run.layers,
      a.index.c_str(), a.cold_attention.c_str(), a.run.window, a.run.sinks, a.run.top_k,
      a.max_batch);
  std::vector<ServeRow> rows;
  int rc = 0;
  for (int64_t context : *contexts) {
    auto data = MakeBenchData(a.data, context, a.run.warmup + a.run.steps);
    if (!data.ok()) {
      std::fprintf(stderr, "kvrt bench serve: context %lld: %s\n",
                   static_cast<long long>(context), std::string(data.status().message()).c_str());
      rc = 1;
      continue;
    }
    ServeRow row;
    row.context = context;
    const ModelShape shape{a.layers_model, data->kv_heads, data->head_dim, 2};
    row.dense_per_seq = DenseBytesPerSequence(shape, context);
    row.dense_batch = SequencesThatFit(*gpu_budget, row.dense_per_seq);
    // One sequence first: kvrt's bytes per (sequence, layer) after prefill and warm-up.
    auto one = RunDecodeHarness(MakeHarnessOptions(a.run, *data, *kind, *mode, 1, false), *data);
    if (!one.ok()) {
      std::fprintf(stderr, "kvrt bench serve: context %lld, B=1: %s\n",
                   static_cast<long long>(context), std::string(one.status().message()).c_str());
      rc = 1;
      continue;
    }
    const kvrt_stats& s = one->begin;
    row.gpu_per_seq_layer = static_cast<double>(s.gpu_allocated_bytes) / a.run.layers;
    row.host_per_seq_layer = static_cast<double>(s.host_bytes + s.index_bytes) / a.run.layers;
    row.fit = FitKvrt(*gpu_budget, host_budget, a.layers_model, row.gpu_per_seq_layer,
                      row.host_per_seq_layer);
    // The batch this machine can run with the measured layers (their host stores must fit in
    // 80% of the host memory), capped by --max-batch.
    const int64_t runnable = SequencesThatFit(
        host_budget / 10 * 8, static_cast<int64_t>(row.host_per_seq_layer * a.run.layers) + 1);
    const int batch = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>({row.fit.batch, a.max_batch, runnable})));
    if (row.fit.batch == 0) {
      // No sequence fits the budgets: nothing to serve, so no throughput (the row says batch 0).
    } else if (batch == 1) {
      Measure(*one, 1, &row);
    } else {
      auto many = RunDecodeHarness(MakeHarnessOptions(a.run, *data, *kind, *mode, batch, true), *data);
      if (!many.ok()) {
        std::fprintf(stderr, "kvrt bench serve: context %lld, B=%d: %s\n",
                     static_cast<long long>(context), batch,
                     std::string(many.status().message()).c_str());
        rc = 1;
        continue;
      }
      Measure(*many, batch, &row);
    }
    if (auto it = dense->find(context); it != dense->end()) {
      row.dense_tokens_per_s = it->second["tokens_per_s"].get<double>();
      if (it->second.contains("batch")) row.dense_peer_batch = it->second["batch"].get<int64_t>();
      if (row.dense_peer_batch >= 0 && row.dense_peer_batch != row.dense_batch)
        std::fprintf(stderr,
                     "kvrt bench serve: context %lld: the dense peer ran batch %lld, this "
                     "arithmetic gives %lld (different budget or shape?)\n",
                     static_cast<long long>(context), static_cast<long long>(row.dense_peer_batch),
                     static_cast<long long>(row.dense_batch));
    }
    rows.push_back(row);
    if (row.fit.batch == 0) {
      std::printf(
          "context %lld: dense %s/seq -> batch %lld | kvrt GPU %s/seq, host %s/seq -> batch 0 "
          "(GPU allows %lld, host %lld: %s binds): no sequence fits, not measured\n",
          static_cast<long long>(context),
          HumanBytes(static_cast<double>(row.dense_per_seq)).c_str(),
          static_cast<long long>(row.dense_batch),
          HumanBytes(static_cast<double>(row.fit.gpu_per_seq)).c_str(),
          HumanBytes(static_cast<double>(row.fit.host_per_seq)).c_str(),
          static_cast<long long>(row.fit.by_gpu), static_cast<long long>(row.fit.by_host),
          row.fit.binding.c_str());
      std::fflush(stdout);
      continue;
    }
    std::printf(
        "context %lld: dense %s/seq -> batch %lld | kvrt GPU %s/seq, host %s/seq -> batch %lld "
        "(GPU allows %lld, host %lld: %s binds) | measured B=%d: p50 %.1f us, p99 %.1f us per "
        "layer-step, %.0f tokens/s per layer%s\n",
        static_cast<long long>(context), HumanBytes(static_cast<double>(row.dense_per_seq)).c_str(),
        static_cast<long long>(row.dense_batch),
        HumanBytes(static_cast<double>(row.fit.gpu_per_seq)).c_str(),
        HumanBytes(static_cast<double>(row.fit.host_per_seq)).c_str(),
        static_cast<long long>(row.fit.batch), static_cast<long long>(row.fit.by_gpu),
        static_cast<long long>(row.fit.by_host), row.fit.binding.c_str(), row.measured_batch,
        row.p50, row.p99, row.tokens_per_s,
        row.dense_tokens_per_s >= 0
            ? absl::StrFormat("; dense %.1f tokens/s", row.dense_tokens_per_s).c_str()
            : "");
    std::fflush(stdout);
  }
  std::string csv =
      "context,dense_bytes_per_seq,dense_batch,kvrt_gpu_bytes_per_seq_layer,kvrt_host_bytes_per_"
      "seq_layer,kvrt_gpu_bytes_per_seq,kvrt_host_bytes_per_seq,kvrt_batch_gpu,kvrt_batch_host,"
      "kvrt_batch,binding,measured_batch,p50_us,p99_us,kvrt_tokens_per_s,dense_tokens_per_s\n";
  PlotSeries kvrt_series{"kvrt " + a.index + " (measured batch)", {}, {}},
      dense_series{"dense SDPA (largest batch)", {}, {}};
  double y_max = 0;
  for (const auto& r : rows) {
    // A context where no sequence fits was not measured: its cells stay empty and its point off
    // the plot, where zeros would read as measured.
    const bool measured = r.measured_batch > 0;
    auto cell = [measured](double v) { return measured ? absl::StrCat(v) : std::string(); };
    csv += absl::StrCat(r.context, ",", r.dense_per_seq, ",", r.dense_batch, ",",
                        static_cast<int64_t>(r.gpu_per_seq_layer), ",",
                        static_cast<int64_t>(r.host_per_seq_layer), ",", r.fit.gpu_per_seq, ",",
                        r.fit.host_per_seq, ",", r.fit.by_gpu, ",", r.fit.by_host, ",", r.fit.batch,
                        ",", r.fit.binding, ",", measured ? absl::StrCat(r.measured_batch) : "",
                        ",", cell(r.p50), ",", cell(r.p99), ",", cell(r.tokens_per_s), ",",
                        r.dense_tokens_per_s >= 0 ? absl::StrCat(r.dense_tokens_per_s) : "", "\n");
    if (measured) {
      kvrt_series.x.push_back(static_cast<double>(r.context));
      kvrt_series.y.push_back(r.tokens_per_s);
      y_max = std::max(y_max, r.tokens_per_s);
    }
    if (r.dense_tokens_per_s >= 0) {
      dense_series.x.push_back(static_cast<double>(r.context));
      dense_series.y.push_back(r.dense_tokens_per_s);
      y_max = std::max(y_max, r.dense_tokens_per_s);
    }
  }
  std::string plot;
  if (!a.plot.empty()) {
    PlotSpec spec{absl::StrCat("Decode throughput per layer at ", a.gpu_memory, " of GPU memory"),
                  "context (tokens)", "tokens/s per layer-step", true, 0,
                  y_max > 0 ? y_max * 1.1 : 1};
    std::vector<PlotSeries> series{kvrt_series};
    if (!dense_series.x.empty()) series.push_back(dense_series);
    plot = RenderSvg(spec, series);
  }
  for (auto st : {WriteTextFile("--csv", a.csv, csv), WriteTextFile("--plot", a.plot, plot)})
    if (!st.ok()) {
      std::fprintf(stderr, "kvrt bench serve: %s\n", std::string(st.message()).c_str());
      rc = 1;
    }
  return rc;
}

}  // namespace
}  // namespace kvrt::cli

KVRT_REGISTER_COMMAND("bench serve", [](CLI::App& app, int* exit_code) {
  auto* bench = kvrt::cli::GetOrAddGroup(app, "bench", "Benchmarks (speed and quality; not tests)");
  auto args = std::make_shared<kvrt::cli::BenchServeArgs>();
  auto* cmd = bench->add_subcommand(
      "serve",
      "Serving capacity at a fixed memory budget, per context: the largest batch dense attention "
      "fits (whole KV resident), the largest batch kvrt fits (measured GPU bytes per sequence "
      "and layer scaled to the model's layers, and its host store against the host memory; the "
      "binding limit is named), and kvrt's tokens/s per layer-step at that batch "
      "(kvrt_attend_batch_ex; capped by --max-batch and by what the measured layers need in host "
      "memory). CSV and an SVG plot of throughput against context; the dense peer's tokens/s "
      "from `python3 tools/gpu_bench/sdpa_peer.py --serve` (--dense-json).");
  cmd->add_option("--context", args->context, "comma-separated context lengths (tokens/sequence)")
      ->capture_default_str();
  cmd->add_option("--gpu-memory", args->gpu_memory,
                  "GPU memory for KV, e.g. 100GiB (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
      ->capture_default_str();
  cmd->add_option("--host-memory", args->host_memory,
                  "host memory for kvrt's host stores (default: MemTotal of /proc/meminfo)");
  cmd->add_option("--layers-model", args->layers_model,
                  "the model's layers (bytes per layer are scaled to it)")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(1, 1024));
  cmd->add_option("--max-batch", args->max_batch, "largest batch measured")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(1, 4096));
  cmd->add_option("--index", args->index, "index kind")->capture_default_str();
  cmd->add_option("--cold-attention", args->cold_attention, "cpu, fetch or auto")
      ->capture_default_str();
  args->run.steps = 20;
  args->run.max_seconds = 10;
  kvrt::cli::AddDecodeSettingsOptions(cmd, &args->run);
  kvrt::cli::AddBenchDataOptions(cmd, &args->data);
  cmd->add_option("--dense-json", args->dense_json,
                  "JSON lines of `sdpa_peer.py --serve` (dense tokens/s per context)");
  cmd->add_option("--csv", args->csv, "write the table as CSV")->check(kvrt::cli::OutputFile());
  cmd->add_option("--plot", args->plot, "write throughput against context (SVG)")
      ->check(kvrt::cli::OutputFile());
  cmd->callback([args, exit_code] { *exit_code = kvrt::cli::Run(*args); });
});

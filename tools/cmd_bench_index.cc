// kvrt bench index: recall vs scanned fraction for every index kind over a sweep of search
// effort, all measured against one exact reference, through the public C API.
#include <cstdio>
#include <map>
#include <memory>
#include <thread>

#include "tools/cli_checks.h"
#include "tools/command.h"
#include "tools/options.h"
#include "tools/output_files.h"
#include "tools/replay.h"
#include "tools/report.h"
#include "tools/svg_plot.h"

namespace {

struct BenchIndexArgs {
  std::string trace, indexes = "flat,ivf,hnsw,landmark,attention-aware", efforts, csv, json, plot,
                     group_search;  // empty: each kind's library default
  int top_k = 100, sinks = 4, window = 512, steps = 16, threads = 0;
  bool quiet = false;
};

// Default sweeps per kind (effort means nprobe, ef, blocks or beam width).
std::vector<int> DefaultEfforts(kvrt_index_kind kind, int k) {
  switch (kind) {
    case KVRT_INDEX_IVF: return {1, 2, 4, 8, 16, 32, 64, 128};
    case KVRT_INDEX_HNSW: return {k, 2 * k, 4 * k, 8 * k, 16 * k};
    case KVRT_INDEX_LANDMARK: return {k / 16 + 1, k / 8 + 1, k / 4 + 1, k / 2 + 1, k, 2 * k};
    case KVRT_INDEX_ATTENTION_AWARE: return {k, 2 * k, 4 * k, 8 * k, 16 * k};
    default: return {0};
  }
}

int Run(const BenchIndexArgs& a) {
  std::vector<kvrt_index_kind> kinds;
  for (const auto& name : kvrt::cli::SplitList(a.indexes)) {
    auto k = kvrt::cli::ParseIndexKindOption(name);
    if (!k.ok()) {
      std::fprintf(stderr, "kvrt bench index: %s\n", std::string(k.status().message()).c_str());
      return 2;
    }
    kinds.push_back(*k);
  }
  if (kinds.empty()) {
    std::fprintf(stderr, "kvrt bench index: --index names no index kind\n");
    return 2;
  }
  std::vector<int> efforts;
  if (!kvrt::cli::SplitList(a.efforts).empty()) {
    // search_effort's range in kvrt_runtime_create (kvrt.h).
    auto parsed = kvrt::cli::ParseIntList("--effort", a.efforts, 0, 1 << 24);
    if (!parsed.ok()) {
      std::fprintf(stderr, "kvrt bench index: %s\n",
                   std::string(parsed.status().message()).c_str());
      return 2;
    }
    efforts.assign(parsed->begin(), parsed->end());
  }
  // 1 or 0 as given; -1: the library's default for the kind (per q head for attention-aware and
  // landmark, per kv head for cluster), what replay and a decoder get.
  std::vector<int> group_modes;
  for (const auto& g : kvrt::cli::SplitList(a.group_search)) {
    if (g != "0" && g != "1") {
      std::fprintf(stderr, "kvrt bench index: --group-search: '%s' is not 0 or 1\n", g.c_str());
      return 2;
    }
    group_modes.push_back(g == "1" ? 1 : 0);
  }
  if (group_modes.empty()) group_modes = {-1};
  if (auto st = kvrt::cli::CheckOutputsApart(
          {{"--trace", a.trace}}, {{"--csv", a.csv}, {"--json", a.json}, {"--plot", a.plot}});
      !st.ok()) {
    std::fprintf(stderr, "kvrt bench index: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  auto trace = kvrt::trace::TraceReader::Open(a.trace);
  if (!trace.ok()) {
    std::fprintf(stderr, "kvrt bench index: %s\n", std::string(trace.status().message()).c_str());
    return 1;
  }
  auto ref = kvrt::cli::ComputeExactReference(**trace, a.top_k, a.steps, !a.quiet);
  if (!ref.ok()) {
    std::fprintf(stderr, "kvrt bench index: %s\n", std::string(ref.status().message()).c_str());
    return 1;
  }
  if (ref->steps == 0) {
    std::fprintf(stderr, "kvrt bench index: %s has no decode steps: nothing to measure recall on\n",
                 a.trace.c_str());
    return 1;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  std::printf("kvrt bench index  %s  (top-k %d, %d steps, window %d, sinks %d, %d threads)\n",
              a.trace.c_str(), a.top_k, ref->steps, a.window, a.sinks,
              a.threads ? a.threads : static_cast<int>(hw));
  std::printf("%-24s %7s %9s %9s %10s %10s %9s %9s %10s %10s %10s %9s\n", "index", "effort",
              "recall@k", "mass", "err_mean", "err_p99", "scanned", "read", "build_ms", "p50_us",
              "p99_us", "idx_B/key");
  nlohmann::json rows = nlohmann::json::array();
  std::vector<kvrt::cli::PlotSeries> recall_series, mass_series;
  std::string csv =
      "index,group_search,effort,top_k,recall_at_k,mass_recall,output_rel_error_mean,output_rel_"
      "error_p99,"
      "scanned_fraction,read_fraction,build_ms_per_layer,latency_us_p50,latency_us_p99,index_bytes_"
      "per_key,retrieved_fraction\n";
  for (auto kind : kinds)
    for (int mode : group_modes) {
      // Kinds without a shared group search give the same figures either way: run them once.
      const bool shares = kind == KVRT_INDEX_ATTENTION_AWARE || kind == KVRT_INDEX_LANDMARK ||
                          kind == KVRT_INDEX_CLUSTER;
      if (!shares && mode != group_modes.front()) continue;
      const bool group = mode < 0 ? kind == KVRT_INDEX_CLUSTER : mode == 1;
      const std::string name =
          std::string(kvrt::cli::IndexKindOptionName(kind)) +
          (shares && group_modes.size() > 1 ? (group ? "/group" : "/per-head") : "");
      kvrt::cli::PlotSeries rs{name, {}, {}}, ms = rs;
      std::vector<int> sweep = efforts.empty() ? DefaultEfforts(kind, a.top_k) : efforts;
      if (kind == KVRT_INDEX_FLAT || kind == KVRT_INDEX_EXACT)
        sweep = {0};  // effort is meaningless
      kvrt::cli::ReplayOptions o;
      o.index = kind;
      o.top_k = a.top_k;
      o.sinks = a.sinks;
      o.window = a.window;
      o.threads = a.threads;
      o.max_steps = a.steps;
      o.progress = !a.quiet;
      o.group_search = group;
      // The cluster kind's per-kv-head sharing is its group selection, not the index search:
      // "/per-head" runs one selection per q head (both rows were the library's default, group).
      if (kind == KVRT_INDEX_CLUSTER && mode >= 0) o.cluster.group_select = mode;
      // One build per kind; every effort attends to the same states.
      auto reports = kvrt::cli::RunReplaySweep(**trace, *ref, o, sweep);
      if (!reports.ok()) {
        std::fprintf(stderr, "kvrt bench index: %s: %s\n", kvrt::cli::IndexKindOptionName(kind),
                     std::string(reports.status().message()).c_str());
        return 1;
      }
      for (const auto& report : *reports) {
        const auto* r = &report;
        const int effort = r->effort;
        const double cold_keys = static_cast<double>(r->cold_tokens) * r->layers * r->kv_heads;
        const double bytes_per_key = cold_keys > 0 ? r->index_bytes / cold_keys : 0;
        std::printf("%-24s %7d %9.4f %9.4f %10.3g %10.3g %9.4f %9.4f %10.1f %10.1f %10.1f %9.1f\n",
                    name.c_str(), effort, r->recall_at_k, r->mass_recall, r->output_rel_error_mean,
                    r->output_rel_error_p99, r->scanned_fraction, r->read_fraction,
                    r->prefill_ms_per_layer, r->latency_us_p50, r->latency_us_p99, bytes_per_key);
        std::fflush(stdout);
        char line[512];
        std::snprintf(line, sizeof line,
                      "%s,%d,%d,%d,%.6f,%.6f,%.6g,%.6g,%.6f,%.6f,%.3f,%.2f,%.2f,%.2f,%.6f\n",
                      r->index.c_str(), group ? 1 : 0, effort, a.top_k, r->recall_at_k,
                      r->mass_recall, r->output_rel_error_mean, r->output_rel_error_p99,
                      r->scanned_fraction, r->read_fraction, r->prefill_ms_per_layer,
                      r->latency_us_p50, r->latency_us_p99, bytes_per_key, r->retrieved_fraction);
        csv += line;
        auto j = kvrt::cli::ReportJson(*r);
        j["index_bytes_per_key"] = bytes_per_key;
        rows.push_back(j);
        rs.x.push_back(r->scanned_fraction);
        rs.y.push_back(r->recall_at_k);
        ms.x.push_back(r->scanned_fraction);
        ms.y.push_back(r->mass_recall);
      }
      recall_series.push_back(rs);
      mass_series.push_back(ms);
    }
  std::string svg;
  if (!a.plot.empty()) {
    kvrt::cli::PlotSpec spec;
    spec.title = "recall@" + std::to_string(a.top_k) + " vs scanned fraction of cold keys";
    spec.x_label = "scanned fraction (dot products, centroids included / cold keys, log)";
    spec.y_label = "recall@" + std::to_string(a.top_k);
    svg = kvrt::cli::RenderSvg(spec, recall_series);
  }
  // Every output is attempted: one that fails loses no other.
  int rc = 0;
  for (const auto& st : {kvrt::cli::WriteTextFile("--csv", a.csv, csv),
                         kvrt::cli::WriteTextFile("--json", a.json, rows.dump(2) + "\n"),
                         kvrt::cli::WriteTextFile("--plot", a.plot, svg)})
    if (!st.ok()) {
      std::fprintf(stderr, "kvrt bench index: %s\n", std::string(st.message()).c_str());
      rc = 1;
    }
  return rc;
}

}  // namespace

KVRT_REGISTER_COMMAND("bench index", [](CLI::App& app, int* exit_code) {
  auto* bench = kvrt::cli::GetOrAddGroup(app, "bench", "Benchmarks (speed and quality; not tests)");
  auto args = std::make_shared<BenchIndexArgs>();
  auto* cmd = bench->add_subcommand(
      "index",
      "Sweep search effort for each index kind on a trace and report recall@k, attention-mass "
      "recall, output error, scanned fraction, build time, attend latency (p50/p99) and index "
      "bytes per key, all against exact attention. Writes CSV/JSON and an SVG recall-vs-scanned "
      "plot with every kind on one figure.");
  cmd->add_option("--trace", args->trace, "trace file")->required()->check(CLI::ExistingFile);
  cmd->add_option("--index", args->indexes, "comma-separated kinds")->capture_default_str();
  cmd->add_option("--effort", args->efforts,
                  "comma-separated efforts for every kind (default: a sweep per kind)");
  cmd->add_option("--top-k", args->top_k, "k retrieved and of recall@k")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(1, 1 << 20));
  cmd->add_option("--sinks", args->sinks, "sink tokens")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(0, 1 << 20));
  cmd->add_option("--window", args->window, "window tokens")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(1, 1 << 24));
  cmd->add_option("--steps", args->steps, "decode steps replayed per configuration (0 = all)")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option("--threads", args->threads, "CPU worker threads (0 = all)")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option(
      "--group-search", args->group_search,
      "GQA search modes to compare: 1 = one search per kv head for its q heads (cluster: one "
      "selection per kv head), 0 = one per q head; '0,1' runs both (attention-aware, "
      "landmark and cluster; other kinds search per q head either way). Default: each "
      "kind's library default, as replay runs it (per kv head for cluster, per q head for "
      "the others)");
  cmd->add_option("--csv", args->csv, "write the table as CSV")->check(kvrt::cli::OutputFile());
  cmd->add_option("--json", args->json, "write every report as JSON")
      ->check(kvrt::cli::OutputFile());
  cmd->add_option("--plot", args->plot, "write the recall-vs-scanned plot (SVG)")
      ->check(kvrt::cli::OutputFile());
  cmd->add_flag("--quiet", args->quiet, "no progress on stderr");
  cmd->callback([args, exit_code] { *exit_code = Run(*args); });
});

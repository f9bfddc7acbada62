// kvrt replay FILE: prefill, then every decode step, every output compared with exact attention.
#include <cstdio>
#include <memory>

#include "tools/cli_checks.h"
#include "tools/cluster_options.h"
#include "tools/command.h"
#include "tools/output_files.h"
#include "tools/replay.h"
#include "tools/report.h"

namespace {

struct ReplayArgs {
  std::string file, index = "flat", json;
  int sinks = 4, window = 512, top_k = 100, effort = 0, threads = 0, steps = 0;
  bool quiet = false, per_head = false;
  int group_search = 0;
  kvrt::cli::ClusterOptions cluster;
  double streaming_threshold = 0;
};

int RunReplayCommand(const ReplayArgs& a) {
  auto kind = kvrt::cli::ParseIndexKindOption(a.index);
  if (!kind.ok()) {
    std::fprintf(stderr, "kvrt replay: %s\n", std::string(kind.status().message()).c_str());
    return 2;
  }
  if (auto st = kvrt::cli::CheckOutputsApart({{"trace", a.file}}, {{"--json", a.json}}); !st.ok()) {
    std::fprintf(stderr, "kvrt replay: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  auto trace = kvrt::trace::TraceReader::Open(a.file);
  if (!trace.ok()) {
    std::fprintf(stderr, "kvrt replay: %s\n", std::string(trace.status().message()).c_str());
    return 1;
  }
  // The threshold applies to a share measured on the prompt's queries; without a prompt there is
  // no measurement, and streaming every head on an assumed share would be silent garbage.
  if (a.streaming_threshold > 0 && (*trace)->meta().prompt_tokens == 0) {
    std::fprintf(stderr,
                 "kvrt replay: --streaming-threshold calibrates each head on the trace's prompt, "
                 "and %s has no prompt tokens\n",
                 a.file.c_str());
    return 2;
  }
  auto ref = kvrt::cli::ComputeExactReference(**trace, a.top_k, a.steps, !a.quiet);
  if (!ref.ok()) {
    std::fprintf(stderr, "kvrt replay: %s\n", std::string(ref.status().message()).c_str());
    return 1;
  }
  kvrt::cli::ReplayOptions o;
  o.index = *kind;
  o.sinks = a.sinks;
  o.window = a.window;
  o.top_k = a.top_k;
  o.effort = a.effort;
  o.threads = a.threads;
  o.max_steps = a.steps;
  o.progress = !a.quiet;
  o.streaming_threshold = a.streaming_threshold;
  o.group_search = a.group_search != 0;
  o.cluster = a.cluster;
  auto report = kvrt::cli::RunReplay(**trace, *ref, o);
  if (!report.ok()) {
    std::fprintf(stderr, "kvrt replay: %s\n", std::string(report.status().message()).c_str());
    return 1;
  }
  kvrt::cli::PrintReport(*report, stdout);
  if (a.per_head) kvrt::cli::PrintHeads(*report, stdout);
  if (!a.json.empty()) {
    const std::string text = kvrt::cli::ReportJson(*report).dump(2) + "\n";
    if (auto st = kvrt::cli::WriteTextFile("--json", a.json, text); !st.ok()) {
      std::fprintf(stderr, "kvrt replay: %s\n", std::string(st.message()).c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace

KVRT_REGISTER_COMMAND("replay", [](CLI::App& app, int* exit_code) {
  auto args = std::make_shared<ReplayArgs>();
  auto* cmd = app.add_subcommand(
      "replay",
      "Replay a trace through libkvrt: prefill each layer, then append and attend every decode "
      "step; compare every output with exact f32 attention over all tokens and print recall@k, "
      "attention-mass recall, output error, scanned fraction, latency and memory.");
  cmd->add_option("file", args->file, "trace file (safetensors, see docs/traces.md)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--index", args->index,
                  "cold-token retrieval: exact (all cold tokens), flat (exact top-k), ivf, hnsw, "
                  "landmark, attention-aware, cluster (two-level: a token budget of clusters "
                  "attended, the rest estimated)")
      ->capture_default_str();
  cmd->add_option("--sinks", args->sinks, "sink tokens kept on the GPU tier")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(0, 1 << 20));
  cmd->add_option("--window", args->window, "recent tokens kept on the GPU tier")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(1, 1 << 24));
  cmd->add_option("--top-k", args->top_k,
                  "cold tokens retrieved per q head and step; also the k of recall@k")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(1, 1 << 20));
  cmd->add_option("--effort", args->effort,
                  "index search effort (nprobe, ef, blocks, beam); 0 = the kind's default")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option("--threads", args->threads, "CPU worker threads; 0 = all")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option("--steps", args->steps, "replay only the first N decode steps; 0 = all")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option("--json", args->json, "also write the report as JSON to this file")
      ->check(kvrt::cli::OutputFile());
  cmd->add_option(
         "--streaming-threshold", args->streaming_threshold,
         "serve a head from the GPU tier alone (streaming head, DuoAttention) when its share "
         "of exact attention mass in sinks + window, calibrated on the prompt's last 16 "
         "queries, is at least this; 0 = every head retrieves")
      ->capture_default_str()
      ->check(kvrt::cli::NumberIn(0.0, 1.0));
  cmd->add_option("--group-search", args->group_search,
                  "GQA: 1 = one index search per kv head for its q heads, 0 = one per q head")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(0, 1));
  kvrt::cli::AddClusterOptions(cmd, &args->cluster);
  cmd->add_flag("--per-head", args->per_head, "print the per-(layer, head) table");
  cmd->add_flag("--quiet", args->quiet, "no progress on stderr");
  cmd->callback([args, exit_code] { *exit_code = RunReplayCommand(*args); });
});

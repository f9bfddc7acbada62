// kvrt bench decode: per layer-step latency of the decode path (append 1 token + attend, for B
// sequences) through the public C API, with the split of each step from kvrt_stats' timing
// counters (GPU attention, D2H, CPU search, CPU attention, H2D, merge, idle), and beside it the
// accuracy of the same run: recall@k, attention-mass recall and output error against exact f32
// attention over all tokens, on a few of the measured steps (computed after the timed loop).
//
// Shape defaults to an 8B model layer (32 q / 8 kv heads, d=128, bf16), sinks 4, window 2048,
// top-k 100. Each (sequence, layer) is prefilled with sinks + cold + window tokens, so exactly
// `cold` tokens sit in the host store. K/V/q: trace-like (kvrt gen-trace's generator at that size,
// the default), random, or a recorded trace (tools/bench_data.h).
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "kvrt.h"
#include "tools/accuracy.h"
#include "tools/bench_data.h"
#include "tools/bench_settings.h"
#include "tools/cli_checks.h"
#include "tools/command.h"
#include "tools/decode_harness.h"
#include "tools/options.h"
#include "tools/output_files.h"
#include "tools/replay.h"

namespace kvrt::cli {
namespace {

// The table's index column: the longest row name, "attention-aware/batch-serial".
constexpr int kIndexWidth = 28;

struct BenchDecodeArgs {
  std::string cold = "4096,32768,131072,524288,1048576", batch = "1,16", indexes = "flat,landmark";
  std::string csv, cold_attention = "cpu", attend = "threads";
  DecodeSettings run;               // shared with bench serve
  int64_t max_cold_batch = 131072;  // batch > 1 only up to this cold size (host memory)
  BenchDataOptions data;            // --keys, --trace, --seed, --needles, shape
  int accuracy_steps = 8, accuracy_every = 4;
};

struct Row {
  std::string index;
  int64_t cold = 0;
  int batch = 0;
  int samples = 0;
  double p50 = 0, p99 = 0, mean = 0;  // us per layer-step (all B sequences)
  // Mean per attend (one sequence), us.
  double gpu_attn = 0, d2h = 0, search = 0, cpu_attn = 0, h2d = 0, merge = 0, idle = 0, attend = 0;
  double append = 0;                 // mean append call, us
  double gpu_mib_per_seq_layer = 0;  // GPU-tier buffers per (sequence, layer)
  double scanned = 0;                // keys scored / cold keys searchable
  double retrieved = 0;              // cold tokens attended / cold keys searchable
  AccuracySummary accuracy;          // of the captured steps (sequence 0, layer 0)
  double fetch_share = 0;            // share of layer attends run in fetch mode
  // GPU hot cache, per attend: row groups found in it / copied into it, MB copied.
  double hot_hits = 0, hot_misses = 0, hot_h2d_mb = 0, hot_cpu_us = 0;
  // The direct step: share of attends that ran it, MB read over PCIe per attend.
  double direct_share = 0, direct_host_mb = 0;
  bool batched = false;  // kvrt_attend_batch for the B sequences
  bool serial_appends = false;  // their appends from the calling thread, in order
  double setup_s = 0;
  double prefill_ms = 0;        // mean kvrt_prefill of one (sequence, layer); device pointers with
                                // --memory device
  double build_gpu_ms = 0;      // of it, the cluster kind's GPU build (time_segment_build_ns)
  int64_t segments_gpu = 0;     // (kv head, segment) pairs that build clustered
  double prefill_ready_ms = 0;  // until its background work is done (kvrt_seq_wait)
  bool device = false;
};

// One configuration: index kind, cold size, batch.
// batched: B > 1 sequences attend through one kvrt_attend_batch_ex call per layer-step, their
// appends from one thread each, or (serial_appends) from the calling thread in order; else one
// thread per sequence appends and attends.
bool RunOne(const BenchDecodeArgs& a, const BenchData& data, kvrt_index_kind kind,
            const std::string& kind_name, kvrt_cold_attention mode, bool batched,
            bool serial_appends, int64_t cold, int batch, Row* row) {
  HarnessOptions o = MakeHarnessOptions(a.run, data, kind, mode, batch, batched);
  o.serial_appends = batched && serial_appends;
  o.config.record_attended = a.accuracy_steps > 0 ? 1 : 0;
  o.capture_steps = CaptureSchedule(a.run.warmup, a.run.steps, a.accuracy_every, a.accuracy_steps);
  auto res = RunDecodeHarness(o, data);
  if (!res.ok()) {
    std::fprintf(stderr, "kvrt bench decode: %s cold %lld B=%d: %s\n", kind_name.c_str(),
                 static_cast<long long>(cold), batch, std::string(res.status().message()).c_str());
    return false;
  }
  const kvrt_stats &s0 = res->begin, &s1 = res->end;
  const auto& lat = res->latency_us;
  const double attends = static_cast<double>(s1.attend_calls - s0.attend_calls);
  auto per = [&](int64_t a1, int64_t a0) { return attends > 0 ? (a1 - a0) / 1e3 / attends : 0.0; };
  row->index = !row->batched         ? kind_name
               : row->serial_appends ? kind_name + "/batch-serial"
                                     : kind_name + "/batch";
  row->cold = cold;
  row->batch = batch;
  row->samples = static_cast<int>(lat.size());
  row->p50 = Percentile(lat, 0.5);
  row->p99 = Percentile(lat, 0.99);
  row->mean = Mean(lat);
  row->setup_s = res->setup_s;
  row->prefill_ms = res->prefill_ms;
  row->prefill_ready_ms = res->prefill_ready_ms;
  const double layers_prefilled = static_cast<double>(batch) * o.config.num_layers;
  row->build_gpu_ms = res->prefilled.time_segment_build_ns / 1e6 / layers_prefilled;
  row->segments_gpu = res->prefilled.segments_built_gpu;
  row->device = o.device;
  row->attend = per(s1.time_attend_ns, s0.time_attend_ns);
  row->gpu_attn = per(s1.time_gpu_attention_ns, s0.time_gpu_attention_ns);
  row->d2h = per(s1.time_d2h_ns, s0.time_d2h_ns);
  row->search = per(s1.time_cpu_search_ns, s0.time_cpu_search_ns);
  row->cpu_attn = per(s1.time_cpu_attention_ns, s0.time_cpu_attention_ns);
  row->h2d = per(s1.time_h2d_ns, s0.time_h2d_ns);
  row->merge = per(s1.time_merge_ns, s0.time_merge_ns);
  // Idle: the CPU waiting for the GPU after the CPU side (inside attend for host output, in the
  // bench's stream synchronisation for device output).
  row->idle = per(s1.time_idle_ns, s0.time_idle_ns) + (attends > 0 ? res->sync_us / attends : 0);
  row->append = attends > 0 ? res->append_us / attends : 0;
  row->gpu_mib_per_seq_layer =
      static_cast<double>(s1.gpu_allocated_bytes) / (batch * a.run.layers) / (1 << 20);
  const double searchable = static_cast<double>(s1.cold_keys_searchable - s0.cold_keys_searchable);
  row->scanned = searchable > 0 ? (s1.keys_scored - s0.keys_scored) / searchable : 0;
  row->retrieved =
      searchable > 0 ? (s1.cold_tokens_attended - s0.cold_tokens_attended) / searchable : 0;
  row->fetch_share = attends > 0 ? (s1.attends_fetch - s0.attends_fetch) / attends : 0;
  if (attends > 0) {
    row->hot_hits = (s1.hot_hits - s0.hot_hits) / attends;
    row->hot_misses = (s1.hot_misses - s0.hot_misses) / attends;
    row->hot_h2d_mb = (s1.hot_h2d_bytes - s0.hot_h2d_bytes) / attends / 1e6;
    row->hot_cpu_us = per(s1.time_hot_cache_ns, s0.time_hot_cache_ns);
    row->direct_share = (s1.attends_direct - s0.attends_direct) / attends;
    row->direct_host_mb = (s1.direct_host_bytes - s0.direct_host_bytes) / attends / 1e6;
  }
  auto accuracy = ScoreCapturedSteps(data, res->captured, a.run.top_k);
  if (!accuracy.ok()) {
    std::fprintf(stderr, "kvrt bench decode: %s cold %lld B=%d: %s\n", kind_name.c_str(),
                 static_cast<long long>(cold), batch,
                 std::string(accuracy.status().message()).c_str());
    return false;
  }
  row->accuracy = *accuracy;
  return true;
}

int Usage(const absl::Status& s) {
  std::fprintf(stderr, "kvrt bench decode: %s\n", std::string(s.message()).c_str());
  return 2;
}

int Run(BenchDecodeArgs a) {
  auto colds = ParseIntList("--cold", a.cold, 0, int64_t{1} << 40);
  if (!colds.ok()) return Usage(colds.status());
  auto batches = ParseIntList("--batch", a.batch, 1, 4096);
  if (!batches.ok()) return Usage(batches.status());
  if (auto st = CheckBenchDataOptions(a.data); !st.ok()) return Usage(st);
  if (auto st = CheckOutputsApart({{"--trace", a.data.trace}}, {{"--csv", a.csv}}); !st.ok())
    return Usage(st);
  std::vector<std::pair<kvrt_index_kind, std::string>> kinds;
  for (const auto& name : SplitList(a.indexes)) {
    auto k = ParseIndexKindOption(name);
    if (!k.ok())
      return Usage(absl::InvalidArgumentError("--index: " + std::string(k.status().message())));
    kinds.emplace_back(*k, name);
  }
  std::vector<std::pair<kvrt_cold_attention, std::string>> modes;
  for (const auto& name : SplitList(a.cold_attention)) {
    auto mode = ParseColdAttention(name);
    if (!mode.ok()) return Usage(mode.status());
    modes.emplace_back(*mode, name);
  }
  if (auto st = CheckDecodeSettings(a.run); !st.ok()) return Usage(st);
  struct AttendMode {
    bool batched, serial_appends;
  };
  std::vector<AttendMode> attend_modes;
  for (const auto& m : SplitList(a.attend)) {
    if (m != "threads" && m != "batch" && m != "batch-serial")
      return Usage(absl::InvalidArgumentError("--attend: '" + m +
                                              "' is not threads, batch or batch-serial"));
    attend_modes.push_back({m != "threads", m == "batch-serial"});
  }
  if (kinds.empty() || modes.empty() || attend_modes.empty())
    return Usage(absl::InvalidArgumentError("--index, --cold-attention and --attend need a value"));
  if (auto st = ResolveGpu(&a.run); !st.ok()) return Usage(st);
  const bool device = a.run.device();
  const bool measure = a.accuracy_steps > 0;
  int rc = 0;
  std::string csv =
      "index,cold_attention,cold,batch,samples,p50_us,p99_us,mean_us,gpu_attn_us,d2h_us,cpu_search_"
      "us,cpu_attn_us,h2d_us,merge_us,idle_us,attend_us,append_us,gpu_mib_per_seq_layer,scanned_"
      "fraction,fetch_share,setup_s,retrieved_fraction,accuracy_samples,recall_at_k,mass_recall,"
      "output_rel_error_mean,output_rel_error_p99,keys,prefill_ms,prefill_gpu_build_ms,prefill_"
      "ready_ms\n";
  bool header = false;
  // Cold outermost: the data of a cold size is drawn once for every configuration.
  for (int64_t cold : *colds) {
    const int64_t prompt = a.run.sinks + cold + a.run.window;
    auto data = MakeBenchData(a.data, prompt, a.run.warmup + a.run.steps);
    if (!data.ok()) {
      std::fprintf(stderr, "kvrt bench decode: cold %lld: %s\n", static_cast<long long>(cold),
                   std::string(data.status().message()).c_str());
      rc = 1;
      continue;
    }
    if (!header) {
      header = true;
      std::printf(
          "kvrt bench decode: %d q / %d kv heads, d=%d, bf16, sinks %d, window %d, top-k %d, %d "
          "layers, %s pointers, use_gpu %d, group_search %d, %u hardware threads\n",
          data->q_heads, data->kv_heads, data->head_dim, a.run.sinks, a.run.window, a.run.top_k,
          a.run.layers, device ? "device" : "host", a.run.use_gpu, a.run.group_search,
          std::thread::hardware_concurrency());
      for (const auto& kind : kinds) {
        if (kind.first != KVRT_INDEX_CLUSTER) continue;
        // The cluster kind's settings in effect (the library's defaults where not given).
        const kvrt_config c = MakeHarnessOptions(a.run, *data, kind.first, KVRT_COLD_CPU, 1, false)
                                  .config;
        const std::string bits = std::to_string(c.cluster_rescore_bits) + "-bit codes";
        const std::string values =
            c.cluster_value_bits > 0
                ? ", the rest's values from " + std::to_string(c.cluster_value_bits) + "-bit codes"
                : "";
        const std::string codes = c.cluster_rescore_bits == 0 ? ""
                                  : c.cluster_rescore > 1     ? " on " + bits
                                                              : ", clusters ranked on " + bits + values;
        std::printf(
            "cluster: %d keys per cluster, budget %.3f of the clustered rows %s, hot cache %.2f, "
            "direct step %d%s, miss penalty %.2f, top-p %.2f, rescore %.1f%s\n",
            c.cluster_keys, c.cluster_budget_fraction,
            c.cluster_group_select ? "per kv head" : "per q head", c.hot_cache_fraction,
            c.cluster_direct_step,
            c.cluster_rescore > 1 ? " (off: the CPU selects in two stages)" : "",
            c.cluster_miss_penalty, c.cluster_top_p, c.cluster_rescore, codes.c_str());
      }
      std::printf(
          "per layer-step (B sequences: append 1 token + attend each); split = mean per attend, "
          "us\n");
      if (a.run.use_gpu == 0)
        std::printf(
            "host backend: no device, so h2d is n/a; gpu_attn and merge are the CPU's wall "
            "time of the attention over sinks + window and of the merge\n");
      if (std::any_of(attend_modes.begin(), attend_modes.end(),
                      [](const AttendMode& m) { return m.batched; }))
        std::printf(
            "batch modes: search and cpu_attn sum each member's time in its lane, and the lanes "
            "run in parallel, so the split of a batched row may exceed its attend\n");
      if (a.run.pipeline)
        std::printf(
            "pipelined: a step's %d layer-steps back to back, one wait per step; p50/p99 of a "
            "step's wall time over its layers (compare SDPA's pipelined mean)\n",
            a.run.layers);
      if (measure)
        std::printf(
            "accuracy: sequence 0, layer 0, every %d-th measured step (at most %d) against exact "
            "f32 attention over sinks + cold + window, computed after the timed loop; "
            "record_attended is on, so the timings include recording the attended positions "
            "(--accuracy-steps 0: timings without it)\n",
            a.accuracy_every, a.accuracy_steps);
      std::printf(
          "%-*s %5s %8s %3s %5s %9s %9s | %8s %7s %8s %8s %7s %7s %7s %8s | %7s %9s %8s %6s | "
          "%7s %7s %7s %9s %9s\n",
          kIndexWidth, "index", "cold_attn", "cold", "B", "n", "p50_us", "p99_us", "gpu_attn",
          "d2h", "search", "cpu_attn", "h2d", "merge", "idle", "attend", "append", "GPU_MiB/sl",
          "scanned", "fetch", "retr", "recall", "mass", "err_mean", "err_p99");
    }
    std::printf("keys (cold %lld): %s\n", static_cast<long long>(cold), data->source.c_str());
    for (const auto& [kind, name] : kinds)
      for (const auto& [mode, mode_name] : modes)
        for (const AttendMode& am : attend_modes)
          for (int64_t batch : *batches) {
            if (batch > 1 && cold > a.max_cold_batch) {
              std::fprintf(stderr,
                           "kvrt bench decode: %s cold %lld B=%lld skipped: batches run up to "
                           "--max-cold-batch %lld cold tokens\n",
                           name.c_str(), static_cast<long long>(cold),
                           static_cast<long long>(batch), static_cast<long long>(a.max_cold_batch));
              continue;
            }
            if (am.batched && batch == 1) {  // the same as one thread
              std::fprintf(stderr,
                           "kvrt bench decode: %s B=1 with --attend batch%s skipped: a batch of "
                           "one is --attend threads\n",
                           name.c_str(), am.serial_appends ? "-serial" : "");
              continue;
            }
            Row r;
            r.batched = am.batched;
            r.serial_appends = am.serial_appends;
            if (!RunOne(a, *data, kind, name, mode, am.batched, am.serial_appends, cold,
                        static_cast<int>(batch), &r)) {
              rc = 1;
              continue;
            }
            const auto& acc = r.accuracy;
            // Without scored steps the accuracy columns say n/a (table) or stay empty (CSV):
            // zeros would read as a measured total miss.
            const bool scored = acc.samples > 0;
            const std::string acc_cols =
                scored ? absl::StrFormat("%7.4f %7.4f %9.3g %9.3g", acc.recall, acc.mass,
                                         acc.error_mean, acc.error_p99)
                       : absl::StrFormat("%7s %7s %9s %9s", "n/a", "n/a", "n/a", "n/a");
            // Unmeasured, not 0: no timed step (every measured step captured for accuracy in a
            // pipelined run), and the H2D time on the host backend.
            const bool timed = r.samples > 0, on_gpu = a.run.use_gpu != 0;
            if (!timed)
              std::fprintf(stderr,
                           "kvrt bench decode: %s: no step was timed (with --pipeline a step "
                           "captured for accuracy is not timed: raise --steps or "
                           "--accuracy-every)\n",
                           r.index.c_str());
            auto us = [](bool known, int width, double v) {
              return known ? absl::StrFormat("%*.1f", width, v)
                           : absl::StrFormat("%*s", width, "n/a");
            };
            std::printf(
                "%-*s %9s %8lld %3d %5d %s %s | %s %7.1f %8.1f %8.1f %s %s %7.1f "
                "%8.1f | %7.1f %9.2f %8.4f %6.2f | %7.4f %s\n",
                kIndexWidth, r.index.c_str(), mode_name.c_str(), static_cast<long long>(r.cold),
                r.batch, r.samples, us(timed, 9, r.p50).c_str(), us(timed, 9, r.p99).c_str(),
                us(true, 8, r.gpu_attn).c_str(), r.d2h, r.search, r.cpu_attn,
                us(on_gpu, 7, r.h2d).c_str(), us(true, 7, r.merge).c_str(), r.idle, r.attend,
                r.append, r.gpu_mib_per_seq_layer, r.scanned, r.fetch_share, r.retrieved,
                acc_cols.c_str());
            if (r.direct_share > 0)
              std::printf(
                  "%-*s direct step in %.0f%% of attends; per attend: %.1f 8-row blocks hit, "
                  "%.1f given a page (%.3f MB copied in over PCIe), %.3f MB read from the host "
                  "store, CPU %.1f us\n",
                  kIndexWidth, "", 100 * r.direct_share, r.hot_hits, r.hot_misses, r.hot_h2d_mb,
                  r.direct_host_mb, r.hot_cpu_us);
            else if (r.hot_hits + r.hot_misses > 0)
              std::printf(
                  "%-*s hot cache per attend: %.1f groups hit, %.1f copied (%.3f MB), CPU %.1f "
                  "us of the search\n",
                  kIndexWidth, "", r.hot_hits, r.hot_misses, r.hot_h2d_mb, r.hot_cpu_us);
            std::printf(
                "%-*s prefill (%s pointers): the call %.1f ms, until ready (host store and "
                "index built, kvrt_seq_wait) %.1f ms per (sequence, layer)",
                kIndexWidth, "", r.device ? "device" : "host", r.prefill_ms, r.prefill_ready_ms);
            if (r.segments_gpu > 0)
              std::printf("; GPU build of %lld segments: %.1f ms of it",
                          static_cast<long long>(r.segments_gpu), r.build_gpu_ms);
            std::printf("\n");
            std::fflush(stdout);
            // Empty where unmeasured, as the table's n/a.
            auto cell = [](bool known, double v) {
              return known ? absl::StrFormat("%.1f", v) : std::string();
            };
            char line[768];
            std::snprintf(line, sizeof line,
                          "%s,%s,%lld,%d,%d,%s,%s,%s,%s,%.1f,%.1f,%.1f,%s,%s,%.1f,%.1f,"
                          "%.1f,%.3f,%.5f,%.3f,%.1f,%.5f,%lld,%s,%s,%.2f,%.2f,%.2f\n",
                          r.index.c_str(), mode_name.c_str(), static_cast<long long>(r.cold),
                          r.batch, r.samples, cell(timed, r.p50).c_str(),
                          cell(timed, r.p99).c_str(), cell(timed, r.mean).c_str(),
                          cell(true, r.gpu_attn).c_str(), r.d2h, r.search, r.cpu_attn,
                          cell(on_gpu, r.h2d).c_str(), cell(true, r.merge).c_str(), r.idle,
                          r.attend, r.append, r.gpu_mib_per_seq_layer, r.scanned, r.fetch_share,
                          r.setup_s, r.retrieved, static_cast<long long>(acc.samples),
                          scored ? absl::StrFormat("%.5f,%.5f,%.6g,%.6g", acc.recall, acc.mass,
                                                   acc.error_mean, acc.error_p99)
                                       .c_str()
                                 : ",,,",
                          a.data.trace.empty() ? a.data.keys.c_str() : "trace", r.prefill_ms,
                          r.build_gpu_ms, r.prefill_ready_ms);
            csv += line;
          }
  }
  if (auto st = WriteTextFile("--csv", a.csv, csv); !st.ok()) {
    std::fprintf(stderr, "kvrt bench decode: %s\n", std::string(st.message()).c_str());
    rc = 1;
  }
  return rc;
}

}  // namespace
}  // namespace kvrt::cli

KVRT_REGISTER_COMMAND("bench decode", [](CLI::App& app, int* exit_code) {
  auto* bench = kvrt::cli::GetOrAddGroup(app, "bench", "Benchmarks (speed and quality; not tests)");
  auto args = std::make_shared<kvrt::cli::BenchDecodeArgs>();
  auto* cmd = bench->add_subcommand(
      "decode",
      "Decode-path latency per layer-step and, in the same run, its accuracy: B sequences each "
      "append 1 token and attend, for every cold size, batch and index kind; p50/p99 and the split "
      "(GPU attention, D2H, CPU search, CPU attention, H2D, merge, idle), GPU memory per "
      "(sequence, layer), retrieved fraction, recall@k, attention-mass recall and output error "
      "(mean, p99) against exact f32 attention over all tokens. K/V/q trace-like (kvrt gen-trace's "
      "generator), random or from --trace. Needs the GPU backend unless --gpu 0.");
  cmd->add_option("--cold", args->cold, "comma-separated cold (host store) token counts")
      ->capture_default_str();
  cmd->add_option("--batch", args->batch, "comma-separated batch sizes (sequences per layer-step)")
      ->capture_default_str();
  cmd->add_option("--index", args->indexes, "comma-separated index kinds")->capture_default_str();
  cmd->add_option("--max-cold-batch", args->max_cold_batch, "largest cold size run with batch > 1")
      ->capture_default_str()
      ->check(kvrt::cli::AtLeast(0));
  cmd->add_option("--attend", args->attend,
                  "comma-separated ways B > 1 sequences attend: threads (one caller thread per "
                  "sequence, kvrt_attend_ex), batch (one kvrt_attend_batch_ex call, the appends "
                  "from one thread per sequence) and/or batch-serial (the same call, the appends "
                  "from the calling thread in order, as a batched decoder and the Python "
                  "package's append_attend_batch make them)")
      ->capture_default_str();
  cmd->add_option(
         "--cold-attention", args->cold_attention,
         "comma-separated config.cold_attention modes to compare: cpu (CPU attention over "
         "the retrieved rows), fetch (rows copied H2D, attended on the GPU), auto (per layer, "
         "the cheaper one as measured)")
      ->capture_default_str();
  args->run.max_seconds = 20;
  kvrt::cli::AddDecodeSettingsOptions(cmd, &args->run);
  kvrt::cli::AddBenchDataOptions(cmd, &args->data);
  cmd->add_option("--accuracy-steps", args->accuracy_steps,
                  "measured steps whose output (sequence 0, layer 0) is scored against exact f32 "
                  "attention after the timed loop; 0 = no accuracy (and no record_attended)")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(0, 100000));
  cmd->add_option("--accuracy-every", args->accuracy_every,
                  "score every N-th measured step (from the first)")
      ->capture_default_str()
      ->check(kvrt::cli::IntIn(1, 100000));
  cmd->add_option("--csv", args->csv, "write the table as CSV")->check(kvrt::cli::OutputFile());
  cmd->callback([args, exit_code] { *exit_code = kvrt::cli::Run(*args); });
});

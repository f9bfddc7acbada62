// `kvrt gen-trace`: writes a synthetic attention trace (tools/trace/trace_gen.cc, docs/traces.md).
#include <cstdio>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "tools/cli_checks.h"
#include "tools/command.h"
#include "tools/output_files.h"
#include "tools/trace/trace.h"

namespace {

struct GenTraceArgs {
  std::string out;
  int64_t tokens = 4096;
  int64_t steps = 64;
  int layers = 2;
  int q_heads = 8;
  int kv_heads = 2;
  int head_dim = 64;
  uint64_t seed = 1;
  std::string dtype = "bf16";
  int needles = 16;
  std::string model = "synthetic";
  bool quiet = false;
};

// The first problem with the arguments, or "" when they are fine.
std::string Validate(const GenTraceArgs& a) {
  if (a.tokens <= 0) return absl::StrCat("--tokens must be positive, got ", a.tokens);
  if (a.steps < 0) return absl::StrCat("--steps must be >= 0, got ", a.steps);
  if (a.layers <= 0) return absl::StrCat("--layers must be positive, got ", a.layers);
  if (a.q_heads <= 0) return absl::StrCat("--q-heads must be positive, got ", a.q_heads);
  if (a.kv_heads <= 0) return absl::StrCat("--kv-heads must be positive, got ", a.kv_heads);
  if (a.q_heads % a.kv_heads != 0)
    return absl::StrCat("--q-heads (", a.q_heads, ") must be a multiple of --kv-heads (",
                        a.kv_heads, "): grouped-query attention shares one kv head per group");
  if (a.head_dim <= 0 || a.head_dim > 65536)
    return absl::StrCat("--head-dim must be in [1, 65536], got ", a.head_dim);
  if (a.needles < 0 || a.needles > 30000)
    return absl::StrCat("--needles must be in [0, 30000], got ", a.needles);
  return "";
}

int Run(const GenTraceArgs& a) {
  if (std::string problem = Validate(a); !problem.empty()) {
    std::fprintf(stderr, "kvrt gen-trace: %s\n", problem.c_str());
    return 2;  // a usage error, as CLI11's own checks
  }
  kvrt::trace::GenOptions opt;
  opt.meta.model = a.model;
  opt.meta.num_layers = a.layers;
  opt.meta.num_q_heads = a.q_heads;
  opt.meta.num_kv_heads = a.kv_heads;
  opt.meta.head_dim = a.head_dim;
  opt.meta.dtype = a.dtype == "f32"   ? kvrt::DType::kF32
                   : a.dtype == "f16" ? kvrt::DType::kF16
                                      : kvrt::DType::kBF16;
  opt.meta.prompt_tokens = a.tokens;
  opt.meta.decode_steps = a.steps;
  opt.seed = a.seed;
  opt.needles = a.needles;
  opt.show_progress = !a.quiet;
  const double gib = static_cast<double>(a.tokens + a.steps) * a.layers *
                     (a.q_heads + 2.0 * a.kv_heads) * a.head_dim * kvrt::DTypeSize(opt.meta.dtype) /
                     (1 << 30);
  if (!a.quiet)
    std::fprintf(stderr,
                 "gen-trace: %s: %lld+%lld tokens, %d layers, %d/%d heads, d=%d, %s, %.2f GiB\n",
                 a.out.c_str(), static_cast<long long>(a.tokens), static_cast<long long>(a.steps),
                 a.layers, a.q_heads, a.kv_heads, a.head_dim, a.dtype.c_str(), gib);
  absl::Status s = kvrt::trace::GenerateTrace(a.out, opt);
  if (!s.ok()) {
    std::fprintf(stderr, "kvrt gen-trace: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  if (!a.quiet) std::fprintf(stderr, "gen-trace: wrote %s\n", a.out.c_str());
  return 0;
}

}  // namespace

KVRT_REGISTER_COMMAND("gen-trace", [](CLI::App& app, int* exit_code) {
  auto args = std::make_shared<GenTraceArgs>();
  CLI::App* cmd = app.add_subcommand(
      "gen-trace",
      "Write a synthetic attention trace (safetensors) with what makes retrieval hard: queries\n"
      "distributed differently from keys, attention sinks, recency bias, topic clusters spread\n"
      "over the context, and planted needle tokens that about a third of the decode queries\n"
      "attend to sharply. Deterministic for a seed. See docs/traces.md.");
  cmd->add_option("-o,--output", args->out, "trace file to write")
      ->required()
      ->check(kvrt::cli::OutputFile());
  cmd->add_option("--tokens", args->tokens, "prompt tokens (prefill)")->capture_default_str();
  cmd->add_option("--steps", args->steps, "decode steps after the prompt")->capture_default_str();
  cmd->add_option("--layers", args->layers, "layers")->capture_default_str();
  cmd->add_option("--q-heads", args->q_heads, "query heads (a multiple of --kv-heads)")
      ->capture_default_str();
  cmd->add_option("--kv-heads", args->kv_heads, "key/value heads")->capture_default_str();
  cmd->add_option("--head-dim", args->head_dim, "head dimension")->capture_default_str();
  cmd->add_option("--seed", args->seed, "random seed (same seed, same bytes)")
      ->capture_default_str()
      ->check(kvrt::cli::Unsigned());
  cmd->add_option("--dtype", args->dtype, "storage dtype")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--needles", args->needles, "planted needle tokens per (layer, kv head)")
      ->capture_default_str();
  cmd->add_option("--model", args->model, "model name stored in the metadata")
      ->capture_default_str();
  cmd->add_flag("-q,--quiet", args->quiet, "no progress on stderr");
  cmd->callback([args, exit_code] { *exit_code = Run(*args); });
});

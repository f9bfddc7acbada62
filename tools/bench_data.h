#pragma once
// The K/V/q a decode benchmark runs on (`bench decode`, `bench serve`): one layer's prompt and
// decode rows in bf16, reused for every (sequence, layer). Three sources: random (uniform-sum
// noise, no structure), trace-like (the generator of `kvrt gen-trace`, drawn in memory at the
// benchmark's size) and a recorded trace's layer 0 (truncated or tiled to the size).
#include <cstdint>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"

namespace kvrt::cli {

struct BenchDataOptions {
  std::string keys = "trace-like";  // random | trace-like (ignored when trace is set)
  std::string trace;                // a trace file: its layer 0, its shape and scale
  uint64_t seed = 1;                // trace-like: the generator's seed
  int needles = 16;                 // trace-like: needles per kv head
  bool prompt_queries = true;       // keep the prompt's queries for kvrt_prefill (not for random)
  int q_heads = 32, kv_heads = 8, head_dim = 128;  // shape (a trace's own shape replaces it)
};

struct BenchData {
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 0;  // 0 = 1/sqrt(head_dim)
  int64_t prompt = 0;
  int steps = 0;
  // bf16, [tokens, heads, head_dim]; pq empty when the prompt's queries are not kept.
  std::vector<unsigned char> pq, pk, pv, dq, dk, dv;
  std::string source;  // one line: where the rows came from (and any truncation or tiling)
  std::size_t q_row() const { return static_cast<std::size_t>(q_heads) * head_dim * 2; }
  std::size_t kv_row() const { return static_cast<std::size_t>(kv_heads) * head_dim * 2; }
};

// --keys, --trace, --seed, --needles, --prompt-queries, --q-heads, --kv-heads, --head-dim.
void AddBenchDataOptions(CLI::App* cmd, BenchDataOptions* options);

// Checks the option values (named in the error) without drawing anything.
absl::Status CheckBenchDataOptions(const BenchDataOptions& options);

// `prompt` prefill rows and `steps` decode rows (decode row s is position prompt + s).
absl::StatusOr<BenchData> MakeBenchData(const BenchDataOptions& options, int64_t prompt,
                                        int steps);

}  // namespace kvrt::cli

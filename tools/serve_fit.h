#pragma once
// The arithmetic of `kvrt bench serve`: how many sequences of a context fit a memory budget, for
// dense attention (the whole KV resident) and for kvrt (measured bytes per sequence and layer).
// tools/gpu_bench/sdpa_peer.py --serve does the same for the dense peer; docs/benchmarks.md
// ("Serving capacity") states the formulas once.
#include <cstdint>
#include <string>

namespace kvrt::cli {

struct ModelShape {
  int layers = 32, kv_heads = 8, head_dim = 128, dtype_bytes = 2;
};

// K and V of every token of every layer: 2 * context * kv_heads * head_dim * dtype_bytes * layers.
int64_t DenseBytesPerSequence(const ModelShape& m, int64_t context);
// floor(budget / per_sequence); 0 when per_sequence is 0 or more than the budget.
int64_t SequencesThatFit(int64_t budget, int64_t per_sequence);

struct KvrtFit {
  int64_t gpu_per_seq = 0, host_per_seq = 0;  // scaled to the model's layers
  int64_t by_gpu = 0, by_host = 0, batch = 0;
  std::string binding;  // "gpu", "host" or "gpu+host" (equal)
};
// gpu_per_seq_layer: kvrt's GPU bytes per (sequence, layer) (kvrt_stats.gpu_allocated_bytes:
// tier, summary, caches); host_per_seq_layer: host store + index bytes per (sequence, layer).
KvrtFit FitKvrt(int64_t gpu_budget, int64_t host_budget, int layers_model,
                double gpu_per_seq_layer, double host_per_seq_layer);

}  // namespace kvrt::cli

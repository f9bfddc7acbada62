#pragma once
// Attention traces in safetensors format (docs/traces.md): read (memory-mapped, validated)
// and write (streamed, tensor by tensor, so traces larger than memory can be generated).
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvrt_common/dtype.h"

namespace kvrt::trace {

inline constexpr char kFormatName[] = "kvrt-trace";
inline constexpr int kFormatVersion = 1;

struct TraceMeta {
  std::string model = "synthetic";
  int num_layers = 0;  // layers recorded in the file (tensors "0." .. "<n-1>.")
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kBF16;
  int64_t prompt_tokens = 0;
  int64_t decode_steps = 0;
  float scale = 0.f;  // 0 = 1/sqrt(head_dim)
  bool post_rotary = true;
  std::map<std::string, std::string> extra;  // any other __metadata__ entries (seed, source, ...)
};

// The six tensors of a layer: "prefill.q", "prefill.k", "prefill.v", "decode.q", "decode.k",
// "decode.v"; the full name is "<layer>.<part>".
inline const std::vector<std::string>& TensorParts() {
  static const std::vector<std::string> parts = {"prefill.q", "prefill.k", "prefill.v",
                                                 "decode.q",  "decode.k",  "decode.v"};
  return parts;
}

struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // [tokens, heads, head_dim]
  std::size_t bytes = 0;
};

class TraceReader {
 public:
  // Opens and validates the whole header: safetensors framing, metadata (errors name the key),
  // every tensor present with the shape the metadata implies and offsets inside the file.
  // Errors name the file and what is wrong (absl InvalidArgument / NotFound / DataLoss).
  static absl::StatusOr<std::unique_ptr<TraceReader>> Open(const std::string& path);
  virtual ~TraceReader() = default;
  virtual const TraceMeta& meta() const = 0;
  virtual const std::string& path() const = 0;
  // Tensor "<layer>.<part>", a view into the mapped file (valid while the reader lives).
  virtual absl::StatusOr<TensorView> Tensor(int layer, const std::string& part) const = 0;
};

class TraceWriter {
 public:
  // Writes the header for `meta` (all tensors of all layers, sizes implied by meta) and then
  // expects exactly those tensors through WriteTensor, in the order of layers then TensorParts().
  static absl::StatusOr<std::unique_ptr<TraceWriter>> Create(const std::string& path,
                                                             const TraceMeta& meta);
  virtual ~TraceWriter() = default;
  // data holds the tensor in meta.dtype, exactly its size.
  virtual absl::Status WriteTensor(int layer, const std::string& part, const void* data,
                                   std::size_t bytes) = 0;
  // Flushes and closes; an error if a tensor is missing.
  virtual absl::Status Close() = 0;
};

// Synthetic traces with what makes retrieval hard (see gen-trace's --help and docs/traces.md).
struct GenOptions {
  TraceMeta meta;  // shapes, dtype, prompt_tokens, decode_steps
  uint64_t seed = 1;
  int needles = 16;  // planted needle tokens per (layer, kv head)
  bool show_progress = true;
  // false: prefill.q is neither stored nor handed out (its part stays empty); every other byte is
  // the same as with it. GenerateTrace always writes it.
  bool prefill_queries = true;
};
absl::Status GenerateTrace(const std::string& path, const GenOptions& options);

// One layer's six tensors, TensorParts() order, in meta.dtype, [tokens, heads, head_dim] each.
struct LayerTensors {
  std::vector<uint8_t> part[6];
};
// Called once per layer, in order. It may take the buffers (std::move): the generator sizes
// them again for the next layer, reusing what is left.
using LayerConsumer = std::function<absl::Status(int layer, LayerTensors& tensors)>;
// The generator of GenerateTrace without a file: the same bytes for the same options, one layer
// at a time (what `kvrt bench decode --keys trace-like` draws its K/V/q from).
absl::Status GenerateLayers(const GenOptions& options, const LayerConsumer& consume);

// The metadata checks every reader and writer makes (sizes, GQA divisibility, scale, post_rotary);
// errors start with `where`.
absl::Status ValidateTraceMeta(const TraceMeta& meta, const std::string& where);

// Attention statistics of a trace's decode queries against exact softmax attention over every
// token up to and including the query's own position (f32). They measure what the generator is
// tuned for (docs/traces.md) and are printed by `kvrt inspect --attention`.
struct AttentionStatsOptions {
  int top_k = 100;
  int sink_tokens = 4;
  int window_tokens = 512;
  int max_steps = 16;  // decode steps measured per layer, spread evenly; 0 = all
  int max_layers = 1;  // first layers measured; 0 = all
  // Key-only IVF probe (k-means on the keys alone, clusters ranked by q . centroid): recall of
  // the exact top-k when the probed clusters hold this share of the keys. 0 = skip.
  double ivf_probe_fraction = 0.0;
  int ivf_max_kv_heads = 2;  // kv heads of the first layer the IVF probe is run on
};
struct AttentionStats {
  int64_t queries = 0;          // (layer, step, q head) triples measured
  double top_k_mass = 0;        // mean softmax mass on the exact top-k keys
  double sink_mass = 0;         // mean mass on the first sink_tokens tokens
  double window_mass = 0;       // mean mass on the last window_tokens tokens (sinks excluded)
  double top_k_cold_share = 0;  // mean share of the top-k keys that are neither sinks nor window
  double top_k_span = 0;        // mean (max - min position) of the cold top-k, / prompt tokens
  double max_weight = 0;        // mean largest single weight
  double sharp_share = 0;       // share of queries whose largest weight is >= 0.3 (needles)
  double ivf_recall = -1;       // key-only IVF recall@top_k (-1 = not measured)
  double ivf_scanned = 0;       // share of keys the IVF probe scored
};
absl::StatusOr<AttentionStats> ComputeAttentionStats(const TraceReader& reader,
                                                     const AttentionStatsOptions& options);

}  // namespace kvrt::trace

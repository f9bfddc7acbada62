#pragma once
// The runtime's C++ interface (api/ wraps it in the C API; tools and tests may use it too).
// Thread safety: as documented in kvrt.h: different sequences concurrently, one sequence at a time
// (each sequence also carries a mutex, so misuse serialises instead of corrupting state).
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvrt_common/dtype.h"
#include "kvrt_cpu_index/index.h"

namespace kvrt::runtime {

// The search settings' ranges (Runtime::Create; kvrt_index_describe_search checks the same).
inline constexpr int kMaxTopK = 1 << 20;
inline constexpr int kMaxSearchEffort = 1 << 24;

struct RuntimeConfig {
  int num_layers = 1;
  int num_q_heads = 1;
  int num_kv_heads = 1;
  int head_dim = 128;
  DType dtype = DType::kBF16;
  float scale = 0.f;  // 0 = 1/sqrt(head_dim)
  int sink_tokens = 4;
  int window_tokens = 2048;
  int top_k = 100;
  cpu_index::IndexKind index_kind = cpu_index::IndexKind::kExact;
  int search_effort = 0;     // 0 = the kind's default
  int worker_threads = 0;    // 0 = hardware threads (worker_cpu_count when bound)
  int worker_cpu_first = 0;  // the arena's workers run on CPUs first .. first + count - 1
  int worker_cpu_count = 0;  // 0 = not bound
  bool record_attended = false;
  int64_t host_memory_limit = 0;   // bytes of host store + indexes over all sequences; 0 = none
  int64_t gpu_memory_limit = 0;    // bytes of GPU-tier buffers over all sequences; 0 = none
  bool check_finite = false;       // reject NaN/Inf in q, k, v
  bool group_search = false;       // GQA: one index search per kv head for its q heads
  int cold_attention = 0;          // kvrt_cold_attention: 0 CPU, 1 fetch, 2 auto (GPU backend)
  cpu_index::IndexConfig index;    // per-kind knobs (the cluster budget: index.cluster)
  float hot_cache_fraction = 0.f;  // GPU hot cache, fraction of the cold rows (kvrt.h); 0 = off
  bool direct_step = false;  // cluster kind, GPU backend: the selection attended on the device
  // Each token's value is its key (v is not read; one row per token is stored, not two): the
  // output is the weighted sum of keys (MLA held as its latent). Host backend only.
  bool values_are_keys = false;
  int cuda_device = -1;  // GPU backend's device ordinal; -1: the creating thread's current device
  int use_gpu = 0;       // 0: host backend; 1: GPU tier in device memory (error without a device);
                         // -1: GPU when available. The effective config holds 0 or 1.

  // The device calls run on (transfer::CudaCallScope): cuda_device on the GPU backend, else -1.
  int call_device() const { return use_gpu == 1 ? cuda_device : -1; }
  // Rows stored per token and kv head: its key and its value, or the key alone (values_are_keys).
  int rows_per_token() const { return values_are_keys ? 1 : 2; }
};

// Where a call's tensors live and which CUDA stream orders its device work (kvrt_exec).
struct Exec {
  bool device = false;     // q, k, v, out are device pointers (GPU backend only)
  void* stream = nullptr;  // cudaStream_t for device pointers; null = legacy default stream
};

// Checks every field; the message names the field and the accepted range.
absl::Status ValidateConfig(const RuntimeConfig& config);

// The runtime's counters, listed once. The atomics the layers update (Runtime::Counters),
// RuntimeStats and the C API's kvrt_stats (copied field by field, by name) all expand this list;
// kvrt.h documents what each counts.
// clang-format off
#define KVRT_RUNTIME_COUNTERS(X)                                                             \
  X(gpu_tokens) X(host_tokens) X(index_bytes) X(attend_calls) X(keys_scored)                 \
  X(cold_keys_searchable) X(cold_tokens_attended) X(evicted_tokens) X(gpu_allocated_bytes)   \
  X(time_attend_ns) X(time_gpu_attention_ns) X(time_d2h_ns) X(time_cpu_search_ns)           \
  X(time_cpu_attention_ns) X(time_h2d_ns) X(time_merge_ns) X(time_idle_ns)                   \
  X(eviction_batches) X(index_update_failures) X(keys_read) X(attends_fetch)                 \
  X(attends_gpu_select) X(summary_gpu_bytes) X(hot_hits) X(hot_misses) X(hot_h2d_bytes)     \
  X(hot_cache_gpu_bytes) X(time_hot_cache_ns) X(segments_built_gpu) X(time_segment_build_ns)   \
  X(attends_direct) X(direct_host_bytes) X(time_background_wait_ns) X(value_codes_fallbacks) \
  X(evicted_in_place)
// clang-format on

struct RuntimeStats {
  // Derived when read: live sequences, and the bytes of the tokens counted below.
  int64_t sequences = 0;
  int64_t gpu_bytes = 0;
  int64_t host_bytes = 0;
#define KVRT_STATS_FIELD_(name) int64_t name = 0;
  KVRT_RUNTIME_COUNTERS(KVRT_STATS_FIELD_)
#undef KVRT_STATS_FIELD_
};

class Sequence;

// The rows whose queries a prefill of n queries reads (the query sample of the index kinds that
// build from queries): row i * stride for i < count, evenly spaced, all of them when n is small;
// count 0 when the kind does not read queries. A constant stride (not i * n / count), so that a
// device tensor's sample is one 2D copy (DeviceTier::CopyRowsToHost).
struct QuerySample {
  int64_t count = 0;
  int64_t stride = 1;
};
QuerySample PromptQuerySample(const RuntimeConfig& config, int64_t n);

// Tokens a (sequence, layer) may hold: bounded so that byte counts (n * heads * dim * 4) cannot
// overflow int64 (kvrt.h).
inline constexpr int64_t kMaxTokens = int64_t{1} << 34;

class Runtime {
 public:
  static absl::StatusOr<std::unique_ptr<Runtime>> Create(const RuntimeConfig& config);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  // The effective configuration (scale and worker_threads resolved), as the caller sees it: its
  // head_dim is the caller's also where the GPU backend pads the rows (head_pad.h).
  const RuntimeConfig& config() const { return api_config_; }

  absl::StatusOr<int64_t> CreateSequence();
  absl::Status ReleaseSequence(int64_t seq);
  absl::StatusOr<int64_t> SequenceLength(int64_t seq, int layer) const;
  // Waits for the sequence's background work on every layer (a prefill's staged rows reaching
  // the host store, index builds); the first error of a layer whose rows could not be stored.
  absl::Status WaitSequence(int64_t seq);

  // Tensors in config.dtype, [n, heads, head_dim]; q may be null in Prefill.
  absl::Status Prefill(int64_t seq, int layer, const void* q, const void* k, const void* v,
                       int64_t n_tokens, const Exec& exec = {}) {
    return Prefill(seq, layer, q, q == nullptr ? 0 : n_tokens, k, v, n_tokens, exec);
  }
  // With some of the prompt's queries: q [n_queries, q_heads, head_dim], 0 <= n_queries <=
  // n_tokens (q null when 0), of which the query sample is taken as it is of n_tokens queries
  // (PromptQuerySample): the rows it names give the index that all queries give.
  absl::Status Prefill(int64_t seq, int layer, const void* q, int64_t n_queries, const void* k,
                       const void* v, int64_t n_tokens, const Exec& exec = {});
  absl::Status Append(int64_t seq, int layer, const void* k, const void* v, int64_t n_tokens,
                      const Exec& exec = {});
  // q: [q_heads, head_dim] in config.dtype; out: f32 [q_heads, head_dim]. lse: null, or f32
  // [q_heads] in out's memory: each head's log-sum-exp (natural log) of its scaled scores over
  // every token the step weighed (the GPU tier, the cold rows attended, a two-level kind's
  // estimate of the rest), so that a caller can merge out with states of its own.
  absl::Status Attend(int64_t seq, int layer, const void* q, float* out, const Exec& exec = {},
                      float* lse = nullptr);
  // One layer's attend for n distinct sequences (a batched decode step): q [n, q_heads, d],
  // out [n, q_heads, d]. One parallel loop over the sequences on the runtime's arena, so a
  // batch needs no caller thread per sequence. On error, the rows of the sequences that failed
  // are untouched and the status names the first one; the others are written.
  absl::Status AttendBatch(const int64_t* seqs, int n, int layer, const void* q, float* out,
                           const Exec& exec = {}, float* lse = nullptr);
  // True when the GPU backend is on (effective use_gpu = 1).
  bool gpu_backend() const { return config_.use_gpu == 1; }
  // Per (layer, q head), for every sequence: a streaming head attends to sinks + window only.
  // Not concurrent with Attend on any sequence (set it before decoding).
  absl::Status SetHeadStreaming(int layer, int q_head, bool streaming);

  // Changes config.search_effort for later searches (benchmarks sweep it over one built index).
  // Not concurrent with Attend.
  absl::Status SetSearchEffort(int effort);

  // Positions the last Attend of (seq, layer) used for q_head (needs record_attended).
  // ids may be null (only the preconditions are checked).
  absl::Status GetAttended(int64_t seq, int layer, int q_head, std::vector<int64_t>* ids) const;
  // The lse of the last attend's estimate for q_head (-inf: none); record_attended as above.
  absl::StatusOr<float> GetEstimateLse(int64_t seq, int layer, int q_head) const;

  RuntimeStats Stats() const;

  // Counters the layer states update (relaxed atomics: statistics only).
  struct Counters {
#define KVRT_COUNTER_FIELD_(name) std::atomic<int64_t> name{0};
    KVRT_RUNTIME_COUNTERS(KVRT_COUNTER_FIELD_)
#undef KVRT_COUNTER_FIELD_
  };

 private:
  explicit Runtime(const RuntimeConfig& config);
  absl::StatusOr<std::shared_ptr<Sequence>> Find(int64_t seq, int layer) const;
  // GetAttended's checks and copy; `what` names the public call in the messages.
  absl::Status Attended(const char* what, int64_t seq, int layer, int q_head,
                        std::vector<int64_t>* ids) const;

  struct Impl;
  RuntimeConfig config_;      // the layers' (head_dim padded to a kernel's width on the GPU)
  RuntimeConfig api_config_;  // config(): the same with the caller's head_dim
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvrt::runtime

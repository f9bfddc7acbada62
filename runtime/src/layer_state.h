#pragma once
// State of one (sequence, layer): the GPU tier (sinks + window ring; host memory in the host
// backend) and the cold tier (host KV store and index per kv head).
//
// Positions are implicit: sinks hold positions [0, S), the cold store row i is position S + i
// (tokens leave the window in order), the window holds [S + n_cold, length), and position p >= S
// lives in ring slot (p - S) % W.
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "oneapi/tbb/task_arena.h"
#include "kvrt_cpu_index/head_store.h"
#include "kvrt_cpu_index/index.h"
#include "kvrt_runtime/runtime.h"
#include "runtime/src/gpu_tier.h"


namespace kvrt::runtime {

class LayerState {
 public:
  // gpu: the runtime's CUDA resources when the GPU backend is on (config.use_gpu), else null.
  LayerState(const RuntimeConfig* config, Runtime::Counters* counters, GpuContext* gpu = nullptr);
  ~LayerState();
  LayerState(LayerState&&) noexcept = default;
  LayerState& operator=(LayerState&&) noexcept = default;

  int64_t length() const { return length_; }
  // Host store rows plus evicted rows still in flight to it (GPU backend).
  int64_t cold_tokens() const { return (cold_.empty() ? 0 : cold_[0].size()) + pending_cold_; }
  int64_t gpu_tokens() const { return n_sink_ + n_window_; }

  // See Runtime::Prefill / Append / Attend. Atomic: on error the state is unchanged (except that
  // an index insert that failed is retried on the next call; unindexed rows are scanned exactly).
  // exec: where the tensors live and the caller's stream (device pointers need the GPU backend).
  absl::Status Prefill(const void* q, const void* k, const void* v, int64_t n,
                       tbb::task_arena& arena, const Exec& exec = {});
  absl::Status Append(const void* k, const void* v, int64_t n, tbb::task_arena& arena,
                      const Exec& exec = {});
  // streaming: [q_heads] flags or null; a streaming head attends to the GPU tier only
  // (DuoAttention's streaming heads), skipping the cold tier.
  absl::Status Attend(const void* q, float* out, tbb::task_arena& arena,
                      const uint8_t* streaming = nullptr, const Exec& exec = {});
  const std::vector<int64_t>& attended(int q_head) const { return attended_[q_head]; }
  bool has_attended() const { return !attended_.empty(); }

  // Waits for this layer's background index insert (GPU backend; a no-op on the host backend).
  // Runtime::AttendBatch calls it from the caller's thread before running attends on the arena's
  // workers: a worker blocked in that wait could otherwise hold the thread the insert needs.
  void SettleBackgroundWork();

  // Gives back every counter this layer added (at release).
  void Release();

 private:
  absl::Status AppendTokens(const void* k, const void* v, int64_t n);
  // Stores the positions q head h attended to (record_attended): GPU tier, then cold rows.
  void RecordAttended(int h, int64_t n_cold, const std::vector<int64_t>& cold_ids);
  // Cold tier (cold_tier.cc), shared by both backends. The non-streaming q heads in units that
  // run in parallel: a kv head's group together (config.group_search, index kinds) or one head
  // each (exact mode, group_search off).
  std::vector<std::vector<int>> ColdUnits(const uint8_t* streaming) const;
  // The cold-tier step of the q heads of one unit (one kv head's): one group search or a search
  // per head, then ColdHead's rest per head. q, o: [q_heads, d] f32; lse, scored, search_ns:
  // [q_heads]; ids: [q_heads]; only the unit's heads are written. *read: keys the unit read.
  absl::Status ColdGroup(const std::vector<int>& heads, const float* q, float* o, float* lse,
                         std::vector<std::vector<int64_t>>* ids, int64_t* scored,
                         int64_t* search_ns, int64_t* read, bool attend = true) const;
  // The cold-tier step of q head h: exact attention over every cold token (exact mode) or index
  // search then FinishCold. Writes the partial state (o, lse), the chosen rows, keys scored and
  // the search time.
  // attend = false (fetch mode): select the rows only; o and lse are not written.
  absl::Status ColdHead(int h, const float* qh, float* o, float* lse, std::vector<int64_t>* ids,
                        int64_t* scored, int64_t* search_ns, bool attend = true) const;
  // After the search of kv head g: exact scan of the rows the index does not cover yet, the
  // union cut back to top_k, attention over the rows. *search_ns = time from t_start to the
  // start of the attention.
  void FinishCold(int g, const float* qh, cpu_index::SearchResult* found, float* o, float* lse,
                  std::vector<int64_t>* ids, int64_t* scored, int64_t t_start, int64_t* search_ns,
                  bool attend) const;
  // Fetch mode (gpu_tier.cc): the rows in ids gathered into pinned memory, copied H2D and attended
  // on the GPU into (o_dev, lse_dev) [q_heads], in stream order.
  absl::Status FetchAttend(const std::vector<std::vector<int64_t>>& ids, const void* q_dev, float* o_dev,
                           float* lse_dev, void* stream, tbb::task_arena& arena);
  // KVRT_COLD_AUTO's choice for this attend, and what it learns from the attend's wall time.
  bool ChooseFetch();
  void RecordColdCost(bool fetch, int64_t ns);
  absl::Status UpdateIndexes(tbb::task_arena& arena);
  void SampleQueries(const void* q, int64_t n);
  std::size_t token_bytes() const;  // one token, all kv heads, k or v

  const RuntimeConfig* cfg_;
  Runtime::Counters* counters_;
  int64_t length_ = 0;
  // GPU tier, [rows, kv_heads, d] in storage dtype.
  std::vector<unsigned char> sink_k_, sink_v_, ring_k_, ring_v_;
  int64_t n_sink_ = 0, n_window_ = 0;
  // Cold tier, one per kv head.
  std::vector<cpu_index::HeadStore> cold_;
  std::vector<std::unique_ptr<cpu_index::KeyIndex>> index_;
  int64_t index_bytes_ = 0;
  // Prompt queries kept (f32, per kv head) until the cold index is built, when the prompt was too
  // short to build it at prefill.
  std::vector<std::vector<float>> query_sample_;
  std::vector<std::vector<int64_t>> attended_;  // per q head, when record_attended

  // GPU backend (gpu_tier.cc); null members in the host backend.
  absl::Status PrefillGpu(const void* q, const void* k, const void* v, int64_t n,
                          tbb::task_arena& arena, const Exec& exec);
  absl::Status AppendTokensGpu(const void* k, const void* v, int64_t n, tbb::task_arena& arena,
                               const Exec& exec);
  absl::Status AttendGpu(const void* q, float* out, tbb::task_arena& arena,
                         const uint8_t* streaming, const Exec& exec);
  absl::Status DrainEvictions(tbb::task_arena& arena, bool launch_index);
  GpuContext* gpu_ctx_ = nullptr;
  std::unique_ptr<GpuTier> gpu_;
  int64_t pending_cold_ = 0;     // evicted rows in flight to the host store
  absl::Status index_status_;    // a background index insert's failure, reported by Append
  // KVRT_COLD_AUTO: moving average of the attend wall time per mode (0 = not tried), attends.
  double cold_cost_ns_[2] = {0, 0};
  int64_t cold_attends_ = 0;
};

}  // namespace kvrt::runtime

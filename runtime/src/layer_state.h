#pragma once
// State of one (sequence, layer): the GPU tier (sinks + window ring, behind TierBackend: device
// memory, or host memory without a GPU) and the cold tier (ColdTier: host KV store, index and
// row-to-position map per kv head).
//
// Positions: sinks hold [0, S); the cold tier holds [S, S + cold) (ColdTier maps its rows to
// these); the window holds [S + cold, length), position p >= S in ring slot (p - S) % W; cold
// counts rows still in flight from the window to the host (GPU backend).
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "cold_tier.h"
#include "kvrt_runtime/runtime.h"
#include "oneapi/tbb/task_arena.h"
#include "tier_backend.h"

namespace kvrt::runtime {

class LayerState {
 public:
  // gpu: the runtime's CUDA resources when the GPU backend is on (config.use_gpu), else null.
  LayerState(const RuntimeConfig* config, Runtime::Counters* counters, GpuContext* gpu = nullptr);
  ~LayerState();
  LayerState(LayerState&&) noexcept = default;
  LayerState& operator=(LayerState&&) noexcept = default;

  int64_t length() const { return length_; }
  // Cold rows, including evicted rows still in flight to the host store (GPU backend).
  int64_t cold_tokens() const { return cold_.rows() + tier_->pending_rows(); }
  int64_t gpu_tokens() const { return n_sink_ + n_window_; }

  // See Runtime::Prefill / Append / Attend. Atomic: on error the state is unchanged (except that
  // an index update that failed is retried later; uncovered rows are scanned exactly).
  // exec: where the tensors live and the caller's stream (device pointers need the GPU backend).
  // q: n_queries of the prompt's queries (Runtime::Prefill), null when 0.
  absl::Status Prefill(const void* q, int64_t n_queries, const void* k, const void* v, int64_t n,
                       tbb::task_arena& arena, const Exec& exec = {});
  absl::Status Append(const void* k, const void* v, int64_t n, tbb::task_arena& arena,
                      const Exec& exec = {});
  // The decode step (decode_step.cc). streaming: [q_heads] flags or null; a streaming head
  // attends to the GPU tier only (DuoAttention's streaming heads).
  absl::Status Attend(const void* q, float* out, tbb::task_arena& arena,
                      const uint8_t* streaming = nullptr, const Exec& exec = {},
                      float* lse = nullptr);
  // One decode step of layers[0, n) (one layer of n different sequences; kvrt_attend_batch):
  // q [n, q_heads, d], out [n, q_heads, d], lse null or [n, q_heads]; the GPU tier of all in
  // one launch. status[i] is member i's outcome (its rows of out and lse are written only when
  // OK); the return value is an error of the step as a whole (every member failed, no row
  // written).
  static absl::Status Step(LayerState* const* layers, int n, const void* q, float* out,
                           tbb::task_arena& arena, const uint8_t* streaming, const Exec& exec,
                           absl::Status* status, float* lse = nullptr);
  const std::vector<int64_t>& attended(int q_head) const { return attended_[q_head]; }
  // The lse the last attend's estimate of the cold tokens it did not attend added for q_head
  // (-inf: no estimate), with record_attended.
  float estimate_lse(int q_head) const { return estimate_lse_[q_head]; }
  bool has_attended() const { return !attended_.empty(); }

  // Waits for this layer's background index refresh. Runtime::AttendBatch calls it from the
  // caller's thread before running attends on the arena's workers: a worker blocked in that wait
  // could otherwise hold the thread the refresh needs.
  void SettleBackgroundWork();

  // Gives back every counter this layer added (at release).
  void Release();

  // Before the store is read or grown: background work (a prefill's job, an index refresh) done,
  // staged and evicted rows moved in (Runtime::WaitSequence calls it too).
  absl::Status SettleCold();
  // SettleCold in two parts, for a selection scored on the device: what the selection reads (the
  // cold indexes, a prompt's job) before its kernels are queued, the decode evictions after.
  // *index_wait_ns (when given): the time it waited for a background index build or refresh
  // (time_background_wait_ns), which the step keeps out of time_d2h_ns.
  absl::Status SettleBeforeSelect(int64_t* index_wait_ns = nullptr);
  absl::Status SettleEvictions();
  absl::Status SettleReadyEvictions() { return tier_->SettleReadyEvictions(&cold_); }

 private:
  AppendPlan PlanAppend(int64_t n) const;
  absl::Status AppendTokens(const void* k, const void* v, int64_t n, const Exec& exec);
  // Prefill, GPU backend, cluster kind: the prompt's cold segments clustered on the GPU from the
  // call's k, v (segment_build.h) and preset into the indexes that the refresh builds next.
  void BuildSegmentsOnGpu(const void* k, const void* v, const Exec& exec);
  void RecordAttended(const ColdSelection& sel);
  void CountStep(const ColdSelection& sel);
  void CountColdTime(const ColdSelection& sel, int64_t wall);
  // Whether this step's cold selection is scored on the GPU (a two-level kind's summary).
  bool UsesGpuSelect(const uint8_t* streaming) const;
  // KVRT_COLD_AUTO's choice for this attend, and what it learns from the attend's wall time.
  bool ChooseFetch();
  void RecordColdCost(bool fetch, int64_t ns);

  const RuntimeConfig* cfg_;
  Runtime::Counters* counters_;
  std::unique_ptr<TierBackend> tier_;
  ColdTier cold_;
  int64_t length_ = 0;
  // A prompt's index build (host pointers) runs in the background: the layer's next append waits
  // for it, whatever the backend (the caller's thread alone reads and clears this).
  bool prompt_build_ = false;
  int64_t n_sink_ = 0, n_window_ = 0;
  std::vector<std::vector<int64_t>> attended_;  // per q head, when record_attended
  std::vector<float> estimate_lse_;             // per q head, when record_attended
  // KVRT_COLD_AUTO: moving average of the attend wall time per mode (0 = not tried), attends.
  double cold_cost_ns_[2] = {0, 0};
  int64_t cold_attends_ = 0;
};

}  // namespace kvrt::runtime

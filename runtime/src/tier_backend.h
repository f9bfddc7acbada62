#pragma once
// The GPU tier of one (sequence, layer): the sinks and the window ring, behind one interface with
// two backends. HostTier keeps them in host memory (no GPU; CI); DeviceTier keeps them in device
// memory and moves tokens that leave the window through the eviction pipeline (transfer/).
// LayerState (layer_state.h) drives either without knowing which.
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cold_tier.h"
#include "kvrt_runtime/runtime.h"
#include "oneapi/tbb/task_arena.h"
#include "partial_state.h"
#include "segment_build.h"

namespace kvrt::runtime {

class GpuContext;

// Where the tokens of one append go, by position. Computed once from the layer's length, the
// cold rows and the config (PlanAppend), so both backends move the same tokens.
struct AppendPlan {
  int64_t length = 0, new_length = 0;    // [length, new_length) arrive
  int64_t cold_begin = 0, cold_end = 0;  // positions cold afterwards that are not yet: [begin, end)
  int64_t evict = 0;                     // ring tokens leaving: [cold_begin, cold_begin + evict)
  int64_t direct_begin = 0, direct = 0;  // input tokens straight to the cold tier
  int64_t sink_end = 0;                  // sinks written: [length, sink_end)
  int64_t ring_begin = 0;                // input tokens into the ring: [ring_begin, new_length)
  bool need_sinks = false;               // first use allocates the sinks
  int64_t ring_grow = 0;                 // rows the ring grows by (RingGrowth)
  int64_t gpu_bytes = 0;                 // bytes the allocation adds to the GPU tier

  int64_t new_cold() const { return cold_end - cold_begin; }
};

// A batch step's members whose cold selection runs on the device are stepped in at most this many
// lanes (runs of consecutive members, each on one thread and, on the device, one stream;
// decode_step.cc says why); KVRT_DEVICE_MEMBER_LANES overrides it.
constexpr int kDefaultDeviceMemberLanes = 4;
int DeviceMemberLanes();
// Whether a batch step launches its members' device selections together (TierBackend::
// PrepareBatchSelect): on by default, KVRT_BATCH_SELECT=0 turns it off.
bool BatchSelectEnabled();
// Member i's lane of a batch of n in DeviceMemberLanes() lanes: runs of LaneGrain(n) members.
inline int LaneGrain(int n) {
  const int lanes = DeviceMemberLanes();
  return (n + lanes - 1) / lanes;
}

// The tier counts phase 1 reads for one layer.
struct TierCounts {
  int64_t n_sink = 0, n_window = 0;
  // The member's cold selection will run on the device (SelectClusters): a one-member step may
  // then launch the tier's attention from there, beside the selection's kernels.
  bool selects_on_device = false;
};

// One decode step of n layer states (kvrt_attend: n = 1; kvrt_attend_batch: one layer of n
// sequences) in one backend: scratch, events, and q as f32 for the CPU.
class TierStep {
 public:
  virtual ~TierStep() = default;
  int size() const { return n_; }
  // q of member i as f32 [q_heads, d] in host memory, for the cold tier. Brought to the host at
  // the first call (a device q: one wait), so that a step whose cold tier runs on the device does
  // not wait for it. Members may call it concurrently.
  const float* q(int i) const {
    std::call_once(q_once_, [this] {
      if (fetch_q_) fetch_q_(q_.data());
    });
    return q_.data() + static_cast<std::size_t>(i) * q_floats_;
  }

 protected:
  int n_ = 0;
  std::size_t q_floats_ = 0;
  mutable std::vector<float> q_;
  std::function<void(float*)> fetch_q_;  // fills q_ (null: filled already)
  mutable std::once_flag q_once_;
};

class TierBackend {
 public:
  virtual ~TierBackend() = default;

  // Allocates what `plan` needs and stores its tokens; rows leaving for the cold tier reach it now
  // (host) or at the next SettleEvictions (device). Atomic: on error nothing changed.
  virtual absl::Status Append(const AppendPlan& plan, const void* k, const void* v,
                              const Exec& exec, ColdTier* cold) = 0;
  // Rows evicted by earlier calls enter the cold tier (waits for their copies).
  virtual absl::Status SettleEvictions(ColdTier* cold) = 0;
  // The same without waiting: only the rows whose copies are complete enter the cold tier.
  virtual absl::Status SettleReadyEvictions(ColdTier* cold) { return SettleEvictions(cold); }
  // Rows evicted (or staged by a prefill) but not yet in the cold tier.
  virtual int64_t pending_rows() const = 0;
  // A prefill's cold rows that the device backend staged in device memory (device pointers) and
  // SettlePrompt moves to the cold tier: in the prefill's background job, or at the next call if
  // that job failed. The slots bound how many prompts a runtime stages at once.
  virtual int64_t pending_prompt_rows() const { return 0; }
  virtual absl::Status SettlePrompt(ColdTier* cold) {
    (void)cold;
    return absl::OkStatus();
  }
  // After a prefill filled the cold tier: what the first decode step would otherwise set up
  // (the direct step's registration of the stores and its pool), so that it is not on the
  // critical path. Failures are left for that step to meet.
  virtual void PrepareDecode(const ColdTier& cold) { (void)cold; }
  // The cold tier's stores are about to move (`moves`) or permute their rows in place
  // (ColdTier::SetStoreGuard); may run on a background thread.
  virtual void BeforeStoreChanges(bool moves) { (void)moves; }
  virtual void AcquirePromptSlot() {}
  virtual void ReleasePromptSlot() {}
  // Copies rows[i] of a call's tensor (row_bytes each; device memory when exec.device) to row i
  // of dst in host memory (one wait for all of them).
  virtual absl::Status CopyRowsToHost(void* dst, const void* src, std::size_t row_bytes,
                                      const std::vector<int64_t>& rows, const Exec& exec) = 0;
  // With a prompt staged (pending_prompt_rows() > 0): rows[i] of the prefill's device query
  // tensor are staged beside it, in the caller's stream order, and SettlePrompt hands them to
  // cold->SampleQueries before it builds anything. The prefill then does not wait for the
  // caller's stream (a layer's whole prompt attention, when the decoder attends before it
  // prefills). Unimplemented where nothing is staged.
  virtual absl::Status StagePromptQueries(const void* q, std::size_t row_bytes,
                                          const std::vector<int64_t>& rows, const Exec& exec) {
    (void)q, (void)row_bytes, (void)rows, (void)exec;
    return absl::UnimplementedError("no staged prompt to stage queries beside");
  }
  // Whether indexes refresh in the background (device: overlapping other layers' work) or at
  // once (host: results independent of timing).
  virtual bool background_refresh() const = 0;
  // Whether BeginStep and Finish compute on the calling thread (host: the step counts their wall
  // time in time_gpu_attention_ns and time_merge_ns) rather than record device times of their own.
  virtual bool computes_on_host() const { return false; }

  // Phase 1 of a decode step for tiers[0, n) (this backend's kind, one runtime; n = 1 for one
  // sequence): starts the tiers' partial attention for q [n, q_heads, d] (device: one launch for
  // all; host: computed) and makes q available in f32 to the CPU.
  virtual absl::StatusOr<std::unique_ptr<TierStep>> BeginStep(TierBackend* const* tiers,
                                                              const TierCounts* counts, int n,
                                                              const void* q, const Exec& exec,
                                                              tbb::task_arena& arena) = 0;
  // Phase 3, fetch mode, for member i (tiers[i] == this): the selected rows copied to the
  // accelerator and attended there; the state joins member i's in Finish. Members may call it
  // concurrently. Unimplemented on the host backend.
  virtual bool can_fetch() const = 0;
  virtual absl::Status AttendFetched(TierStep* step, int i, const ColdSelection& sel,
                                     const ColdTier& cold, tbb::task_arena& arena) = 0;
  // Phase 2 on the accelerator for a two-level kind (cluster): member i's summary scored there
  // (from a device copy, refreshed when the cold tier's index changed), its selection brought back
  // to *sel (completed by the cold tier: uncovered rows, NaN rows) and its estimate left in
  // member i's device state for Finish. FailedPrecondition when no summary exists yet (the caller
  // falls back to ColdTier::Select); ResourceExhausted past gpu_memory_limit. With a hot cache
  // (config.hot_cache_fraction), the selected rows are attended on the device as well and *sel
  // keeps only the rows left to the CPU (sel->cached counts the others).
  // settle_evictions(wait) brings the layer's pending decode evictions into `cold`: it is called
  // once the selection's kernels are queued (they read only the summary), before anything reads
  // the cold rows, so that the host's wait for the evictions overlaps the device's work. With
  // wait = false only the rows whose copies are complete enter; the direct step attends the
  // others on the device, from the pinned block the append's kernel wrote them to, and sets
  // sel->evictions_on_device (they enter the cold tier at the layer's next call).
  virtual bool can_select_clusters() const = 0;
  // A batch's selections in one launch per kernel (BatchSelectEnabled()): before the members'
  // cold phases, PrepareBatchSelect for each member whose selection runs on the device (on the
  // step's stream: its summary, scratch and the waits its kernels need; FailedPrecondition with
  // no summary yet, Unimplemented where the backend has no batch form), then LaunchBatchSelect
  // on the step's lead backend; SelectClusters then takes the launched selection. A member not
  // prepared selects in SelectClusters as without them.
  virtual absl::Status PrepareBatchSelect(TierStep* step, int i, const ColdTier& cold) {
    (void)step;
    (void)i;
    (void)cold;
    return absl::UnimplementedError("no batch selection in this backend");
  }
  virtual absl::Status LaunchBatchSelect(TierStep* step) {
    (void)step;
    return absl::OkStatus();
  }
  virtual absl::Status SelectClusters(
      TierStep* step, int i, const ColdTier& cold, ColdSelection* sel, tbb::task_arena& arena,
      absl::FunctionRef<absl::Status(bool wait)> settle_evictions) = 0;
  // Phase 4 for every member at once: member i's tier state, its fetched state and states[i]
  // (host memory) merged once, into out [n, q_heads, d] and, when not null, the merged
  // log-sum-exp into lse [n, q_heads] (one launch on the device; both in the call's memory).
  // Rows of members with ok[i] = 0 (failed in phases 2-3) are left untouched.
  virtual absl::Status Finish(TierStep* step, const std::vector<StepStates>& states,
                              const std::vector<uint8_t>& ok, float* out, float* lse) = 0;

  // The cluster kind's GPU build at prefill (segment_build.h): whether this backend runs it, and
  // the run for a prompt's cold rows k, v ([rows, kv_heads, d] from store row 0, in the call's
  // memory) in the metric of `cold`'s index.
  virtual bool builds_segments() const { return false; }
  virtual absl::StatusOr<std::vector<std::vector<cpu_index::SegmentClustering>>> BuildSegments(
      const ColdTier& cold, const void* k, const void* v, int64_t rows, const Exec& exec) {
    (void)cold, (void)k, (void)v, (void)rows, (void)exec;
    return absl::UnimplementedError("segment build: no GPU backend");
  }

  // Whether the sink buffers exist (allocated at first use).
  virtual bool has_sinks() const = 0;
  // Rows the window ring must grow by to hold positions below new_length. The host backend grows
  // it as it fills (doubling, up to window_tokens: before it wraps, position p sits in slot p - S,
  // so growth keeps every slot in place); the device backend allocates it whole at first use.
  virtual int64_t RingGrowth(int64_t new_length) const = 0;
  // Bytes of GPU-tier buffers held.
  virtual std::size_t allocated_bytes() const = 0;
  // Waits for device work and drops evictions in flight (release).
  virtual void Release() = 0;
};

std::unique_ptr<TierBackend> MakeHostTier(const RuntimeConfig* config);
std::unique_ptr<TierBackend> MakeDeviceTier(const RuntimeConfig* config,
                                            Runtime::Counters* counters, GpuContext* gpu);

}  // namespace kvrt::runtime

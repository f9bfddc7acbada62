#pragma once
// The device backend's classes (device_tier.h is its factory): DeviceStep, a step's device state
// for one sequence or a batch, and DeviceTier, one (sequence, layer)'s GPU tier. Its methods are
// in three files: device_tier.cc (the tier's memory: appends, evictions, prompts),
// device_tier_step.cc (a step's begin, the tier's attention, the fetched rows, the merge) and
// device_tier_select.cc (the summary on the device, the cluster selection, the direct step and
// the hot cache's attention).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "align.h"
#include "device_hot_cache.h"
#include "device_tier.h"
#include "direct_step.h"
#include "kvrt_common/clock.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_gpu/cluster_kernels.h"
#include "kvrt_gpu/code_rest.h"
#include "kvrt_gpu/code_scan.h"
#include "kvrt_gpu/kernels.h"
#include "tier_backend.h"

namespace kvrt::runtime::device_tier_internal {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Free pinned blocks kept by the pool (eviction batches, q staging).
constexpr std::size_t kPinnedCacheBytes = std::size_t{512} << 20;
constexpr std::size_t kDirectChunkBytes = std::size_t{32} << 20;  // a prompt's D2H, per K and V
// The fused decode append writes the leaving rows over the bus on the caller's stream; beyond a
// few hundred rows the copy stream's asynchronous D2H (Evict) keeps that stream free sooner.
constexpr int64_t kFusedEvictMaxRows = 256;

// The call's stream: the caller's for device pointers, else one of the runtime's (returned at
// scope exit).
class StreamLease {
 public:
  StreamLease(GpuContext* ctx, const Exec& exec) : ctx_(ctx) {
    if (exec.device) {
      stream_ = exec.stream;
      return;
    }
    auto s = ctx->AcquireStream();
    if (!s.ok()) {
      status_ = s.status();
      return;
    }
    stream_ = *s;
    owned_ = true;
  }
  ~StreamLease() {
    if (owned_) ctx_->ReleaseStream(stream_);
  }
  const absl::Status& status() const { return status_; }
  void* get() const { return stream_; }

 private:
  GpuContext* ctx_;
  void* stream_ = nullptr;
  bool owned_ = false;
  absl::Status status_;
};

class DeviceTier;

// State slots of a step, one list per member, merged once: the tier's, the cold rows' (fetched on
// the device or uploaded from the CPU), an estimate, the rows attended from the hot cache.
constexpr int kTierSlot = 0, kColdSlot = 1, kEstimateSlot = 2, kHotSlot = 3, kSlots = 4;

// A device selection's scratch (SelectClusters): density [H, C] | group keys [G, C] | outlier
// scores [H, O] | selected [H, C] | count [H] | tokens [H] (int64) | ClusterStep's workspace (f32).
// on_codes (selection on codes): the clusters' masses [H, C] after the rest; value_rest (the rest
// estimated from value codes, DeviceTier::LaunchValueRest): then the attended mask [H, C] (bytes)
// and CodeValueRest's workspace (f32).
struct SelectScratch {
  SelectScratch(const gpu::ClusterSummaryView& s, int H, bool on_codes = false,
                bool value_rest = false) {
    const auto C = static_cast<std::size_t>(s.num_clusters);
    const auto O = static_cast<std::size_t>(std::max(s.num_outliers, 1));
    key_at = density_at + H * C * 4;
    outlier_at = key_at + static_cast<std::size_t>(s.kv_heads) * C * 4;
    selected_at = outlier_at + H * O * 4;
    count_at = selected_at + H * C * 4;
    tokens_at = (count_at + H * 4 + 7) / 8 * 8;
    ws_at = Align256(tokens_at + H * 8);
    bytes = ws_at + gpu::ClusterStepWorkspaceFloats(s, H) * 4;
    if (on_codes) {
      lse_at = Align256(bytes);
      bytes = lse_at + H * C * 4;
    }
    if (on_codes && value_rest) {
      gpu::CodeScanView keys;
      keys.kv_heads = s.kv_heads;
      keys.head_dim = s.head_dim;
      keys.num_clusters = s.num_clusters;
      attended_at = Align256(bytes);
      rest_ws_at = Align256(attended_at + H * C);
      bytes = rest_ws_at + static_cast<std::size_t>(gpu::CodeValueRestWorkspaceFloats(keys, H)) * 4;
    }
  }
  std::size_t density_at = 0, key_at, outlier_at, selected_at, count_at, tokens_at, ws_at, bytes;
  std::size_t lse_at = 0, attended_at = 0, rest_ws_at = 0;
};

// The most of a step's scratch that BeginStep sets aside for its members' selections.
constexpr std::size_t kStepSelectScratchBytes = std::size_t{256} << 20;

// Scratch of one step of n members, slot-major: o [slot_count, n, q_heads, d], lse [slot_count,
// n, q_heads], so that each slot's states are contiguous for one batched launch and the merge sees
// rows = n * q_heads. A one-member step whose selection runs on the device has
// kHotSlot + gpu::kDirectAttendMaxSplits slots: the direct step leaves its split states from the
// hot slot on (hot_states of them), and the step's one merge takes them with the others.
class DeviceStep : public TierStep {
 public:
  DeviceStep(GpuContext* ctx, const Exec& exec, int n, int q_heads, int d)
      : ctx(ctx),
        exec(exec),
        lease(ctx, exec),
        rows(n * q_heads),
        state_floats(static_cast<std::size_t>(n) * q_heads * d) {
    n_ = n;
    q_floats_ = static_cast<std::size_t>(q_heads) * d;
    q_.resize(n * q_floats_);
    fetched.assign(n, 0);
    estimated.assign(n, 0);
    hot.assign(n, 0);
    pending.assign(n, 0);
  }
  ~DeviceStep() override {
    // NOTE: errors here are sticky CUDA errors that the step's next call reports.
    (void)JoinTier();
    (void)JoinLanes();
    // A member prepared with the batch's but never selected (an earlier failure): its own scratch.
    for (Selection& s : selections)
      if (s.own != nullptr) (void)transfer::FreeAsync(std::exchange(s.own, nullptr), lease.get());
    if (scratch != nullptr) (void)transfer::FreeAsync(scratch, lease.get());
  }
  // The stream member i's device work goes on: for a batch, its lane's (a runtime stream forked
  // from the step's at the lane's first member, joined by JoinLanes); for one sequence, or when
  // no stream could be forked, the step's own.
  void* MemberStream(int i) {
    if (size() == 1 || forked == nullptr || lanes.empty()) return lease.get();
    Lane& lane = lanes[std::min<std::size_t>(i / lane_grain, lanes.size() - 1)];
    std::lock_guard<std::mutex> lock(lanes_mu);
    if (lane.stream == nullptr) {
      lane.stream = lease.get();
      if (absl::StatusOr<void*> st = ctx->AcquireStream(); st.ok()) {
        if (transfer::StreamWaitEvent(*st, *forked).ok())
          lane.stream = *st;
        else
          ctx->ReleaseStream(*st);
      }
    }
    return lane.stream;
  }
  // The step's stream waits for every lane's work (before the merge reads the members' states,
  // and before the scratch they use is freed); the lanes' streams go back to the pool.
  absl::Status JoinLanes() {
    absl::Status first;
    for (std::size_t l = 0; l < lanes.size(); ++l) {
      void* s = std::exchange(lanes[l].stream, nullptr);
      if (s == nullptr || s == lease.get()) continue;
      transfer::Event& joined = (*lane_joined)[l];
      absl::Status st = joined.Record(s);
      if (st.ok()) st = transfer::StreamWaitEvent(lease.get(), joined);
      if (!st.ok()) (void)transfer::StreamSynchronize(s);  // ordered the slow way
      ctx->ReleaseStream(s);
      if (first.ok()) first = st;
    }
    return first;
  }
  // The step's stream waits for the tier's attention (on a stream of its own since BeginStep):
  // before the merge reads the tier slot, and before the scratch it writes is freed.
  absl::Status JoinTier() {
    if (tier_done == nullptr) return absl::OkStatus();
    const transfer::Event* e = std::exchange(tier_done, nullptr);
    return transfer::StreamWaitEvent(lease.get(), *e);
  }
  float* q_mut() { return q_.data(); }
  void set_fetch_q(std::function<void(float*)> f) { fetch_q_ = std::move(f); }
  float* o(int slot, int i) { return o_states + slot * state_floats + i * q_floats_; }
  float* lse(int slot, int i) { return lse_states + slot * rows + i * (rows / n_); }

  GpuContext* ctx;
  Exec exec;
  StreamLease lease;
  const int rows;                  // n * q_heads
  const std::size_t state_floats;  // n * q_heads * d
  void* scratch = nullptr;
  float* o_states = nullptr;
  float* lse_states = nullptr;
  float* out_dev = nullptr;  // host output: staging of the merged result
  float* lse_dev = nullptr;  // the same for the merged lse [n, q_heads]
  const void* q_dev = nullptr;
  // Every member's q in f32 on the device, converted in one launch at BeginStep when some member
  // selects on the device (null otherwise).
  float* q_f32 = nullptr;
  // Member i's share of the step's scratch for its device selection (SelectScratch), sized at
  // BeginStep from its summary then; a member whose summary grew since allocates its own.
  std::vector<unsigned char*> select_scratch;
  std::vector<std::size_t> select_bytes;
  // A member's selection as prepared for its kernels (DeviceTier::PrepareSelect): launched by
  // itself in SelectClusters, or with the batch's (PrepareBatchSelect, LaunchBatchSelect).
  struct Selection {
    bool prepared = false;
    bool launched = false;
    gpu::ClusterStepParams params;
    gpu::ClusterStepOutputs outs;
    const float* q = nullptr;
    float* workspace = nullptr;
    bool direct_q = false;
    void* own = nullptr;  // its own scratch (the step's share was too small), freed by its lane
    // The rest estimated from value codes after the selection (DeviceTier::LaunchValueRest) into
    // the estimate slot, instead of ClusterStep's estimate from the value means.
    bool value_rest = false;
    uint8_t* attended = nullptr;  // [H, C]
    float* rest_workspace = nullptr;
  };
  std::vector<Selection> selections;  // [n] once some member prepared with the batch's
  std::vector<uint8_t> fetched;       // [n] member's cold state is in its device slot
  std::vector<uint8_t> estimated;     // [n] member's estimate is in its device slot
  std::vector<uint8_t> hot;           // [n] member's hot-cache state is in its device slot
  int hot_states = 1;                 // states from the hot slot on (one unless split states)
  int slot_count = kSlots;
  std::vector<uint8_t> pending;  // [n] its cold slot holds its pending evictions' state
  bool timed = true;             // the step records the timing events (DeviceTier::kTimedEvery)
  std::vector<DeviceTier*> tiers;
  // A batch's members select on their lane's stream (MemberStream), forked here: decode_step.cc
  // steps them in runs of lane_grain members, each run on one thread (DeviceMemberLanes()), so a
  // stream per run rather than per member: three driver calls (fork, record, join) fewer per
  // member, in a batch step that the host's driver calls bound. The events are the lead tier's.
  const transfer::Event* forked = nullptr;
  struct Lane {
    void* stream = nullptr;
  };
  std::vector<Lane> lanes;
  int lane_grain = 1;
  std::mutex lanes_mu;
  std::vector<transfer::Event>* lane_joined = nullptr;
  // The tier's attention, launched by DeviceTier::LaunchTier (pending: not yet).
  gpu::TierBatch tier;
  gpu::AttnParams tier_params;
  float* tier_ws = nullptr;  // its split states, in the step's scratch
  bool tier_pending = false;
  // Recorded after the tier's attention on its own stream; null once joined (or when it ran on
  // the step's stream).
  const transfer::Event* tier_done = nullptr;
};

class DeviceTier final : public TierBackend {
  friend class DeviceStep;

 public:
  DeviceTier(const RuntimeConfig* config, Runtime::Counters* counters, GpuContext* ctx)
      : cfg_(config),
        counters_(counters),
        ctx_(ctx),
        hot_(config, counters, ctx),
        direct_(config, counters, ctx) {}
  ~DeviceTier() override { Release(); }

  absl::Status Append(const AppendPlan& plan, const void* k, const void* v, const Exec& exec,
                      ColdTier* cold) override;
  absl::Status SettleEvictions(ColdTier* cold) override;
  absl::Status SettleReadyEvictions(ColdTier* cold) override;
  // The two above: the pending batches into `cold`, each waited for (wait) or the complete ones.
  absl::Status Settle(ColdTier* cold, bool wait);
  // Rows of one pending batch the direct step attends on the device instead of waiting for them.
  static constexpr int64_t kPendingAttendRows = 64;
  int64_t pending_rows() const override { return evictions_.pending_rows() + prompt_.rows; }
  int64_t pending_prompt_rows() const override { return prompt_.rows; }
  absl::Status SettlePrompt(ColdTier* cold) override;
  void PrepareDecode(const ColdTier& cold) override {
    transfer::CudaCallScope on_device(cfg_->call_device());
    StreamLease lease(ctx_, Exec{});
    if (!lease.status().ok()) return;
    // The summary's device copy too, which the first step would otherwise assemble and upload
    // on the decode path (a 128K layer: ~40 MB, ~60 ms of the first token on the H200). A failure
    // here (no summary, no room under gpu_memory_limit) is left for the step to meet and report.
    // (A summary exists only for a two-level kind's built index.)
    const bool uploaded = cfg_->index.cluster.gpu_select && cold.summary(0) != nullptr &&
                          SyncSummary(cold, lease.get()).ok();
    // The decode appends' eviction blocks (a token's K and V, two steps in flight): the first
    // decode tokens waited for cudaHostAlloc (~0.3 ms each, ten in the first token at 128K,
    // profiled), which also holds the driver's lock against the other threads' launches.
    (void)ctx_->pinned().Reserve(token_bytes(), 4);
    // The direct step's setup and its pages for the blocks every step reads, also off the decode
    // path (a failure turns the direct step off for the layer: it takes the CPU-ordered path).
    const bool direct = direct_.Prepare(cold, lease.get());
    if (direct && uploaded) (void)direct_.Warm(cold, summary_view_.num_clusters, lease.get());
    // The stream's uploads (summary, page table, pages) must be complete before a step on
    // another stream reads them.
    if (direct || uploaded) (void)transfer::StreamSynchronize(lease.get());
  }
  void BeforeStoreChanges(bool moves) override {
    if (!direct_.registered()) return;
    transfer::CudaCallScope on_device(cfg_->call_device());
    (void)SyncLastUse();  // a direct step may still read the stores
    // Rows permuted in place keep their registration; moved memory needs a new one.
    if (moves)
      direct_.DropRegistrations();
    else
      (void)direct_.Quiesce();
  }
  void AcquirePromptSlot() override { ctx_->AcquirePromptSlot(); }
  void ReleasePromptSlot() override { ctx_->ReleasePromptSlot(); }
  absl::Status CopyRowsToHost(void* dst, const void* src, std::size_t row_bytes,
                              const std::vector<int64_t>& rows, const Exec& exec) override;
  absl::Status StagePromptQueries(const void* q, std::size_t row_bytes,
                                  const std::vector<int64_t>& rows, const Exec& exec) override;
  bool background_refresh() const override { return true; }
  absl::StatusOr<std::unique_ptr<TierStep>> BeginStep(TierBackend* const* tiers,
                                                      const TierCounts* counts, int n,
                                                      const void* q, const Exec& exec,
                                                      tbb::task_arena& arena) override;
  bool can_fetch() const override { return true; }
  absl::Status AttendFetched(TierStep* step, int i, const ColdSelection& sel, const ColdTier& cold,
                             tbb::task_arena& arena) override;
  bool can_select_clusters() const override { return true; }
  bool builds_segments() const override {
    return cfg_->index.cluster.gpu_build && SegmentBuildSupported(*cfg_);
  }
  absl::StatusOr<std::vector<std::vector<cpu_index::SegmentClustering>>> BuildSegments(
      const ColdTier& cold, const void* k, const void* v, int64_t rows, const Exec& exec) override {
    StreamLease lease(ctx_, exec);
    KVRT_RETURN_IF_ERROR(lease.status());
    // The caller's stream (device pointers) orders the build after the tensors' producers.
    return BuildPromptSegments(cold, k, v, exec.device, rows, lease.get(), &ctx_->pinned());
  }
  absl::Status PrepareBatchSelect(TierStep* step, int i, const ColdTier& cold) override;
  absl::Status LaunchBatchSelect(TierStep* step) override;
  absl::Status SelectClusters(TierStep* step, int i, const ColdTier& cold, ColdSelection* sel,
                              tbb::task_arena& arena,
                              absl::FunctionRef<absl::Status(bool)> settle_evictions) override;
  absl::Status Finish(TierStep* step, const std::vector<StepStates>& states,
                      const std::vector<uint8_t>& ok, float* out, float* lse) override;
  bool has_sinks() const override { return !sink_k_.empty(); }
  int64_t RingGrowth(int64_t new_length) const override {
    return ring_k_.empty() && new_length > cfg_->sink_tokens ? cfg_->window_tokens : 0;
  }
  std::size_t allocated_bytes() const override {
    return sink_k_.size() + sink_v_.size() + ring_k_.size() + ring_v_.size();
  }
  void Release() override {
    evictions_.Discard();
    DropPrompt();
    (void)SyncLastUse();  // device work still reading the buffers
    counters_->gpu_allocated_bytes -= static_cast<int64_t>(summary_.size());
    counters_->summary_gpu_bytes -= static_cast<int64_t>(summary_.size());
    summary_.Reset();
    hot_.Release();
    direct_.Release();
  }

 private:
  std::size_t token_bytes() const {
    return static_cast<std::size_t>(cfg_->num_kv_heads) * cfg_->head_dim * DTypeSize(cfg_->dtype);
  }
  absl::Status Allocate(const AppendPlan& plan);
  absl::Status Evict(const AppendPlan& plan, void* stream);
  // The batch reaches the cold tier once `stream` passes this point (its `done` event).
  absl::Status QueueEviction(transfer::EvictionBatch batch, int64_t rows, void* stream);
  // Append's two ways: the fused decode append (one kernel) and the general one (copies).
  // The leaving rows go straight into the cold stores' next rows where the direct step holds
  // them registered (InPlaceTarget), else into pinned blocks.
  absl::Status AppendEvictFused(const AppendPlan& plan, const unsigned char* k,
                                const unsigned char* v, void* stream, ColdTier* cold);
  // Where the fused append may write its n leaving rows into `cold`'s stores on the device: the
  // rows after the cold rows and the pending batches', every kv head's key and value rows; false
  // where the direct step does not hold the stores registered that far (or KVRT_IN_PLACE_EVICT=0).
  bool InPlaceTarget(ColdTier* cold, int64_t n, gpu::HeadRows* to);
  // `stream` follows the oldest pending batch's `done` (a wait, unless stream order gives it).
  absl::Status FollowPendingEviction(DeviceStep* step, void* stream);
  absl::Status AppendStaged(const AppendPlan& plan, const unsigned char* ks,
                            const unsigned char* vs, const Exec& exec, void* stream,
                            ColdTier* cold);
  absl::Status AppendFromDevice(const unsigned char* k, const unsigned char* v, int64_t rows,
                                void* stream, ColdTier* cold, bool head_major = false);
  absl::Status UploadArrays(int64_t n_sink, int64_t n_window, void* stream);
  // The one pending eviction batch (copy in flight) attended on the device into member i's cold
  // slot: its rows are read where the append's kernel wrote them (the pinned block), after its
  // `done` event, which then moves past this read (the block goes back to the pool only after).
  // q: device f32 [q_heads, d].
  absl::Status AttendPendingEvictions(DeviceStep* step, int i, const float* q, void* stream);
  // rows head-major on the device ([G, rows, d], K then V) into the cold tier's registered stores.
  absl::Status CopyIntoStores(const unsigned char* k, int64_t rows, void* stream, ColdTier* cold);
  absl::Status StagePrompt(const unsigned char* k, const unsigned char* v, int64_t rows,
                           void* stream);
  void DropPrompt();
  absl::StatusOr<std::vector<std::vector<cpu_index::SegmentClustering>>> BuildPromptSegments(
      const ColdTier& cold, const void* k, const void* v, bool on_device, int64_t rows,
      void* stream, transfer::PinnedPool* pinned) const;
  absl::StatusOr<void*> LayOutPrompt(
      const std::vector<std::vector<cpu_index::SegmentClustering>>& parts, void* stream,
      std::vector<std::vector<int64_t>>* order);
  absl::Status SyncSummary(const ColdTier& cold, void* stream);
  // The step's tier attention (step->tier, tier_params), on a stream of the pool that waits for
  // tier_fork_ (recorded by the caller on the step's stream: `forked`; else here), or inline on
  // the step's stream when the pool has none.
  absl::Status LaunchTier(DeviceStep* step, bool forked);
  // Member i's selection before its kernels, on `stream`: the summary on the device (its upload
  // when the index changed; FailedPrecondition with no summary yet), the budget, the scratch, the
  // penalty offsets and the group mask with the waits they need.
  absl::Status PrepareSelect(DeviceStep* step, int i, const ColdTier& cold, void* stream,
                             DeviceStep::Selection* s);
  // After the selection's kernels, on the same stream: the rest's estimate from value codes into
  // the member's estimate slot (Selection::value_rest; nothing otherwise).
  absl::Status LaunchValueRest(const DeviceStep::Selection& s, void* stream) const;
  absl::Status AttendHot(DeviceStep* step, int i, const ColdTier& cold, const int32_t* selected,
                         const int32_t* count, int64_t C, void* stream, ColdSelection* sel,
                         tbb::task_arena& arena);
  void CollectTiming();

  const RuntimeConfig* cfg_;
  Runtime::Counters* counters_;
  GpuContext* ctx_;
  transfer::DeviceBuffer sink_k_, sink_v_;  // [sink_tokens, kv_heads, d]
  transfer::DeviceBuffer ring_k_, ring_v_;  // [window_tokens, kv_heads, d]; p in slot (p-S)%W
  // The kernel's view of the tier (gpu::TierArrays, batch 1), re-uploaded when a count changes.
  transfer::DeviceBuffer arrays_;
  std::vector<unsigned char> arrays_host_;
  int32_t arrays_n_sink_ = -1, arrays_n_window_ = -1;
  transfer::Event last_use_;  // recorded after each call's device work
  // A batch step's one record for all its members (ShareLastUse), in place of last_use_. Guarded
  // by last_use_mu_: the store guard (BeforeStoreChanges) reads it from a background index job
  // while the caller's thread appends; a reader keeps its own reference while it waits.
  mutable std::mutex last_use_mu_;
  std::shared_ptr<const transfer::Event> shared_last_use_;
  void* last_use_stream_ = nullptr;  // the stream it was recorded on
  std::shared_ptr<const transfer::Event> SharedLastUse() const {
    std::lock_guard<std::mutex> lock(last_use_mu_);
    return shared_last_use_;
  }
  // Waits on the host for the tier's last device work (OK at once before any).
  absl::Status SyncLastUse() const {
    if (!used_) return absl::OkStatus();
    const std::shared_ptr<const transfer::Event> shared = SharedLastUse();
    return (shared != nullptr ? *shared : last_use_).Synchronize();
  }
  // Orders `stream` after the last use: a driver call, skipped where it was recorded on the
  // same stream (a caller's one stream: two waits per sequence and layer-step that stream order
  // already gives), if that is a created stream (transfer::IsCreatedStream).
  absl::Status WaitLastUse(void* stream) {
    if (!used_) return absl::OkStatus();
    if (stream == last_use_stream_ && transfer::IsCreatedStream(stream)) return absl::OkStatus();
    const std::shared_ptr<const transfer::Event> shared = SharedLastUse();
    return transfer::StreamWaitEvent(stream, shared != nullptr ? *shared : last_use_);
  }
  absl::Status RecordLastUse(void* stream) {
    KVRT_RETURN_IF_ERROR(last_use_.Record(stream));
    {
      std::lock_guard<std::mutex> lock(last_use_mu_);
      shared_last_use_.reset();
    }
    last_use_stream_ = stream;
    used_ = true;
    return absl::OkStatus();
  }
  // The tier's last use is `done`, recorded on stream after it (a batch step's members: one
  // record instead of one per member).
  void ShareLastUse(std::shared_ptr<const transfer::Event> done, void* stream) {
    {
      std::lock_guard<std::mutex> lock(last_use_mu_);
      shared_last_use_ = std::move(done);
    }
    last_use_stream_ = stream;
    used_ = true;
  }
  // As a batch step's lead: an event no member holds any more (made when none is free).
  absl::StatusOr<std::shared_ptr<transfer::Event>> FreeBatchEvent() {
    for (const auto& e : batch_done_)
      if (e.use_count() == 1) return e;
    KVRT_ASSIGN_OR_RETURN(transfer::Event e, transfer::Event::Create(false));
    return batch_done_.emplace_back(std::make_shared<transfer::Event>(std::move(e)));
  }
  std::vector<std::shared_ptr<transfer::Event>> batch_done_;  // FreeBatchEvent's
  // A batch step's fork and its lanes' joins (DeviceStep::MemberStream), as the step's lead.
  transfer::Event batch_forked_;
  std::vector<transfer::Event> lane_joined_;
  std::atomic<bool> used_{false};  // read by the store guard too (see last_use_mu_)
  transfer::EvictionQueue evictions_;
  // AttendPendingEvictions' row lists (gpu::GatherBatch: offsets [H + 1], then ids [H * rows])
  // for batches of pending_lists_rows_ rows, uploaded through pending_staging_.
  transfer::DeviceBuffer pending_lists_;
  int64_t pending_lists_rows_ = 0;
  transfer::UploadStaging pending_staging_;
  // A prefill's cold rows (device pointers) in device staging [K | V], [rows, kv_heads, d] each,
  // until SettlePrompt moves them to the cold tier (its background job, or the next call).
  struct PendingPrompt {
    void* staging = nullptr;  // stream-ordered allocation
    int64_t rows = 0;
    // The prefill's query sample (StagePromptQueries): query_rows rows of query_row_bytes.
    void* queries = nullptr;  // stream-ordered allocation
    int64_t query_rows = 0;
    std::size_t query_row_bytes = 0;
    transfer::Event ready;  // the staging copies are complete
  } prompt_;
  // Timing events of the last attend (read when complete).
  // Device exec times 1 attend in kTimedEvery (the five records and four reads of these events were
  // a fifth of the host's CUDA calls per attend) and scales what it measures; host exec, which
  // synchronizes anyway, times every attend.
  static constexpr int kTimedEvery = 8;
  transfer::Event ev_start_, ev_tier_, ev_h2d_begin_, ev_h2d_, ev_merge_;
  // The tier attention's fork from the step's stream and its end (DeviceStep::tier_done).
  transfer::Event tier_fork_, tier_done_;
  bool timing_pending_ = false;
  int64_t timing_scale_ = 1;  // of the pending measurement
  uint32_t attends_seen_ = 0;
  // Fetch mode: the pinned staging of the gathered K/V rows, reused by the next attend once the
  // H2D out of it (fetch_done_) has completed.
  transfer::PinnedBlock fetch_block_;
  transfer::Event fetch_done_;
  // Two-level kinds: the device copy of every kv head's summary (gpu::ClusterSummaryView layout,
  // clusters and outliers padded to the largest head), from the cold tier's index_version.
  transfer::DeviceBuffer summary_;
  std::vector<unsigned char> summary_host_;
  int64_t summary_version_ = -1;
  gpu::ClusterSummaryView summary_view_;
  int64_t summary_clustered_ = 0;  // the most clustered rows of a kv head, this version
  // Selection on codes (SelectsOnCodes): the rows' codes and the segments' grids in summary_
  // after the summary's arrays (rows 0 when not selecting on codes), and each cluster's first row.
  gpu::CodeScanView code_view_;
  const int64_t* code_begin_ = nullptr;  // [kv_heads, C]
  // And with value codes (ClusterConfig::value_bits), theirs beside them (code null otherwise).
  gpu::CodeValueView value_view_;
  DeviceHotCache hot_;
  DirectStep direct_;
  // The tier arrays of a batch step led by this tier (pinned: a pageable upload would stall).
  transfer::UploadStaging batch_arrays_;
};

}  // namespace kvrt::runtime::device_tier_internal

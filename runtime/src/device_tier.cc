// The device backend of the GPU tier (device_tier.h, tier_backend.h): device sinks + window ring,
// the eviction pipeline, fetch mode and the device half of a decode step.
#include "device_tier.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "align.h"
#include "clock.h"
#include "device_hot_cache.h"
#include "direct_step.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_gpu/cluster_kernels.h"
#include "kvrt_gpu/code_rest.h"
#include "kvrt_gpu/code_scan.h"
#include "kvrt_gpu/kernels.h"
#include "oneapi/tbb/parallel_for.h"
#include "tier_backend.h"
#include "timeline.h"

namespace kvrt::runtime {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Free pinned blocks kept by the pool (eviction batches, q staging).
constexpr std::size_t kPinnedCacheBytes = std::size_t{512} << 20;
constexpr std::size_t kDirectChunkBytes = std::size_t{32} << 20;  // a prompt's D2H, per K and V
// The fused decode append writes the leaving rows over the bus on the caller's stream; beyond a
// few hundred rows the copy stream's asynchronous D2H (Evict) keeps that stream free sooner.
constexpr int64_t kFusedEvictMaxRows = 256;

// Ring slot of ring-relative index r is r % W. A run of `count` consecutive tokens is at most two
// contiguous pieces of the ring, so plain async copies do it (no index array to upload). One of
// dst and src is the ring (dst_is_ring says which), the other a linear [count] buffer.
absl::Status CopyRingRun(void* dst, const void* src, bool dst_is_ring, int64_t r0, int64_t count,
                         int64_t W, std::size_t tb, void* stream) {
  for (int64_t i = 0; i < count;) {
    const int64_t slot = (r0 + i) % W, run = std::min(count - i, W - slot);
    const int64_t ring_at = slot * static_cast<int64_t>(tb),
                  linear_at = i * static_cast<int64_t>(tb);
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(
        static_cast<unsigned char*>(dst) + (dst_is_ring ? ring_at : linear_at),
        static_cast<const unsigned char*>(src) + (dst_is_ring ? linear_at : ring_at), run * tb,
        stream));
    i += run;
  }
  return absl::OkStatus();
}

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

int64_t MsToNs(float ms) { return static_cast<int64_t>(static_cast<double>(ms) * 1e6); }

}  // namespace

// ---- GpuContext -------------------------------------------------------------------------------

GpuContext::GpuContext() : pinned_(transfer::PinnedHostAllocator(), kPinnedCacheBytes) {}

absl::StatusOr<std::unique_ptr<GpuContext>> GpuContext::Create() {
  std::unique_ptr<GpuContext> c(new GpuContext());
  KVRT_ASSIGN_OR_RETURN(c->copy_stream_, transfer::Stream::Create());
  // Per-step scratch comes from the stream-ordered pool; keep it cached (best effort).
  (void)transfer::KeepPoolMemory();
  return c;
}

absl::StatusOr<void*> GpuContext::AcquireStream() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!free_streams_.empty()) {
    void* s = free_streams_.back();
    free_streams_.pop_back();
    return s;
  }
  // High priority: a prompt's background job builds its clusters while the caller's next layer
  // attends over the prompt (one long kernel at default priority), and its small kernels should
  // not queue behind that one. (Measured alone it changed nothing end to end: the jobs' waits
  // were in the driver, docs/benchmarks.md, seventh session.)
  KVRT_ASSIGN_OR_RETURN(transfer::Stream s, transfer::Stream::Create(/*high_priority=*/true));
  streams_.push_back(std::move(s));
  return streams_.back().get();
}

void GpuContext::ReleaseStream(void* s) {
  std::lock_guard<std::mutex> lock(mu_);
  free_streams_.push_back(s);
}

void GpuContext::AcquirePromptSlot() {
  std::unique_lock<std::mutex> lock(mu_);
  prompt_cv_.wait(lock, [&] { return prompts_in_flight_ < kPromptSlots; });
  ++prompts_in_flight_;
}

void GpuContext::ReleasePromptSlot() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    --prompts_in_flight_;
  }
  prompt_cv_.notify_one();
}

// ---- DeviceTier -------------------------------------------------------------------------------
namespace {

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
  std::vector<uint8_t> fetched;    // [n] member's cold state is in its device slot
  std::vector<uint8_t> estimated;  // [n] member's estimate is in its device slot
  std::vector<uint8_t> hot;        // [n] member's hot-cache state is in its device slot
  int hot_states = 1;              // states from the hot slot on (one unless split states)
  int slot_count = kSlots;
  std::vector<uint8_t> pending;    // [n] its cold slot holds its pending evictions' state
  bool timed = true;               // the step records the timing events (DeviceTier::kTimedEvery)
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
    transfer::ScopedDevice on_device(cfg_->call_device());
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
    transfer::ScopedDevice on_device(cfg_->call_device());
    if (used_) (void)last_use().Synchronize();  // a direct step may still read the stores
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
                      const std::vector<uint8_t>& ok, float* out) override;
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
    if (used_) (void)last_use().Synchronize();  // device work still reading the buffers
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
  absl::Status AppendEvictFused(const AppendPlan& plan, const unsigned char* k,
                                const unsigned char* v, void* stream);
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
  // A batch step's one record for all its members (ShareLastUse), in place of last_use_.
  std::shared_ptr<const transfer::Event> shared_last_use_;
  void* last_use_stream_ = nullptr;  // the stream it was recorded on
  const transfer::Event& last_use() const {
    return shared_last_use_ != nullptr ? *shared_last_use_ : last_use_;
  }
  // Orders `stream` after last_use_: a driver call, skipped where last_use_ was recorded on the
  // same stream (a caller's one stream: two waits per sequence and layer-step that stream order
  // already gives). Not for the default streams: cudaStreamPerThread is one handle for a stream
  // per thread.
  absl::Status WaitLastUse(void* stream) {
    if (!used_) return absl::OkStatus();
    if (stream == last_use_stream_ && reinterpret_cast<uintptr_t>(stream) > 2)
      return absl::OkStatus();
    return transfer::StreamWaitEvent(stream, last_use());
  }
  absl::Status RecordLastUse(void* stream) {
    KVRT_RETURN_IF_ERROR(last_use_.Record(stream));
    shared_last_use_.reset();
    last_use_stream_ = stream;
    used_ = true;
    return absl::OkStatus();
  }
  // The tier's last use is `done`, recorded on stream after it (a batch step's members: one
  // record instead of one per member).
  void ShareLastUse(std::shared_ptr<const transfer::Event> done, void* stream) {
    shared_last_use_ = std::move(done);
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
  bool used_ = false;
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

absl::Status DeviceTier::Allocate(const AppendPlan& plan) {
  const std::size_t tb = token_bytes();
  auto alloc = [&](transfer::DeviceBuffer* b, int64_t rows) -> absl::Status {
    KVRT_ASSIGN_OR_RETURN(*b,
                          transfer::DeviceBuffer::Allocate(static_cast<std::size_t>(rows) * tb));
    return absl::OkStatus();
  };
  absl::Status st;
  if (plan.need_sinks) {
    st = alloc(&sink_k_, cfg_->sink_tokens);
    if (st.ok()) st = alloc(&sink_v_, cfg_->sink_tokens);
  }
  if (st.ok() && plan.ring_grow > 0) {
    st = alloc(&ring_k_, cfg_->window_tokens);
    if (st.ok()) st = alloc(&ring_v_, cfg_->window_tokens);
  }
  if (st.ok() && arrays_.empty()) {
    auto made = transfer::DeviceBuffer::Allocate(gpu::TierArrays::Bytes(1));
    if (made.ok()) arrays_ = std::move(*made);
    st = made.status();
  }
  if (!st.ok()) {
    if (plan.need_sinks) sink_k_.Reset(), sink_v_.Reset();
    if (plan.ring_grow > 0) ring_k_.Reset(), ring_v_.Reset();
    return absl::Status(st.code(), absl::StrCat("append (GPU backend): ", st.message()));
  }
  return absl::OkStatus();
}

absl::Status DeviceTier::SettleEvictions(ColdTier* cold) { return Settle(cold, /*wait=*/true); }

absl::Status DeviceTier::SettleReadyEvictions(ColdTier* cold) {
  return Settle(cold, /*wait=*/false);
}

absl::Status DeviceTier::Settle(ColdTier* cold, bool wait) {
  if (evictions_.empty()) return absl::OkStatus();
  KVRT_RETURN_IF_ERROR(cold->Reserve(cold->rows() + evictions_.pending_rows()));
  // Capacity is reserved, so these appends cannot fail half-way.
  auto append = [&](const void* k, const void* v, int64_t rows) {
    return cold->Append(k, v, rows);
  };
  return wait ? evictions_.Drain(append) : evictions_.DrainReady(append);
}

absl::Status DeviceTier::AttendPendingEvictions(DeviceStep* step, int i, const float* q,
                                                void* stream) {
  transfer::EvictionBatch& b = evictions_.front();
  const int H = cfg_->num_q_heads, G = cfg_->num_kv_heads, group = H / G;
  const int64_t P = b.rows;
  const std::size_t list_bytes = static_cast<std::size_t>(H + 1 + H * P) * sizeof(int32_t);
  if (pending_lists_rows_ != P) {
    // The block is [P, G, d]: row p * G + g of it (rows of d) is row p's key (value) of kv head g.
    if (pending_lists_.size() < list_bytes) {
      KVRT_ASSIGN_OR_RETURN(pending_lists_, transfer::DeviceBuffer::Allocate(list_bytes));
    }
    KVRT_ASSIGN_OR_RETURN(void* staged, pending_staging_.Stage(ctx_->pinned(), list_bytes));
    auto* lists = static_cast<int32_t*>(staged);
    for (int h = 0; h <= H; ++h) lists[h] = static_cast<int32_t>(h * P);
    for (int h = 0; h < H; ++h)
      for (int64_t p = 0; p < P; ++p)
        lists[H + 1 + h * P + p] = static_cast<int32_t>(p * G + h / group);
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(pending_lists_.data(), staged, list_bytes, stream));
    KVRT_RETURN_IF_ERROR(pending_staging_.Sent(stream));
    pending_lists_rows_ = P;
  }
  // The batch's copy was recorded by this layer's append, before this call: on this stream, or
  // on the step's stream ahead of the fork of this batch member's lane. Stream order then gives
  // the wait (a driver call fewer per member and step); not for the default streams (see
  // WaitLastUse).
  const bool ordered =
      reinterpret_cast<uintptr_t>(b.done_stream) > 2 &&
      (b.done_stream == stream || (step->size() > 1 && b.done_stream == step->lease.get()));
  if (!ordered) KVRT_RETURN_IF_ERROR(transfer::StreamWaitEvent(stream, b.done));
  gpu::GatherBatch rows;
  rows.k = b.k.data();  // pinned: the device reads it where the append's kernel wrote it
  rows.v = b.v.data();
  rows.row_offsets = static_cast<const int32_t*>(pending_lists_.data());
  rows.row_ids = rows.row_offsets + H + 1;
  rows.rows_q = H;
  rows.max_rows = static_cast<int>(P);
  rows.head_dim = cfg_->head_dim;
  rows.dtype = cfg_->dtype;
  KVRT_RETURN_IF_ERROR(gpu::GatherAttend(rows, q, /*q_is_f32=*/true, cfg_->scale, 0,
                                         step->o(kColdSlot, i), step->lse(kColdSlot, i), nullptr,
                                         stream));
  KVRT_RETURN_IF_ERROR(b.done.Record(stream));
  b.done_stream = stream;
  step->pending[i] = 1;
  return absl::OkStatus();
}

// Ring tokens that leave the window: device copy into staging (stream order, before the ring
// slots are overwritten), then D2H on the copy stream into pinned blocks. The batch reaches the
// cold tier at this layer's next call (SettleEvictions).
absl::Status DeviceTier::Evict(const AppendPlan& plan, void* stream) {
  const int64_t S = cfg_->sink_tokens, W = cfg_->window_tokens;
  const std::size_t tb = token_bytes();
  const std::size_t bytes = static_cast<std::size_t>(plan.evict) * tb;
  KVRT_ASSIGN_OR_RETURN(void* staging, transfer::MallocAsync(2 * bytes, stream));
  auto* stg = static_cast<unsigned char*>(staging);
  KVRT_RETURN_IF_ERROR(
      CopyRingRun(stg, ring_k_.data(), false, plan.cold_begin - S, plan.evict, W, tb, stream));
  KVRT_RETURN_IF_ERROR(CopyRingRun(stg + bytes, ring_v_.data(), false, plan.cold_begin - S,
                                   plan.evict, W, tb, stream));
  KVRT_ASSIGN_OR_RETURN(transfer::Event gathered, transfer::Event::Create(false));
  KVRT_RETURN_IF_ERROR(gathered.Record(stream));
  void* copy = ctx_->copy_stream();
  KVRT_RETURN_IF_ERROR(transfer::StreamWaitEvent(copy, gathered));
  transfer::EvictionBatch batch;
  KVRT_ASSIGN_OR_RETURN(batch.k, ctx_->pinned().Acquire(bytes));
  KVRT_ASSIGN_OR_RETURN(batch.v, ctx_->pinned().Acquire(bytes));
  KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(batch.k.data(), stg, bytes, copy));
  KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(batch.v.data(), stg + bytes, bytes, copy));
  KVRT_RETURN_IF_ERROR(transfer::FreeAsync(staging, copy));
  return QueueEviction(std::move(batch), plan.evict, copy);
}

absl::Status DeviceTier::QueueEviction(transfer::EvictionBatch batch, int64_t rows, void* stream) {
  KVRT_ASSIGN_OR_RETURN(batch.done, evictions_.NewEvent());
  KVRT_RETURN_IF_ERROR(batch.done.Record(stream));
  batch.done_stream = stream;
  batch.rows = rows;
  evictions_.Push(std::move(batch));
  counters_->eviction_batches += 1;
  return absl::OkStatus();
}

absl::Status DeviceTier::UploadArrays(int64_t n_sink, int64_t n_window, void* stream) {
  if (arrays_n_sink_ == n_sink && arrays_n_window_ == n_window) return absl::OkStatus();
  gpu::TierArrays::Entry e{sink_k_.data(),
                           sink_v_.data(),
                           ring_k_.data(),
                           ring_v_.data(),
                           static_cast<int32_t>(n_sink),
                           static_cast<int32_t>(n_window)};
  // NOTE: a member, not a stack buffer: the copy from pageable memory may still read it after
  // MemcpyAsync returns.
  arrays_host_.resize(gpu::TierArrays::Bytes(1));
  gpu::TierArrays::Pack(&e, 1, arrays_host_.data());
  KVRT_RETURN_IF_ERROR(
      transfer::MemcpyAsync(arrays_.data(), arrays_host_.data(), arrays_host_.size(), stream));
  arrays_n_sink_ = static_cast<int32_t>(n_sink);
  arrays_n_window_ = static_cast<int32_t>(n_window);
  return absl::OkStatus();
}

absl::Status DeviceTier::Append(const AppendPlan& plan, const void* k, const void* v,
                                const Exec& exec, ColdTier* cold) {
  const int64_t S = cfg_->sink_tokens, W = cfg_->window_tokens;
  if (plan.direct > 0) KVRT_RETURN_IF_ERROR(cold->Reserve(cold->rows() + plan.new_cold()));
  KVRT_RETURN_IF_ERROR(Allocate(plan));
  StreamLease lease(ctx_, exec);
  KVRT_RETURN_IF_ERROR(lease.status());
  void* stream = lease.get();
  KVRT_RETURN_IF_ERROR(WaitLastUse(stream));
  auto* ks = static_cast<const unsigned char*>(k);
  auto* vs = static_cast<const unsigned char*>(v);

  // A decode append from device pointers on a full window: the new rows take exactly the slots of
  // the rows that leave, so one kernel moves both (the leaving rows straight into pinned blocks)
  // instead of a dozen copies, allocations and events (docs/benchmarks.md, eighth session).
  if (exec.device && plan.direct == 0 && plan.sink_end <= plan.length && plan.evict > 0 &&
      plan.ring_begin == plan.length && plan.new_length - plan.length == plan.evict &&
      plan.length - plan.cold_begin == W && plan.evict <= kFusedEvictMaxRows) {
    KVRT_RETURN_IF_ERROR(AppendEvictFused(plan, ks, vs, stream));
  } else {
    KVRT_RETURN_IF_ERROR(AppendStaged(plan, ks, vs, exec, stream, cold));
  }
  const int64_t n_sink = std::min(plan.new_length, S);
  const int64_t n_window = plan.new_length - n_sink - (cold->rows() + pending_rows());
  KVRT_RETURN_IF_ERROR(UploadArrays(n_sink, n_window, stream));
  KVRT_RETURN_IF_ERROR(RecordLastUse(stream));
  return absl::OkStatus();
}

absl::Status DeviceTier::AppendEvictFused(const AppendPlan& plan, const unsigned char* k,
                                          const unsigned char* v, void* stream) {
  const int64_t S = cfg_->sink_tokens, W = cfg_->window_tokens;
  const std::size_t bytes = static_cast<std::size_t>(plan.evict) * token_bytes();
  transfer::EvictionBatch batch;
  KVRT_ASSIGN_OR_RETURN(batch.k, ctx_->pinned().Acquire(bytes));
  KVRT_ASSIGN_OR_RETURN(batch.v, ctx_->pinned().Acquire(bytes));
  gpu::RingRows ring;
  ring.k = ring_k_.data();
  ring.v = ring_v_.data();
  ring.capacity = W;
  ring.slot0 = (plan.length - S) % W;
  ring.row_bytes = token_bytes();
  KVRT_RETURN_IF_ERROR(
      gpu::RingAppendRows(ring, k, v, plan.evict, batch.k.data(), batch.v.data(), stream));
  return QueueEviction(std::move(batch), plan.evict, stream);
}

absl::Status DeviceTier::AppendStaged(const AppendPlan& plan, const unsigned char* ks,
                                      const unsigned char* vs, const Exec& exec, void* stream,
                                      ColdTier* cold) {
  const int64_t S = cfg_->sink_tokens, W = cfg_->window_tokens;
  const std::size_t tb = token_bytes();
  // 1. Ring tokens leaving the window (before their slots are overwritten below).
  if (plan.evict > 0) KVRT_RETURN_IF_ERROR(Evict(plan, stream));
  // 2. Input tokens straight to the cold tier (more than a window at once, e.g. a prompt): after
  //    the pending batch, in position order.
  if (plan.direct > 0) {
    KVRT_RETURN_IF_ERROR(SettleEvictions(cold));
    const std::size_t off = static_cast<std::size_t>(plan.direct_begin - plan.length) * tb;
    const unsigned char* kr = ks + off;
    const unsigned char* vr = vs + off;
    if (exec.device && cold->rows() == 0 && prompt_.rows == 0 && plan.length == 0) {
      // A prompt: its cold rows go to the cold tier in the background (SettlePrompt), so that
      // this prefill does not wait for the copy and the index build.
      KVRT_RETURN_IF_ERROR(StagePrompt(kr, vr, plan.direct, stream));
    } else if (exec.device) {
      KVRT_RETURN_IF_ERROR(AppendFromDevice(kr, vr, plan.direct, stream, cold));
    } else {
      KVRT_RETURN_IF_ERROR(cold->Append(kr, vr, plan.direct));
    }
  }
  // 3. New tokens that stay on the tier (host sources are staged by the driver, so the caller may
  //    reuse them when this returns).
  if (plan.sink_end > plan.length) {
    const std::size_t bytes = static_cast<std::size_t>(plan.sink_end - plan.length) * tb;
    auto* sk = static_cast<unsigned char*>(sink_k_.data()) + plan.length * tb;
    auto* sv = static_cast<unsigned char*>(sink_v_.data()) + plan.length * tb;
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(sk, ks, bytes, stream));
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(sv, vs, bytes, stream));
  }
  if (plan.new_length > plan.ring_begin) {
    const std::size_t off = static_cast<std::size_t>(plan.ring_begin - plan.length) * tb;
    const int64_t n = plan.new_length - plan.ring_begin;
    KVRT_RETURN_IF_ERROR(
        CopyRingRun(ring_k_.data(), ks + off, true, plan.ring_begin - S, n, W, tb, stream));
    KVRT_RETURN_IF_ERROR(
        CopyRingRun(ring_v_.data(), vs + off, true, plan.ring_begin - S, n, W, tb, stream));
  }
  return absl::OkStatus();
}

// Device-to-device copy of a prompt's cold rows into staging owned by this tier, in the caller's
// stream order (the caller may reuse k, v after it, as after every device call).
absl::Status DeviceTier::StagePrompt(const unsigned char* k, const unsigned char* v, int64_t rows,
                                     void* stream) {
  const std::size_t bytes = static_cast<std::size_t>(rows) * token_bytes();
  KVRT_ASSIGN_OR_RETURN(void* staging, transfer::MallocAsync(2 * bytes, stream));
  auto* s = static_cast<unsigned char*>(staging);
  absl::Status st = transfer::MemcpyAsync(s, k, bytes, stream);
  if (st.ok()) st = transfer::MemcpyAsync(s + bytes, v, bytes, stream);
  if (st.ok()) st = prompt_.ready.Record(stream);  // created at its first record
  if (!st.ok()) {
    (void)transfer::FreeAsync(staging, stream);
    return st;
  }
  prompt_.staging = staging;
  prompt_.rows = rows;
  return absl::OkStatus();
}

void DeviceTier::DropPrompt() {
  if (prompt_.staging == nullptr && prompt_.queries == nullptr) return;
  (void)prompt_.ready.Synchronize();
  for (void* p : {prompt_.staging, prompt_.queries})
    if (p != nullptr) (void)transfer::FreeAsync(p, nullptr);
  (void)transfer::StreamSynchronize(nullptr);
  prompt_.staging = prompt_.queries = nullptr;
  prompt_.rows = prompt_.query_rows = 0;
}

// The staged prompt enters the cold tier: the cluster kind's segments built on the GPU from the
// staging first (segment_build.h; preset into the index the refresh builds next), then the rows
// copied to the host store. On error the rows stay staged, so a later call retries: nothing is
// lost.
absl::Status DeviceTier::SettlePrompt(ColdTier* cold) {
  if (prompt_.rows == 0) return absl::OkStatus();
  transfer::ScopedDevice on_device(cfg_->call_device());  // an arena worker runs the job
  StreamLease lease(ctx_, Exec{});
  KVRT_RETURN_IF_ERROR(lease.status());
  void* stream = lease.get();
  // Before anything below waits for the device (this job starts as the prefill returns, while
  // the caller's device is still computing the layer): the stores' room for the prompt, their
  // pages faulted in and registered for the direct step, so that the laid-out rows can be copied
  // straight into them below (done after the copy, the last layer's registration left the device
  // idle for 46 ms of the first decode token's profile; docs/benchmarks.md, seventh session).
  // With the direct step, room for half a prompt of decode tokens as well: capacity never touched
  // costs address space only, and a store that grows within it is not moved (a moved store is
  // registered again, all of it).
  const int64_t rows_after = cold->rows() + prompt_.rows;
  const int64_t headroom = cfg_->direct_step ? prompt_.rows / 2 : 0;
  KVRT_RETURN_IF_ERROR(cold->Reserve(rows_after + headroom));
  cold->PrefaultStores(rows_after);
  (void)direct_.RegisterAhead(*cold, rows_after, stream);  // else PrepareDecode registers them
  KVRT_RETURN_IF_ERROR(transfer::StreamWaitEvent(stream, prompt_.ready));
  if (prompt_.queries != nullptr) {
    // The query sample first: the build's metric comes from it (ColdTier::MetricFactor).
    std::vector<unsigned char> sample(static_cast<std::size_t>(prompt_.query_rows) *
                                      prompt_.query_row_bytes);
    KVRT_RETURN_IF_ERROR(
        transfer::MemcpyAsync(sample.data(), prompt_.queries, sample.size(), stream));
    KVRT_RETURN_IF_ERROR(transfer::StreamSynchronize(stream));
    cold->SampleQueries(sample.data(), prompt_.query_rows);
    (void)transfer::FreeAsync(prompt_.queries, stream);
    prompt_.queries = nullptr;
    prompt_.query_rows = 0;
  }
  const std::size_t bytes = static_cast<std::size_t>(prompt_.rows) * token_bytes();
  const auto* k = static_cast<const unsigned char*>(prompt_.staging);
  std::vector<std::vector<cpu_index::SegmentClustering>> parts;
  int64_t build_ns = 0;
  if (builds_segments() && prompt_.rows >= cfg_->index.cluster.segment_tokens &&
      cold->rows() == 0) {
    const int64_t t0 = NowNs();
    // NOTE: no pinned pool here (unlike the synchronous build): a new pinned block's allocation
    // synchronises the device, which stalled the caller's next prefill by ~25 ms (call 9 of
    // docs/runs/prefill-build-device-2026-12-02), more than the pageable copies cost the job.
    auto built = BuildPromptSegments(*cold, k, k + bytes, /*on_device=*/true, prompt_.rows, stream,
                                     /*pinned=*/nullptr);
    // NOTE: a failed GPU build is no error of the prefill: the index clusters on the CPU.
    if (built.ok()) parts = std::move(*built);
    build_ns = NowNs() - t0;
  }
  // With the GPU's clusters, the rows are laid out cluster-contiguous on the device (one scatter)
  // before they go down, so that the host store needs no permutation of its own.
  std::vector<std::vector<int64_t>> order;
  void* laid_out = nullptr;
  if (!parts.empty() && !parts[0].empty()) {
    auto made = LayOutPrompt(parts, stream, &order);
    if (made.ok()) laid_out = *made;  // else: the store is permuted on the host, as before
  }
  const auto* src = laid_out != nullptr ? static_cast<const unsigned char*>(laid_out) : k;
  // NOTE: the appends cannot fail (capacity reserved above); what can is a CUDA copy or event,
  // and such errors are sticky: every later call of the context fails the same way, so a retry
  // never completes a half-copied prompt in another order.
  // Laid out and registered: each store's rows in one copy straight into it (no pinned staging,
  // whose growth blocked the driver for 11-17 ms a block in the prompt's profile, and no host
  // copy).
  const absl::Status appended =
      laid_out != nullptr && direct_.RegisteredUpTo(*cold, rows_after)
          ? CopyIntoStores(src, prompt_.rows, stream, cold)
          : AppendFromDevice(src, src + bytes, prompt_.rows, stream, cold, laid_out != nullptr);
  if (laid_out != nullptr) (void)transfer::FreeAsync(laid_out, stream);
  KVRT_RETURN_IF_ERROR(appended);
  (void)transfer::FreeAsync(prompt_.staging, stream);
  prompt_.staging = nullptr;
  prompt_.rows = 0;
  if (!parts.empty() && !parts[0].empty()) {
    const int64_t segments = static_cast<int64_t>(parts[0].size()) * cfg_->num_kv_heads;
    cold->PresetSegments(0, std::move(parts), std::move(order));
    counters_->segments_built_gpu += segments;
    counters_->time_segment_build_ns += build_ns;
  }
  return absl::OkStatus();
}

// The cluster kind's GPU build of a prompt's cold rows [rows, kv_heads, d] (from store row 0), in
// the metric the cold tier's index will be built with (both prefill paths).
absl::StatusOr<std::vector<std::vector<cpu_index::SegmentClustering>>>
DeviceTier::BuildPromptSegments(const ColdTier& cold, const void* k, const void* v, bool on_device,
                                int64_t rows, void* stream, transfer::PinnedPool* pinned) const {
  std::vector<std::vector<float>> metric(cfg_->num_kv_heads);
  tbb::parallel_for(0, cfg_->num_kv_heads, [&](int g) { metric[g] = cold.MetricFactor(g); });
  const SegmentBuildInput in{k, v, on_device, rows, &metric, pinned};
  return runtime::BuildSegments(*cfg_, in, /*on_gpu=*/true, stream);
}

// The staged prompt's rows in the order the segments' clusters lay them out (per kv head: row r
// holds old row order[g][r]), head-major [kv_heads, rows, d] for K then V, in new device memory
// (caller frees; stream-ordered).
absl::StatusOr<void*> DeviceTier::LayOutPrompt(
    const std::vector<std::vector<cpu_index::SegmentClustering>>& parts, void* stream,
    std::vector<std::vector<int64_t>>* order) {
  const int G = cfg_->num_kv_heads;
  const int64_t rows = prompt_.rows, S = cfg_->index.cluster.segment_tokens;
  if (rows * G >= (int64_t{1} << 31)) return absl::OutOfRangeError("prompt too long to lay out");
  order->assign(G, std::vector<int64_t>(rows));
  std::vector<int32_t> dst(static_cast<std::size_t>(rows) * G);
  for (int g = 0; g < G; ++g) {
    std::vector<int64_t>& o = (*order)[g];
    std::iota(o.begin(), o.end(), 0);  // rows past the last segment stay where they are
    for (std::size_t s = 0; s < parts[g].size(); ++s)
      for (int64_t i = 0; i < S; ++i)
        o[s * S + i] = static_cast<int64_t>(s) * S + parts[g][s].order[i];
    // Head-major out ([G, rows, d]): each head's rows go down, and into its store, in one piece.
    for (int64_t r = 0; r < rows; ++r) dst[o[r] * G + g] = static_cast<int32_t>(g * rows + r);
  }
  const std::size_t bytes = static_cast<std::size_t>(rows) * token_bytes();
  const std::size_t head_row = static_cast<std::size_t>(cfg_->head_dim) * DTypeSize(cfg_->dtype);
  KVRT_ASSIGN_OR_RETURN(void* out, transfer::MallocAsync(2 * bytes, stream));
  auto dst_dev = transfer::MallocAsync(dst.size() * sizeof(int32_t), stream);
  absl::Status st = dst_dev.status();
  if (st.ok())
    st = transfer::MemcpyAsync(*dst_dev, dst.data(), dst.size() * sizeof(int32_t), stream);
  const auto* k = static_cast<const unsigned char*>(prompt_.staging);
  auto* o = static_cast<unsigned char*>(out);
  if (st.ok())
    st = gpu::ScatterRows(k, k + bytes, o, o + bytes, static_cast<const int32_t*>(*dst_dev),
                          rows * G, head_row, stream);
  // NOTE: pageable source: the H2D has read `dst` when MemcpyAsync returned.
  if (dst_dev.ok()) (void)transfer::FreeAsync(*dst_dev, stream);
  if (!st.ok()) {
    (void)transfer::FreeAsync(out, stream);
    return st;
  }
  return out;
}

// D2H of the cold part of a call's device tensors through pinned staging (pageable copies run at
// a fraction of PCIe speed), two chunks in flight: chunk c + 1 copies while chunk c is appended.
absl::Status DeviceTier::AppendFromDevice(const unsigned char* k, const unsigned char* v,
                                          int64_t rows, void* stream, ColdTier* cold,
                                          bool head_major) {
  const std::size_t tb = token_bytes();
  const int64_t chunk = std::max<int64_t>(1, static_cast<int64_t>(kDirectChunkBytes / tb));
  const int64_t chunks = (rows + chunk - 1) / chunk;
  transfer::PinnedBlock kb[2], vb[2];
  transfer::Event done[2];
  for (int i = 0; i < 2 && i < chunks; ++i) {
    const std::size_t bytes = static_cast<std::size_t>(std::min(chunk, rows)) * tb;
    KVRT_ASSIGN_OR_RETURN(kb[i], ctx_->pinned().Acquire(bytes));
    KVRT_ASSIGN_OR_RETURN(vb[i], ctx_->pinned().Acquire(bytes));
    KVRT_ASSIGN_OR_RETURN(done[i], transfer::Event::Create(false));
  }
  const std::size_t hb = tb / cfg_->num_kv_heads;
  auto enqueue = [&](int64_t c) -> absl::Status {
    const int64_t r0 = c * chunk, n = std::min(chunk, rows - r0);
    if (head_major) {  // [G, rows, d] on the device -> [G, n, d] in staging, one 2D copy each
      const std::size_t off = static_cast<std::size_t>(r0) * hb, width = n * hb;
      const std::size_t pitch = static_cast<std::size_t>(rows) * hb;
      const std::size_t G = cfg_->num_kv_heads;
      KVRT_RETURN_IF_ERROR(
          transfer::Memcpy2DAsync(kb[c % 2].data(), width, k + off, pitch, width, G, stream));
      KVRT_RETURN_IF_ERROR(
          transfer::Memcpy2DAsync(vb[c % 2].data(), width, v + off, pitch, width, G, stream));
      return done[c % 2].Record(stream);
    }
    const std::size_t off = static_cast<std::size_t>(r0) * tb, bytes = n * tb;
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(kb[c % 2].data(), k + off, bytes, stream));
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(vb[c % 2].data(), v + off, bytes, stream));
    return done[c % 2].Record(stream);
  };
  KVRT_RETURN_IF_ERROR(enqueue(0));
  for (int64_t c = 0; c < chunks; ++c) {
    if (c + 1 < chunks) KVRT_RETURN_IF_ERROR(enqueue(c + 1));
    KVRT_RETURN_IF_ERROR(done[c % 2].Synchronize());
    const int64_t n = std::min(chunk, rows - c * chunk);
    KVRT_RETURN_IF_ERROR(cold->Append(kb[c % 2].data(), vb[c % 2].data(), n, head_major));
    // NOTE: chunk c + 2 reuses these blocks: its copies are enqueued only after this append.
  }
  return absl::OkStatus();
}

namespace {

// rows[i] of src (row_bytes each) to row i of dst, in stream order: evenly strided rows (a
// prompt's query sample) in one 2D copy, others one copy per row.
absl::Status CopyPickedRows(unsigned char* dst, const unsigned char* src, std::size_t row_bytes,
                            const std::vector<int64_t>& rows, void* stream) {
  const int64_t stride = rows.size() > 1 ? rows[1] - rows[0] : 1;
  bool strided = stride > 0;
  for (std::size_t i = 1; strided && i < rows.size(); ++i)
    strided = rows[i] - rows[i - 1] == stride;
  if (strided && !rows.empty())
    return transfer::Memcpy2DAsync(dst, row_bytes, src + rows[0] * row_bytes,
                                   static_cast<std::size_t>(stride) * row_bytes, row_bytes,
                                   rows.size(), stream);
  for (std::size_t i = 0; i < rows.size(); ++i)
    KVRT_RETURN_IF_ERROR(
        transfer::MemcpyAsync(dst + i * row_bytes, src + rows[i] * row_bytes, row_bytes, stream));
  return absl::OkStatus();
}

}  // namespace

absl::Status DeviceTier::CopyIntoStores(const unsigned char* k, int64_t rows, void* stream,
                                        ColdTier* cold) {
  const std::size_t head = static_cast<std::size_t>(rows) * cfg_->head_dim * DTypeSize(cfg_->dtype);
  const std::size_t bytes = static_cast<std::size_t>(rows) * token_bytes();
  for (int g = 0; g < cfg_->num_kv_heads; ++g) {
    const auto [keys, values] = cold->NextRows(g);
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(keys, k + g * head, head, stream));
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(values, k + bytes + g * head, head, stream));
  }
  KVRT_RETURN_IF_ERROR(transfer::StreamSynchronize(stream));
  return cold->AppendWritten(rows);
}

absl::Status DeviceTier::CopyRowsToHost(void* dst, const void* src, std::size_t row_bytes,
                                        const std::vector<int64_t>& rows, const Exec& exec) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* from = static_cast<const unsigned char*>(src);
  if (!exec.device) {
    for (std::size_t i = 0; i < rows.size(); ++i)
      std::memcpy(d + i * row_bytes, from + rows[i] * row_bytes, row_bytes);
    return absl::OkStatus();
  }
  StreamLease lease(ctx_, exec);
  KVRT_RETURN_IF_ERROR(lease.status());
  KVRT_RETURN_IF_ERROR(CopyPickedRows(d, from, row_bytes, rows, lease.get()));
  return transfer::StreamSynchronize(lease.get());
}

absl::Status DeviceTier::StagePromptQueries(const void* q, std::size_t row_bytes,
                                            const std::vector<int64_t>& rows, const Exec& exec) {
  if (prompt_.rows == 0 || !exec.device)
    return absl::FailedPreconditionError("prefill: no staged prompt to stage queries beside");
  if (rows.empty()) return absl::OkStatus();
  StreamLease lease(ctx_, exec);
  KVRT_RETURN_IF_ERROR(lease.status());
  void* stream = lease.get();
  KVRT_ASSIGN_OR_RETURN(void* staged, transfer::MallocAsync(rows.size() * row_bytes, stream));
  absl::Status st = CopyPickedRows(static_cast<unsigned char*>(staged),
                                   static_cast<const unsigned char*>(q), row_bytes, rows, stream);
  // The prompt's event now follows the sample too: SettlePrompt waits for both.
  if (st.ok()) st = prompt_.ready.Record(stream);
  if (!st.ok()) {
    (void)transfer::FreeAsync(staged, stream);
    return st;
  }
  if (prompt_.queries != nullptr) (void)transfer::FreeAsync(prompt_.queries, stream);
  prompt_.queries = staged;
  prompt_.query_rows = static_cast<int64_t>(rows.size());
  prompt_.query_row_bytes = row_bytes;
  return absl::OkStatus();
}

void DeviceTier::CollectTiming() {
  if (!timing_pending_) return;
  bool done = false;
  if (!ev_merge_.Query(&done).ok() || !done) return;
  auto a = transfer::ElapsedMs(ev_start_, ev_tier_);
  auto b = transfer::ElapsedMs(ev_h2d_begin_, ev_h2d_);
  auto c = transfer::ElapsedMs(ev_h2d_, ev_merge_);
  if (a.ok()) counters_->time_gpu_attention_ns += MsToNs(*a) * timing_scale_;
  if (b.ok()) counters_->time_h2d_ns += MsToNs(*b) * timing_scale_;
  if (c.ok()) counters_->time_merge_ns += MsToNs(*c) * timing_scale_;
  timing_pending_ = false;
}

// The tier's attention goes on a stream of its own, beside the cold phase's kernels: on the
// step's stream it ran before the summary's scoring, ~14 us of a 128K layer-step's device chain
// (profiled). A one-member step with a device selection forks it after the scoring kernel
// (ClusterStepParams::scored_event), so that it runs beside the selection kernels, which leave
// most SMs idle; the others fork it at BeginStep. Finish (or the step's end) joins it.
absl::Status DeviceTier::LaunchTier(DeviceStep* step, bool forked) {
  if (!step->tier_pending) return absl::OkStatus();
  step->tier_pending = false;
  void* stream = step->lease.get();
  const SideStream side(ctx_, stream);
  if (side.apart()) {
    if (!forked) KVRT_RETURN_IF_ERROR(tier_fork_.Record(stream));
    KVRT_RETURN_IF_ERROR(transfer::StreamWaitEvent(side.get(), tier_fork_));
  }
  void* tier_stream = side.get();
  if (step->timed) KVRT_RETURN_IF_ERROR(ev_start_.Record(tier_stream));
  absl::Status st =
      gpu::TierAttention(step->tier, step->q_dev, step->tier_params, step->o(kTierSlot, 0),
                         step->lse(kTierSlot, 0), step->tier_ws, tier_stream);
  if (side.apart()) {
    // The join point, whatever happened above: the step's scratch is freed after it.
    const absl::Status done = tier_done_.Record(tier_stream);
    if (done.ok()) step->tier_done = &tier_done_;
    if (st.ok()) st = done;
  }
  KVRT_RETURN_IF_ERROR(st);
  if (step->timed) KVRT_RETURN_IF_ERROR(ev_tier_.Record(tier_stream));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TierStep>> DeviceTier::BeginStep(TierBackend* const* members,
                                                                const TierCounts* counts, int n,
                                                                const void* q_in, const Exec& exec,
                                                                tbb::task_arena&) {
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const std::size_t of = static_cast<std::size_t>(n) * H * d;
  const std::size_t qbytes = of * DTypeSize(cfg_->dtype);
  auto step = std::make_unique<DeviceStep>(ctx_, exec, n, H, d);
  KVRT_RETURN_IF_ERROR(step->lease.status());
  void* stream = step->lease.get();
  std::vector<gpu::TierArrays::Entry> entries(n);
  int max_tokens = 0;
  for (int i = 0; i < n; ++i) {
    auto* t = static_cast<DeviceTier*>(members[i]);
    step->tiers.push_back(t);
    t->CollectTiming();  // the previous attend's device times (device output: read lazily)
    KVRT_RETURN_IF_ERROR(t->WaitLastUse(stream));
    entries[i] = {t->sink_k_.data(),
                  t->sink_v_.data(),
                  t->ring_k_.data(),
                  t->ring_v_.data(),
                  static_cast<int32_t>(counts[i].n_sink),
                  static_cast<int32_t>(counts[i].n_window)};
    max_tokens = std::max(max_tokens, static_cast<int>(counts[i].n_sink + counts[i].n_window));
  }
  if (ev_start_.empty()) {
    for (auto* e : {&ev_start_, &ev_tier_, &ev_h2d_begin_, &ev_h2d_, &ev_merge_}) {
      KVRT_ASSIGN_OR_RETURN(*e, transfer::Event::Create(true));
    }
  }

  gpu::AttnParams params;
  params.q_heads = H;
  params.scale = cfg_->scale;
  params.q_is_f32 = cfg_->dtype == DType::kF32;
  gpu::TierBatch tier;
  tier.batch = n;
  tier.max_tokens = max_tokens;
  tier.kv_heads = cfg_->num_kv_heads;
  tier.head_dim = d;
  tier.dtype = cfg_->dtype;

  // Scratch: [o slots*n*H*d | lse slots*n*H | merged n*H*d | the tier attention's split
  // states | tier arrays (n > 1) | q (host q)]. NOTE: one allocation per step: the tier
  // attention's own was two driver calls more per step.
  const std::size_t arrays_bytes = n > 1 ? gpu::TierArrays::Bytes(n) : 0;
  if (n == 1 && counts[0].selects_on_device)
    step->slot_count = kHotSlot + gpu::kDirectAttendMaxSplits;
  const std::size_t floats = step->slot_count * (of + step->rows) + of;
  const std::size_t tier_ws_at = Align16(floats * sizeof(float));
  const std::size_t arrays_at =
      Align16(tier_ws_at + gpu::TierAttentionWorkspaceFloats(tier, params) * sizeof(float));
  // Members that select on the device: q in f32 (one conversion for all) and each one's selection
  // scratch, sized from its summary as it is now plus room to grow, so that a member allocates
  // nothing of its own (two driver calls fewer per member and step). At most
  // kStepSelectScratchBytes in all (a large batch at 1M: ~20 MiB per member); the members past it
  // allocate their own, as one whose summary outgrew its share does.
  std::size_t select_at = Align256(arrays_at + arrays_bytes + (exec.device ? 0 : qbytes));
  const bool device_select =
      std::any_of(counts, counts + n, [](const TierCounts& c) { return c.selects_on_device; });
  const std::size_t q_f32_at = select_at;
  std::size_t select_total = 0;
  if (device_select) {
    select_at = Align256(select_at + of * sizeof(float));
    step->select_scratch.assign(n, nullptr);
    step->select_bytes.assign(n, 0);
    for (int i = 0; i < n; ++i) {
      auto* t = static_cast<DeviceTier*>(members[i]);
      if (!counts[i].selects_on_device || t->summary_view_.num_clusters == 0) continue;
      gpu::ClusterSummaryView grown = t->summary_view_;
      grown.num_clusters += grown.num_clusters / 16 + 64;
      grown.num_outliers += grown.num_outliers / 8 + 16;
      const std::size_t bytes = Align256(
          SelectScratch(grown, H, t->code_view_.rows > 0, t->value_view_.code != nullptr).bytes);
      if (select_total + bytes > kStepSelectScratchBytes) continue;
      step->select_bytes[i] = bytes;
      select_total += bytes;
      select_at += bytes;
    }
  }
  KVRT_ASSIGN_OR_RETURN(step->scratch, transfer::MallocAsync(select_at, stream));
  auto* scratch = static_cast<unsigned char*>(step->scratch);
  step->o_states = reinterpret_cast<float*>(scratch);
  step->lse_states = step->o_states + step->slot_count * of;
  step->out_dev = step->lse_states + step->slot_count * step->rows;
  step->tier_ws = reinterpret_cast<float*>(scratch + tier_ws_at);

  // q for the GPU (device) and for the CPU (host f32).
  step->q_dev = q_in;
  if (!exec.device) {
    void* qd = scratch + arrays_at + arrays_bytes;
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(qd, q_in, qbytes, stream));
    step->q_dev = qd;
  }
  if (device_select) {
    step->q_f32 = reinterpret_cast<float*>(scratch + q_f32_at);
    KVRT_RETURN_IF_ERROR(gpu::ConvertRowsToF32(step->q_dev, cfg_->dtype, static_cast<int64_t>(of),
                                               step->q_f32, stream));
    unsigned char* at = scratch + Align256(q_f32_at + of * sizeof(float));
    for (int i = 0; i < n; ++i) {
      if (step->select_bytes[i] == 0) continue;
      step->select_scratch[i] = at;
      at += step->select_bytes[i];
    }
  }

  // Partial attention over every member's sinks + window in one launch, into the tier slot.
  if (n == 1) {
    KVRT_RETURN_IF_ERROR(UploadArrays(counts[0].n_sink, counts[0].n_window, stream));
    gpu::TierArrays::View(arrays_.data(), 1, &tier);
  } else {
    KVRT_ASSIGN_OR_RETURN(void* packed, batch_arrays_.Stage(ctx_->pinned(), arrays_bytes));
    gpu::TierArrays::Pack(entries.data(), n, packed);
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(scratch + arrays_at, packed, arrays_bytes, stream));
    KVRT_RETURN_IF_ERROR(batch_arrays_.Sent(stream));
    gpu::TierArrays::View(scratch + arrays_at, n, &tier);
  }
  step->timed = !exec.device || attends_seen_++ % kTimedEvery == 0;
  if (step->timed) timing_scale_ = exec.device ? kTimedEvery : 1;
  if (tier_fork_.empty()) {
    KVRT_ASSIGN_OR_RETURN(tier_fork_, transfer::Event::Create(false));
    KVRT_ASSIGN_OR_RETURN(tier_done_, transfer::Event::Create(false));
  }
  step->tier = tier;
  step->tier_params = params;
  step->tier_pending = true;
  // One sequence whose selection runs on the device launches the tier from SelectClusters, to
  // wait for the scoring kernel only (see LaunchTier); the others launch it now.
  if (!(n == 1 && counts[0].selects_on_device)) KVRT_RETURN_IF_ERROR(LaunchTier(step.get(), false));
  if (n > 1) {
    KVRT_RETURN_IF_ERROR(batch_forked_.Record(stream));
    step->forked = &batch_forked_;
    step->lane_grain = LaneGrain(n);
    const int lanes = (n + step->lane_grain - 1) / step->lane_grain;
    step->lanes.resize(lanes);
    lane_joined_.resize(std::max<std::size_t>(lane_joined_.size(), lanes));
    step->lane_joined = &lane_joined_;
  }

  if (exec.device) {
    // The copy is made when the CPU first needs q: a step whose cold tier runs on the device
    // never waits for it (and no copy is left in flight into a block that goes back to the pool).
    DeviceStep* s = step.get();
    s->set_fetch_q(
        [s, ctx = ctx_, dtype = cfg_->dtype, of, qbytes, counters = counters_](float* q) {
          const int64_t t0 = NowNs();
          // NOTE: a failed copy leaves q as zeros; the step's own launches report the CUDA error.
          auto block = ctx->pinned().Acquire(qbytes);
          auto ready = transfer::Event::Create(false);
          if (block.ok() && ready.ok() &&
              transfer::MemcpyAsync(block->data(), s->q_dev, qbytes, s->lease.get()).ok() &&
              ready->Record(s->lease.get()).ok() && ready->Synchronize().ok())
            ConvertToF32(block->data(), dtype, of, q);
          counters->time_d2h_ns += NowNs() - t0;
        });
  } else {
    ConvertToF32(q_in, cfg_->dtype, of, step->q_mut());
  }
  return std::unique_ptr<TierStep>(std::move(step));
}

absl::Status DeviceTier::AttendFetched(TierStep* base, int i, const ColdSelection& sel,
                                       const ColdTier& cold, tbb::task_arena& arena) {
  auto* step = static_cast<DeviceStep*>(base);
  void* stream = step->lease.get();
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const int group = H / cfg_->num_kv_heads;
  const std::size_t row_bytes = static_cast<std::size_t>(d) * DTypeSize(cfg_->dtype);
  std::vector<int32_t> offsets(H + 1, 0);
  int max_rows = 0;
  for (int h = 0; h < H; ++h) {
    offsets[h + 1] = offsets[h] + static_cast<int32_t>(sel.rows[h].size());
    max_rows = std::max(max_rows, static_cast<int>(sel.rows[h].size()));
  }
  const std::size_t kv_bytes = static_cast<std::size_t>(offsets[H]) * row_bytes;
  const std::size_t total = 2 * kv_bytes + offsets.size() * sizeof(int32_t);
  KVRT_RETURN_IF_ERROR(fetch_done_.Synchronize());  // the previous H2D out of fetch_block_
  if (fetch_block_.size() < total) {
    fetch_block_ = transfer::PinnedBlock();
    KVRT_ASSIGN_OR_RETURN(fetch_block_, ctx_->pinned().Acquire(total));
  }
  auto* host_k = static_cast<unsigned char*>(fetch_block_.data());
  auto* host_v = host_k + kv_bytes;
  arena.execute([&] {
    tbb::parallel_for(0, H, [&](int h) {
      const auto& store = cold.store(h / group);
      for (std::size_t j = 0; j < sel.rows[h].size(); ++j) {
        const std::size_t at = (static_cast<std::size_t>(offsets[h]) + j) * row_bytes;
        std::memcpy(host_k + at, store.key(sel.rows[h][j]), row_bytes);
        std::memcpy(host_v + at, store.value(sel.rows[h][j]), row_bytes);
      }
    });
  });
  std::memcpy(host_v + kv_bytes, offsets.data(), offsets.size() * sizeof(int32_t));
  if (step->size() == 1 && step->timed) KVRT_RETURN_IF_ERROR(ev_h2d_begin_.Record(stream));
  KVRT_ASSIGN_OR_RETURN(void* dev, transfer::MallocAsync(total, stream));
  auto* dev_k = static_cast<unsigned char*>(dev);
  absl::Status st = transfer::MemcpyAsync(dev, host_k, total, stream);
  if (st.ok()) st = fetch_done_.Record(stream);
  if (st.ok() && step->size() == 1 && step->timed) st = ev_h2d_.Record(stream);
  if (st.ok()) {
    gpu::GatherBatch batch;
    batch.k = dev_k;
    batch.v = dev_k + kv_bytes;
    batch.row_offsets = reinterpret_cast<const int32_t*>(dev_k + 2 * kv_bytes);
    batch.rows_q = H;
    batch.max_rows = max_rows;
    batch.head_dim = d;
    batch.dtype = cfg_->dtype;
    const void* q_dev = static_cast<const unsigned char*>(step->q_dev) +
                        static_cast<std::size_t>(i) * H * d * DTypeSize(cfg_->dtype);
    st = gpu::GatherAttend(batch, q_dev, cfg_->dtype == DType::kF32, cfg_->scale, 0,
                           step->o(kColdSlot, i), step->lse(kColdSlot, i), nullptr, stream);
  }
  if (st.ok()) step->fetched[i] = 1;
  const absl::Status freed = transfer::FreeAsync(dev, stream);
  return st.ok() ? freed : st;
}

// Whether every decoded residual of `values` (offset + step x code, codes up to 2^bits - 1) is
// well inside f16's range (gpu::CodeValueRest decodes them in f16).
bool ValueGridFitsF16(const cpu_index::SegmentCodes& values, int bits) {
  const float top = static_cast<float>((1 << bits) - 1);
  for (std::size_t i = 0; i < values.offset.size(); ++i)
    if (!(std::fabs(values.offset[i]) + top * std::fabs(values.step[i]) < 6e4f)) return false;
  return true;
}

// Packs every kv head's summary in ClusterSummaryView's layout and uploads it when the cold tier's
// index changed since the last upload. Its bytes count against gpu_memory_limit.
absl::Status DeviceTier::SyncSummary(const ColdTier& cold, void* stream) {
  if (summary_version_ == cold.index_version() && !summary_.empty()) return absl::OkStatus();
  const int G = cfg_->num_kv_heads, d = cfg_->head_dim;
  int64_t C = 0, O = 0, clustered = 0;
  for (int g = 0; g < G; ++g) {
    const cpu_index::ClusterSummary* s = cold.summary(g);
    if (s == nullptr) return absl::FailedPreconditionError("no cluster summary yet");
    C = std::max<int64_t>(C, s->num_clusters());
    O = std::max<int64_t>(O, static_cast<int64_t>(s->outliers.size()));
    int64_t rows = 0;
    for (int32_t n : s->size) rows += n;
    clustered = std::max(clustered, rows);
  }
  if (C == 0) return absl::FailedPreconditionError("no cluster summary yet");
  // Selection on codes: every kv head's codes over its covered rows (the same rows for every
  // head: their stores grow together) and its segments' grids.
  const int bits = cfg_->index.cluster.rescore_bits;
  const int64_t rb =
      cpu_index::SelectsOnCodes(cfg_->index.cluster) ? cpu_index::CodeRowBytes(d, bits) : 0;
  // And the value codes, the rest's estimate (LaunchValueRest), laid out as the key codes. The
  // kernel decodes residuals (offset + step x code) in f16: a summary whose grids reach past
  // f16's range (values of magnitude ~1e4 and more) estimates from the value means instead, as
  // docs/gpu.md says.
  int value_bits = rb > 0 ? cfg_->index.cluster.value_bits : 0;
  for (int g = 0; g < G && value_bits > 0; ++g) {
    const cpu_index::SegmentCodes* values = cold.value_codes(g);
    if (values == nullptr) return absl::FailedPreconditionError("no cluster value codes yet");
    if (!ValueGridFitsF16(*values, value_bits)) value_bits = 0;
  }
  const bool value_fallback = value_bits == 0 && rb > 0 && cfg_->index.cluster.value_bits > 0;
  const int64_t vrb = value_bits > 0 ? cpu_index::CodeRowBytes(d, value_bits) : 0;
  int64_t code_rows = 0, segments = 0;
  for (int g = 0; g < G && rb > 0; ++g) {
    const cpu_index::SegmentCodes* codes = cold.codes(g);
    if (codes == nullptr) return absl::FailedPreconditionError("no cluster codes yet");
    code_rows = std::max<int64_t>(code_rows, static_cast<int64_t>(codes->code.size()) / rb);
    segments = std::max<int64_t>(segments, static_cast<int64_t>(codes->offset.size()) / d);
    if (vrb == 0) continue;
    const cpu_index::SegmentCodes* values = cold.value_codes(g);
    if (values->code.size() / vrb != codes->code.size() / rb ||
        values->offset.size() != codes->offset.size())
      return absl::InternalError(absl::StrCat("kv head ", g, ": ", values->code.size() / vrb,
                                              " value-coded rows against ", codes->code.size() / rb,
                                              " key-coded rows"));
  }
  auto align = [](std::size_t x) { return (x + 255) / 256 * 256; };
  const std::size_t kd = static_cast<std::size_t>(G) * d * sizeof(uint16_t);
  const std::size_t centroid_at = 0, value_at = align(C * kd), size_at = value_at + align(C * kd);
  const std::size_t spread_at = size_at + align(G * C * sizeof(int32_t));
  const std::size_t outlier_at = spread_at + align(G * C * sizeof(float));
  const std::size_t code_at = outlier_at + align(std::max<int64_t>(O, 1) * kd);
  const std::size_t gd = static_cast<std::size_t>(G) * segments * d * sizeof(float);
  const std::size_t offset_at = code_at + align(G * code_rows * rb);
  const std::size_t step_at = offset_at + align(gd), begin_at = step_at + align(gd);
  const std::size_t vcode_at = begin_at + align(G * C * sizeof(int64_t));
  const std::size_t voffset_at = vcode_at + align(G * code_rows * vrb);
  const std::size_t vstep_at = voffset_at + align(gd);
  const std::size_t bytes = rb == 0 ? code_at : vrb == 0 ? vcode_at : vstep_at + align(gd);
  summary_host_.assign(bytes, 0);
  auto* h = summary_host_.data();
  std::vector<float> row(d);
  for (int g = 0; g < G; ++g) {
    const cpu_index::ClusterSummary& s = *cold.summary(g);
    const std::size_t c = static_cast<std::size_t>(s.num_clusters());
    const std::size_t head_rows = static_cast<std::size_t>(g) * C;
    std::memcpy(h + centroid_at + head_rows * d * 2, s.centroid.data(), c * d * 2);
    std::memcpy(h + value_at + head_rows * d * 2, s.value_mean.data(), c * d * 2);
    std::memcpy(h + size_at + head_rows * 4, s.size.data(), c * 4);  // padding: size 0
    std::memcpy(h + spread_at + head_rows * 4, s.spread.data(), c * 4);
    const auto& store = cold.store(g);
    for (std::size_t j = 0; j < s.outliers.size(); ++j) {
      store.KeyF32(s.outliers[j], row.data());
      ConvertFromF32(row.data(), d, DType::kBF16,
                     h + outlier_at + (static_cast<std::size_t>(g) * O + j) * d * 2);
    }
    if (rb == 0) continue;
    const cpu_index::SegmentCodes& codes = *cold.codes(g);
    const std::size_t head_code_rows = static_cast<std::size_t>(g) * code_rows;
    std::memcpy(h + code_at + head_code_rows * rb, codes.code.data(), codes.code.size());
    auto* begin = reinterpret_cast<int64_t*>(h + begin_at) + head_rows;
    std::copy(s.begin.begin(), s.begin.end(), begin);  // padding: size 0 from row 0
    const std::size_t grid = static_cast<std::size_t>(g) * segments * d * sizeof(float);
    std::memcpy(h + offset_at + grid, codes.offset.data(), codes.offset.size() * sizeof(float));
    std::memcpy(h + step_at + grid, codes.step.data(), codes.step.size() * sizeof(float));
    if (vrb == 0) continue;
    const cpu_index::SegmentCodes& values = *cold.value_codes(g);
    std::memcpy(h + vcode_at + head_code_rows * vrb, values.code.data(), values.code.size());
    std::memcpy(h + voffset_at + grid, values.offset.data(), values.offset.size() * sizeof(float));
    std::memcpy(h + vstep_at + grid, values.step.data(), values.step.size() * sizeof(float));
  }
  if (summary_.size() < bytes) {
    const int64_t add = static_cast<int64_t>(bytes) - static_cast<int64_t>(summary_.size());
    const int64_t limit = cfg_->gpu_memory_limit;
    if (limit > 0 && counters_->gpu_allocated_bytes.load() + add > limit)
      return absl::ResourceExhaustedError(absl::StrCat(
          "GPU memory limit: the cluster summary needs ", bytes, " bytes, ",
          counters_->gpu_allocated_bytes.load(), " in use > gpu_memory_limit ", limit));
    KVRT_ASSIGN_OR_RETURN(transfer::DeviceBuffer grown,
                          transfer::DeviceBuffer::Allocate(bytes + bytes / 4));
    counters_->gpu_allocated_bytes += static_cast<int64_t>(grown.size() - summary_.size());
    counters_->summary_gpu_bytes += static_cast<int64_t>(grown.size() - summary_.size());
    summary_ = std::move(grown);
  }
  // NOTE: pageable source: the copy has read summary_host_ when MemcpyAsync returns.
  KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(summary_.data(), h, bytes, stream));
  auto* dev = static_cast<unsigned char*>(summary_.data());
  summary_view_.kv_heads = G;
  summary_view_.head_dim = d;
  summary_view_.num_clusters = static_cast<int>(C);
  summary_view_.num_outliers = static_cast<int>(O);
  summary_view_.centroid = reinterpret_cast<const uint16_t*>(dev + centroid_at);
  summary_view_.value_mean = reinterpret_cast<const uint16_t*>(dev + value_at);
  summary_view_.size = reinterpret_cast<const int32_t*>(dev + size_at);
  summary_view_.spread = reinterpret_cast<const float*>(dev + spread_at);
  summary_view_.outlier_key = reinterpret_cast<const uint16_t*>(dev + outlier_at);
  code_view_ = gpu::CodeScanView{};
  code_begin_ = nullptr;
  value_view_ = gpu::CodeValueView{};
  if (rb > 0 && code_rows > 0) {
    code_view_.kv_heads = G;
    code_view_.head_dim = d;
    code_view_.bits = bits;
    code_view_.rows = code_rows;
    code_view_.segment_rows = cfg_->index.cluster.segment_tokens;
    code_view_.num_clusters = static_cast<int>(C);
    code_view_.code = dev + code_at;
    code_view_.centroid = summary_view_.centroid;
    code_view_.offset = reinterpret_cast<const float*>(dev + offset_at);
    code_view_.step = reinterpret_cast<const float*>(dev + step_at);
    code_begin_ = reinterpret_cast<const int64_t*>(dev + begin_at);
    if (vrb > 0) {
      value_view_.bits = value_bits;
      value_view_.code = dev + vcode_at;
      value_view_.value_mean = summary_view_.value_mean;
      value_view_.offset = reinterpret_cast<const float*>(dev + voffset_at);
      value_view_.step = reinterpret_cast<const float*>(dev + vstep_at);
    }
  }
  summary_version_ = cold.index_version();
  if (value_fallback) counters_->value_codes_fallbacks += 1;
  summary_clustered_ = clustered;
  return absl::OkStatus();
}

absl::Status DeviceTier::PrepareSelect(DeviceStep* step, int i, const ColdTier& cold, void* stream,
                                       DeviceStep::Selection* s) {
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const int group = H / cfg_->num_kv_heads;
  if (step->q_f32 == nullptr)
    return absl::FailedPreconditionError(
        "select clusters: the step converted no q (not announced as selecting on the device)");
  // No summary yet: FailedPrecondition (the CPU selects).
  KVRT_RETURN_IF_ERROR(SyncSummary(cold, stream));
  const int64_t C = summary_view_.num_clusters, O = summary_view_.num_outliers;
  const cpu_index::ClusterConfig& cc = cfg_->index.cluster;
  // The same budget as the index's own Search: max(k, fraction of the clustered rows, floor);
  // the clustered rows are counted once per index version (SyncSummary), not per step.
  const int64_t clustered = summary_clustered_;
  gpu::ClusterStepParams& params = s->params;
  params = gpu::ClusterStepParams{};
  params.q_heads = H;
  params.scale = cfg_->scale;
  params.spread_weight = cc.spread_weight;
  params.budget_tokens = std::max<int64_t>(
      {cfg_->top_k,
       static_cast<int64_t>(std::ceil(static_cast<double>(cc.budget_fraction) * clustered)),
       cc.min_budget_tokens});
  params.top_p = cc.top_p;
  params.estimate = cc.estimate;
  params.group_select = cc.group_select;

  // Scratch (SelectScratch): the step's share for this member (BeginStep), or one allocation of
  // its own when its summary outgrew it (freed by SelectClusters on the member's stream). NOTE:
  // one allocation: the kernel's own workspace allocation sat between its launches, on the
  // step's device chain.
  const SelectScratch at(summary_view_, H, code_view_.rows > 0, value_view_.code != nullptr);
  unsigned char* dev = step->select_scratch.empty() ? nullptr : step->select_scratch[i];
  s->own = nullptr;
  if (dev == nullptr || at.bytes > step->select_bytes[i]) {
    KVRT_ASSIGN_OR_RETURN(s->own, transfer::MallocAsync(at.bytes, stream));
    dev = static_cast<unsigned char*>(s->own);
  }
  s->direct_q = direct_.Prepare(cold, stream);
  // q in f32 on the device: converted for every member at BeginStep, which a step whose cold
  // tier runs on the device never copies to the host.
  s->q = step->q_f32 + static_cast<std::size_t>(i) * H * d;
  // Residency-aware selection: a cluster's group key loses miss_penalty x its share of rows that
  // the attend would read over PCIe, as the direct step's last admission job computed it after
  // its fill (the stream waits for that fill, long done in a decoder's pipeline).
  if (s->direct_q && cc.miss_penalty > 0.f && cc.group_select && group > 1 && C > 0)
    params.key_offset = direct_.PenaltyOffsets(cold, static_cast<int>(C), stream);
  gpu::ClusterStepOutputs& outs = s->outs;
  outs = gpu::ClusterStepOutputs{};
  outs.density = reinterpret_cast<float*>(dev + at.density_at);
  outs.group_key = reinterpret_cast<float*>(dev + at.key_at);
  outs.outlier_score = O > 0 ? reinterpret_cast<float*>(dev + at.outlier_at) : nullptr;
  outs.selected = reinterpret_cast<int32_t*>(dev + at.selected_at);
  outs.selected_count = reinterpret_cast<int32_t*>(dev + at.count_at);
  outs.selected_tokens = reinterpret_cast<int64_t*>(dev + at.tokens_at);
  outs.est_o = step->o(kEstimateSlot, i);
  outs.est_lse = step->lse(kEstimateSlot, i);
  // Group selection with a direct step: the select kernel writes the step's mask itself (no
  // clear and no MarkSelected on the chain).
  if (s->direct_q && cc.group_select && group > 1 && C > 0)
    outs.group_mask = direct_.SelectionMask(static_cast<int>(C), stream);
  s->workspace = reinterpret_cast<float*>(dev + at.ws_at);
  if (code_view_.rows > 0) {
    // Selection on codes: each cluster's mass from its rows' codes (the index's one-stage code
    // selection, ClusterConfig::rescore_bits), before the step's kernels.
    auto* lse = reinterpret_cast<float*>(dev + at.lse_at);
    KVRT_RETURN_IF_ERROR(gpu::CodeClusterMass(code_view_, s->q, H, code_begin_, summary_view_.size,
                                              cfg_->scale, lse, stream));
    params.cluster_lse = lse;
    params.top_p = 0.f;  // as the index's code selection
  }
  // The rest from value codes replaces the value means' estimate (LaunchValueRest).
  s->value_rest = params.estimate && code_view_.rows > 0 && value_view_.code != nullptr;
  s->attended = s->value_rest ? dev + at.attended_at : nullptr;
  s->rest_workspace = s->value_rest ? reinterpret_cast<float*>(dev + at.rest_ws_at) : nullptr;
  if (s->value_rest) params.estimate = false;
  s->prepared = true;
  return absl::OkStatus();
}

absl::Status DeviceTier::LaunchValueRest(const DeviceStep::Selection& s, void* stream) const {
  if (!s.value_rest) return absl::OkStatus();
  const int H = cfg_->num_q_heads, C = summary_view_.num_clusters;
  KVRT_RETURN_IF_ERROR(
      gpu::AttendedFromSelection(s.outs.selected, s.outs.selected_count, H, C, s.attended, stream));
  return gpu::CodeValueRest(code_view_, value_view_, s.q, H, code_begin_, summary_view_.size,
                            s.attended, s.params.cluster_lse, cfg_->scale, s.rest_workspace,
                            s.outs.est_o, s.outs.est_lse, stream);
}

absl::Status DeviceTier::PrepareBatchSelect(TierStep* base, int i, const ColdTier& cold) {
  auto* step = static_cast<DeviceStep*>(base);
  if (step->size() < 2) return absl::UnimplementedError("batch selection: one member");
  KVRT_SPAN("select_prepare", i);
  if (step->selections.empty()) step->selections.resize(step->size());
  return PrepareSelect(step, i, cold, step->lease.get(), &step->selections[i]);
}

// The prepared members' selections in one launch per kernel on the step's stream (members that
// need another score kernel than the first one's launch one by one), then the lanes' fork moved
// after them.
absl::Status DeviceTier::LaunchBatchSelect(TierStep* base) {
  auto* step = static_cast<DeviceStep*>(base);
  void* stream = step->lease.get();
  KVRT_SPAN("select_batch_launch", step->size());
  std::vector<gpu::ClusterStepItem> items;
  std::vector<int> who;
  for (int i = 0; i < static_cast<int>(step->selections.size()); ++i) {
    const DeviceStep::Selection& s = step->selections[i];
    if (!s.prepared) continue;
    gpu::ClusterStepItem it;
    it.summary = step->tiers[i]->summary_view_;
    it.q = s.q;
    it.budget_tokens = s.params.budget_tokens;
    it.key_offset = s.params.key_offset;
    it.cluster_lse = s.params.cluster_lse;
    it.out = s.outs;
    it.workspace = s.workspace;
    items.push_back(it);
    who.push_back(i);
  }
  if (items.empty()) return absl::OkStatus();
  const gpu::ClusterStepParams& shared = step->selections[who[0]].params;
  // The batch's kernels take one estimate switch: members whose estimate differs (the rest from
  // value codes for some, from value means for others while a summary has no codes yet) launch
  // one by one.
  const bool one_estimate = std::all_of(who.begin(), who.end(), [&](int i) {
    return step->selections[i].params.estimate == shared.estimate;
  });
  absl::Status st;
  bool one_by_one = !one_estimate;
  if (one_estimate) {
    st = gpu::ClusterStepBatch(items.data(), static_cast<int>(items.size()), shared, stream);
    one_by_one = st.code() == absl::StatusCode::kInvalidArgument;
  }
  if (one_by_one) {
    // Members the batch's kernels cannot take together: one launch each, as SelectClusters would.
    st = absl::OkStatus();
    for (std::size_t k = 0; k < items.size() && st.ok(); ++k)
      st = gpu::ClusterStep(items[k].summary, items[k].q, step->selections[who[k]].params,
                            items[k].out, items[k].workspace, stream);
  }
  KVRT_RETURN_IF_ERROR(st);
  for (int i : who)
    KVRT_RETURN_IF_ERROR(step->tiers[i]->LaunchValueRest(step->selections[i], stream));
  for (int i : who) step->selections[i].launched = true;
  // The lanes start after the selections (their fork, recorded at BeginStep, recorded again: no
  // lane has waited on it yet).
  if (step->forked != nullptr) KVRT_RETURN_IF_ERROR(batch_forked_.Record(stream));
  return absl::OkStatus();
}

absl::Status DeviceTier::SelectClusters(TierStep* base, int i, const ColdTier& cold,
                                        ColdSelection* sel, tbb::task_arena& arena,
                                        absl::FunctionRef<absl::Status(bool)> settle_evictions) {
  auto* step = static_cast<DeviceStep*>(base);
  KVRT_SPAN("select_clusters", i);
  int64_t t0 = NowNs();  // the search's time: the eviction wait below is not part of it
  void* stream = step->MemberStream(i);
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const int group = H / cfg_->num_kv_heads;
  timeline::Span launch_span("select_launch", i);
  DeviceStep::Selection own_selection;
  const bool batched =
      i < static_cast<int>(step->selections.size()) && step->selections[i].launched;
  DeviceStep::Selection& selection = batched ? step->selections[i] : own_selection;
  if (!batched) {
    if (absl::Status st = PrepareSelect(step, i, cold, stream, &selection); !st.ok()) {
      // No selection on the device (no summary yet: the CPU selects): the tier's attention now,
      // beside the CPU's work, rather than at the merge.
      if (selection.own != nullptr) (void)transfer::FreeAsync(selection.own, stream);
      KVRT_RETURN_IF_ERROR(LaunchTier(step, false));
      return st;
    }
  }
  struct FreeOnExit {
    void* p;
    void* s;
    ~FreeOnExit() {
      if (p != nullptr) (void)transfer::FreeAsync(p, s);
    }
  } free_scratch{std::exchange(selection.own, nullptr), stream};
  const int64_t C = summary_view_.num_clusters;
  const gpu::ClusterStepParams& params = selection.params;
  const gpu::ClusterStepOutputs& outs = selection.outs;
  const float* q = selection.q;
  const bool direct_q = selection.direct_q;
  if (!batched) {
    // The tier's attention (one sequence) forks after the scoring kernel (LaunchTier).
    gpu::ClusterStepParams p = params;
    if (step->tier_pending) p.scored_event = tier_fork_.get();
    KVRT_RETURN_IF_ERROR(gpu::ClusterStep(summary_view_, q, p, outs, selection.workspace, stream));
    if (step->tier_pending) KVRT_RETURN_IF_ERROR(LaunchTier(step, /*forked=*/true));
    KVRT_RETURN_IF_ERROR(LaunchValueRest(selection, stream));
  }
  // The decode evictions enter the cold tier only now: the selection's kernels (they read the
  // summary, not the rows) are queued before the host waits for the evictions' copies, which in a
  // pipelined decoder wait for the device's work on the layers before. Everything below sees the
  // settled rows (the direct step's registration and view are checked again for them).
  // NOTE: a direct step does not wait at all (the host, blocked here, could not run ahead of the
  // device): rows whose copy is in flight (one batch, a decode append's) are attended on the
  // device from the pinned block (AttendPendingEvictions) and enter the cold tier at the layer's
  // next call. Measurement mode keeps the wait: it records the positions of the rows attended.
  launch_span.End();
  const int64_t t_settle = NowNs();
  bool defer = direct_q && !cfg_->record_attended;
  if (defer) {
    KVRT_RETURN_IF_ERROR(settle_evictions(/*wait=*/false));
    defer = evictions_.size() == 1 && evictions_.pending_rows() <= kPendingAttendRows &&
            !evictions_.front().done.empty();
  }
  if (!defer) KVRT_RETURN_IF_ERROR(settle_evictions(/*wait=*/true));
  bool direct = direct_q && direct_.Prepare(cold, stream);
  if (!direct && defer) {
    KVRT_RETURN_IF_ERROR(settle_evictions(true));
    defer = false;
  }
  t0 += NowNs() - t_settle;
  // The direct step's page table follows the last admission. Its stream wait comes after the
  // selection, which reads neither pool nor table: the last step's page fill (PCIe) overlaps
  // the selection's kernels instead of delaying them.
  if (direct) {
    KVRT_SPAN("direct_begin", i);
    // The lane forked after the batch's selections, whose PrepareSelect ordered the step's
    // stream after the last fill (PenaltyOffsets).
    if (batched) direct_.StreamFollows(step->lease.get(), stream);
    KVRT_RETURN_IF_ERROR(direct_.BeginStep(cold, static_cast<int>(C), summary_view_.size, stream));
  }
  const bool estimated = params.estimate || selection.value_rest;
  step->estimated[i] = estimated ? 1 : 0;
  sel->estimate_on_device = estimated;
  if (cfg_->record_attended && estimated) {
    // Measurement mode (it waits for the device anyway): the estimate's lse for replay metrics.
    sel->device_estimate_lse.resize(H);
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(sel->device_estimate_lse.data(), outs.est_lse,
                                               static_cast<std::size_t>(H) * sizeof(float),
                                               stream));
    KVRT_RETURN_IF_ERROR(transfer::StreamSynchronize(stream));
  }
  if (direct) {
    KVRT_SPAN("direct_attend", i);
    // One sequence: the attention's split states stay in the step's slots for its one merge.
    int splits = 0;
    KVRT_RETURN_IF_ERROR(direct_.Attend(cold, outs.selected, outs.selected_count,
                                        outs.group_mask != nullptr, step->size() > 1, q,
                                        step->o(kHotSlot, i), step->lse(kHotSlot, i),
                                        step->slot_count - kHotSlot, &splits, stream, arena, sel));
    step->hot[i] = 1;
    step->hot_states = splits;
    if (defer) {
      KVRT_SPAN("pending_attend", i);
      KVRT_RETURN_IF_ERROR(AttendPendingEvictions(step, i, q, stream));
      sel->evictions_on_device = true;
    }
    const int64_t per_head_ns = (NowNs() - t0) / H;
    for (int h = 0; h < H; ++h) sel->search_ns[h] = per_head_ns;
    counters_->attends_gpu_select += 1;
    return absl::OkStatus();
  }
  // The selection comes back (counts, then the selected clusters): the CPU maps it to rows.
  // NOTE: selected [H, C] and count [H] are adjacent in the scratch (SelectScratch).
  const auto* first = reinterpret_cast<const unsigned char*>(outs.selected);
  const std::size_t back =
      reinterpret_cast<const unsigned char*>(outs.selected_count) + H * 4 - first;
  KVRT_ASSIGN_OR_RETURN(transfer::PinnedBlock host, ctx_->pinned().Acquire(back));
  KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(host.data(), first, back, stream));
  KVRT_ASSIGN_OR_RETURN(transfer::Event copied, transfer::Event::Create(false));
  KVRT_RETURN_IF_ERROR(copied.Record(stream));
  KVRT_RETURN_IF_ERROR(copied.Synchronize());
  const auto* selected = static_cast<const int32_t*>(host.data());
  const int32_t* count = selected + static_cast<std::size_t>(H) * C;
  if (hot_.Fit(cold.rows(), stream)) {
    KVRT_RETURN_IF_ERROR(AttendHot(step, i, cold, selected, count, C, stream, sel, arena));
    const int64_t per_head_ns = (NowNs() - t0) / H;
    for (int h = 0; h < H; ++h) sel->search_ns[h] = per_head_ns;
  } else {
    const int64_t per_head_ns = (NowNs() - t0) / H;
    for (int h = 0; h < H; ++h) {
      if (!sel->active[h]) continue;
      const cpu_index::ClusterSummary& s = *cold.summary(h / group);
      std::vector<int64_t> rows(s.outliers.begin(), s.outliers.end());  // always attended
      for (int32_t j = 0; j < count[h]; ++j) {
        const int32_t c = selected[static_cast<std::size_t>(h) * C + j];
        if (c >= s.num_clusters()) continue;  // padding (never selected: size 0)
        for (int64_t r = s.begin[c]; r < s.begin[c] + s.size[c]; ++r) rows.push_back(r);
      }
      const int64_t t1 = NowNs();
      cold.CompleteSelection(h, step->q(i) + static_cast<std::size_t>(h) * d, std::move(rows),
                             s.num_clusters() + static_cast<int64_t>(s.outliers.size()), sel);
      sel->search_ns[h] = per_head_ns + NowNs() - t1;
    }
  }
  counters_->attends_gpu_select += 1;
  return absl::OkStatus();
}

// The selected clusters, the outliers and the rows not clustered yet, attended on the device from
// the hot cache into member i's hot slot; what does not fit stays in sel->rows for the CPU.
absl::Status DeviceTier::AttendHot(DeviceStep* step, int i, const ColdTier& cold,
                                   const int32_t* selected, const int32_t* count, int64_t C,
                                   void* stream, ColdSelection* sel, tbb::task_arena& arena) {
  const int H = cfg_->num_q_heads, G = cfg_->num_kv_heads, group = H / G;
  // Unclustered rows go up in chunks of this many (stable until the index covers them).
  constexpr int32_t kChunkRows = 4 * DeviceHotCache::kPageRows;
  hot_.SyncVersion(cold.index_version());
  // Per kv head, the groups all its q heads attend: runs of consecutive outlier rows, then the
  // unclustered rows in chunks.
  std::vector<std::vector<HotCacheMap::Group>> common(G);
  std::vector<int64_t> scanned(G);
  for (int g = 0; g < G; ++g) {
    const cpu_index::ClusterSummary& s = *cold.summary(g);
    const auto& out = s.outliers;
    for (std::size_t a = 0; a < out.size();) {
      std::size_t b = a + 1;
      while (b < out.size() && out[b] == out[b - 1] + 1 && b - a < kChunkRows) ++b;
      common[g].push_back({g, out[a], static_cast<int32_t>(b - a), true});
      a = b;
    }
    const int64_t covered = cold.covered_rows(g), rows = cold.rows();
    for (int64_t r = covered; r < rows; r += kChunkRows)
      common[g].push_back(
          {g, r, static_cast<int32_t>(std::min<int64_t>(kChunkRows, rows - r)), false});
    scanned[g] = s.num_clusters() + static_cast<int64_t>(out.size()) + rows - covered;
  }
  std::vector<std::vector<HotCacheMap::Group>> groups(H);
  for (int h = 0; h < H; ++h) {
    if (!sel->active[h]) continue;
    const int g = h / group;
    const cpu_index::ClusterSummary& s = *cold.summary(g);
    for (int32_t j = 0; j < count[h]; ++j) {
      const int32_t c = selected[static_cast<std::size_t>(h) * C + j];
      if (c >= s.num_clusters()) continue;  // padding (never selected: size 0)
      groups[h].push_back({g, s.begin[c], s.size[c], true});
    }
    groups[h].insert(groups[h].end(), common[g].begin(), common[g].end());
  }
  const void* q_dev = static_cast<const unsigned char*>(step->q_dev) +
                      static_cast<std::size_t>(i) * H * cfg_->head_dim * DTypeSize(cfg_->dtype);
  HotCacheStep hs;
  KVRT_RETURN_IF_ERROR(hot_.Attend(groups, cold, q_dev, cfg_->dtype == DType::kF32,
                                   step->o(kHotSlot, i), step->lse(kHotSlot, i), stream, arena,
                                   cfg_->record_attended, &hs));
  step->hot[i] = hs.on_device ? 1 : 0;
  for (int h = 0; h < H; ++h)
    if (sel->active[h]) cold.SetSelection(h, std::move(hs.cpu_rows[h]), scanned[h / group], sel);
  sel->cached = std::move(hs.attended);
  sel->cached_rows = std::move(hs.rows);
  return absl::OkStatus();
}

absl::Status DeviceTier::Finish(TierStep* base, const std::vector<StepStates>& states,
                                const std::vector<uint8_t>& ok, float* out) {
  auto* step = static_cast<DeviceStep*>(base);
  void* stream = step->lease.get();
  const int n = step->size();
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const std::size_t of = static_cast<std::size_t>(H) * d;
  // Slots past the tier's: used when some member has a state for them. Host states are packed
  // slot-major as on the device (an absent state is empty: lse -inf) and go up in one copy per
  // run of members; a fetched cold state is already in place and is skipped.
  bool any_cold = false, any_estimate = false, any_fetched = false, any_hot = false;
  for (int i = 0; i < n; ++i) {
    any_cold = any_cold || states[i].cold != nullptr || step->fetched[i] || step->pending[i];
    any_estimate = any_estimate || states[i].estimate != nullptr || step->estimated[i];
    any_fetched = any_fetched || step->fetched[i];
    any_hot = any_hot || step->hot[i];
  }
  const int slots = any_hot ? kHotSlot + step->hot_states : any_estimate ? 3 : any_cold ? 2 : 1;
  const bool timed = step->timed;
  if (timed && (!any_fetched || n > 1)) KVRT_RETURN_IF_ERROR(ev_h2d_begin_.Record(stream));
  for (int slot = kColdSlot; slot < std::min(slots, kSlots); ++slot) {
    std::vector<float> o(static_cast<std::size_t>(n) * of, 0.f),
        lse(static_cast<std::size_t>(n) * H, kNegInf);
    for (int i = 0; i < n; ++i) {
      const PartialState* s = slot == kColdSlot       ? states[i].cold
                              : slot == kEstimateSlot ? states[i].estimate
                                                      : nullptr;
      if (s == nullptr) continue;
      std::copy(s->o.begin(), s->o.end(), o.begin() + i * of);
      std::copy(s->lse.begin(), s->lse.end(), lse.begin() + i * H);
    }
    // A state already on the device (fetched cold rows, a GPU estimate, the hot cache's) is not
    // overwritten.
    auto on_device = [&](int m) {
      return (slot == kColdSlot       ? step->fetched[m] || step->pending[m]
              : slot == kEstimateSlot ? step->estimated[m]
                                      : step->hot[m]) != 0;
    };
    for (int i = 0; i < n;) {
      if (on_device(i)) {
        ++i;
        continue;
      }
      int j = i;
      bool any_host = false;
      for (; j < n && !on_device(j); ++j)
        any_host = any_host || (slot == kColdSlot       ? states[j].cold != nullptr
                                : slot == kEstimateSlot ? states[j].estimate != nullptr
                                                        : false);
      if (!any_host) {
        // Empty states only (the direct step leaves the cold slot so): lse -inf on the device,
        // whose o MergeStatesN does not read; a pageable upload would stall the host.
        KVRT_RETURN_IF_ERROR(
            gpu::FillF32(step->lse(slot, i), kNegInf, static_cast<int64_t>(j - i) * H, stream));
        i = j;
        continue;
      }
      KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(step->o(slot, i), o.data() + i * of,
                                                 (j - i) * of * sizeof(float), stream));
      KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(step->lse(slot, i), lse.data() + i * H,
                                                 (j - i) * H * sizeof(float), stream));
      i = j;
    }
  }
  if (timed && (!any_fetched || n > 1)) KVRT_RETURN_IF_ERROR(ev_h2d_.Record(stream));
  // Merged into staging, then copied to out member run by member run: a member that failed in
  // phases 2-3 leaves its rows of out untouched.
  const bool whole = std::all_of(ok.begin(), ok.end(), [](uint8_t x) { return x != 0; });
  float* merged = step->exec.device && whole ? out : step->out_dev;
  KVRT_RETURN_IF_ERROR(LaunchTier(step, false));  // a step whose selection did not launch it
  KVRT_RETURN_IF_ERROR(step->JoinTier());
  KVRT_RETURN_IF_ERROR(step->JoinLanes());
  KVRT_RETURN_IF_ERROR(gpu::MergeStatesN(step->o_states, step->lse_states, slots, step->rows, d,
                                         merged, DType::kF32, nullptr, stream));
  if (timed) {
    KVRT_RETURN_IF_ERROR(ev_merge_.Record(stream));
    timing_pending_ = true;
  }
  if (merged != out) {
    for (int i = 0; i < n;) {
      if (!ok[i]) {
        ++i;
        continue;
      }
      int j = i;
      while (j < n && ok[j]) ++j;
      KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(out + i * of, merged + i * of,
                                                 (j - i) * of * sizeof(float), stream));
      i = j;
    }
  }
  if (!step->exec.device) {
    const int64_t t0 = NowNs();
    KVRT_RETURN_IF_ERROR(transfer::StreamSynchronize(stream));
    counters_->time_idle_ns += NowNs() - t0;
    CollectTiming();
  }
  if (step->tiers.size() == 1) return RecordLastUse(stream);
  KVRT_ASSIGN_OR_RETURN(std::shared_ptr<transfer::Event> done, FreeBatchEvent());
  KVRT_RETURN_IF_ERROR(done->Record(stream));
  for (DeviceTier* t : step->tiers) t->ShareLastUse(done, stream);
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<TierBackend> MakeDeviceTier(const RuntimeConfig* config,
                                            Runtime::Counters* counters, GpuContext* gpu) {
  return std::make_unique<DeviceTier>(config, counters, gpu);
}

}  // namespace kvrt::runtime

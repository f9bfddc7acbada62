// The device backend of the GPU tier (device_tier.h, tier_backend.h): device sinks + window ring,
// the eviction pipeline and the prompt's staging (the step: device_tier_step.cc, the selection:
// device_tier_select.cc; the classes: device_tier_internal.h).
#include "device_tier.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "align.h"
#include "device_hot_cache.h"
#include "device_tier_internal.h"
#include "direct_step.h"
#include "kvrt_common/clock.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_common/timeline.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_gpu/cluster_kernels.h"
#include "kvrt_gpu/code_rest.h"
#include "kvrt_gpu/code_scan.h"
#include "kvrt_gpu/kernels.h"
#include "oneapi/tbb/parallel_for.h"
#include "tier_backend.h"

namespace kvrt::runtime {
namespace {

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

}  // namespace

// ---- GpuContext -------------------------------------------------------------------------------

// ---- GpuContext -------------------------------------------------------------------------------

GpuContext::GpuContext()
    : pinned_(transfer::PinnedHostAllocator(), device_tier_internal::kPinnedCacheBytes) {}

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

// ---- DeviceTier: memory ------------------------------------------------------------------------
namespace device_tier_internal {

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
  // NOTE: no growth when a batch was written in place (InPlaceTarget checked the capacity): a
  // store that moved would leave its rows behind.
  KVRT_RETURN_IF_ERROR(cold->Reserve(cold->rows() + evictions_.pending_rows()));
  // Capacity is reserved, so these appends cannot fail half-way.
  auto append = [&](const void* k, const void* v, int64_t rows) {
    return k == nullptr ? cold->AppendWritten(rows) : cold->Append(k, v, rows);
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
  KVRT_RETURN_IF_ERROR(FollowPendingEviction(step, stream));
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

absl::Status DeviceTier::FollowPendingEviction(DeviceStep* step, void* stream) {
  const transfer::EvictionBatch& b = evictions_.front();
  // The batch's copy was recorded by this layer's append, before this call: on this stream, or
  // on the step's stream ahead of the fork of this batch member's lane. Stream order then gives
  // the wait (a driver call fewer per member and step) on a created stream
  // (transfer::IsCreatedStream).
  const bool ordered =
      transfer::IsCreatedStream(b.done_stream) &&
      (b.done_stream == stream || (step->size() > 1 && b.done_stream == step->lease.get()));
  return ordered ? absl::OkStatus() : transfer::StreamWaitEvent(stream, b.done);
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
    KVRT_RETURN_IF_ERROR(AppendEvictFused(plan, ks, vs, stream, cold));
  } else {
    KVRT_RETURN_IF_ERROR(AppendStaged(plan, ks, vs, exec, stream, cold));
  }
  const int64_t n_sink = std::min(plan.new_length, S);
  const int64_t n_window = plan.new_length - n_sink - (cold->rows() + pending_rows());
  KVRT_RETURN_IF_ERROR(UploadArrays(n_sink, n_window, stream));
  KVRT_RETURN_IF_ERROR(RecordLastUse(stream));
  return absl::OkStatus();
}

namespace {
bool InPlaceEvictEnabled() {
  // On by default since 0.3.36 (tests, memcheck and an A/B on an H100, docs/gpu.md):
  // KVRT_IN_PLACE_EVICT=0 keeps the leaving rows in pinned blocks (diagnostics). Read once.
  static const bool on = [] {
    const char* env = std::getenv("KVRT_IN_PLACE_EVICT");
    return env == nullptr || std::atoi(env) != 0;
  }();
  return on;
}
}  // namespace

bool DeviceTier::InPlaceTarget(ColdTier* cold, int64_t n, gpu::HeadRows* to) {
  const int G = cfg_->num_kv_heads;
  if (!InPlaceEvictEnabled() || G > gpu::HeadRows::kMaxHeads || prompt_.rows > 0) return false;
  const int64_t ahead = evictions_.pending_rows();
  const int64_t end = cold->rows() + ahead + n;
  if (end > cold->store(0).capacity() || !direct_.RegisteredUpTo(*cold, end)) return false;
  const std::size_t hb = static_cast<std::size_t>(cfg_->head_dim) * DTypeSize(cfg_->dtype);
  to->heads = G;
  for (int g = 0; g < G; ++g) {
    auto [keys, values] = cold->NextRows(g);
    if (keys == values) return false;  // the keys hold the values too: one store
    to->k[g] = static_cast<unsigned char*>(keys) + ahead * hb;
    to->v[g] = static_cast<unsigned char*>(values) + ahead * hb;
  }
  return true;
}

absl::Status DeviceTier::AppendEvictFused(const AppendPlan& plan, const unsigned char* k,
                                          const unsigned char* v, void* stream, ColdTier* cold) {
  const int64_t S = cfg_->sink_tokens, W = cfg_->window_tokens;
  gpu::RingRows ring;
  ring.k = ring_k_.data();
  ring.v = ring_v_.data();
  ring.capacity = W;
  ring.slot0 = (plan.length - S) % W;
  ring.row_bytes = token_bytes();
  // In place: the rows are where the cold tier takes them (AppendWritten at the settle) and where
  // the layer's next direct step reads them (its row count covers the pending batch), so no copy,
  // no pinned block and no separate attention of the batch in flight (AttendPendingEvictions).
  // The batch then holds no blocks.
  gpu::HeadRows to;
  if (InPlaceTarget(cold, plan.evict, &to)) {
    KVRT_RETURN_IF_ERROR(gpu::RingAppendRowsToHeads(ring, k, v, plan.evict, to, stream));
    counters_->evicted_in_place += plan.evict;
    return QueueEviction(transfer::EvictionBatch{}, plan.evict, stream);
  }
  const std::size_t bytes = static_cast<std::size_t>(plan.evict) * token_bytes();
  transfer::EvictionBatch batch;
  KVRT_ASSIGN_OR_RETURN(batch.k, ctx_->pinned().Acquire(bytes));
  KVRT_ASSIGN_OR_RETURN(batch.v, ctx_->pinned().Acquire(bytes));
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
  transfer::CudaCallScope on_device(cfg_->call_device());  // an arena worker runs the job
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

}  // namespace device_tier_internal

std::unique_ptr<TierBackend> MakeDeviceTier(const RuntimeConfig* config,
                                            Runtime::Counters* counters, GpuContext* gpu) {
  return std::make_unique<device_tier_internal::DeviceTier>(config, counters, gpu);
}

}  // namespace kvrt::runtime

// The GPU backend of LayerState (gpu_tier.h): device sinks + window ring, the eviction pipeline,
// and the decode step that overlaps GPU tier attention with the CPU's cold-tier search.
#include "runtime/src/gpu_tier.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "runtime/src/budget.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_cpu_index/attention.h"
#include "kvrt_gpu/kernels.h"
#include "oneapi/tbb/parallel_for.h"
#include "runtime/src/layer_state.h"

namespace kvrt::runtime {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Free pinned blocks kept by the pool (eviction batches, q staging).
constexpr std::size_t kPinnedCacheBytes = std::size_t{256} << 20;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Ring slot of ring-relative index r is r % W. A run of `count` consecutive tokens is at most two
// contiguous pieces of the ring, so plain async copies do it (no index array to upload).
absl::Status RingToLinear(void* dst, const void* ring, int64_t r0, int64_t count, int64_t W,
                          std::size_t tb, void* stream) {
  for (int64_t i = 0; i < count;) {
    const int64_t slot = (r0 + i) % W, run = std::min(count - i, W - slot);
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(static_cast<unsigned char*>(dst) + i * tb,
                                               static_cast<const unsigned char*>(ring) + slot * tb,
                                               run * tb, stream));
    i += run;
  }
  return absl::OkStatus();
}

absl::Status LinearToRing(void* ring, const void* src, int64_t r0, int64_t count, int64_t W,
                          std::size_t tb, void* stream) {
  for (int64_t i = 0; i < count;) {
    const int64_t slot = (r0 + i) % W, run = std::min(count - i, W - slot);
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(static_cast<unsigned char*>(ring) + slot * tb,
                                               static_cast<const unsigned char*>(src) + i * tb,
                                               run * tb, stream));
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
  KVRT_ASSIGN_OR_RETURN(transfer::Stream s, transfer::Stream::Create());
  streams_.push_back(std::move(s));
  return streams_.back().get();
}

void GpuContext::ReleaseStream(void* s) {
  std::lock_guard<std::mutex> lock(mu_);
  free_streams_.push_back(s);
}

GpuTier::~GpuTier() {
  (void)index_work.Wait();
  evictions.Discard();
  if (used) (void)last_use.Synchronize();  // device work still reading the buffers freed below
}

// ---- LayerState, GPU backend ------------------------------------------------------------------

absl::Status LayerState::DrainEvictions(tbb::task_arena& arena, bool launch_index) {
  if (gpu_->evictions.empty()) return absl::OkStatus();
  // The store grows here, not at append time: the background index insert reads the store, and
  // only the callers of this (after waiting for it) may reallocate it.
  for (auto& store : cold_)
    KVRT_RETURN_IF_ERROR(store.Reserve(store.size() + gpu_->evictions.pending_rows()));
  const std::size_t head_elems = static_cast<std::size_t>(cfg_->num_kv_heads) * cfg_->head_dim;
  const std::size_t hb = static_cast<std::size_t>(cfg_->head_dim) * DTypeSize(cfg_->dtype);
  KVRT_RETURN_IF_ERROR(gpu_->evictions.Drain([&](const void* k, const void* v, int64_t rows) {
    // Capacity was reserved when the rows were evicted, so these appends cannot fail.
    for (int g = 0; g < cfg_->num_kv_heads; ++g)
      KVRT_RETURN_IF_ERROR(cold_[g].Append(static_cast<const unsigned char*>(k) + g * hb,
                                           static_cast<const unsigned char*>(v) + g * hb, rows,
                                           head_elems));
    pending_cold_ -= rows;
    return absl::OkStatus();
  }));
  if (launch_index && cfg_->index_kind != cpu_index::IndexKind::kExact)
    gpu_->index_work.Launch(arena, [this, &arena] { return UpdateIndexes(arena); });
  return absl::OkStatus();
}

absl::Status LayerState::PrefillGpu(const void* q, const void* k, const void* v, int64_t n,
                                    tbb::task_arena& arena, const Exec& exec) {
  if (length_ != 0)
    return absl::FailedPreconditionError(absl::StrCat(
        "prefill: the layer already holds ", length_, " tokens (prefill once, then append)"));
  KVRT_RETURN_IF_ERROR(AppendTokensGpu(k, v, n, arena, exec));
  // AppendTokensGpu launched no index work for a prefill (the layer was empty); build here, with
  // the prompt's queries, as the host backend does.
  if (q != nullptr && cfg_->index_kind != cpu_index::IndexKind::kExact) {
    if (!exec.device) {
      SampleQueries(q, n);
    } else {
      // Only the sampled rows cross PCIe: the same evenly spaced rows SampleQueries picks.
      const int group = cfg_->num_q_heads / cfg_->num_kv_heads;
      const int64_t cap = std::max(1, cfg_->index.graph_query_sample);
      const int64_t tokens = std::min<int64_t>(n, std::max<int64_t>(1, cap / group));
      const std::size_t row = static_cast<std::size_t>(cfg_->num_q_heads) * cfg_->head_dim *
                              DTypeSize(cfg_->dtype);
      std::vector<unsigned char> rows(static_cast<std::size_t>(tokens) * row);
      StreamLease stream(gpu_ctx_, exec);
      for (int64_t i = 0; i < tokens; ++i) {
        const int64_t t = tokens == n ? i : i * n / tokens;
        KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(rows.data() + i * row,
                                                   static_cast<const unsigned char*>(q) + t * row,
                                                   row, stream.get()));
      }
      KVRT_RETURN_IF_ERROR(transfer::StreamSynchronize(stream.get()));
      SampleQueries(rows.data(), tokens);
    }
  }
  KVRT_RETURN_IF_ERROR(DrainEvictions(arena, false));
  return UpdateIndexes(arena);
}

absl::Status LayerState::AppendTokensGpu(const void* k, const void* v, int64_t n,
                                         tbb::task_arena& arena, const Exec& exec) {
  const int64_t S = cfg_->sink_tokens, W = cfg_->window_tokens;
  const std::size_t tb = token_bytes();
  const std::size_t head_elems = static_cast<std::size_t>(cfg_->num_kv_heads) * cfg_->head_dim;
  const std::size_t hb = static_cast<std::size_t>(cfg_->head_dim) * DTypeSize(cfg_->dtype);
  const int64_t L = length_, L2 = length_ + n;
  const int64_t cold_begin = S + cold_tokens();
  const int64_t cold_end = std::max(S, L2 - W);
  const int64_t new_cold = std::max<int64_t>(0, cold_end - cold_begin);
  auto* ks = static_cast<const unsigned char*>(k);
  auto* vs = static_cast<const unsigned char*>(v);
  const int64_t evict = std::max<int64_t>(0, std::min(L, cold_end) - cold_begin);  // ring -> host
  const int64_t direct_begin = std::max(L, cold_begin);
  const int64_t direct = std::max<int64_t>(0, cold_end - direct_begin);  // input -> host
  // Only a call that writes the store waits for the layer's background index insert (a decode
  // append, which only evicts, does not: its rows reach the store at the next attend).
  const bool settled = direct > 0 || !gpu_->evictions.empty();  // no background insert after this
  if (settled) {
    if (absl::Status s = gpu_->index_work.Wait(); !s.ok() && index_status_.ok()) index_status_ = s;
    // Rows evicted by earlier calls enter the store first (the store is in position order).
    KVRT_RETURN_IF_ERROR(DrainEvictions(arena, false));
  }

  // Budgets and allocations first (same rules and messages as the host backend).
  const bool need_sinks = gpu_->sink_k.empty() && S > 0;
  const bool need_ring = gpu_->ring_k.empty() && L2 > S;
  const int64_t gpu_add = 2 * static_cast<int64_t>(tb) * ((need_sinks ? S : 0) + (need_ring ? W : 0));
  // Index growth is reserved up front as on the host backend when no background insert runs
  // (index_bytes_ is then ours); else it is counted when that insert completes (kvrt.h).
  const int64_t index_add = settled && new_cold > 0
                                ? IndexGrowthBound(*cfg_, cold_tokens() + new_cold, kIndexMinRows, index_bytes_)
                                : 0;
  BudgetReservation budget;
  KVRT_RETURN_IF_ERROR(budget.Reserve(*cfg_, counters_, gpu_add, new_cold, tb, index_add));
  auto alloc = [&](transfer::DeviceBuffer* b, int64_t rows) -> absl::Status {
    auto made = transfer::DeviceBuffer::Allocate(static_cast<std::size_t>(rows) * tb);
    if (!made.ok()) return made.status();
    *b = std::move(*made);
    return absl::OkStatus();
  };
  absl::Status st;
  if (need_sinks) {
    st = alloc(&gpu_->sink_k, S);
    if (st.ok()) st = alloc(&gpu_->sink_v, S);
  }
  if (st.ok() && need_ring) {
    st = alloc(&gpu_->ring_k, W);
    if (st.ok()) st = alloc(&gpu_->ring_v, W);
  }
  if (st.ok() && gpu_->desc.empty()) {
    auto made = transfer::DeviceBuffer::Allocate(4 * sizeof(void*) + 2 * sizeof(int32_t));
    if (made.ok()) gpu_->desc = std::move(*made);
    st = made.status();
  }
  for (auto& store : cold_)
    if (st.ok() && direct > 0) st = store.Reserve(store.size() + new_cold);
  if (!st.ok()) {
    if (need_sinks) gpu_->sink_k.Reset(), gpu_->sink_v.Reset();
    if (need_ring) gpu_->ring_k.Reset(), gpu_->ring_v.Reset();
    return absl::Status(st.code(), absl::StrCat("append (GPU backend): ", st.message()));
  }
  budget.Commit();
  index_bytes_ += index_add;  // UpdateIndexes trues this up to the indexes' real size

  StreamLease lease(gpu_ctx_, exec);
  KVRT_RETURN_IF_ERROR(lease.status());
  void* stream = lease.get();
  if (gpu_->used) KVRT_RETURN_IF_ERROR(transfer::StreamWaitEvent(stream, gpu_->last_use));

  // 1. Ring tokens that leave the window: device copy into staging (stream order, before the ring
  //    slots are overwritten below), then D2H on the copy stream into pinned blocks. The batch
  //    reaches the host store at this layer's next attend or append (DrainEvictions).
  if (evict > 0) {
    const std::size_t bytes = static_cast<std::size_t>(evict) * tb;
    KVRT_ASSIGN_OR_RETURN(void* staging, transfer::MallocAsync(2 * bytes, stream));
    auto* stg = static_cast<unsigned char*>(staging);
    KVRT_RETURN_IF_ERROR(RingToLinear(stg, gpu_->ring_k.data(), cold_begin - S, evict, W, tb, stream));
    KVRT_RETURN_IF_ERROR(RingToLinear(stg + bytes, gpu_->ring_v.data(), cold_begin - S, evict, W, tb, stream));
    KVRT_ASSIGN_OR_RETURN(transfer::Event gathered, transfer::Event::Create(false));
    KVRT_RETURN_IF_ERROR(gathered.Record(stream));
    void* copy = gpu_ctx_->copy_stream();
    KVRT_RETURN_IF_ERROR(transfer::StreamWaitEvent(copy, gathered));
    transfer::EvictionBatch batch;
    KVRT_ASSIGN_OR_RETURN(batch.k, gpu_ctx_->pinned().Acquire(bytes));
    KVRT_ASSIGN_OR_RETURN(batch.v, gpu_ctx_->pinned().Acquire(bytes));
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(batch.k.data(), stg, bytes, copy));
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(batch.v.data(), stg + bytes, bytes, copy));
    KVRT_RETURN_IF_ERROR(transfer::FreeAsync(staging, copy));
    KVRT_ASSIGN_OR_RETURN(batch.done, transfer::Event::Create(false));
    KVRT_RETURN_IF_ERROR(batch.done.Record(copy));
    batch.rows = evict;
    gpu_->evictions.Push(std::move(batch));
    pending_cold_ += evict;
    counters_->eviction_batches += 1;
  }
  // 2. Tokens that go from the input straight to the host store (more than a window at once,
  //    e.g. a prompt): after the pending batch, in position order.
  if (direct > 0) {
    KVRT_RETURN_IF_ERROR(DrainEvictions(arena, false));
    const std::size_t off = static_cast<std::size_t>(direct_begin - L) * tb;
    const std::size_t bytes = static_cast<std::size_t>(direct) * tb;
    const unsigned char* kr = ks + off;
    const unsigned char* vr = vs + off;
    std::vector<unsigned char> hk, hv;
    if (exec.device) {  // D2H of the cold part only
      hk.resize(bytes);
      hv.resize(bytes);
      KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(hk.data(), kr, bytes, stream));
      KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(hv.data(), vr, bytes, stream));
      KVRT_RETURN_IF_ERROR(transfer::StreamSynchronize(stream));
      kr = hk.data();
      vr = hv.data();
    }
    for (int g = 0; g < cfg_->num_kv_heads; ++g)
      KVRT_RETURN_IF_ERROR(cold_[g].Append(kr + g * hb, vr + g * hb, direct, head_elems));
  }
  // 3. New tokens that stay on the GPU tier: sinks, then the ring (host sources are staged by
  //    the driver, so the caller may reuse them when this returns).
  const int64_t sink_end = std::min(L2, S);
  if (sink_end > L) {
    const std::size_t bytes = static_cast<std::size_t>(sink_end - L) * tb;
    auto* sk = static_cast<unsigned char*>(gpu_->sink_k.data()) + L * tb;
    auto* sv = static_cast<unsigned char*>(gpu_->sink_v.data()) + L * tb;
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(sk, ks, bytes, stream));
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(sv, vs, bytes, stream));
  }
  const int64_t ring_begin = std::max({L, S, cold_end});
  if (L2 > ring_begin) {
    const std::size_t off = static_cast<std::size_t>(ring_begin - L) * tb;
    KVRT_RETURN_IF_ERROR(LinearToRing(gpu_->ring_k.data(), ks + off, ring_begin - S, L2 - ring_begin, W, tb, stream));
    KVRT_RETURN_IF_ERROR(LinearToRing(gpu_->ring_v.data(), vs + off, ring_begin - S, L2 - ring_begin, W, tb, stream));
  }
  const int64_t gpu_before = gpu_tokens();
  length_ = L2;
  n_sink_ = std::min(L2, S);
  n_window_ = L2 - n_sink_ - cold_tokens();
  counters_->gpu_tokens += gpu_tokens() - gpu_before;
  counters_->evicted_tokens += evict;
  // The kernels' view of the tier (pointers and counts), uploaded when it changes.
  if (gpu_->desc_n_sink != n_sink_ || gpu_->desc_n_window != n_window_) {
    unsigned char host[4 * sizeof(void*) + 2 * sizeof(int32_t)];
    const void* ptrs[4] = {gpu_->sink_k.data(), gpu_->sink_v.data(), gpu_->ring_k.data(),
                           gpu_->ring_v.data()};
    const int32_t counts[2] = {static_cast<int32_t>(n_sink_), static_cast<int32_t>(n_window_)};
    std::memcpy(host, ptrs, sizeof ptrs);
    std::memcpy(host + sizeof ptrs, counts, sizeof counts);
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(gpu_->desc.data(), host, sizeof host, stream));
    gpu_->desc_n_sink = static_cast<int32_t>(n_sink_);
    gpu_->desc_n_window = static_cast<int32_t>(n_window_);
  }
  if (gpu_->last_use.empty()) {
    KVRT_ASSIGN_OR_RETURN(gpu_->last_use, transfer::Event::Create(false));
  }
  KVRT_RETURN_IF_ERROR(gpu_->last_use.Record(stream));
  gpu_->used = true;
  // Rows stored straight from the input get indexed in the background (prefill builds instead).
  if (direct > 0 && L > 0 && cfg_->index_kind != cpu_index::IndexKind::kExact)
    gpu_->index_work.Launch(arena, [this, &arena] { return UpdateIndexes(arena); });
  return std::exchange(index_status_, absl::OkStatus());
}

absl::Status LayerState::AttendGpu(const void* q_in, float* out, tbb::task_arena& arena,
                                   const uint8_t* streaming, const Exec& exec) {
  if (length_ == 0)
    return absl::FailedPreconditionError("attend: the layer holds no token (prefill or append first)");
  const int64_t t0 = NowNs();
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const std::size_t es = DTypeSize(cfg_->dtype);
  const std::size_t qbytes = static_cast<std::size_t>(H) * d * es;
  GpuTier& t = *gpu_;
  auto collect_timing = [&] {
    if (!t.timing_pending) return;
    bool done = false;
    if (!t.ev_merge.Query(&done).ok() || !done) return;
    auto a = transfer::ElapsedMs(t.ev_start, t.ev_tier);
    auto b = transfer::ElapsedMs(t.ev_h2d_begin, t.ev_h2d);
    auto c = transfer::ElapsedMs(t.ev_h2d, t.ev_merge);
    if (a.ok()) counters_->time_gpu_attention_ns += MsToNs(*a);
    if (b.ok()) counters_->time_h2d_ns += MsToNs(*b);
    if (c.ok()) counters_->time_merge_ns += MsToNs(*c);
    t.timing_pending = false;
  };
  collect_timing();  // the previous attend's device times (device output: read lazily)
  if (t.ev_start.empty()) {
    for (auto* e : {&t.ev_start, &t.ev_tier, &t.ev_h2d_begin, &t.ev_h2d, &t.ev_merge}) {
      KVRT_ASSIGN_OR_RETURN(*e, transfer::Event::Create(true));
    }
  }
  StreamLease lease(gpu_ctx_, exec);
  KVRT_RETURN_IF_ERROR(lease.status());
  void* stream = lease.get();
  if (t.used) KVRT_RETURN_IF_ERROR(transfer::StreamWaitEvent(stream, t.last_use));

  // Scratch: [o_gpu H*d | lse_gpu H | o_cpu H*d | lse_cpu H | out H*d (host out) | q (host q)].
  const std::size_t of = static_cast<std::size_t>(H) * d;
  const std::size_t floats = 2 * of + 2 * static_cast<std::size_t>(H) + (exec.device ? 0 : of);
  KVRT_ASSIGN_OR_RETURN(void* scratch_raw,
                        transfer::MallocAsync(floats * sizeof(float) + (exec.device ? 0 : qbytes), stream));
  auto* scratch = static_cast<float*>(scratch_raw);
  float* o_gpu = scratch;
  float* lse_gpu = o_gpu + of;
  float* o_cpu_dev = lse_gpu + H;
  float* lse_cpu_dev = o_cpu_dev + of;
  float* out_dev = exec.device ? out : lse_cpu_dev + H;
  struct FreeOnExit {
    void* p;
    void* s;
    ~FreeOnExit() { (void)transfer::FreeAsync(p, s); }
  } free_scratch{scratch_raw, stream};

  // q for the GPU (device) and for the CPU (host f32).
  const void* q_dev = q_in;
  transfer::PinnedBlock q_pinned;
  transfer::Event q_ready;
  if (exec.device) {
    KVRT_ASSIGN_OR_RETURN(q_pinned, gpu_ctx_->pinned().Acquire(qbytes));
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(q_pinned.data(), q_in, qbytes, stream));
    KVRT_ASSIGN_OR_RETURN(q_ready, transfer::Event::Create(false));
    KVRT_RETURN_IF_ERROR(q_ready.Record(stream));
  } else {
    void* qd = static_cast<unsigned char*>(scratch_raw) + floats * sizeof(float);
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(qd, q_in, qbytes, stream));
    q_dev = qd;
  }

  // (a) GPU: partial attention over sinks + window.
  gpu::TierBatch tier;
  const auto* desc = static_cast<const unsigned char*>(t.desc.data());
  tier.sink_k = reinterpret_cast<const void* const*>(desc);
  tier.sink_v = reinterpret_cast<const void* const*>(desc + sizeof(void*));
  tier.window_k = reinterpret_cast<const void* const*>(desc + 2 * sizeof(void*));
  tier.window_v = reinterpret_cast<const void* const*>(desc + 3 * sizeof(void*));
  tier.n_sink = reinterpret_cast<const int32_t*>(desc + 4 * sizeof(void*));
  tier.n_window = tier.n_sink + 1;
  tier.batch = 1;
  tier.max_tokens = static_cast<int>(n_sink_ + n_window_);
  tier.kv_heads = cfg_->num_kv_heads;
  tier.head_dim = d;
  tier.dtype = cfg_->dtype;
  gpu::AttnParams params;
  params.q_heads = H;
  params.scale = cfg_->scale;
  params.q_is_f32 = cfg_->dtype == DType::kF32;
  KVRT_RETURN_IF_ERROR(t.ev_start.Record(stream));
  KVRT_RETURN_IF_ERROR(gpu::TierAttention(tier, q_dev, params, o_gpu, lse_gpu, nullptr, stream));
  KVRT_RETURN_IF_ERROR(t.ev_tier.Record(stream));

  // (b) CPU, meanwhile: the layer's background index insert (normally long done), q, the
  //     layer's evicted rows into the store, then the cold tier.
  const int64_t t1 = NowNs();
  if (absl::Status s = t.index_work.Wait(); !s.ok() && index_status_.ok()) index_status_ = s;
  std::vector<float> q(of);
  if (exec.device) {
    KVRT_RETURN_IF_ERROR(q_ready.Synchronize());
    ConvertToF32(q_pinned.data(), cfg_->dtype, of, q.data());
  } else {
    ConvertToF32(q_in, cfg_->dtype, of, q.data());
  }
  KVRT_RETURN_IF_ERROR(DrainEvictions(arena, false));
  const int64_t t2 = NowNs();
  counters_->time_d2h_ns += t2 - t1;

  const int64_t n_cold = cold_tokens();
  if (cfg_->record_attended) attended_.assign(H, {});
  std::vector<float> o_cpu(of, 0.f), lse_cpu(H, kNegInf);
  std::vector<std::vector<int64_t>> ids(H);
  std::vector<int64_t> scored(H, 0), attended_cold(H, 0), search_ns(H, 0);
  const auto units = n_cold > 0 ? ColdUnits(streaming) : std::vector<std::vector<int>>{};
  std::vector<absl::Status> status(units.size());
  std::vector<int64_t> read(units.size(), 0);
  std::vector<int64_t> busy_ns(units.size(), 0);
  const bool fetch = !units.empty() && ChooseFetch();
  arena.execute([&] {
    tbb::parallel_for(0, static_cast<int>(units.size()), [&](int u) {
      const int64_t h0 = NowNs();
      status[u] = ColdGroup(units[u], q.data(), o_cpu.data(), lse_cpu.data(), &ids, scored.data(),
                            search_ns.data(), &read[u], /*attend=*/!fetch);
      busy_ns[u] = NowNs() - h0;
    });
  });
  for (auto& s : status) KVRT_RETURN_IF_ERROR(s);
  for (const auto& unit : units)
    for (int h : unit)
      attended_cold[h] = cfg_->index_kind == cpu_index::IndexKind::kExact ? n_cold
                                                                           : static_cast<int64_t>(ids[h].size());
  if (cfg_->record_attended)
    for (int h = 0; h < H; ++h) RecordAttended(h, n_cold, ids[h]);
  const int64_t t3 = NowNs();
  {
    int64_t search = 0, busy = 0;
    for (int h = 0; h < H; ++h) search += search_ns[h];
    for (int64_t b : busy_ns) busy += b;
    const int64_t wall = t3 - t2;
    const int64_t search_wall = busy > 0 ? static_cast<int64_t>(static_cast<double>(wall) * search / busy) : 0;
    counters_->time_cpu_search_ns += search_wall;
    counters_->time_cpu_attention_ns += wall - search_wall;
  }

  // (c) H2D of the CPU state, merge into out.
  // Fetch mode: H2D of the selected rows instead, attended on the GPU (its kernel time then counts
  // as merge time).
  KVRT_RETURN_IF_ERROR(t.ev_h2d_begin.Record(stream));
  if (fetch) {
    KVRT_RETURN_IF_ERROR(FetchAttend(ids, q_dev, o_cpu_dev, lse_cpu_dev, stream, arena));
    counters_->attends_fetch += 1;
  } else {
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(o_cpu_dev, o_cpu.data(), of * sizeof(float), stream));
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(lse_cpu_dev, lse_cpu.data(), H * sizeof(float), stream));
    KVRT_RETURN_IF_ERROR(t.ev_h2d.Record(stream));
  }
  KVRT_RETURN_IF_ERROR(gpu::MergeStates(o_gpu, lse_gpu, o_cpu_dev, lse_cpu_dev, H, d, out_dev,
                                        DType::kF32, nullptr, stream));
  KVRT_RETURN_IF_ERROR(t.ev_merge.Record(stream));
  t.timing_pending = true;
  if (!exec.device) {
    const int64_t t4 = NowNs();
    KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(out, out_dev, of * sizeof(float), stream));
    KVRT_RETURN_IF_ERROR(transfer::StreamSynchronize(stream));
    counters_->time_idle_ns += NowNs() - t4;
    collect_timing();
  }
  KVRT_RETURN_IF_ERROR(t.last_use.Record(stream));

  // Index insert of the rows stored above: in the background, overlapping other layers' work.
  if (cfg_->index_kind != cpu_index::IndexKind::kExact && !cold_.empty() &&
      (index_[0] == nullptr || index_[0]->size() < cold_[0].size()))
    t.index_work.Launch(arena, [this, &arena] { return UpdateIndexes(arena); });

  int64_t total_scored = 0, total_cold = 0;
  for (int h = 0; h < H; ++h) {
    total_scored += scored[h];
    total_cold += attended_cold[h];
  }
  counters_->attend_calls += 1;
  counters_->keys_scored += total_scored;
  for (int64_t r : read) counters_->keys_read += r;
  // Retrieval heads only: a streaming head searches nothing, so it would make the scanned
  // fraction (keys_scored / cold_keys_searchable) read low.
  for (const auto& unit : units) counters_->cold_keys_searchable += n_cold * static_cast<int64_t>(unit.size());
  counters_->cold_tokens_attended += total_cold;
  const int64_t wall = NowNs() - t0;
  counters_->time_attend_ns += wall;
  if (!units.empty()) RecordColdCost(fetch, wall);
  return absl::OkStatus();
}

void LayerState::SettleBackgroundWork() {
  if (!gpu_) return;
  if (absl::Status s = gpu_->index_work.Wait(); !s.ok() && index_status_.ok()) index_status_ = s;
}

bool LayerState::ChooseFetch() {
  if (cfg_->index_kind == cpu_index::IndexKind::kExact || cfg_->cold_attention == 0) return false;
  if (cfg_->cold_attention == 1) return true;
  // Auto: try each mode once, then the cheaper one, re-trying the other every 32 attends (the
  // costs move with the context length and the machine's load).
  const int64_t n = cold_attends_++;
  if (cold_cost_ns_[0] == 0) return false;
  if (cold_cost_ns_[1] == 0) return true;
  const bool fetch_cheaper = cold_cost_ns_[1] < cold_cost_ns_[0];
  return n % 32 == 31 ? !fetch_cheaper : fetch_cheaper;
}

void LayerState::RecordColdCost(bool fetch, int64_t ns) {
  double& c = cold_cost_ns_[fetch ? 1 : 0];
  c = c == 0 ? static_cast<double>(ns) : 0.8 * c + 0.2 * static_cast<double>(ns);
}

absl::Status LayerState::FetchAttend(const std::vector<std::vector<int64_t>>& ids, const void* q_dev,
                                     float* o_dev, float* lse_dev, void* stream, tbb::task_arena& arena) {
  GpuTier& t = *gpu_;
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  const int group = H / cfg_->num_kv_heads;
  const std::size_t row_bytes = static_cast<std::size_t>(d) * DTypeSize(cfg_->dtype);
  std::vector<int32_t> offsets(H + 1, 0);
  int max_rows = 0;
  for (int h = 0; h < H; ++h) {
    offsets[h + 1] = offsets[h] + static_cast<int32_t>(ids[h].size());
    max_rows = std::max(max_rows, static_cast<int>(ids[h].size()));
  }
  const std::size_t kv_bytes = static_cast<std::size_t>(offsets[H]) * row_bytes;
  const std::size_t total = 2 * kv_bytes + offsets.size() * sizeof(int32_t);
  if (t.fetch_done.empty()) {
    KVRT_ASSIGN_OR_RETURN(t.fetch_done, transfer::Event::Create(false));
  } else {
    KVRT_RETURN_IF_ERROR(t.fetch_done.Synchronize());  // the previous H2D out of fetch_block
  }
  if (t.fetch_block.size() < total) {
    t.fetch_block = transfer::PinnedBlock();
    KVRT_ASSIGN_OR_RETURN(t.fetch_block, gpu_ctx_->pinned().Acquire(total));
  }
  auto* host_k = static_cast<unsigned char*>(t.fetch_block.data());
  auto* host_v = host_k + kv_bytes;
  arena.execute([&] {
    tbb::parallel_for(0, H, [&](int h) {
      const auto& store = cold_[h / group];
      for (std::size_t j = 0; j < ids[h].size(); ++j) {
        const std::size_t at = (static_cast<std::size_t>(offsets[h]) + j) * row_bytes;
        std::memcpy(host_k + at, store.key(ids[h][j]), row_bytes);
        std::memcpy(host_v + at, store.value(ids[h][j]), row_bytes);
      }
    });
  });
  std::memcpy(host_v + kv_bytes, offsets.data(), offsets.size() * sizeof(int32_t));
  KVRT_ASSIGN_OR_RETURN(void* dev, transfer::MallocAsync(total, stream));
  auto* dev_k = static_cast<unsigned char*>(dev);
  absl::Status st = transfer::MemcpyAsync(dev, host_k, total, stream);
  if (st.ok()) st = t.fetch_done.Record(stream);
  if (st.ok()) st = t.ev_h2d.Record(stream);
  if (st.ok()) {
    gpu::GatherBatch batch;
    batch.k = dev_k;
    batch.v = dev_k + kv_bytes;
    batch.row_offsets = reinterpret_cast<const int32_t*>(dev_k + 2 * kv_bytes);
    batch.rows_q = H;
    batch.max_rows = max_rows;
    batch.head_dim = d;
    batch.dtype = cfg_->dtype;
    st = gpu::GatherAttend(batch, q_dev, cfg_->dtype == DType::kF32, cfg_->scale, 0, o_dev, lse_dev,
                           nullptr, stream);
  }
  const absl::Status freed = transfer::FreeAsync(dev, stream);
  return st.ok() ? freed : st;
}

}  // namespace kvrt::runtime

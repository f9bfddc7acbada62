// DeviceTier's decode step (device_tier_internal.h): its begin (q converted, the tier's arrays,
// the lanes' fork), the tier's attention, the rows the CPU fetched, the timing and the merge.
#include "device_tier_internal.h"
#include "kvrt_common/timeline.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvrt::runtime::device_tier_internal {
namespace {

int64_t MsToNs(float ms) { return static_cast<int64_t>(static_cast<double>(ms) * 1e6); }

}  // namespace

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

  // Scratch: [o slots*n*H*d | lse slots*n*H | merged n*H*d | merged lse n*H | the tier
  // attention's split states | tier arrays (n > 1) | q (host q)]. NOTE: one allocation per step:
  // the tier attention's own was two driver calls more per step.
  const std::size_t arrays_bytes = n > 1 ? gpu::TierArrays::Bytes(n) : 0;
  if (n == 1 && counts[0].selects_on_device)
    step->slot_count = kHotSlot + gpu::kDirectAttendMaxSplits;
  const std::size_t floats = step->slot_count * (of + step->rows) + of + step->rows;
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
  step->lse_dev = step->out_dev + of;
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

absl::Status DeviceTier::Finish(TierStep* base, const std::vector<StepStates>& states,
                                const std::vector<uint8_t>& ok, float* out, float* lse) {
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
  float* merged_lse = lse == nullptr ? nullptr : step->exec.device && whole ? lse : step->lse_dev;
  KVRT_RETURN_IF_ERROR(LaunchTier(step, false));  // a step whose selection did not launch it
  KVRT_RETURN_IF_ERROR(step->JoinTier());
  KVRT_RETURN_IF_ERROR(step->JoinLanes());
  KVRT_RETURN_IF_ERROR(gpu::MergeStatesN(step->o_states, step->lse_states, slots, step->rows, d,
                                         merged, DType::kF32, merged_lse, stream));
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
      if (lse != nullptr)
        KVRT_RETURN_IF_ERROR(transfer::MemcpyAsync(lse + i * H, merged_lse + i * H,
                                                   (j - i) * H * sizeof(float), stream));
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

}  // namespace kvrt::runtime::device_tier_internal

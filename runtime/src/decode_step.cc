// One decode step of one layer, for one sequence or a batch of them, top to bottom. The same phases
// run on both backends; what differs (where the GPU tier lives, where states merge) is behind
// TierBackend:
//
//   1. GPU tier    partial attention over sinks + window, every sequence of the batch in one
//                  launch on the device (it runs while the CPU works on 2-3), or on the host.
//   2. selection   per q head, the cold rows to attend (ColdTier::Select: index search, exact scan
//                  of rows the index does not cover yet, top_k), plus a two-level kind's estimate
//                  of the rows it leaves out.
//   3. cold attend exact attention over the selected rows: on the CPU over the host store, or
//                  (fetch mode) gathered, copied to the GPU and attended there.
//   4. merge       each sequence's list of partial states (tier, cold or fetched, estimate)
//                  merged once, in log-sum-exp space, into out (one launch for the batch).
// Then the rows this step moved into the cold tier get indexed (in the background on the GPU).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvrt_common/clock.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_common/timeline.h"
#include "kvrt_cpu_index/kind_table.h"
#include "kvrt_transfer/cuda_rt.h"
#include "layer_state.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvrt::runtime {

absl::Status LayerState::Attend(const void* q, float* out, tbb::task_arena& arena,
                                const uint8_t* streaming, const Exec& exec, float* lse) {
  LayerState* self = this;
  absl::Status status;
  KVRT_RETURN_IF_ERROR(Step(&self, 1, q, out, arena, streaming, exec, &status, lse));
  return status;
}

absl::Status LayerState::Step(LayerState* const* layers, int n, const void* q, float* out,
                              tbb::task_arena& arena, const uint8_t* streaming, const Exec& exec,
                              absl::Status* status, float* lse) {
  const RuntimeConfig& cfg = *layers[0]->cfg_;
  const std::size_t q_bytes =
      static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim * DTypeSize(cfg.dtype);
  const std::size_t out_floats = static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim;
  const std::size_t lse_floats = static_cast<std::size_t>(cfg.num_q_heads);
  // Members that can take part: a layer with no token fails alone. The others step together;
  // q and out of the members are gathered (contiguous, in member order) only when some failed.
  std::vector<int> members;
  for (int i = 0; i < n; ++i) {
    if (layers[i]->length_ == 0) {
      status[i] = absl::FailedPreconditionError(
          "attend: the layer holds no token (prefill or append first)");
    } else {
      members.push_back(i);
    }
  }
  const int m = static_cast<int>(members.size());
  if (m == 0) return absl::OkStatus();
  KVRT_SPAN("layer_step", m);
  const int64_t t_start = NowNs();
  const void* q_step = q;
  float* out_step = out;
  float* lse_step = lse;
  std::vector<unsigned char> q_gathered;
  std::vector<float> out_gathered, lse_gathered;
  if (m < n) {
    if (exec.device) {
      // Device tensors are not regathered on the host: the members step one at a time.
      for (int i : members)
        status[i] = layers[i]->Attend(static_cast<const unsigned char*>(q) + i * q_bytes,
                                      out + i * out_floats, arena, streaming, exec,
                                      lse != nullptr ? lse + i * lse_floats : nullptr);
      return absl::OkStatus();
    }
    q_gathered.resize(m * q_bytes);
    out_gathered.resize(m * out_floats);
    if (lse != nullptr) lse_gathered.resize(m * lse_floats);
    for (int j = 0; j < m; ++j)
      std::memcpy(q_gathered.data() + j * q_bytes,
                  static_cast<const unsigned char*>(q) + members[j] * q_bytes, q_bytes);
    q_step = q_gathered.data();
    out_step = out_gathered.data();
    if (lse != nullptr) lse_step = lse_gathered.data();
  }
  std::vector<TierBackend*> tiers(m);
  std::vector<TierCounts> counts(m);
  for (int j = 0; j < m; ++j) {
    LayerState& l = *layers[members[j]];
    tiers[j] = l.tier_.get();
    counts[j] = {l.n_sink_, l.n_window_, l.UsesGpuSelect(streaming)};
  }
  TierBackend& backend = *tiers[0];

  // 1. GPU tier, every member in one launch.
  timeline::Span begin_span("tier_begin", m);
  const int64_t t_tier = NowNs();
  KVRT_ASSIGN_OR_RETURN(std::unique_ptr<TierStep> step,
                        backend.BeginStep(tiers.data(), counts.data(), m, q_step, exec, arena));
  const int64_t tier_ns = NowNs() - t_tier;
  begin_span.End();

  // 2-3. Per member: cold selection, then cold attention (CPU, or fetched to the GPU).
  std::vector<ColdSelection> sel(m);
  std::vector<PartialState> cold_state(m);
  std::vector<StepStates> states(m);
  std::vector<uint8_t> ok(m, 1), fetched(m, 0);
  std::vector<absl::Status> member_status(m);
  // A batch whose selections run on the device: every member's selection launched at once (one
  // launch per kernel for the batch, BatchSelectEnabled) before the lanes take the rest. A member
  // that could not be prepared (no summary yet) selects in its cold phase as without it.
  std::vector<uint8_t> settled_before(m, 0);
  if (m > 1 && BatchSelectEnabled() && layers[members[0]]->UsesGpuSelect(streaming)) {
    KVRT_SPAN("batch_select", m);
    bool any = false;
    for (int j = 0; j < m; ++j) {
      LayerState& l = *layers[members[j]];
      if (!l.UsesGpuSelect(streaming)) continue;
      member_status[j] = l.SettleBeforeSelect();
      settled_before[j] = 1;
      if (!member_status[j].ok()) continue;
      any = l.tier_->PrepareBatchSelect(step.get(), j, l.cold_).ok() || any;
    }
    if (any) KVRT_RETURN_IF_ERROR(backend.LaunchBatchSelect(step.get()));
  }
  auto cold_phase = [&](int j) {
    // On the arena's workers (batch): they may last have run another runtime's device work.
    transfer::CudaCallScope on_device(cfg.call_device());
    KVRT_SPAN("cold_phase", j);
    LayerState& l = *layers[members[j]];
    const int64_t t_settle = NowNs();
    // A selection scored on the device settles the decode evictions once its kernels are queued.
    int64_t index_wait_ns = 0;  // time_background_wait_ns's, not the D2H's
    if (!settled_before[j]) member_status[j] = l.SettleBeforeSelect(&index_wait_ns);
    if (!member_status[j].ok()) return;
    const bool gpu_select = l.UsesGpuSelect(streaming);
    if (!gpu_select) member_status[j] = l.SettleEvictions();
    if (!member_status[j].ok()) return;
    const int64_t t_cold = NowNs();
    l.counters_->time_d2h_ns += t_cold - t_settle - index_wait_ns;
    int64_t late_settle_ns = 0;
    auto settle_evictions = [&](bool wait) -> absl::Status {
      KVRT_SPAN(wait ? "settle_wait" : "settle_ready", j);
      const int64_t t = NowNs();
      // Nothing to do once settled.
      absl::Status st = wait ? l.SettleEvictions() : l.SettleReadyEvictions();
      late_settle_ns += NowNs() - t;
      return st;
    };
    fetched[j] = l.cold_.AnyActive(streaming) && l.ChooseFetch();
    if (gpu_select) {
      // Two-level kind on the GPU backend: the summary is scored on the device, the selection
      // comes back, its estimate stays there for the merge.
      l.cold_.BeginSelection(streaming, &sel[j]);
      member_status[j] =
          l.tier_->SelectClusters(step.get(), j, l.cold_, &sel[j], arena, settle_evictions);
      // Settled in every outcome before the rows are read (a failure may have come first), unless
      // the device attended the ones in flight.
      if ((member_status[j].ok() && !sel[j].evictions_on_device) ||
          member_status[j].code() == absl::StatusCode::kFailedPrecondition)
        if (absl::Status st = settle_evictions(true); !st.ok()) member_status[j] = st;
      l.counters_->time_d2h_ns += late_settle_ns;
      if (member_status[j].code() == absl::StatusCode::kFailedPrecondition) {
        // No summary yet (fewer cold rows than a segment): the selection runs on the CPU.
        member_status[j] = l.cold_.Select(step->q(j), streaming, arena, &sel[j],
                                          fetched[j] ? nullptr : &cold_state[j]);
      } else if (member_status[j].ok()) {
        // The selection's time is the search; the CPU attention's is added to the busy time so
        // that CountColdTime splits the phase between the two.
        const int64_t t_attend = NowNs();
        if (!fetched[j] && sel[j].any_rows())
          l.cold_.AttendSelection(step->q(j), sel[j], arena, &cold_state[j]);
        for (int64_t ns : sel[j].search_ns) sel[j].busy_ns += ns;
        sel[j].busy_ns += NowNs() - t_attend;
      }
    } else {
      member_status[j] = l.cold_.Select(step->q(j), streaming, arena, &sel[j],
                                        fetched[j] ? nullptr : &cold_state[j]);
    }
    if (!member_status[j].ok()) return;
    // The hot cache may have left nothing to move or attend here.
    if (fetched[j] && !sel[j].any_rows()) fetched[j] = 0;
    if (fetched[j]) {
      member_status[j] = l.tier_->AttendFetched(step.get(), j, sel[j], l.cold_, arena);
      if (!member_status[j].ok()) return;
      l.counters_->attends_fetch += 1;
    } else if (sel[j].any_active() && !cold_state[j].empty()) {
      states[j].cold = &cold_state[j];
    }
    if (!sel[j].estimate.empty()) states[j].estimate = &sel[j].estimate;
    l.CountColdTime(sel[j], NowNs() - t_cold - late_settle_ns);
  };
  if (m == 1) {
    cold_phase(0);
  } else {
    // Members whose selection runs on the device spend their cold phase in CUDA calls, which the
    // driver serialises: 16 threads issuing them at once took 8x the thread time of 4 (host
    // timeline, 128K B=16, docs/benchmarks.md, seventeenth session), time the admission jobs on
    // the same arena could use. Those members go in at most DeviceMemberLanes() chunks, each
    // stepped in order by one thread; a CPU selection keeps one task per member.
    // A lane's members share one stream on the device (DeviceStep::MemberStream): a lane is
    // exactly the run [l * grain, (l + 1) * grain).
    const int grain = layers[members[0]]->UsesGpuSelect(streaming) ? LaneGrain(m) : 1;
    const int lanes = (m + grain - 1) / grain;
    arena.execute([&] {
      tbb::parallel_for(0, lanes, [&](int lane) {
        for (int j = lane * grain; j < std::min(m, (lane + 1) * grain); ++j) cold_phase(j);
      });
    });
  }
  for (int j = 0; j < m; ++j) {
    ok[j] = member_status[j].ok() ? 1 : 0;
    status[members[j]] = member_status[j];
  }

  // 4. One merge of every member's list of states.
  timeline::Span merge_span("merge", m);
  const int64_t t_merge = NowNs();
  KVRT_RETURN_IF_ERROR(backend.Finish(step.get(), states, ok, out_step, lse_step));
  if (backend.computes_on_host()) {
    // The device backend records these as device times; here they are the calling thread's.
    Runtime::Counters& c = *layers[members[0]]->counters_;
    c.time_gpu_attention_ns += tier_ns;
    c.time_merge_ns += NowNs() - t_merge;
  }
  merge_span.End();
  if (m < n)
    for (int j = 0; j < m; ++j) {
      if (!ok[j]) continue;
      std::memcpy(out + members[j] * out_floats, out_step + j * out_floats,
                  out_floats * sizeof(float));
      if (lse != nullptr)
        std::memcpy(lse + members[j] * lse_floats, lse_step + j * lse_floats,
                    lse_floats * sizeof(float));
    }

  const int64_t wall = NowNs() - t_start;
  for (int j = 0; j < m; ++j) {
    if (!ok[j]) continue;
    LayerState& l = *layers[members[j]];
    if (cfg.record_attended) l.RecordAttended(sel[j]);
    l.CountStep(sel[j]);
    l.counters_->time_attend_ns += wall / m;
    if (sel[j].any_active() && l.tier_->can_fetch()) l.RecordColdCost(fetched[j], wall);
    // GPU backend: rows that entered the cold tier in this step get indexed, overlapping other
    // layers' work. (The host backend's rows enter, and are indexed, at append.)
    if (l.tier_->background_refresh()) {
      KVRT_SPAN("refresh_indexes", j);
      l.cold_.RefreshIndexes(arena, true);
    }
  }
  return absl::OkStatus();
}

bool BatchSelectEnabled() {
  static const bool on = [] {
    // On by default since measured on the H200 (same outputs, the search part 20-35% shorter);
    // KVRT_BATCH_SELECT=0 restores one selection per member, for A/B runs.
    const char* env = std::getenv("KVRT_BATCH_SELECT");
    return env == nullptr || std::atoi(env) != 0;
  }();
  return on;
}

int DeviceMemberLanes() {
  // KVRT_DEVICE_MEMBER_LANES overrides the default (a tuning knob for measurements, read once).
  static const int lanes = [] {
    const char* env = std::getenv("KVRT_DEVICE_MEMBER_LANES");
    const int v = env != nullptr ? std::atoi(env) : 0;
    return v > 0 ? v : kDefaultDeviceMemberLanes;
  }();
  return lanes;
}

bool LayerState::UsesGpuSelect(const uint8_t* streaming) const {
  if (!tier_->can_select_clusters() || !cpu_index::KindInfo(cfg_->index_kind).estimates ||
      !cfg_->index.cluster.gpu_select || cold_.rows() == 0)
    return false;
  // NOTE: the device step scores every q head; with a streaming head (which must get no cold
  // state) the selection stays on the CPU.
  if (streaming != nullptr)
    for (int h = 0; h < cfg_->num_q_heads; ++h)
      if (streaming[h]) return false;
  return true;
}

void LayerState::CountColdTime(const ColdSelection& sel, int64_t wall) {
  // The cold phase's wall time, split between search and attention by their busy times.
  int64_t search = 0;
  for (int64_t ns : sel.search_ns) search += ns;
  const int64_t search_wall =
      sel.busy_ns > 0 ? static_cast<int64_t>(static_cast<double>(wall) * search / sel.busy_ns) : 0;
  counters_->time_cpu_search_ns += std::min(search_wall, wall);
  counters_->time_cpu_attention_ns += wall - std::min(search_wall, wall);
}

void LayerState::RecordAttended(const ColdSelection& sel) {
  // Positions: sinks [0, n_sink), window [S + cold, length), then each selected row's position.
  const int H = cfg_->num_q_heads;
  const int group = H / cfg_->num_kv_heads;
  const int64_t n_cold = cold_.rows();
  attended_.assign(H, {});
  estimate_lse_.assign(H, -std::numeric_limits<float>::infinity());
  if (!sel.estimate.empty())
    estimate_lse_ = sel.estimate.lse;
  else if (!sel.device_estimate_lse.empty())
    estimate_lse_ = sel.device_estimate_lse;
  for (int h = 0; h < H; ++h) {
    auto& rec = attended_[h];
    const int g = h / group;
    rec.reserve(n_sink_ + n_window_ + cold_.attended(sel, h));
    for (int64_t p = 0; p < n_sink_; ++p) rec.push_back(p);
    for (int64_t p = cfg_->sink_tokens + n_cold; p < length_; ++p) rec.push_back(p);
    if (!sel.active[h]) continue;
    if (sel.exact) {
      for (int64_t r = 0; r < n_cold; ++r) rec.push_back(cold_.position(g, r));
    } else {
      for (int64_t r : sel.rows[h]) rec.push_back(cold_.position(g, r));
      if (!sel.cached_rows.empty())
        for (int64_t r : sel.cached_rows[h]) rec.push_back(cold_.position(g, r));
    }
  }
}

void LayerState::CountStep(const ColdSelection& sel) {
  const int H = cfg_->num_q_heads;
  int64_t scored = 0, attended = 0;
  for (int h = 0; h < H; ++h) {
    scored += sel.scored[h];
    attended += cold_.attended(sel, h);
  }
  counters_->attend_calls += 1;
  counters_->keys_scored += scored;
  counters_->keys_read += sel.keys_read;
  // Retrieval heads only: a streaming head searches nothing, so it would make the scanned
  // fraction (keys_scored / cold_keys_searchable) read low.
  int64_t active = 0;
  for (uint8_t a : sel.active) active += a;
  counters_->cold_keys_searchable += cold_.rows() * active;
  counters_->cold_tokens_attended += attended;
}

bool LayerState::ChooseFetch() {
  if (!tier_->can_fetch() || cfg_->index_kind == cpu_index::IndexKind::kExact ||
      cfg_->cold_attention == 0)
    return false;
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

}  // namespace kvrt::runtime

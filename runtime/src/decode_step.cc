// One decode step of one (sequence, layer), top to bottom. The same phases run on both backends;
// what differs (where the GPU tier lives, where states merge) is behind TierBackend:
//
//   1. GPU tier    partial attention over sinks + window: launched on the device (it runs while
//                  the CPU works on 2-3) or computed on the host backend.
//   2. selection   per q head, the cold rows to attend (ColdTier::Select: index search, exact scan
//                  of rows the index does not cover yet, top_k), plus a two-level kind's estimate
//                  of the rows it leaves out.
//   3. cold attend exact attention over the selected rows: on the CPU over the host store, or
//                  (fetch mode) gathered, copied to the GPU and attended there.
//   4. merge       the list of partial states (tier, cold or fetched, estimate) merged once, in
//                  log-sum-exp space, into out.
// Then the rows this step moved into the cold tier get indexed (in the background on the GPU).
#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvrt_common/status_macros.h"
#include "runtime/src/layer_state.h"

namespace kvrt::runtime {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

absl::Status LayerState::Attend(const void* q, float* out, tbb::task_arena& arena,
                                const uint8_t* streaming, const Exec& exec) {
  if (length_ == 0)
    return absl::FailedPreconditionError(
        "attend: the layer holds no token (prefill or append first)");
  const int64_t t_start = NowNs();

  // 1. GPU tier.
  KVRT_ASSIGN_OR_RETURN(std::unique_ptr<TierStep> step,
                        tier_->BeginStep(q, n_sink_, n_window_, exec, arena));
  const int64_t t_settle = NowNs();
  KVRT_RETURN_IF_ERROR(SettleCold());
  counters_->time_d2h_ns += NowNs() - t_settle;

  // 2. Cold selection.
  const int64_t t_cold = NowNs();
  ColdSelection sel;
  KVRT_RETURN_IF_ERROR(cold_.Select(step->q(), streaming, arena, &sel));
  const bool any_cold = sel.any_active();
  const bool fetch = any_cold && ChooseFetch();

  // 3. Cold attention.
  std::vector<const PartialState*> states;
  PartialState cold_state;
  if (fetch) {
    KVRT_RETURN_IF_ERROR(tier_->AttendFetched(step.get(), sel, cold_, arena));
    counters_->attends_fetch += 1;
  } else if (cold_.rows() > 0) {
    cold_.Attend(step->q(), sel, arena, &cold_state);
    states.push_back(&cold_state);
  }
  if (!sel.estimate.empty()) states.push_back(&sel.estimate);
  {
    // The cold phase's wall time, split between search and attention by their busy times.
    int64_t search = 0;
    for (int64_t ns : sel.search_ns) search += ns;
    const int64_t wall = NowNs() - t_cold;
    const int64_t search_wall =
        sel.busy_ns > 0 ? static_cast<int64_t>(static_cast<double>(wall) * search / sel.busy_ns)
                        : 0;
    counters_->time_cpu_search_ns += std::min(search_wall, wall);
    counters_->time_cpu_attention_ns += wall - std::min(search_wall, wall);
  }

  // 4. Merge.
  KVRT_RETURN_IF_ERROR(tier_->Finish(step.get(), states, out));

  if (cfg_->record_attended) RecordAttended(sel);
  CountStep(sel);
  const int64_t wall = NowNs() - t_start;
  counters_->time_attend_ns += wall;
  if (any_cold && tier_->can_fetch()) RecordColdCost(fetch, wall);
  // GPU backend: rows that entered the cold tier in this step get indexed, overlapping other
  // layers' work. (The host backend's rows enter, and are indexed, at append.)
  if (tier_->background_refresh()) cold_.RefreshIndexes(arena, true);
  return absl::OkStatus();
}

void LayerState::RecordAttended(const ColdSelection& sel) {
  // Positions: sinks [0, n_sink), window [S + cold, length), then each selected row's position.
  const int H = cfg_->num_q_heads;
  const int group = H / cfg_->num_kv_heads;
  const int64_t n_cold = cold_.rows();
  attended_.assign(H, {});
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
  counters_->cold_keys_searchable += cold_.rows() * H;
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

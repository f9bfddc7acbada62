// The cold-tier step of attend, shared by both backends: which q heads search together (GQA
// group search), index search, exact scan of the rows the index does not cover yet, cut back to
// top_k, attention over the chosen rows.
#include <algorithm>
#include <chrono>
#include <vector>

#include "kvrt_common/status_macros.h"
#include "absl/strings/str_cat.h"
#include "kvrt_cpu_index/attention.h"
#include "runtime/src/fault_injection.h"
#include "runtime/src/layer_state.h"

namespace kvrt::runtime {
namespace {

int64_t SteadyNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A failed index search fails the attend (INTERNAL for FAISS/hnswlib errors): the message says
// which step and kv head, then the index's own words.
absl::Status SearchFailed(const absl::Status& st, int g) {
  return absl::Status(st.code(),
                      absl::StrCat("attend: cold-index search of kv head ", g, " failed: ", st.message()));
}

// The index search, after the test-only fault hook (fault_injection.h; one atomic load when off).
template <typename SearchFn>
absl::Status GuardedSearch(cpu_index::IndexKind kind, int g, SearchFn&& search) {
  absl::Status st = fault::Check(fault::Site::kIndexSearch, cpu_index::IndexKindName(kind), "search");
  if (st.ok()) st = search();
  return st.ok() ? st : SearchFailed(st, g);
}

}  // namespace

std::vector<std::vector<int>> LayerState::ColdUnits(const uint8_t* streaming) const {
  const int H = cfg_->num_q_heads;
  const int group = H / cfg_->num_kv_heads;
  // NOTE: only the kinds whose group search shares work (one traversal / one bound pass) group
  // their heads; for the others (exact, flat, ivf, hnsw: one search per query either way)
  // grouping would only cut the parallelism of a single attend.
  const bool shares = cfg_->index_kind == cpu_index::IndexKind::kAttentionAware ||
                      cfg_->index_kind == cpu_index::IndexKind::kLandmark;
  const bool together = cfg_->group_search && shares && group > 1;
  std::vector<std::vector<int>> units;
  for (int g = 0; g < cfg_->num_kv_heads; ++g) {
    std::vector<int> heads;
    for (int h = g * group; h < (g + 1) * group; ++h) {
      if (streaming && streaming[h]) continue;
      if (together) {
        heads.push_back(h);
      } else {
        units.push_back({h});
      }
    }
    if (!heads.empty()) units.push_back(std::move(heads));
  }
  return units;
}

absl::Status LayerState::ColdGroup(const std::vector<int>& heads, const float* q, float* o, float* lse,
                                   std::vector<std::vector<int64_t>>* ids, int64_t* scored,
                                   int64_t* search_ns, int64_t* read, bool attend) const {
  const int d = cfg_->head_dim;
  const int group = cfg_->num_q_heads / cfg_->num_kv_heads;
  const int g = heads.front() / group;
  const auto* index = index_[g].get();
  const auto at = [d](auto* base, int h) { return base + static_cast<std::size_t>(h) * d; };
  *read = 0;
  if (heads.size() == 1 || index == nullptr || cfg_->index_kind == cpu_index::IndexKind::kExact) {
    for (int h : heads) {
      KVRT_RETURN_IF_ERROR(
          ColdHead(h, at(q, h), at(o, h), &lse[h], &(*ids)[h], &scored[h], &search_ns[h], attend));
      *read += scored[h];
    }
    return absl::OkStatus();
  }
  const int64_t t0 = SteadyNs();
  const int nq = static_cast<int>(heads.size());
  std::vector<float> qs(static_cast<std::size_t>(nq) * d);
  for (int i = 0; i < nq; ++i) std::copy(at(q, heads[i]), at(q, heads[i]) + d, at(qs.data(), i));
  std::vector<cpu_index::SearchResult> found(nq);
  cpu_index::SearchParams params;
  params.k = cfg_->top_k;
  params.effort = cfg_->search_effort;
  KVRT_RETURN_IF_ERROR(GuardedSearch(cfg_->index_kind, g, [&] {
    return index->SearchGroup(cold_[g], qs.data(), nq, params, found.data());
  }));
  const int64_t shared_ns = (SteadyNs() - t0) / nq;
  for (int i = 0; i < nq; ++i) {
    const int h = heads[i];
    FinishCold(g, at(q, h), &found[i], at(o, h), &lse[h], &(*ids)[h], &scored[h], SteadyNs(), &search_ns[h],
               attend);
    search_ns[h] += shared_ns;
  }
  // Every head scored the same keys (the group's, plus the same unindexed rows).
  *read = scored[heads.front()];
  return absl::OkStatus();
}

absl::Status LayerState::ColdHead(int h, const float* qh, float* o, float* lse,
                                  std::vector<int64_t>* ids, int64_t* scored,
                                  int64_t* search_ns, bool attend) const {
  const int group = cfg_->num_q_heads / cfg_->num_kv_heads;
  const int g = h / group;
  const auto& store = cold_[g];
  const int64_t n_cold = store.size();
  const int64_t t0 = SteadyNs();
  if (cfg_->index_kind == cpu_index::IndexKind::kExact) {
    cpu_index::AttendStoreAll(qh, cfg_->scale, store, o, lse);
    *scored = n_cold;
    if (cfg_->record_attended) {
      ids->resize(n_cold);
      for (int64_t i = 0; i < n_cold; ++i) (*ids)[i] = i;
    }
    *search_ns = 0;
    return absl::OkStatus();
  }
  cpu_index::SearchResult found;
  if (const auto* index = index_[g].get()) {
    cpu_index::SearchParams params;
    params.k = cfg_->top_k;
    params.effort = cfg_->search_effort;
    KVRT_RETURN_IF_ERROR(
        GuardedSearch(cfg_->index_kind, g, [&] { return index->Search(store, qh, params, &found); }));
  }
  FinishCold(g, qh, &found, o, lse, ids, scored, t0, search_ns, attend);
  return absl::OkStatus();
}

void LayerState::FinishCold(int g, const float* qh, cpu_index::SearchResult* found, float* o, float* lse,
                            std::vector<int64_t>* ids, int64_t* scored, int64_t t_start,
                            int64_t* search_ns, bool attend) const {
  const auto& store = cold_[g];
  const int64_t n_cold = store.size();
  const auto* index = index_[g].get();
  const int64_t indexed = index ? index->size() : 0;
  *ids = std::move(found->ids);
  std::vector<float> scores = std::move(found->scores);
  *scored = found->scanned;
  // Rows the index does not cover yet (evicted since its last background insert) are scanned
  // exactly and compete with the index's results for the top-k by score.
  // NOTE: the union is cut back to k, so that with an exact (flat) index the set is the top-k over
  // all rows even while the index lags (GPU backend: the latest evictions are indexed in the
  // background; host backend: a failed index update).
  if (indexed < n_cold) {
    std::vector<float> s(n_cold - indexed);
    store.Dot(qh, indexed, n_cold, s.data());
    std::vector<int64_t> tail;
    std::vector<float> tail_scores;
    cpu_index::TopK(s.data(), static_cast<int64_t>(s.size()), cfg_->top_k, &tail, &tail_scores);
    *scored += n_cold - indexed;
    if (index == nullptr) {
      for (auto t : tail) ids->push_back(indexed + t);
    } else {
      if (scores.size() != ids->size()) {
        scores.resize(ids->size());
        store.DotIds(qh, ids->data(), static_cast<int64_t>(ids->size()), scores.data());
      }
      for (std::size_t i = 0; i < tail.size(); ++i) {
        ids->push_back(indexed + tail[i]);
        scores.push_back(tail_scores[i]);
      }
      if (static_cast<int64_t>(ids->size()) > cfg_->top_k) {
        std::vector<int64_t> best;
        cpu_index::TopK(scores.data(), static_cast<int64_t>(scores.size()), cfg_->top_k, &best, nullptr);
        std::vector<int64_t> kept(best.size());
        for (std::size_t i = 0; i < best.size(); ++i) kept[i] = (*ids)[best[i]];
        *ids = std::move(kept);
      }
    }
  }
  // Rows holding NaN/Inf (check_finite = 0) are attended whatever the search returned, so that
  // the NaN reaches the output as kvrt.h promises instead of the token being dropped.
  for (int64_t r : store.nonfinite_rows())
    if (std::find(ids->begin(), ids->end(), r) == ids->end()) ids->push_back(r);
  *search_ns = SteadyNs() - t_start;
  if (!attend) return;
  cpu_index::AttendStoreRows(qh, cfg_->scale, store, ids->data(), static_cast<int64_t>(ids->size()), o, lse);
}

}  // namespace kvrt::runtime

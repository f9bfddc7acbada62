#include "cold_tier.h"

#include <algorithm>
#include <exception>
#include <limits>
#include <new>

#include "absl/strings/str_cat.h"
#include "budget.h"
#include "fault_injection.h"
#include "kvrt_common/clock.h"
#include "kvrt_common/status_macros.h"
#include "kvrt_common/timeline.h"
#include "kvrt_cpu_index/attention.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/kind_table.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvrt::runtime {
namespace {

constexpr int64_t kParallelAppendRows = 4096;  // Append: rows from which kv heads copy in parallel

// fn(g) for each of `heads` kv heads taking n rows: a prompt's rows (hundreds of MB) per kv head in
// parallel, in the caller's arena (the runtime's, at prefill); a decode step's few rows are not
// worth the fork.
template <typename Fn>
void ForEachHeadAppending(int64_t n, int heads, Fn&& fn) {
  if (n >= kParallelAppendRows) {
    tbb::parallel_for(0, heads, fn);
  } else {
    for (int g = 0; g < heads; ++g) fn(g);
  }
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A failed index search fails the attend (INTERNAL for FAISS/hnswlib errors): the message says
// which step and kv head, then the index's own words.
absl::Status SearchFailed(const absl::Status& st, int g) {
  return absl::Status(st.code(), absl::StrCat("attend: cold-index search of kv head ", g,
                                              " failed: ", st.message()));
}

// The index search, after the test-only fault hook (fault_injection.h; one atomic load when off).
// An allocation that fails inside the index is the search's OUT_OF_MEMORY, with the step and kv
// head named as for any failed search (other exceptions reach the API's catch as INTERNAL).
template <typename SearchFn>
absl::Status GuardedSearch(cpu_index::IndexKind kind, int g, SearchFn&& search) {
  absl::Status st;
  try {
    st = fault::Check(fault::Site::kIndexSearch, cpu_index::IndexKindName(kind), "search");
    if (st.ok()) st = search();
  } catch (const std::bad_alloc&) {
    st = absl::ResourceExhaustedError(
        absl::StrCat(cpu_index::IndexKindName(kind), " search: out of memory"));
  }
  return st.ok() ? st : SearchFailed(st, g);
}

}  // namespace

ColdTier::ColdTier(const RuntimeConfig* config, Runtime::Counters* counters, int64_t first_position)
    : cfg_(config),
      counters_(counters),
      first_position_(first_position),
      refresh_(std::make_unique<transfer::BackgroundWork>()) {
  stores_.reserve(cfg_->num_kv_heads);
  for (int g = 0; g < cfg_->num_kv_heads; ++g)
    stores_.emplace_back(cfg_->head_dim, cfg_->dtype, cfg_->values_are_keys);
  positions_.resize(cfg_->num_kv_heads);
  indexes_.resize(cfg_->num_kv_heads);
}

ColdTier::~ColdTier() {
  if (refresh_) (void)refresh_->Wait();
}

absl::Status ColdTier::Reserve(int64_t rows) {
  if (store_guard_ && std::any_of(stores_.begin(), stores_.end(),
                                  [&](const auto& st) { return rows > st.capacity(); }))
    store_guard_(/*moves=*/true);
  for (int g = 0; g < cfg_->num_kv_heads; ++g) {
    KVRT_RETURN_IF_ERROR(stores_[g].Reserve(rows));
    try {
      auto& pos = positions_[g];
      // Geometric growth, as the store's: one append per decode step must not copy the map.
      if (pos.capacity() < static_cast<std::size_t>(rows))
        pos.reserve(std::max<std::size_t>(rows, 2 * pos.capacity()));
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError("cold tier: cannot allocate the row-to-position map");
    }
  }
  return absl::OkStatus();
}

void ColdTier::PrefaultStores(int64_t rows) {
  tbb::parallel_for(0, cfg_->num_kv_heads, [&](int g) { stores_[g].Prefault(rows); });
}

absl::Status ColdTier::AppendWritten(int64_t n) {
  if (n <= 0) return absl::OkStatus();
  for (const cpu_index::HeadStore& s : stores_)
    if (s.capacity() - s.size() < n)
      return absl::FailedPreconditionError(
          "cold tier: rows written in place past the reserved room");
  const int64_t first = first_position_ + rows();
  std::vector<absl::Status> st(cfg_->num_kv_heads);
  auto append = [&](int g) {
    st[g] = stores_[g].AppendWritten(n);
    if (st[g].ok())
      for (int64_t i = 0; i < n; ++i) positions_[g].push_back(first + i);
  };
  ForEachHeadAppending(n, cfg_->num_kv_heads, append);
  for (const absl::Status& s : st) KVRT_RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

absl::Status ColdTier::Append(const void* k, const void* v, int64_t n, bool head_major) {
  if (n <= 0) return absl::OkStatus();
  KVRT_RETURN_IF_ERROR(Reserve(rows() + n));
  const std::size_t head_elems = static_cast<std::size_t>(cfg_->num_kv_heads) * cfg_->head_dim;
  const std::size_t hb = static_cast<std::size_t>(cfg_->head_dim) * DTypeSize(cfg_->dtype);
  const int64_t first = first_position_ + rows();
  auto append = [&](int g) {
    // Capacity is reserved above, so neither append can fail half-way.
    const std::size_t at = head_major ? g * static_cast<std::size_t>(n) * hb : g * hb;
    (void)stores_[g].Append(static_cast<const unsigned char*>(k) + at,
                            static_cast<const unsigned char*>(v) + at, n,
                            head_major ? static_cast<std::size_t>(cfg_->head_dim) : head_elems);
    for (int64_t i = 0; i < n; ++i) positions_[g].push_back(first + i);
  };
  ForEachHeadAppending(n, cfg_->num_kv_heads, append);
  // host_tokens was counted when the budget reserved these rows (budget.h).
  return absl::OkStatus();
}

// Keeps an evenly spaced sample of the prompt's queries per kv head (all q heads of its group), in
// f32, for index kinds that build from queries.
void ColdTier::SampleQueries(const void* q, int64_t n) {
  if (cfg_->index_kind == cpu_index::IndexKind::kExact) return;
  const int group = cfg_->num_q_heads / cfg_->num_kv_heads;
  const int d = cfg_->head_dim;
  const QuerySample sample = PromptQuerySample(*cfg_, n);
  const std::size_t q_row = static_cast<std::size_t>(cfg_->num_q_heads) * d;
  query_sample_.assign(cfg_->num_kv_heads, {});
  for (int g = 0; g < cfg_->num_kv_heads; ++g) {
    auto& out = query_sample_[g];
    out.resize(static_cast<std::size_t>(sample.count) * group * d);
    for (int64_t i = 0; i < sample.count; ++i) {
      const int64_t t = i * sample.stride;
      for (int j = 0; j < group; ++j) {
        const std::size_t src = (static_cast<std::size_t>(t) * q_row + (g * group + j) * d);
        ConvertToF32(static_cast<const unsigned char*>(q) + src * DTypeSize(cfg_->dtype),
                     cfg_->dtype, d, out.data() + (static_cast<std::size_t>(i) * group + j) * d);
      }
    }
  }
}

std::vector<float> ColdTier::MetricFactor(int g) const {
  const cpu_index::ClusterConfig& cc = cfg_->index.cluster;
  const bool have_q = cc.query_aware && !query_sample_.empty();
  const int64_t nq = have_q ? static_cast<int64_t>(query_sample_[g].size()) / cfg_->head_dim : 0;
  return cpu_index::QueryMetricFactor(have_q ? query_sample_[g].data() : nullptr, nq,
                                      cfg_->head_dim, cc.metric_queries, cc.active_dim);
}

void ColdTier::PresetSegments(int64_t begin,
                              std::vector<std::vector<cpu_index::SegmentClustering>> parts,
                              std::vector<std::vector<int64_t>> laid_out) {
  preset_begin_ = begin;
  preset_ = std::move(parts);
  laid_out_.assign(cfg_->num_kv_heads, 0);
  for (std::size_t g = 0; g < laid_out.size(); ++g) {
    std::vector<int64_t>& pos = positions_[g];
    std::vector<int64_t> moved(laid_out[g].size());
    for (std::size_t r = 0; r < moved.size(); ++r) moved[r] = pos[begin + laid_out[g][r]];
    std::copy(moved.begin(), moved.end(), pos.begin() + begin);
    laid_out_[g] = 1;
  }
}

bool ColdTier::needs_refresh() const {
  if (cfg_->index_kind == cpu_index::IndexKind::kExact || rows() < kIndexMinRows) return false;
  if (indexes_[0] == nullptr) return true;
  return indexes_[0]->size() < indexes_[0]->CoverableRows(stores_[0].size());
}

void ColdTier::RefreshIndexes(tbb::task_arena& arena, bool background) {
  if (!needs_refresh()) {
    // Nothing to index (the cluster kind between segments): the growth an append reserved (an
    // upper bound) is trued up as a refresh would, or the stats showed the bound for a segment.
    // (Only after a reservation: an hnsw index's MemoryBytes walks its rows.)
    if (!refresh_->running() && index_bytes_reserved_) TrueUpIndexBytes();
    return;
  }
  if (!background) {
    (void)RefreshNow(arena);  // failures are counted inside
    return;
  }
  refresh_->Launch(arena, [this, &arena] { return RefreshNow(arena); });
}

void ColdTier::TrueUpIndexBytes() {
  int64_t bytes = 0;
  for (int g = 0; g < cfg_->num_kv_heads; ++g)
    if (indexes_[g]) bytes += static_cast<int64_t>(indexes_[g]->MemoryBytes());
  counters_->index_bytes += bytes - index_bytes_;
  index_bytes_ = bytes;
  index_bytes_reserved_ = false;
}

int64_t ColdTier::AwaitIndexes() {
  if (!refresh_->running()) {
    (void)refresh_->Wait();  // collects a finished job's status
    return 0;
  }
  const int64_t t0 = NowNs();
  (void)refresh_->Wait();
  const int64_t waited = NowNs() - t0;
  counters_->time_background_wait_ns += waited;
  return waited;
}

void ColdTier::LaunchBackground(tbb::task_arena& arena, std::function<absl::Status()> job,
                                bool joinable) {
  if (joinable) {
    refresh_->LaunchJoinable(arena, std::move(job));
  } else {
    refresh_->Launch(arena, std::move(job));
  }
}

void ColdTier::ApplyRowOrder(int g) {
  int64_t begin = 0;
  std::vector<int64_t> order;
  if (!indexes_[g]->TakeRowOrder(&begin, &order) || order.empty()) return;
  if (g < static_cast<int>(skip_order_.size()) && skip_order_[g]) {
    skip_order_[g] = 0;  // the store was laid out in this order before it arrived
    return;
  }
  // The index chose where its rows live; the store and the position map follow, together.
  if (store_guard_) store_guard_(/*moves=*/false);
  if (!stores_[g].PermuteRows(begin, order).ok()) return;
  std::vector<int64_t> moved(order.size());
  for (std::size_t i = 0; i < order.size(); ++i) moved[i] = positions_[g][begin + order[i]];
  std::copy(moved.begin(), moved.end(), positions_[g].begin() + begin);
}

void ColdTier::TakePreset(int g, cpu_index::KeyIndex* index) {
  if (static_cast<int>(preset_.size()) <= g || preset_[g].empty()) return;
  // NOTE: a preset the index refuses (it cannot happen with segments built for this store) only
  // costs the time of the build: the index clusters those segments itself, from the store as it
  // is (laid out or not), and its order is then applied as usual.
  const bool laid_out = g < static_cast<int>(laid_out_.size()) && laid_out_[g];
  const bool taken =
      cpu_index::PresetSegments(index, preset_begin_, std::move(preset_[g]), laid_out).ok();
  skip_order_[g] = taken && laid_out;  // sized by RefreshNow before its loop over the kv heads
}

absl::Status ColdTier::RefreshNow(tbb::task_arena& arena) {
  std::vector<absl::Status> status(cfg_->num_kv_heads);
  const cpu_index::IndexKind kind = cfg_->index_kind;
  std::vector<int64_t> covered_before(cfg_->num_kv_heads, -1);
  for (int g = 0; g < cfg_->num_kv_heads; ++g)
    if (indexes_[g] != nullptr) covered_before[g] = indexes_[g]->size();
  // Sized here, once: the kv heads' tasks below each write their own entry (TakePreset) and read
  // it (ApplyRowOrder); sized inside them, the first build with presets (the GPU backend's) had
  // every kv head's task reallocate it at once, a data race.
  if (skip_order_.size() != static_cast<std::size_t>(cfg_->num_kv_heads))
    skip_order_.assign(cfg_->num_kv_heads, 0);
  arena.execute([&] {
    tbb::parallel_for(0, cfg_->num_kv_heads, [&](int g) {
      auto& index = indexes_[g];
      if (index != nullptr && index->size() >= stores_[g].size()) return;
      // NOTE: an exception from an index (one that did not turn it into a status) must not leave
      // this call either: the tokens are already stored, so it would report a half-applied
      // append. It is a failed update like any other (counted, retried, rows scanned exactly).
      try {
        status[g] = fault::Check(fault::Site::kIndexUpdate, cpu_index::IndexKindName(kind),
                                 index == nullptr ? "build" : "insert");
        if (!status[g].ok()) return;
        if (index == nullptr) {
          auto made = cpu_index::MakeIndex(kind, cfg_->index, cfg_->head_dim);
          if (!made.ok()) {
            status[g] = made.status();
            return;
          }
          const bool have_q = !query_sample_.empty();
          const int64_t nq =
              have_q ? static_cast<int64_t>(query_sample_[g].size()) / cfg_->head_dim : 0;
          TakePreset(g, made->get());
          KVRT_SPAN("index_build", g);
          status[g] = (*made)->Build(stores_[g], have_q ? query_sample_[g].data() : nullptr, nq);
          if (status[g].ok()) index = std::move(*made);
        } else {
          TakePreset(g, index.get());
          KVRT_SPAN("index_add", g);
          status[g] = index->Add(stores_[g]);
        }
        KVRT_SPAN("index_row_order", g);
        if (status[g].ok()) ApplyRowOrder(g);
      } catch (const std::bad_alloc&) {
        status[g] = absl::ResourceExhaustedError("index update: out of memory");
      } catch (const std::exception& e) {
        status[g] = absl::InternalError(absl::StrCat("index update: ", e.what()));
      }
    });
  });
  bool all_built = true;
  for (int g = 0; g < cfg_->num_kv_heads; ++g) all_built = all_built && indexes_[g] != nullptr;
  TrueUpIndexBytes();
  // The version moves only when an index covers other rows (a two-level kind's summary then
  // changed and its device copy is refreshed): not on every refresh that found nothing to do.
  for (int g = 0; g < cfg_->num_kv_heads; ++g) {
    const int64_t now = indexes_[g] != nullptr ? indexes_[g]->size() : -1;
    if (now != covered_before[g]) {
      ++index_version_;
      break;
    }
  }
  if (all_built) query_sample_.clear();
  preset_.clear();
  laid_out_.clear();
  for (auto& s : status) {
    // NOTE: not an error of the call: the tokens are stored, and rows the index misses are
    // scanned exactly by Select (and retried at the next refresh), so a failed update costs
    // speed, never correctness. Counted in the stats.
    if (!s.ok()) counters_->index_update_failures += 1;
  }
  return absl::OkStatus();
}

std::vector<std::vector<int>> ColdTier::Units(const uint8_t* streaming) const {
  const int H = cfg_->num_q_heads;
  const int group = H / cfg_->num_kv_heads;
  // NOTE: only the kinds whose group search shares work (one traversal / one bound pass) group
  // their heads; for the others (one search per query either way) grouping would only cut the
  // parallelism of a single attend. The cluster kind's group selection is one selection for the
  // group's active heads, so it always searches them together.
  const bool shared_selection =
      cfg_->index_kind == cpu_index::IndexKind::kCluster && cfg_->index.cluster.group_select;
  // Selecting on codes, the cluster kind scores every cluster's rows for all the group's heads in
  // one pass over the codes: its group search shares work too.
  const bool shares_work = cpu_index::KindInfo(cfg_->index_kind).shares_group_search ||
                           (cfg_->index_kind == cpu_index::IndexKind::kCluster &&
                            cpu_index::SelectsOnCodes(cfg_->index.cluster));
  const bool together = group > 1 && (shared_selection || (cfg_->group_search && shares_work));
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

bool ColdTier::AnyActive(const uint8_t* streaming) const {
  if (rows() == 0) return false;
  if (streaming == nullptr) return true;
  for (int h = 0; h < cfg_->num_q_heads; ++h)
    if (!streaming[h]) return true;
  return false;
}

void ColdTier::BeginSelection(const uint8_t* streaming, ColdSelection* sel) const {
  const int H = cfg_->num_q_heads;
  sel->exact = cfg_->index_kind == cpu_index::IndexKind::kExact;
  sel->rows.assign(H, {});
  sel->active.assign(H, 0);
  if (rows() > 0)
    for (int h = 0; h < H; ++h) sel->active[h] = streaming == nullptr || !streaming[h];
  sel->scored.assign(H, 0);
  sel->search_ns.assign(H, 0);
  sel->estimate = {};
  sel->estimate_on_device = false;
  sel->evictions_on_device = false;
  sel->keys_read = 0;
  sel->busy_ns = 0;
}

absl::Status ColdTier::Select(const float* q, const uint8_t* streaming, tbb::task_arena& arena,
                              ColdSelection* sel, PartialState* attend) const {
  const int H = cfg_->num_q_heads;
  BeginSelection(streaming, sel);
  // Sized before the parallel units write their heads' rows of it.
  if (cpu_index::KindInfo(cfg_->index_kind).estimates) sel->estimate.Reset(H, cfg_->head_dim);
  if (attend != nullptr) attend->Reset(H, cfg_->head_dim);
  if (rows() == 0) return absl::OkStatus();
  const auto units = Units(streaming);
  std::vector<absl::Status> status(units.size());
  std::vector<int64_t> read(units.size(), 0), busy(units.size(), 0);
  arena.execute([&] {
    tbb::parallel_for(0, static_cast<int>(units.size()), [&](int u) {
      const int64_t t0 = NowNs();
      status[u] = SelectUnit(units[u], q, sel, &read[u], attend);
      busy[u] = NowNs() - t0;
    });
  });
  for (auto& s : status) KVRT_RETURN_IF_ERROR(s);
  for (std::size_t u = 0; u < units.size(); ++u) {
    sel->keys_read += read[u];
    sel->busy_ns += busy[u];
  }
  return absl::OkStatus();
}

absl::Status ColdTier::SelectUnit(const std::vector<int>& heads, const float* q, ColdSelection* sel,
                                  int64_t* read, PartialState* attend) const {
  const int d = cfg_->head_dim;
  const int group = cfg_->num_q_heads / cfg_->num_kv_heads;
  const int g = heads.front() / group;
  const auto* index = indexes_[g].get();
  const auto at = [d](auto* base, int h) { return base + static_cast<std::size_t>(h) * d; };
  *read = 0;
  if (heads.size() == 1 || index == nullptr || sel->exact) {
    for (int h : heads) {
      KVRT_RETURN_IF_ERROR(SelectHead(h, at(q, h), sel));
      *read += sel->scored[h];
      if (attend != nullptr) AttendHead(h, at(q, h), *sel, attend);
    }
    return absl::OkStatus();
  }
  const int64_t t0 = NowNs();
  const int nq = static_cast<int>(heads.size());
  std::vector<float> qs(static_cast<std::size_t>(nq) * d);
  for (int i = 0; i < nq; ++i) std::copy(at(q, heads[i]), at(q, heads[i]) + d, at(qs.data(), i));
  std::vector<cpu_index::SearchResult> found(nq);
  cpu_index::SearchParams params;
  params.k = cfg_->top_k;
  params.effort = cfg_->search_effort;
  KVRT_RETURN_IF_ERROR(GuardedSearch(cfg_->index_kind, g, [&] {
    return index->SearchGroup(stores_[g], qs.data(), nq, params, found.data());
  }));
  const int64_t shared_ns = (NowNs() - t0) / nq;
  // Each head's own rows (parallel: an MQA model's group is the step's only unit).
  tbb::parallel_for(0, nq, [&](int i) {
    const int h = heads[i];
    const int64_t t1 = NowNs();
    AddUncovered(g, at(q, h), &found[i], sel, h);
    sel->search_ns[h] = NowNs() - t1 + shared_ns;
  });
  // Every head scored the same keys (the group's, plus the same uncovered rows).
  *read = sel->scored[heads.front()];
  if (attend != nullptr) AttendHeads(heads, qs.data(), *sel, attend);
  return absl::OkStatus();
}

// A unit's heads, q [heads, d] in unit order. Heads that selected the same rows (a shared cluster
// selection does) are attended together, each row read once per pass of heads (below).
void ColdTier::AttendHeads(const std::vector<int>& heads, const float* q, const ColdSelection& sel,
                           PartialState* out) const {
  const int d = cfg_->head_dim, nq = static_cast<int>(heads.size());
  bool same = !sel.exact && nq > 1;
  for (int i = 1; same && i < nq; ++i) same = sel.rows[heads[i]] == sel.rows[heads[0]];
  if (!same) {
    tbb::parallel_for(
        0, nq, [&](int i) { AttendHead(heads[i], q + static_cast<std::size_t>(i) * d, sel, out); });
    return;
  }
  KVRT_SPAN("cold_attend_group", nq);
  const auto& store = stores_[heads[0] / (cfg_->num_q_heads / cfg_->num_kv_heads)];
  const auto& rows = sel.rows[heads[0]];
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  // pass_heads heads per pass over a chunk of chunk_rows rows, every (pass, chunk) a task, each
  // head's chunk states merged in chunk order: a wide group (an MQA model's, MLA's latent: 16-128
  // heads over one kv head) is the step's only unit, and its passes alone kept 4 of 16 cores busy
  // (DeepSeek-V2-Lite's latent at 32K: 8.5 ms per layer-step, docs/benchmarks.md). On the tiles
  // (config.index.host_tiles) a pass is 16 heads (its product's padded width) and the chunks
  // shorter, for as many tasks.
  // The chunks follow the row count alone, so a step's result does not depend on the threads.
  const bool tiles = cfg_->index.host_tiles;
  const int pass_heads = cpu_index::GroupPassHeads(tiles);
  const int64_t chunk_rows = tiles ? 256 : 2048;
  const int passes = (nq + pass_heads - 1) / pass_heads;
  const int chunks = static_cast<int>(std::max<int64_t>(1, (n_rows + chunk_rows - 1) / chunk_rows));
  const std::size_t state = static_cast<std::size_t>(nq) * d;
  std::vector<float> o(chunks * state), lse(static_cast<std::size_t>(chunks) * nq);
  tbb::parallel_for(0, passes * chunks, [&](int t) {
    const int c = t % chunks, i0 = t / chunks * pass_heads, n = std::min(pass_heads, nq - i0);
    const int64_t r0 = c * chunk_rows, r1 = std::min(n_rows, r0 + chunk_rows);
    cpu_index::AttendStoreRowsGroup(q + static_cast<std::size_t>(i0) * d, n, cfg_->scale, store,
                                    rows.data() + r0, r1 - r0,
                                    o.data() + c * state + static_cast<std::size_t>(i0) * d,
                                    lse.data() + static_cast<std::size_t>(c) * nq + i0, tiles);
  });
  for (int i = 0; i < nq; ++i) {
    float* oh = out->o.data() + static_cast<std::size_t>(heads[i]) * d;
    float* lh = &out->lse[heads[i]];
    std::copy_n(o.data() + static_cast<std::size_t>(i) * d, d, oh);
    *lh = lse[i];
    for (int c = 1; c < chunks; ++c)
      cpu_index::MergeInto(oh, lh, o.data() + c * state + static_cast<std::size_t>(i) * d,
                           lse[static_cast<std::size_t>(c) * nq + i], d);
  }
}

absl::Status ColdTier::SelectHead(int h, const float* qh, ColdSelection* sel) const {
  const int g = h / (cfg_->num_q_heads / cfg_->num_kv_heads);
  if (sel->exact) {  // every row; Attend reads the store directly
    sel->scored[h] = stores_[g].size();
    return absl::OkStatus();
  }
  const int64_t t0 = NowNs();
  cpu_index::SearchResult found;
  if (const auto* index = indexes_[g].get()) {
    cpu_index::SearchParams params;
    params.k = cfg_->top_k;
    params.effort = cfg_->search_effort;
    KVRT_RETURN_IF_ERROR(GuardedSearch(
        cfg_->index_kind, g, [&] { return index->Search(stores_[g], qh, params, &found); }));
  }
  AddUncovered(g, qh, &found, sel, h);
  sel->search_ns[h] = NowNs() - t0;
  return absl::OkStatus();
}

// Rows the index does not cover yet (evicted since its last refresh, or a failed one) are scanned
// exactly and compete with the index's results for the top-k by score.
// NOTE: the union is cut back to k, so that with an exact (flat) index the set is the top-k over
// all rows even while the index lags.
void ColdTier::AddUncovered(int g, const float* qh, cpu_index::SearchResult* found,
                            ColdSelection* sel, int h) const {
  const auto& store = stores_[g];
  const int64_t n_cold = store.size();
  const auto* index = indexes_[g].get();
  const int64_t indexed = index ? index->size() : 0;
  auto& ids = sel->rows[h];
  ids = std::move(found->ids);
  std::vector<float> scores = std::move(found->scores);
  sel->scored[h] = found->scanned;
  AddEstimate(*found, sel, h);
  if (indexed >= n_cold) {
    AddNonfinite(g, &ids);
    return;
  }
  sel->scored[h] += n_cold - indexed;
  if (cpu_index::KindInfo(cfg_->index_kind).estimates) {
    // A kind that estimates what it leaves out accounts for its clustered rows only: every row it
    // does not cover yet is attended (a top-k of them would drop the others without a trace).
    for (int64_t r = indexed; r < n_cold; ++r) ids.push_back(r);
    AddNonfinite(g, &ids);
    return;
  }
  std::vector<float> s(n_cold - indexed);
  store.Dot(qh, indexed, n_cold, s.data());
  std::vector<int64_t> tail;
  std::vector<float> tail_scores;
  cpu_index::TopK(s.data(), static_cast<int64_t>(s.size()), cfg_->top_k, &tail, &tail_scores);
  // No cut when there is no index (the tail is the exact top-k of every cold row).
  if (index == nullptr) {
    for (auto t : tail) ids.push_back(indexed + t);
    AddNonfinite(g, &ids);
    return;
  }
  if (scores.size() != ids.size()) {
    scores.resize(ids.size());
    store.DotIds(qh, ids.data(), static_cast<int64_t>(ids.size()), scores.data());
  }
  for (std::size_t i = 0; i < tail.size(); ++i) {
    ids.push_back(indexed + tail[i]);
    scores.push_back(tail_scores[i]);
  }
  // A kind that selects more than k by design (a token budget) keeps its set plus the tail.
  const int64_t keep = std::max<int64_t>(
      cfg_->top_k, static_cast<int64_t>(ids.size()) - static_cast<int64_t>(tail.size()));
  if (static_cast<int64_t>(ids.size()) > keep) {
    std::vector<int64_t> best;
    cpu_index::TopK(scores.data(), static_cast<int64_t>(scores.size()), static_cast<int>(keep),
                    &best, nullptr);
    std::vector<int64_t> kept(best.size());
    for (std::size_t i = 0; i < best.size(); ++i) kept[i] = ids[best[i]];
    ids = std::move(kept);
  }
  AddNonfinite(g, &ids);
}

// Rows holding NaN/Inf (check_finite = 0) are attended whatever the search returned, so that the
// NaN reaches the output as kvrt.h promises instead of the token being dropped.
void ColdTier::AddNonfinite(int g, std::vector<int64_t>* ids) const {
  for (int64_t r : stores_[g].nonfinite_rows())
    if (std::find(ids->begin(), ids->end(), r) == ids->end()) ids->push_back(r);
}

// A two-level kind's estimate of the rows it did not select becomes one more partial state.
void ColdTier::AddEstimate(const cpu_index::SearchResult& found, ColdSelection* sel, int h) const {
  if (sel->estimate.empty() || found.est_o.empty() || found.est_lse == kNegInf) return;
  const int d = cfg_->head_dim;
  std::copy(found.est_o.begin(), found.est_o.end(),
            sel->estimate.o.begin() + static_cast<std::size_t>(h) * d);
  sel->estimate.lse[h] = found.est_lse;
}

void ColdTier::AttendHead(int h, const float* qh, const ColdSelection& sel,
                          PartialState* out) const {
  const int d = cfg_->head_dim;
  const auto& store = stores_[h / (cfg_->num_q_heads / cfg_->num_kv_heads)];
  float* oh = out->o.data() + static_cast<std::size_t>(h) * d;
  if (sel.exact) {
    cpu_index::AttendStoreAll(qh, cfg_->scale, store, oh, &out->lse[h], cfg_->index.host_tiles);
  } else {
    cpu_index::AttendStoreRows(qh, cfg_->scale, store, sel.rows[h].data(),
                               static_cast<int64_t>(sel.rows[h].size()), oh, &out->lse[h],
                               cfg_->index.host_tiles);
  }
}

const cpu_index::ClusterSummary* ColdTier::summary(int g) const {
  return indexes_[g] == nullptr ? nullptr : cpu_index::GetClusterSummary(*indexes_[g]);
}

const cpu_index::SegmentCodes* ColdTier::codes(int g) const {
  return indexes_[g] == nullptr ? nullptr : cpu_index::GetClusterCodes(*indexes_[g]);
}

const cpu_index::SegmentCodes* ColdTier::value_codes(int g) const {
  return indexes_[g] == nullptr ? nullptr : cpu_index::GetClusterValueCodes(*indexes_[g]);
}

void ColdTier::CompleteSelection(int h, const float* qh, std::vector<int64_t> rows, int64_t scanned,
                                 ColdSelection* sel) const {
  cpu_index::SearchResult found;
  found.ids = std::move(rows);
  found.scanned = scanned;
  AddUncovered(h / (cfg_->num_q_heads / cfg_->num_kv_heads), qh, &found, sel, h);
}

void ColdTier::SetSelection(int h, std::vector<int64_t> rows, int64_t scanned,
                            ColdSelection* sel) const {
  sel->rows[h] = std::move(rows);
  sel->scored[h] = scanned;
  AddNonfinite(h / (cfg_->num_q_heads / cfg_->num_kv_heads), &sel->rows[h]);
}

int64_t ColdTier::covered_rows(int g) const {
  return indexes_[g] == nullptr ? 0 : std::min(indexes_[g]->size(), rows());
}

void ColdTier::AttendSelection(const float* q, const ColdSelection& sel, tbb::task_arena& arena,
                               PartialState* out) const {
  const int H = cfg_->num_q_heads, d = cfg_->head_dim;
  out->Reset(H, d);
  arena.execute([&] {
    tbb::parallel_for(0, H, [&](int h) {
      if (sel.active[h]) AttendHead(h, q + static_cast<std::size_t>(h) * d, sel, out);
    });
  });
}

int64_t ColdTier::attended(const ColdSelection& sel, int q_head) const {
  if (!sel.active[q_head]) return 0;
  if (sel.exact) return rows();
  return static_cast<int64_t>(sel.rows[q_head].size()) +
         (sel.cached.empty() ? 0 : sel.cached[q_head]);
}

void ColdTier::Release() {
  (void)refresh_->Wait();
  counters_->host_tokens -= rows();
  counters_->index_bytes -= index_bytes_;
  index_bytes_ = 0;
}

}  // namespace kvrt::runtime

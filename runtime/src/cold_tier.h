#pragma once
// The cold tier of one (sequence, layer): every token that left the GPU tier, per kv head a host
// KV store, its index, the rows the index does not cover yet, and the map from store row to
// sequence position. Both backends use it unchanged; only how rows arrive differs (host backend:
// synchronously at append; GPU backend: from the eviction pipeline at the next call).
//
// Rows and positions: rows arrive in position order, so row r starts as position first_position
// + r. A kind that lays the store out itself (KeyIndex::TakeRowOrder, e.g. one that keeps each
// cluster's rows contiguous) permutes rows after they are indexed; the map follows, so everything
// outside this class speaks positions and never assumes row == position.
//
// Index maintenance: started in one place (RefreshIndexes, synchronous or in the background) and
// awaited in one place (AwaitIndexes, called by every method that reads or grows the store while a
// background refresh may run). Rows the index does not cover are scanned exactly by Select, so
// a lagging or failed index costs speed, never a token.
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/head_store.h"
#include "kvrt_cpu_index/index.h"
#include "kvrt_runtime/runtime.h"
#include "kvrt_transfer/eviction.h"
#include "oneapi/tbb/task_arena.h"
#include "partial_state.h"

namespace kvrt::runtime {

// What the cold selection of one decode step chose, per q head: store rows of its kv head
// (empty for streaming heads and for exact mode, which attends every row), and the work it did.
struct ColdSelection {
  bool exact = false;                      // exact mode: every row of every kv head
  std::vector<std::vector<int64_t>> rows;  // [q_heads] store rows
  std::vector<uint8_t> active;             // [q_heads] 1 = the head takes part in the cold tier
  PartialState estimate;                   // kinds that estimate the rows they did not select
  std::vector<int64_t> scored;             // [q_heads] keys scored (distance computations)
  std::vector<int64_t> search_ns;          // [q_heads] time in the search
  int64_t keys_read = 0;                   // keys read (a group search's key counts once)
  int64_t busy_ns = 0;                     // summed busy time of the selection's units
  bool estimate_on_device = false;         // the estimate is in the step's device state already
  // The layer's decode evictions whose copies were in flight were attended on the device (the
  // direct step): they stay pending until the layer's next call (TierBackend::SelectClusters).
  bool evictions_on_device = false;
  // Rows attended on the device from the GPU hot cache (device_hot_cache.h), beside rows[h]:
  std::vector<int64_t> cached;                    // [q_heads] how many (empty: none)
  std::vector<std::vector<int64_t>> cached_rows;  // [q_heads] which (with record_attended only)
  // With record_attended, a GPU estimate's lse brought back ([q_heads]; empty: none or on host).
  std::vector<float> device_estimate_lse;

  bool any_active() const {
    for (uint8_t a : active)
      if (a) return true;
    return false;
  }
  // Whether some head has rows to attend here (exact mode: all of them).
  bool any_rows() const {
    if (exact) return any_active();
    for (const auto& r : rows)
      if (!r.empty()) return true;
    return false;
  }
};

class ColdTier {
 public:
  ColdTier(const RuntimeConfig* config, Runtime::Counters* counters, int64_t first_position);
  ~ColdTier();
  ColdTier(ColdTier&&) noexcept = default;
  ColdTier& operator=(ColdTier&&) noexcept = default;

  int64_t rows() const { return stores_.empty() ? 0 : stores_[0].size(); }
  int64_t index_bytes() const { return index_bytes_; }
  // Index growth reserved against host_memory_limit ahead of a refresh (budget.h); the refresh
  // trues index_bytes up to the indexes' real size. Not while a background refresh runs.
  void AccountIndexGrowth(int64_t bytes) {
    index_bytes_ += bytes;
    if (bytes != 0) index_bytes_reserved_ = true;
  }
  const cpu_index::HeadStore& store(int kv_head) const { return stores_[kv_head]; }
  // Sequence position of store row `row` of kv head g.
  int64_t position(int g, int64_t row) const { return positions_[g][row]; }

  // `guard` runs before the stores' memory moves (growth past their capacity) or their rows are
  // permuted (an index's row order), from the thread doing it (a background refresh included;
  // heads may call it concurrently): the GPU backend's direct step reads the stores in place and
  // must let its reads finish and drop its registration first.
  // `moves`: the memory is about to move (false: rows are permuted in place).
  void SetStoreGuard(std::function<void(bool moves)> guard) { store_guard_ = std::move(guard); }
  // Capacity for `rows` rows in total, so that Append up to it cannot fail.
  absl::Status Reserve(int64_t rows);
  // Faults in every store's memory up to `rows` rows (reserved), one store per task.
  void PrefaultStores(int64_t rows);
  // Where kv head g's next rows go (keys, values), for a caller that fills reserved memory in
  // place (a device copy into the registered stores); then AppendWritten(n) appends n rows to
  // every store, as Append would have (position order).
  std::pair<void*, void*> NextRows(int g) {
    return {stores_[g].next_keys(), stores_[g].next_values()};
  }
  absl::Status AppendWritten(int64_t n);
  // Appends n tokens [n, kv_heads, d] (storage dtype), positions rows() + first_position onward;
  // with head_major, k and v are [kv_heads, n, d] instead (each head's rows one copy).
  absl::Status Append(const void* k, const void* v, int64_t n, bool head_major = false);
  // Keeps the sample PromptQuerySample names of the prompt's queries [n, q_heads, d] for kinds
  // that build from queries.
  void SampleQueries(const void* q, int64_t n);

  // The cluster kind's metric factor L [d * d] of kv head g, from the prompt queries kept by
  // SampleQueries (the one its index's Build computes), for a build outside the index.
  std::vector<float> MetricFactor(int g) const;
  // Segments of every kv head clustered outside the index (segment_build.h), starting at store
  // row `begin`: the next refresh hands them to the indexes (cpu_index::PresetSegments). With
  // `laid_out` (per kv head, the order of rows [begin, begin + n)), the store holds them in that
  // order already: row begin + r is old row begin + laid_out[g][r] (positions follow now), and an
  // index that takes the preset is not permuted again.
  void PresetSegments(int64_t begin, std::vector<std::vector<cpu_index::SegmentClustering>> parts,
                      std::vector<std::vector<int64_t>> laid_out = {});

  // Brings every kv head's index up to the store (build on first use, then insert), at once or as
  // a background job on the arena. Failures are counted, never returned (see the header note).
  void RefreshIndexes(tbb::task_arena& arena, bool background);
  // Waits for a background refresh; the ns it waited (0 if none ran), also counted in
  // time_background_wait_ns.
  int64_t AwaitIndexes();
  // Runs `job` as this tier's background work (a prefill's: LayerState::Prefill), awaited like a
  // refresh. The job may grow the store and refresh the indexes (at once, inside it). joinable:
  // the thread that awaits it runs the arena's tasks meanwhile (transfer::BackgroundWork::
  // LaunchJoinable), for a job that is CPU work only.
  void LaunchBackground(tbb::task_arena& arena, std::function<absl::Status()> job,
                        bool joinable = false);
  bool needs_refresh() const;

  // Whether a step has cold work: cold rows and a head that is not streaming.
  bool AnyActive(const uint8_t* streaming) const;
  // Phases 2 and 3 of a decode step: per active q head, the rows to attend (index search + exact
  // scan of uncovered rows, cut back to top_k) and, with `attend` (CPU attention), the exact
  // attention over them into *attend, in the same task as the head's search (rows still in
  // cache; one fork-join). q: f32 [q_heads, d]; streaming: [q_heads] or null. Heads that are not
  // active leave their rows of *attend empty.
  absl::Status Select(const float* q, const uint8_t* streaming, tbb::task_arena& arena,
                      ColdSelection* sel, PartialState* attend = nullptr) const;
  // Tokens per active head that the selection attends (for the statistics).
  int64_t attended(const ColdSelection& sel, int q_head) const;

  // A two-level kind's summary of kv head g (clusters as store-row ranges), or null. Valid until
  // the next refresh; index_version() changes with every refresh.
  const cpu_index::ClusterSummary* summary(int g) const;
  // The cluster kind's codes of kv head g's covered rows (ClusterConfig::rescore_bits), or null;
  // valid as summary(g).
  const cpu_index::SegmentCodes* codes(int g) const;
  // Its value codes (ClusterConfig::value_bits) laid out as codes(g)'s, or null.
  const cpu_index::SegmentCodes* value_codes(int g) const;
  int64_t index_version() const { return index_version_; }
  // An empty selection for this step: every head that is not streaming active.
  void BeginSelection(const uint8_t* streaming, ColdSelection* sel) const;
  // Completes head h's selection from a summary scored elsewhere (the GPU): `rows` (selected
  // clusters' rows and outliers), `scanned` keys scored for them, then the rows no index covers
  // yet (exact top_k) and NaN/Inf rows, as Select does.
  void CompleteSelection(int h, const float* qh, std::vector<int64_t> rows, int64_t scanned,
                         ColdSelection* sel) const;
  // Sets head h's rows from a selection whose other rows are attended elsewhere (the GPU hot
  // cache): `rows` plus the NaN/Inf rows, `scanned` keys scored. No scan of uncovered rows.
  void SetSelection(int h, std::vector<int64_t> rows, int64_t scanned, ColdSelection* sel) const;
  // Rows of kv head g that its index covers (the rest is scanned or attended whole).
  int64_t covered_rows(int g) const;
  // Phase 3 on the CPU for a selection made outside Select (every active head, in parallel).
  void AttendSelection(const float* q, const ColdSelection& sel, tbb::task_arena& arena,
                       PartialState* out) const;

  // Gives back the counters this tier added (at release).
  void Release();

 private:
  std::vector<std::vector<int>> Units(const uint8_t* streaming) const;
  absl::Status SelectUnit(const std::vector<int>& heads, const float* q, ColdSelection* sel,
                          int64_t* read, PartialState* attend) const;
  void AttendHead(int h, const float* qh, const ColdSelection& sel, PartialState* out) const;
  void AttendHeads(const std::vector<int>& heads, const float* q, const ColdSelection& sel,
                   PartialState* out) const;
  absl::Status SelectHead(int h, const float* qh, ColdSelection* sel) const;
  void AddUncovered(int g, const float* qh, cpu_index::SearchResult* found, ColdSelection* sel,
                    int h) const;
  void AddNonfinite(int g, std::vector<int64_t>* ids) const;
  void AddEstimate(const cpu_index::SearchResult& found, ColdSelection* sel, int h) const;
  absl::Status RefreshNow(tbb::task_arena& arena);
  // index_bytes (and the runtime's counter) <- what the indexes hold; no refresh running.
  void TrueUpIndexBytes();
  void TakePreset(int g, cpu_index::KeyIndex* index);
  void ApplyRowOrder(int g);

  const RuntimeConfig* cfg_;
  Runtime::Counters* counters_;
  int64_t first_position_;
  std::vector<cpu_index::HeadStore> stores_;                   // [kv_heads]
  std::vector<std::vector<int64_t>> positions_;                // [kv_heads][row]
  std::vector<std::unique_ptr<cpu_index::KeyIndex>> indexes_;  // [kv_heads]
  int64_t index_bytes_ = 0;
  bool index_bytes_reserved_ = false;  // index_bytes_ holds a reservation not yet trued up
  // Prompt queries (f32, per kv head) kept until the index is built.
  std::vector<std::vector<float>> query_sample_;
  std::unique_ptr<transfer::BackgroundWork> refresh_;
  int64_t preset_begin_ = 0;
  std::vector<std::vector<cpu_index::SegmentClustering>> preset_;  // [kv_heads][segment]
  std::vector<uint8_t> laid_out_;    // [kv_heads] the store follows the preset's order already
  std::vector<uint8_t> skip_order_;  // [kv_heads] the index took such a preset: drop its order
  int64_t index_version_ = 0;
  std::function<void(bool)> store_guard_;
};

}  // namespace kvrt::runtime

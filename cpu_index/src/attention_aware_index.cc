// attention-aware: a key graph built from where the prompt's queries actually look
// (RetrievalAttention, Liu et al., arXiv 2409.10516, section 3; RoarGraph, Chen et al., VLDB
// 2024, section 4). Queries and keys are differently distributed, so a graph over keys alone
// (hnsw) leads a query to keys near other keys, not to the keys the query scores highest.
//
// Build:
//  1. Sample up to graph_query_sample prompt queries (or keys, when no queries are given).
//  2. Exact top-T keys of every sampled query (T = max(graph_query_top, min(256, n / 512))), and
//     every key's best sampled query: blocked cblas_sgemm (256 queries x 1024-key chunks, so the
//     score tile stays in L2 and each key chunk is packed once per 256 queries) in TBB tasks,
//     threshold filter + partial sort.
//  2b. Key metric for pruning: keys are mapped k -> k L with L L^T = Cov(sampled queries) + ridge,
//     so |k1 L - k2 L|^2 measures how differently the queries score two keys; directions that
//     only keys vary along (nuisance channels, a shared key bias) stop dominating the L2
//     distance between keys (measured on a 128K trace, head 0: recall@100 +0.02 at 2% scanned).
//  3. Bipartite projection (RoarGraph): for a query with top list L (best first), link
//     L0 <-> Li (the pivot and the query's other favourites) and L(i) <-> L(i+1); every key links
//     to the top few keys of its best query; the keys that share a best query form a chain
//     hanging off that query's pivot (so keys in no top list are reachable). Each key's
//     candidates, nearest first by squared L2 between mapped keys (2b), are pruned to graph_degree
//     - 1 by occlusion with Vamana's slack: c is dropped when a kept r has alpha^2 |r-c|^2 <
//     |p-c|^2 (alpha = 1.2). Then reverse edges are added and pruned again.
//  4. Every key also links to the next row (p -> p+1), implicitly: it is not stored. NOTE: this
//     chain makes every key reachable from row 0 (an entry point), so a beam as wide as the index
//     is exact, and it is a cheap sequential link (neighbouring tokens' keys are often alike).
// Entry points: the keys that occur most often in the sampled queries' top lists and row 0, plus
// routing: 256 sampled queries (unit length) keep their top-8 keys, and a search starts from those
// of the 8 routing queries most similar to it (cosine), i.e. near the favourites of queries like
// it (measured on a 32K trace, k = 100, effort 100: recall 0.936 -> 0.951 while scanning 2.95% ->
// 2.83%). Without routes (a store too small to sample): the top keys of 64 sampled queries
// spread over the sample.
//
// Search: best-first beam search by q.k (the candidate pool of NSG/DiskANN), beam = effort,
// default 2k; a per-thread visited set; `scanned` counts every key scored (entry points,
// neighbours, the tail). The neighbours of an expanded key are prefetched together.
// SearchGroup (GQA): one traversal for a kv head's group of queries with a beam per query (see
// there); every query takes its top-k from all keys the traversal scored.
//
// Add: new rows go to a tail scanned exactly by every search; once graph_tail rows wait, each is
// linked in order: a graph search with the key itself as the query gives its candidates (pruned
// as in the build) and the keys that score highest with it, which get a reverse link to it
// (replacing their weakest link by q.k when full); plus the chain link from the previous row.
//
// Memory: graph_degree - 1 u32 per key (124 B at degree 32) plus the entry list and the routing
// table (136 KB at d = 128); the keys are read from the HeadStore. Build holds an f32 copy of the
// keys and the sampled queries transiently.
#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "index_common.h"
#include "kinds.h"
#include "kvrt_common/multiversion.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/enumerable_thread_specific.h"
#include "oneapi/tbb/parallel_for.h"
#include "oneapi/tbb/parallel_sort.h"

namespace kvrt::cpu_index {
namespace {

constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();
constexpr int64_t kMaxRows = std::numeric_limits<uint32_t>::max() - 1;
constexpr int kQueryBlock =
    256;  // sampled queries per sgemm (the key chunk is packed once per block)
constexpr int kKeyChunk = 1024;     // keys per sgemm (the score tile, 1 MB, stays in L2)
constexpr int kMaxQueryTop = 256;   // longest top list that n alone asks for
constexpr int kNumEntries = 16;     // popular entry points
constexpr int kSpreadEntries = 64;  // entry points spread over the sampled queries
constexpr int kRoutes = 256;        // sampled queries kept (unit length) to route a search's start
constexpr int kRouteKeys = 8;       // top keys of each routing query used as entry points
constexpr int kRouteProbe = 8;      // routing queries (most similar to q) whose keys seed a search
constexpr int kBestQueryLinks = 8;  // links of a key into its best query's top list
constexpr int kReverseLinks = 16;   // reverse links made for a key linked by Add
constexpr float kPruneAlpha2 = 1.44f;    // occlusion slack (squared), see BuildGraph
constexpr int kMaxQueriesPerGroup = 64;  // SearchGroup's stack row of scores; larger groups loop

struct ScoredId {
  float score;
  uint32_t id;
};
inline bool Better(const ScoredId& a, const ScoredId& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// Exact top-T keys (best first) of each query, and each key's best query (-1: none).
struct QueryTops {
  int T = 0;
  std::vector<uint32_t> top;        // [S, T]
  std::vector<int32_t> best_query;  // [n]
  std::vector<float> best_score;    // [n]
};

// bs[j] = max(bs[j], row[j]), bq[j] = query where row[j] is larger: each key's best query so far.
// Branch-free so that it vectorises (half the post-processing of a score tile).
KVRT_MULTIVERSION void ColumnMax(const float* row, int cols, int32_t query, float* bs,
                                 int32_t* bq) {
  for (int j = 0; j < cols; ++j) {
    const bool gt = row[j] > bs[j];
    bs[j] = gt ? row[j] : bs[j];
    bq[j] = gt ? query : bq[j];
  }
}

// First index >= j0 with row[j] > thr, or cols. Once a query's top-T threshold is set, most of a
// tile is below it: the scan runs 16 lanes at a time and leaves the scalar path to the hits.
KVRT_MULTIVERSION int NextAbove(const float* row, int j0, int cols, float thr) {
  int j = j0;
  for (; j + 16 <= cols; j += 16) {
    int hits = 0;
    for (int l = 0; l < 16; ++l) hits += row[j + l] > thr ? 1 : 0;
    if (hits != 0) break;
  }
  for (; j < cols; ++j)
    if (row[j] > thr) return j;
  return cols;
}

QueryTops ExactQueryTops(const float* Q, int64_t S, const float* K, int64_t n, int d, int T) {
  internal::UseSingleThreadedBlas();
  QueryTops out;
  out.T = T;
  out.top.assign(static_cast<std::size_t>(S) * T, kNone);
  struct Best {
    std::vector<float> score;
    std::vector<int32_t> query;
  };
  tbb::enumerable_thread_specific<Best> best_local;
  const int64_t blocks = (S + kQueryBlock - 1) / kQueryBlock;
  tbb::parallel_for(int64_t{0}, blocks, [&](int64_t qb) {
    Best& best = best_local.local();
    if (best.score.empty()) {
      best.score.assign(n, -std::numeric_limits<float>::infinity());
      best.query.assign(n, -1);
    }
    const int64_t q0 = qb * kQueryBlock;
    const int rows = static_cast<int>(std::min<int64_t>(kQueryBlock, S - q0));
    std::vector<float> sc(static_cast<std::size_t>(rows) * kKeyChunk);
    std::vector<std::vector<ScoredId>> buf(rows);
    std::vector<float> thr(rows, -std::numeric_limits<float>::infinity());
    auto shrink = [&](int r) {
      auto& b = buf[r];
      if (static_cast<int>(b.size()) <= T) return;
      std::nth_element(b.begin(), b.begin() + (T - 1), b.end(), Better);
      b.resize(T);
      thr[r] = b[T - 1].score;
    };
    for (int64_t c0 = 0; c0 < n; c0 += kKeyChunk) {
      const int cols = static_cast<int>(std::min<int64_t>(kKeyChunk, n - c0));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, d, 1.f, Q + q0 * d, d,
                  K + c0 * d, d, 0.f, sc.data(), cols);
      for (int r = 0; r < rows; ++r) {
        const float* row = sc.data() + static_cast<std::size_t>(r) * cols;
        auto& b = buf[r];
        for (int j = NextAbove(row, 0, cols, thr[r]); j < cols;
             j = NextAbove(row, j + 1, cols, thr[r])) {
          b.push_back({row[j], static_cast<uint32_t>(c0 + j)});
          if (static_cast<int>(b.size()) >= 4 * T) shrink(r);
        }
        if (static_cast<int>(b.size()) > T) {
          shrink(r);
        } else if (static_cast<int>(b.size()) == T) {
          thr[r] = std::min_element(b.begin(), b.end(), [](const ScoredId& x, const ScoredId& y) {
                     return x.score < y.score;
                   })->score;
        }
        ColumnMax(row, cols, static_cast<int32_t>(q0 + r), best.score.data() + c0,
                  best.query.data() + c0);
      }
    }
    for (int r = 0; r < rows; ++r) {
      auto& b = buf[r];
      std::sort(b.begin(), b.end(), Better);
      const int m = std::min<int>(T, static_cast<int>(b.size()));
      for (int i = 0; i < m; ++i) out.top[(q0 + r) * T + i] = b[i].id;
    }
  });
  out.best_query.assign(n, -1);
  out.best_score.assign(n, -std::numeric_limits<float>::infinity());
  std::vector<float>& best_score = out.best_score;
  for (const Best& b : best_local) {
    if (b.score.empty()) continue;
    for (int64_t j = 0; j < n; ++j) {
      if (b.score[j] > best_score[j] ||
          (b.score[j] == best_score[j] && b.query[j] >= 0 && b.query[j] < out.best_query[j])) {
        best_score[j] = b.score[j];
        out.best_query[j] = b.query[j];
      }
    }
  }
  return out;
}

// Occlusion pruning: `cands` sorted by p.c (best first); keeps up to `max_keep` ids c such that
// no already kept r has r.c > p.c. `sim(r, c)` returns r.c.
template <typename Sim>
void OcclusionPrune(const std::vector<ScoredId>& cands, int max_keep, Sim sim,
                    std::vector<uint32_t>* kept) {
  kept->clear();
  for (const ScoredId& c : cands) {
    if (static_cast<int>(kept->size()) >= max_keep) break;
    bool occluded = false;
    for (uint32_t r : *kept) {
      if (sim(r, c.id) > c.score) {
        occluded = true;
        break;
      }
    }
    if (!occluded) kept->push_back(c.id);
  }
}

// Query-aware key metric: |L^T (a - b)|^2 with L L^T = Cov(Q) + ridge, i.e. how differently the
// sampled queries score two keys. Directions that queries ignore (e.g. channels where only keys
// carry energy) do not count. Returns L (row-major [d, d], lower) so that row k -> k L.
std::vector<float> QueryMetric(const float* Q, int64_t S, int d) {
  std::vector<double> mean(d, 0.0), C(static_cast<std::size_t>(d) * d, 0.0);
  for (int64_t i = 0; i < S; ++i)
    for (int a = 0; a < d; ++a) mean[a] += Q[i * d + a];
  for (int a = 0; a < d; ++a) mean[a] /= static_cast<double>(S);
  std::vector<float> Qc(static_cast<std::size_t>(S) * d);
  for (int64_t i = 0; i < S; ++i)
    for (int a = 0; a < d; ++a) Qc[i * d + a] = static_cast<float>(Q[i * d + a] - mean[a]);
  std::vector<float> Cf(static_cast<std::size_t>(d) * d);
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, d, static_cast<int>(S),
              1.f / static_cast<float>(S), Qc.data(), d, 0.f, Cf.data(), d);
  double tr = 0;
  for (int a = 0; a < d; ++a) tr += Cf[a * d + a];
  // Identical queries (zero covariance): plain L2.
  const double ridge = tr > 0 ? 1e-3 * tr / d : 1.0;
  for (int a = 0; a < d; ++a)
    for (int b = a; b < d; ++b) {
      C[a * d + b] = C[b * d + a] = Cf[a * d + b] + (a == b ? ridge : 0.0);
    }
  // Cholesky C = L L^T.
  std::vector<double> L(static_cast<std::size_t>(d) * d, 0.0);
  for (int j = 0; j < d; ++j) {
    double s = C[j * d + j];
    for (int k = 0; k < j; ++k) s -= L[j * d + k] * L[j * d + k];
    const double ljj = std::sqrt(std::max(s, 1e-12));
    L[j * d + j] = ljj;
    for (int i = j + 1; i < d; ++i) {
      double t = C[i * d + j];
      for (int k = 0; k < j; ++k) t -= L[i * d + k] * L[j * d + k];
      L[i * d + j] = t / ljj;
    }
  }
  // x^T C x = |L^T x|^2: the row vector x maps to x L.
  std::vector<float> out(static_cast<std::size_t>(d) * d);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(L[i]);
  return out;
}

class AttentionAwareIndex final : public KeyIndex {
 public:
  AttentionAwareIndex(const IndexConfig& config, int dim)
      : config_(config), dim_(dim), degree_(config.graph_degree) {}

  IndexKind kind() const override { return IndexKind::kAttentionAware; }

  absl::Status Build(const HeadStore& store, const float* queries, int64_t n_queries) override {
    if (auto s = internal::CheckBuild(store, dim_, queries, n_queries, kMaxRows); !s.ok()) return s;
    built_ = false;
    size_ = linked_ = 0;
    nbrs_.clear();
    entries_.clear();
    try {
      BuildGraph(store, queries, n_queries);
    } catch (const std::bad_alloc&) {
      nbrs_.clear();
      entries_.clear();
      size_ = linked_ = 0;
      return absl::ResourceExhaustedError("attention-aware build: out of memory");
    }
    built_ = true;
    return absl::OkStatus();
  }

  absl::Status Add(const HeadStore& store) override {
    if (auto s = internal::CheckAdd(store, dim_, built_, size_, kMaxRows); !s.ok()) return s;
    size_ = store.size();
    if (size_ - linked_ >= std::max(1, config_.graph_tail)) {
      try {
        LinkTail(store);
      } catch (const std::bad_alloc&) {
        return absl::ResourceExhaustedError("attention-aware add: out of memory");
      }
    }
    return absl::OkStatus();
  }

  absl::Status Search(const HeadStore& store, const float* q, const SearchParams& params,
                      SearchResult* out) const override {
    if (auto s = internal::CheckSearch(store, dim_, built_, size_, q, params, out); !s.ok()) {
      return s;
    }
    const int beam = BeamWidth(params);
    thread_local std::vector<Slot> pool;
    const DType t = store.dtype();
    const std::vector<uint32_t>* seeds = Route(q);
    int64_t scanned = BeamSearch(
        store, beam, linked_, [&](uint32_t id) { return DotRow(q, store.key(id), dim_, t); }, &pool,
        seeds);
    thread_local std::vector<std::pair<float, int64_t>> cands;
    cands.clear();
    for (const Slot& s : pool) cands.emplace_back(s.score, s.id);
    for (int64_t r = linked_; r < size_; ++r) {
      cands.emplace_back(DotRow(q, store.key(r), dim_, t), r);
      ++scanned;
    }
    internal::TakeTopK(&cands, params.k, out);
    out->scanned = scanned;
    return absl::OkStatus();
  }

  // One traversal for the whole group with a beam per query: the queries take turns expanding
  // their best unexpanded key; every key reached is read once, scored by all of them and offered
  // to every beam, so a key one query's search finds also serves the others. Each query then takes
  // its top-k from every key scored (not just its beam). Reads at most the union of what
  // separate searches read.
  absl::Status SearchGroup(const HeadStore& store, const float* qs, int nq,
                           const SearchParams& params, SearchResult* outs) const override {
    if (nq <= 1 || outs == nullptr || nq > kMaxQueriesPerGroup)
      return KeyIndex::SearchGroup(store, qs, nq, params, outs);
    if (auto s = internal::CheckSearch(store, dim_, built_, size_, qs, params, outs); !s.ok())
      return s;
    const int beam = BeamWidth(params);
    const DType t = store.dtype();
    thread_local std::vector<float> seen_scores;  // [seen, nq]
    thread_local std::vector<uint32_t> seen_ids;
    seen_scores.clear();
    seen_ids.clear();
    auto score = [&](uint32_t id) -> const float* {
      const std::size_t at = seen_scores.size();
      seen_scores.resize(at + nq);
      seen_ids.push_back(id);
      DotRowMulti(qs, nq, store.key(id), dim_, t, seen_scores.data() + at);
      return seen_scores.data() + at;
    };
    // Entry points: every query's routed ones (the popular keys and row 0 come with the first).
    thread_local std::vector<uint32_t> seeds;
    seeds.clear();
    for (int i = 0; i < nq; ++i) {
      const std::vector<uint32_t>* routed = Route(qs + static_cast<std::size_t>(i) * dim_);
      if (routed == nullptr) break;
      seeds.insert(seeds.end(),
                   routed->begin() + (i == 0 ? 0 : static_cast<std::ptrdiff_t>(n_popular_)),
                   routed->end());
    }
    int64_t scanned = MultiBeamSearch(store, nq, beam, score, seeds.empty() ? nullptr : &seeds);
    for (int64_t r = linked_; r < size_; ++r) score(static_cast<uint32_t>(r));
    scanned += size_ - linked_;
    thread_local std::vector<std::pair<float, int64_t>> cands;
    for (int i = 0; i < nq; ++i) {
      cands.clear();
      for (std::size_t j = 0; j < seen_ids.size(); ++j)
        cands.emplace_back(seen_scores[j * nq + i], seen_ids[j]);
      internal::TakeTopK(&cands, params.k, &outs[i]);
      outs[i].scanned = scanned;
    }
    internal::TrimScratch(&cands);
    internal::TrimScratch(&seen_scores);
    internal::TrimScratch(&seen_ids);
    return absl::OkStatus();
  }

  int64_t size() const override { return size_; }
  std::size_t MemoryBytes() const override {
    return nbrs_.capacity() * sizeof(uint32_t) + entries_.capacity() * sizeof(uint32_t) +
           route_q_.capacity() * sizeof(float) + route_keys_.capacity() * sizeof(uint32_t);
  }

 private:
  struct Slot {
    float score;
    uint32_t id;
    bool expanded;
  };

  // Entry points for q: the popular keys, the top keys of the kRouteProbe routing queries most
  // similar to q (cosine), and row 0; null (use entries_) when the index has no routes.
  const std::vector<uint32_t>* Route(const float* q) const {
    if (route_q_.empty()) return nullptr;
    const int64_t R = static_cast<int64_t>(route_q_.size()) / dim_;
    thread_local std::vector<std::pair<float, int64_t>> sim;
    thread_local std::vector<uint32_t> seeds;
    sim.resize(R);
    for (int64_t r = 0; r < R; ++r)
      sim[r] = {DotRow(q, route_q_.data() + r * dim_, dim_, DType::kF32), r};
    const int64_t probe = std::min<int64_t>(kRouteProbe, R);
    std::partial_sort(sim.begin(), sim.begin() + probe, sim.end(),
                      [](const auto& a, const auto& b) { return a.first > b.first; });
    seeds.assign(entries_.begin(), entries_.begin() + n_popular_);
    for (int64_t p = 0; p < probe; ++p)
      for (int j = 0; j < kRouteKeys; ++j) {
        const uint32_t id = route_keys_[sim[p].second * kRouteKeys + j];
        if (id != kNone && id < linked_) seeds.push_back(id);
      }
    seeds.push_back(0);
    return &seeds;
  }

  // The stored links of row p (degree_ - 1 of them; kNone: empty). Every row also links to
  // p + 1 (the chain), which is not stored.
  uint32_t* Links(int64_t p) { return nbrs_.data() + static_cast<std::size_t>(p) * (degree_ - 1); }
  const uint32_t* Links(int64_t p) const {
    return nbrs_.data() + static_cast<std::size_t>(p) * (degree_ - 1);
  }

  int BeamWidth(const SearchParams& params) const {
    return std::max(params.k, params.effort > 0                ? params.effort
                              : config_.graph_default_beam > 0 ? config_.graph_default_beam
                                                               : 2 * params.k);
  }

  // Inserts (s, id) into a pool sorted by score desc, capped at beam; returns the position, or
  // beam when it is not inserted.
  static std::size_t PoolInsert(std::vector<Slot>* pool, int beam, float s, uint32_t id) {
    if (static_cast<int>(pool->size()) >= beam && s <= pool->back().score) return beam;
    auto it = std::upper_bound(pool->begin(), pool->end(), s,
                               [](float v, const Slot& x) { return v > x.score; });
    const std::size_t pos = it - pool->begin();
    pool->insert(it, Slot{s, id, false});
    if (static_cast<int>(pool->size()) > beam) pool->pop_back();
    return pos;
  }

  // Marks the unvisited neighbours of `id` visited, prefetches their keys (together, so their
  // memory latencies overlap: a key row is 2-4 cache lines, often not in cache) and returns them.
  const std::vector<uint32_t>& FreshNeighbours(const HeadStore& store, uint32_t id, int64_t limit,
                                               internal::VisitedSet& visited) const {
    thread_local std::vector<uint32_t> fresh;
    fresh.clear();
    const std::size_t row_bytes = static_cast<std::size_t>(dim_) * DTypeSize(store.dtype());
    const uint32_t* nb = Links(id);
    auto take = [&](uint32_t v) {
      if (v == kNone || v >= limit || !visited.Insert(v)) return;
      const auto* p = static_cast<const char*>(store.key(v));
      for (std::size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(p + off);
      fresh.push_back(v);
    };
    take(id + 1);  // the implicit chain link
    for (int j = 0; j < degree_ - 1; ++j) take(nb[j]);
    return fresh;
  }

  // SearchGroup's traversal over the linked rows: nq beams; score(id) returns the key's nq
  // scores. Returns the number of keys scored.
  template <class ScoreFn>
  int64_t MultiBeamSearch(const HeadStore& store, int nq, int beam, ScoreFn&& score,
                          const std::vector<uint32_t>* seeds = nullptr) const {
    if (linked_ == 0) return 0;
    auto& visited = internal::VisitedSet::ForThisThread(linked_);
    thread_local std::vector<std::vector<Slot>> pools;
    thread_local std::vector<std::size_t> cursor;
    pools.resize(nq);
    for (auto& p : pools) p.clear();
    cursor.assign(nq, 0);
    int64_t scanned = 0;
    auto offer = [&](uint32_t id) {
      const float* s = score(id);
      ++scanned;
      for (int i = 0; i < nq; ++i)
        cursor[i] = std::min(cursor[i], PoolInsert(&pools[i], beam, s[i], id));
    };
    for (uint32_t e : seeds ? *seeds : entries_) {
      if (e < linked_ && visited.Insert(e)) offer(e);
    }
    for (auto& c : cursor) c = 0;
    for (bool progressed = true; progressed;) {
      progressed = false;
      for (int i = 0; i < nq; ++i) {
        auto& pool = pools[i];
        while (cursor[i] < pool.size() && pool[cursor[i]].expanded) ++cursor[i];
        if (cursor[i] >= pool.size()) continue;
        progressed = true;
        pool[cursor[i]].expanded = true;
        const uint32_t id = pool[cursor[i]].id;
        ++cursor[i];
        for (uint32_t v : FreshNeighbours(store, id, linked_, visited)) offer(v);
      }
    }
    return scanned;
  }

  // Best-first search over rows [0, limit) of the graph by score(id) (higher = better); leaves
  // the best `beam` (score desc) in *pool; returns the number of keys scored.
  template <class ScoreFn>
  int64_t BeamSearch(const HeadStore& store, int beam, int64_t limit, ScoreFn&& score,
                     std::vector<Slot>* pool, const std::vector<uint32_t>* seeds = nullptr) const {
    pool->clear();
    if (limit == 0) return 0;
    auto& visited = internal::VisitedSet::ForThisThread(limit);
    int64_t scanned = 0;
    for (uint32_t e : seeds ? *seeds : entries_) {
      if (e >= limit || !visited.Insert(e)) continue;
      PoolInsert(pool, beam, score(e), e);
      ++scanned;
    }
    std::size_t i = 0;
    while (i < pool->size()) {
      if ((*pool)[i].expanded) {
        ++i;
        continue;
      }
      (*pool)[i].expanded = true;
      // The adjacency list of the key likely expanded next is a random read too: start it now,
      // under this expansion's scoring.
      for (std::size_t j = i + 1; j < pool->size() && j < i + 3; ++j) {
        if ((*pool)[j].expanded) continue;
        const uint32_t* adj = Links((*pool)[j].id);
        __builtin_prefetch(adj);
        __builtin_prefetch(reinterpret_cast<const char*>(adj) + 64);
        break;
      }
      std::size_t next = pool->size();
      for (uint32_t v : FreshNeighbours(store, (*pool)[i].id, limit, visited)) {
        ++scanned;
        next = std::min(next, PoolInsert(pool, beam, score(v), v));
      }
      i = std::min(i + 1, next);
    }
    return scanned;
  }

  void BuildGraph(const HeadStore& store, const float* queries, int64_t n_queries) {
    const int64_t n = store.size();
    const int d = dim_;
    const int R = degree_;
    std::vector<float> K = internal::KeysF32(store, 0, n);

    // 1. Sample queries (keys when there are none: a key-only graph still works).
    const bool have_queries = queries != nullptr && n_queries > 0;
    const float* src = have_queries ? queries : K.data();
    const int64_t pool_n = have_queries ? n_queries : n;
    const int64_t S = std::min<int64_t>(std::max(1, config_.graph_query_sample), pool_n);
    std::vector<int64_t> pick(pool_n);
    std::iota(pick.begin(), pick.end(), 0);
    if (S < pool_n) {
      std::mt19937_64 rng(config_.seed);
      for (int64_t i = 0; i < S; ++i) {
        std::uniform_int_distribution<int64_t> u(i, pool_n - 1);
        std::swap(pick[i], pick[u(rng)]);
      }
      pick.resize(S);
      std::sort(pick.begin(), pick.end());
    }
    std::vector<float> Q(static_cast<std::size_t>(S) * d);
    for (int64_t i = 0; i < S; ++i) std::copy_n(src + pick[i] * d, d, Q.data() + i * d);

    // 2. Exact top lists.
    // Top-list length grows with n (at least graph_query_top): the longer lists cover more of the
    // keys that unsampled queries want (measured on a 128K trace, head 0, decode queries: share of
    // their exact top-100 inside some sampled query's top-T list 0.86 / 0.92 / 0.96 / 0.98 at
    // T = 64 / 128 / 256 / 512; recall at 2% scanned peaks at T = 256).
    const int64_t t_want =
        std::max<int64_t>(config_.graph_query_top, std::min<int64_t>(kMaxQueryTop, n / 512));
    const int T = static_cast<int>(std::min<int64_t>(std::max<int64_t>(1, t_want), n));
    const QueryTops tops = ExactQueryTops(Q.data(), S, K.data(), n, d, T);
    {
      const std::vector<float> Lm = QueryMetric(Q.data(), S, d);
      std::vector<float> Kt(K.size());
      tbb::parallel_for(int64_t{0}, (n + kKeyChunk - 1) / kKeyChunk, [&](int64_t c) {
        const int64_t r0 = c * kKeyChunk;
        const int rows = static_cast<int>(std::min<int64_t>(kKeyChunk, n - r0));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d, d, 1.f, K.data() + r0 * d,
                    d, Lm.data(), d, 0.f, Kt.data() + r0 * d, d);
      });
      K.swap(Kt);
    }
    // Routing: a few sampled queries (unit length) and their top keys, so that a search starts
    // at the favourites of the sampled queries most like it rather than at fixed entry points.
    {
      const int64_t R = std::min<int64_t>(kRoutes, S);
      const int rk = std::min(kRouteKeys, T);
      route_q_.assign(static_cast<std::size_t>(R) * d, 0.f);
      route_keys_.assign(static_cast<std::size_t>(R) * kRouteKeys, kNone);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r * S / R;
        const float* qi = Q.data() + i * d;
        float norm = 0.f;
        for (int c = 0; c < d; ++c) norm += qi[c] * qi[c];
        const float inv = norm > 0.f ? 1.f / std::sqrt(norm) : 0.f;
        for (int c = 0; c < d; ++c) route_q_[r * d + c] = qi[c] * inv;
        for (int j = 0; j < rk; ++j) route_keys_[r * kRouteKeys + j] = tops.top[i * T + j];
      }
    }
    Q = {};

    // Entry points: most frequent keys in the top lists, then row 0.
    {
      std::vector<uint32_t> count(n, 0);
      for (uint32_t id : tops.top)
        if (id != kNone) ++count[id];
      std::vector<uint32_t> ids(n);
      std::iota(ids.begin(), ids.end(), 0u);
      const int64_t e = std::min<int64_t>(kNumEntries, n);
      std::partial_sort(ids.begin(), ids.begin() + e, ids.end(), [&](uint32_t a, uint32_t b) {
        return count[a] > count[b] || (count[a] == count[b] && a < b);
      });
      for (int64_t i = 0; i < e; ++i)
        if (count[ids[i]] > 0) entries_.push_back(ids[i]);
      n_popular_ = entries_.size();
      // Spread entries: the pivots (top-1 keys) of sampled queries taken at an even stride, so
      // a query whose favourite keys are far from the popular ones starts near them.
      for (int64_t i = 0; i < kSpreadEntries && i < S; ++i) {
        const uint32_t pivot = tops.top[(i * S / kSpreadEntries) * T];
        if (pivot != kNone && std::find(entries_.begin(), entries_.end(), pivot) == entries_.end())
          entries_.push_back(pivot);
      }
      if (std::find(entries_.begin(), entries_.end(), 0u) == entries_.end()) entries_.push_back(0);
    }

    // 3. Candidate edges (src << 32 | dst), sentinel for unused slots.
    const int m = std::min(kBestQueryLinks, T);
    const std::size_t per_query = 4 * static_cast<std::size_t>(T);
    const std::size_t per_key = m;
    std::vector<uint64_t> edges(S * per_query + n * per_key, ~uint64_t{0});
    auto edge = [](uint32_t a, uint32_t b) {
      return a == b || a == kNone || b == kNone ? ~uint64_t{0} : (uint64_t{a} << 32) | b;
    };
    tbb::parallel_for(int64_t{0}, S, [&](int64_t s) {
      const uint32_t* L = tops.top.data() + s * T;
      uint64_t* e = edges.data() + s * per_query;
      for (int i = 1; i < T; ++i) {
        *e++ = edge(L[0], L[i]);
        *e++ = edge(L[i], L[0]);
        if (i + 1 < T) {
          *e++ = edge(L[i], L[i + 1]);
          *e++ = edge(L[i + 1], L[i]);
        }
      }
    });
    tbb::parallel_for(int64_t{0}, n, [&](int64_t j) {
      const int32_t bq = tops.best_query[j];
      if (bq < 0) return;
      const uint32_t* L = tops.top.data() + static_cast<int64_t>(bq) * T;
      uint64_t* e = edges.data() + S * per_query + j * per_key;
      for (int i = 0; i < m; ++i) e[i] = edge(static_cast<uint32_t>(j), L[i]);
    });
    // Keys grouped by their best query, best first: the query's pivot links to the group's
    // head and the group is linked as a chain, so keys in no top list are reachable too.
    {
      std::vector<uint32_t> by_query;
      for (int64_t j = 0; j < n; ++j)
        if (tops.best_query[j] >= 0) by_query.push_back(static_cast<uint32_t>(j));
      std::sort(by_query.begin(), by_query.end(), [&](uint32_t a, uint32_t b) {
        return tops.best_query[a] < tops.best_query[b] ||
               (tops.best_query[a] == tops.best_query[b] &&
                tops.best_score[a] > tops.best_score[b]);
      });
      for (std::size_t i = 0; i < by_query.size(); ++i) {
        const uint32_t j = by_query[i];
        const int32_t bq = tops.best_query[j];
        if (i == 0 || tops.best_query[by_query[i - 1]] != bq) {
          const uint32_t pivot = tops.top[static_cast<int64_t>(bq) * T];
          edges.push_back(edge(pivot, j));
          edges.push_back(edge(j, pivot));
        } else {
          edges.push_back(edge(by_query[i - 1], j));
          edges.push_back(edge(j, by_query[i - 1]));
        }
      }
    }
    tbb::parallel_sort(edges.begin(), edges.end());
    edges.erase(std::unique(edges.begin(), edges.end()), edges.end());
    if (!edges.empty() && edges.back() == ~uint64_t{0}) edges.pop_back();

    // Prune each key's candidates into slots 1..R-1.
    nbrs_.assign(static_cast<std::size_t>(n) * (R - 1), kNone);
    std::vector<std::size_t> begin(n + 1, 0);
    for (uint64_t e : edges) ++begin[(e >> 32) + 1];
    for (int64_t i = 0; i < n; ++i) begin[i + 1] += begin[i];
    std::vector<float> norm2(n);
    for (int64_t i = 0; i < n; ++i) {
      const float* a = K.data() + i * d;
      norm2[i] = DotRow(a, a, d, DType::kF32);
    }
    // NOTE: pruning measures closeness between keys by squared L2, with Vamana's slack
    // (alpha = 1.2, alpha^2 = 1.44): with inner products, large-norm keys occlude everything and
    // keys' shared bias makes every pair look alike (measured: recall plateau 0.78 vs 0.99).
    auto sim = [&](uint32_t a, uint32_t b) {
      const float ip = DotRow(K.data() + static_cast<std::size_t>(a) * d,
                              K.data() + static_cast<std::size_t>(b) * d, d, DType::kF32);
      return -(norm2[a] + norm2[b] - 2 * ip);
    };
    auto occl_sim = [&](uint32_t a, uint32_t b) { return kPruneAlpha2 * sim(a, b); };
    const int max_cands = 3 * R;
    auto prune_node = [&](uint32_t p, std::vector<ScoredId>& cands, std::vector<uint32_t>& kept) {
      for (auto& c : cands) c.score = sim(p, c.id);
      std::sort(cands.begin(), cands.end(), Better);
      if (static_cast<int>(cands.size()) > max_cands) cands.resize(max_cands);
      OcclusionPrune(cands, R - 1, occl_sim, &kept);
      uint32_t* slots = Links(p);
      std::fill(slots, slots + R - 1, kNone);
      std::copy(kept.begin(), kept.end(), slots);
    };
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, 256),
                      [&](const tbb::blocked_range<int64_t>& r) {
                        std::vector<ScoredId> cands;
                        std::vector<uint32_t> kept;
                        for (int64_t p = r.begin(); p < r.end(); ++p) {
                          cands.clear();
                          for (std::size_t i = begin[p]; i < begin[p + 1]; ++i)
                            cands.push_back({0.f, static_cast<uint32_t>(edges[i] & 0xffffffffu)});
                          if (!cands.empty()) prune_node(static_cast<uint32_t>(p), cands, kept);
                        }
                      });

    // Reverse edges: c -> p for every kept p -> c, merged with c's list and pruned again.
    edges.clear();
    for (int64_t p = 0; p < n; ++p) {
      const uint32_t* slots = Links(p);
      for (int j = 0; j < R - 1; ++j)
        if (slots[j] != kNone)
          edges.push_back((uint64_t{slots[j]} << 32) | static_cast<uint64_t>(p));
    }
    tbb::parallel_sort(edges.begin(), edges.end());
    std::fill(begin.begin(), begin.end(), 0);
    for (uint64_t e : edges) ++begin[(e >> 32) + 1];
    for (int64_t i = 0; i < n; ++i) begin[i + 1] += begin[i];
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, 256),
                      [&](const tbb::blocked_range<int64_t>& r) {
                        std::vector<ScoredId> cands;
                        std::vector<uint32_t> kept;
                        for (int64_t c = r.begin(); c < r.end(); ++c) {
                          if (begin[c] == begin[c + 1]) continue;
                          const uint32_t* slots = Links(c);
                          cands.clear();
                          for (int j = 0; j < R - 1; ++j)
                            if (slots[j] != kNone) cands.push_back({0.f, slots[j]});
                          for (std::size_t i = begin[c]; i < begin[c + 1]; ++i) {
                            const auto p = static_cast<uint32_t>(edges[i] & 0xffffffffu);
                            if (std::none_of(cands.begin(), cands.end(),
                                             [p](const ScoredId& x) { return x.id == p; }))
                              cands.push_back({0.f, p});
                          }
                          prune_node(static_cast<uint32_t>(c), cands, kept);
                        }
                      });

    // 4. The chain p -> p + 1 is implicit (Links).
    size_ = linked_ = n;
  }

  // Links the tail rows [linked_, size_) into the graph, in order.
  void LinkTail(const HeadStore& store) {
    const int R = degree_;
    const std::size_t need = static_cast<std::size_t>(size_) * (R - 1);
    if (nbrs_.capacity() < need)
      nbrs_.reserve(std::max(need, nbrs_.capacity() + nbrs_.capacity() / 4));
    nbrs_.resize(need, kNone);
    std::vector<float> kp(dim_), kc(dim_);
    std::vector<Slot> pool;
    std::vector<ScoredId> cands;
    std::vector<uint32_t> kept;
    std::vector<std::vector<float>> kept_f32;
    std::vector<float> cand_f32, cand_norm;
    const DType t = store.dtype();
    const int beam = std::max(2 * R, 64);
    for (int64_t j = linked_; j < size_; ++j) {
      store.KeyF32(j, kp.data());
      BeamSearch(
          store, beam, linked_,
          [&](uint32_t id) { return DotRow(kp.data(), store.key(id), dim_, t); }, &pool);
      // Candidates by squared L2 to the new key (higher = closer), pruned as in the build.
      const float nj = DotRow(kp.data(), kp.data(), dim_, DType::kF32);
      cands.clear();
      cand_f32.resize(pool.size() * dim_);
      cand_norm.resize(pool.size());
      for (std::size_t c = 0; c < pool.size(); ++c) {
        float* row = cand_f32.data() + c * dim_;
        store.KeyF32(pool[c].id, row);
        cand_norm[c] = DotRow(row, row, dim_, DType::kF32);
        cands.push_back({-(nj + cand_norm[c] - 2 * pool[c].score), static_cast<uint32_t>(c)});
      }
      std::sort(cands.begin(), cands.end(), Better);
      kept.clear();
      kept_f32.clear();
      std::vector<uint32_t> kept_pos;
      for (const ScoredId& c : cands) {
        if (static_cast<int>(kept.size()) >= R - 1) break;
        const float* crow = cand_f32.data() + static_cast<std::size_t>(c.id) * dim_;
        bool occluded = false;
        for (uint32_t r : kept_pos) {
          const float* rrow = cand_f32.data() + static_cast<std::size_t>(r) * dim_;
          const float d2 =
              cand_norm[r] + cand_norm[c.id] - 2 * DotRow(rrow, crow, dim_, DType::kF32);
          if (-kPruneAlpha2 * d2 > c.score) {
            occluded = true;
            break;
          }
        }
        if (occluded) continue;
        kept_pos.push_back(c.id);
        kept.push_back(pool[c.id].id);
        kept_f32.emplace_back(crow, crow + dim_);
      }
      std::copy(kept.begin(), kept.end(), Links(j));  // and j - 1 -> j, the implicit chain
      // Reverse links from the keys that score highest with the new key (the pool, by q.k):
      // a query that likes this key's direction ends its search among them.
      const int rev = std::min<int>(kReverseLinks, static_cast<int>(pool.size()));
      for (int i = 0; i < rev; ++i) {
        const uint32_t c = pool[i].id;
        uint32_t* other = Links(c);
        if (c + 1 == j ||
            std::find(other, other + R - 1, static_cast<uint32_t>(j)) != other + R - 1)
          continue;
        uint32_t* free_slot = std::find(other, other + R - 1, kNone);
        if (free_slot != other + R - 1) {
          *free_slot = static_cast<uint32_t>(j);
          continue;
        }
        store.KeyF32(c, kc.data());
        const float mine = DotRow(kc.data(), store.key(j), dim_, t);
        int worst = -1;
        float worst_s = mine;
        for (int s = 0; s < R - 1; ++s) {
          const float v = DotRow(kc.data(), store.key(other[s]), dim_, t);
          if (v < worst_s) {
            worst_s = v;
            worst = s;
          }
        }
        if (worst >= 0) other[worst] = static_cast<uint32_t>(j);
      }
      linked_ = j + 1;
    }
  }

  IndexConfig config_;
  int dim_;
  int degree_;
  bool built_ = false;
  int64_t size_ = 0;
  int64_t linked_ = 0;             // rows [0, linked_) are in the graph, the rest is the tail
  std::vector<uint32_t> nbrs_;     // [linked_, degree_ - 1] stored links (Links); kNone: empty
  std::vector<uint32_t> entries_;  // popular keys [0, n_popular_), then spread pivots, row 0
  std::size_t n_popular_ = 0;
  std::vector<float> route_q_;        // [routes, dim] unit-length sampled queries
  std::vector<uint32_t> route_keys_;  // [routes, kRouteKeys] their top keys (kNone: none)
};

}  // namespace

absl::StatusOr<std::unique_ptr<KeyIndex>> MakeAttentionAwareIndex(const IndexConfig& config,
                                                                  int head_dim) {
  if (config.graph_degree < 2 || config.graph_query_sample <= 0 || config.graph_query_top <= 0 ||
      config.graph_default_beam < 0 || config.graph_tail < 0) {
    return absl::InvalidArgumentError(
        "attention-aware: need graph_degree >= 2, graph_query_sample > 0, graph_query_top > 0, "
        "graph_default_beam >= 0, graph_tail >= 0");
  }
  return std::unique_ptr<KeyIndex>(new AttentionAwareIndex(config, head_dim));
}

std::string AttentionAwareSearchSettings(const IndexConfig& c, int k, int effort) {
  return absl::StrCat("beam=", std::max(k, effort > 0                 ? effort
                                           : c.graph_default_beam > 0 ? c.graph_default_beam
                                                                      : 2 * k));
}

int64_t AttentionAwareBytesBound(const IndexConfig& c, int head_dim, int64_t rows) {
  const int64_t d = head_dim, key = 4 * d;  // indexes keep f32 keys
  (void)d;
  // Links (grown by 1.25x), entry list, routing queries (256 at most) and their 8 keys.
  return (5 * rows * (c.graph_degree - 1) * 4) / 4 + 4 + 2 * (rows + 64) * 4 + 256 * (key + 8 * 4);
}

}  // namespace kvrt::cpu_index

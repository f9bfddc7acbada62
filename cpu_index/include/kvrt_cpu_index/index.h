#pragma once
// One interface for every cold-key index kind (docs/architecture.md, Index kinds). An index covers
// the keys of one kv head of one (sequence, layer), which live in a HeadStore the index does not
// own: every call passes the store, so kinds that score against stored keys need no copy of them.
//
// Thread safety: Search is const and safe to call concurrently with other Search calls on the
// same index; Build and Add need exclusive access.
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvrt_cpu_index/cluster.h"
#include "kvrt_cpu_index/head_store.h"

namespace kvrt::cpu_index {

enum class IndexKind : int {
  kExact = 0,  // no index: the runtime attends every cold token
  kFlat = 1,
  kIvf = 2,
  kHnsw = 3,
  kLandmark = 4,
  kAttentionAware = 5,
  kCluster = 6,  // two-level cold tier, cluster.h
};

const char* IndexKindName(IndexKind kind);
absl::StatusOr<IndexKind> ParseIndexKind(std::string_view name);

struct IndexConfig {
  int num_threads = 0;  // parallel build; 0 = the current TBB arena's concurrency
  // ivf
  int ivf_nlist = 0;  // 0 = about 4 * sqrt(n) at build
  int ivf_default_nprobe = 16;
  // The default nprobe also grows until the probed lists hold this many keys per result wanted:
  // at k = 100 on 8K keys 16 lists hold more already; at k = 1000 it probes about 3000 keys
  // (measured: nprobe 16 returned 621 of 1000, recall 0.52; nprobe 128, ~2800 keys, 0.956).
  int ivf_default_keys_per_result = 3;
  // hnsw
  int hnsw_m = 16;
  int hnsw_ef_construction = 100;
  int hnsw_default_ef = 128;
  // landmark
  int landmark_block = 32;          // tokens per block
  int landmark_default_blocks = 0;  // 0 = enough blocks for 4 * k tokens
  // attention-aware
  int graph_degree = 32;          // out-links per key
  int graph_query_sample = 4096;  // prompt queries whose exact top keys seed the graph
  int graph_query_top = 64;       // top keys taken per sampled query
  int graph_default_beam = 0;     // 0 = 2 * k
  int graph_tail = 256;           // rows Add keeps in an exactly scanned tail before linking them
                                  // into the graph (0 = link at every Add)
  uint64_t seed = 42;
  // The cluster kind's summary scoring and estimate on the AMX tiles where they run (attention.h,
  // UseHostTiles; the runtime sets it from the model's q heads per kv head).
  bool host_tiles = false;
  ClusterConfig cluster;  // cluster (k = token budget floor, see cluster.h)
};

struct SearchParams {
  int k = 100;     // ids wanted
  int effort = 0;  // kind-specific (nprobe, ef, blocks, beam); 0 = the kind's default
  // The cluster kind with ClusterConfig::rescore_clusters: [clusters] 1 where a cluster's keys
  // are in fast memory, so that only those candidates are scored exactly (the others keep their
  // estimate); null = every candidate. An evaluation of a device pass over the page pool.
  const uint8_t* resident = nullptr;
};

struct SearchResult {
  std::vector<int64_t> ids;   // HeadStore rows, best first, at most k, no duplicates
  std::vector<float> scores;  // unscaled q.k of each id
  int64_t scanned = 0;        // keys scored (distance computations) by this search
  // Two-level kinds (KindDescriptor::estimates): the partial state estimated for the rows not in
  // ids (o f32 [dim] normalised, lse as for attention with the scale of the search); est_o empty
  // or est_lse = -inf: no estimate.
  std::vector<float> est_o;
  float est_lse = -std::numeric_limits<float>::infinity();
};

class KeyIndex {
 public:
  virtual ~KeyIndex() = default;
  virtual IndexKind kind() const = 0;

  // Builds over rows [0, store.size()). queries: f32 [n_queries, dim] from the prompt (the q
  // heads of this kv head's group), may be null; only kinds that use queries read them.
  virtual absl::Status Build(const HeadStore& store, const float* queries, int64_t n_queries) = 0;

  // Makes rows [size(), store.size()) searchable without a rebuild.
  virtual absl::Status Add(const HeadStore& store) = 0;

  // q: f32 [dim]. Returns the best rows by q.k that the kind finds at this effort.
  virtual absl::Status Search(const HeadStore& store, const float* q, const SearchParams& params,
                              SearchResult* out) const = 0;

  // GQA: the queries of one kv head's group, searched together. qs: f32 [nq, dim]; outs[i] is
  // query i's best rows (at most k, best first) among the keys the group search scored, each
  // scored by that query. outs[i].scanned = keys the group search scored (each key is read once
  // and scored by all nq queries). Kinds that share work across the group (attention-aware: one
  // traversal; landmark: one pass over the block bounds) override this; the default runs Search
  // once per query.
  virtual absl::Status SearchGroup(const HeadStore& store, const float* qs, int nq,
                                   const SearchParams& params, SearchResult* outs) const;

  // Kinds that lay the store out themselves (e.g. each cluster's rows contiguous): after Build or
  // Add, the permutation of the rows just covered: new row begin + i holds old row
  // begin + order[i]. The owner applies it to the store (HeadStore::PermuteRows) and to its
  // row-to-position map before the next Search. Default: none (false).
  virtual bool TakeRowOrder(int64_t* begin, std::vector<int64_t>* order) {
    (void)begin;
    (void)order;
    return false;
  }

  // Rows an Add over a store of `store_rows` would cover: all of them by default; a kind that
  // covers whole segments only (cluster) fewer, so that the owner does not ask it to refresh when
  // nothing new can be covered.
  virtual int64_t CoverableRows(int64_t store_rows) const { return store_rows; }

  virtual int64_t size() const = 0;             // rows covered
  virtual std::size_t MemoryBytes() const = 0;  // bytes held beyond the HeadStore
};

// Creates an empty index of `kind` (not kExact) for keys of `head_dim`.
absl::StatusOr<std::unique_ptr<KeyIndex>> MakeIndex(IndexKind kind, const IndexConfig& config,
                                                    int head_dim);

// The search settings a kind resolves for k and effort (0 = its default), in words, e.g.
// "nprobe=16+ (lists holding >= 3000 keys)" or "ef=1000": what a report prints, so that
// effort = 0 never hides what the default does at this k.
std::string SearchSettings(IndexKind kind, const IndexConfig& config, int k, int effort);

// An upper bound of MemoryBytes() of a `kind` index over `rows` keys of `head_dim` (built at once
// or grown by Adds, capacity growth included), so that a memory budget can be checked before the
// index grows (config.host_memory_limit). 0 for kExact and kFlat. tests/cpu_index checks the bound.
int64_t IndexBytesBound(IndexKind kind, const IndexConfig& config, int head_dim, int64_t rows);

// Exact top-k of scores[0, n) (ids are positions), best first; ties by lower id.
void TopK(const float* scores, int64_t n, int k, std::vector<int64_t>* ids,
          std::vector<float>* top_scores);

}  // namespace kvrt::cpu_index
